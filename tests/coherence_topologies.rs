//! L1 follows Redis on a Redis Cluster and through a Sentinel failover (issue 13, item 1:
//! "works on standalone, Cluster and Sentinel"): two sidecars, A without L1 (so the
//! process-wide metrics below are B's alone) and B with one. A block B holds in its L1
//! leaves it once the node that owns the block reports it gone; after a failover B's L1 is
//! flushed (the invalidation stream of the old primary is lost) and B tracks the new
//! primary.
//!
//! Each test runs on Redis and on Valkey (`…::redis`, `…::valkey`).

mod support;

use std::time::Duration;

use kvshelf::client::{Client, Protocol};
use kvshelf::config::Config;
use kvshelf::shelf::L1Coherence;
use kvshelf::store::block_key;
use kvshelf::{BlockHash, Namespace, PrefixHasher, RedisStore, StoreConfig};
use support::{
    RedisCluster, RedisSentinel, Server, Sidecar, namespace, on_every_server, redis_cli,
};

const TEST_LIMIT: Duration = Duration::from_secs(60);

/// One test at a time: the metrics are the process's, and B's counters must be B's.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn hashes(ns: &Namespace, blocks: u32) -> Vec<BlockHash> {
    let tokens: Vec<u32> = (0..blocks * ns.block_size).map(|t| t * 7 + 3).collect();
    PrefixHasher::new(ns, None).hash_prefix(&tokens)
}

fn config(store: StoreConfig, ns: &Namespace, l1: bool) -> Config {
    let mut cfg = support::sidecar_config(None, vec![ns.clone()]);
    cfg.store = Some(store);
    if !l1 {
        cfg.server.l1_bytes = 0;
    }
    cfg
}

/// Waits (bounded by the caller's timeout) until B tracks invalidations.
async fn until_tracking(b: &Sidecar) {
    while b.shelf.l1_coherence() != L1Coherence::Tracking {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Puts `hs` through A and reads them through B until B serves them all from its L1.
async fn fill_b(a: &Sidecar, b: &Sidecar, ns: &Namespace, hs: &[BlockHash]) {
    support::put_via_then_fetch_via(a, b, ns, hs).await;
    assert_eq!(from_b_l1(b, ns, hs).await, hs.len(), "all from B's L1");
}

/// Fetches `hs` one by one through B; how many came from B's L1 (no Redis read).
async fn from_b_l1(b: &Sidecar, ns: &Namespace, hs: &[BlockHash]) -> usize {
    let reads = format!(
        "kvshelf_backend_block_reads_total{{namespace=\"{}\"}}",
        ns.label
    );
    let c = b.client(Protocol::Http, None);
    let mut from_l1 = 0;
    for h in hs {
        let before = b.metric(&reads).await;
        let got = c.fetch(&ns.label, &[*h]).await.unwrap();
        if got.blocks.len() == 1 && b.metric(&reads).await == before {
            from_l1 += 1;
        }
    }
    from_l1
}

/// Fetches `h` through `c` until it is a miss.
async fn until_miss(c: &Client, ns: &Namespace, h: &BlockHash) {
    while !c.fetch(&ns.label, &[*h]).await.unwrap().blocks.is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

on_every_server!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    on_a_cluster_each_primary_reports_its_blocks_gone
);

async fn on_a_cluster_each_primary_reports_its_blocks_gone(server: Server) {
    let _serial = SERIAL.lock().await;
    let cluster = RedisCluster::start_on_server(server, 3, 0);
    let store = StoreConfig {
        url: cluster.url(),
        cluster: true,
        ..Default::default()
    };
    let ns = namespace("cohc-unlink");
    let a = Sidecar::start(config(store.clone(), &ns, false)).await;
    let b = Sidecar::start(config(store.clone(), &ns, true)).await;
    tokio::time::timeout(TEST_LIMIT, async {
        until_tracking(&b).await;
        let hs = hashes(&ns, 12);
        fill_b(&a, &b, &ns, &hs).await;
        let owners: Vec<usize> = hs
            .iter()
            .map(|h| cluster.owner(&block_key(&ns.label, h)).unwrap())
            .collect();
        // One block on each of two different primaries, unlinked behind kvshelf's back.
        let first = 0;
        let second = owners.iter().position(|o| *o != owners[first]).unwrap();
        let c = b.client(Protocol::Http, None);
        for i in [first, second] {
            cluster
                .cli(&["UNLINK", &block_key(&ns.label, &hs[i])])
                .unwrap();
            until_miss(&c, &ns, &hs[i]).await;
        }
        // The others were not touched: still served from B's L1.
        let rest: Vec<BlockHash> = (0..hs.len())
            .filter(|i| *i != first && *i != second)
            .map(|i| hs[i])
            .collect();
        assert_eq!(from_b_l1(&b, &ns, &rest).await, rest.len());

        // A purge through the library (what `kvshelf purge` runs): every primary reports
        // its blocks, B misses them all.
        let s = RedisStore::new(store.clone()).unwrap();
        s.purge(&ns.label).await.unwrap();
        for h in &rest {
            until_miss(&c, &ns, h).await;
        }
    })
    .await
    .expect("B kept serving blocks the cluster no longer has");
}

on_every_server!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    through_a_sentinel_failover_l1_is_flushed_then_follows_the_new_primary
);

async fn through_a_sentinel_failover_l1_is_flushed_then_follows_the_new_primary(server: Server) {
    let _serial = SERIAL.lock().await;
    let mut sentinel = RedisSentinel::start_on_server(server);
    let store = StoreConfig {
        url: sentinel.url(),
        connection_timeout: Duration::from_millis(300),
        response_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let ns = namespace("cohs-failover");
    let a = Sidecar::start(config(store.clone(), &ns, false)).await;
    let b = Sidecar::start(config(store.clone(), &ns, true)).await;
    tokio::time::timeout(TEST_LIMIT, async {
        until_tracking(&b).await;
        let hs = hashes(&ns, 4);
        fill_b(&a, &b, &ns, &hs).await;
        sentinel.wait_replicated(Duration::from_secs(10));
        let lost = "kvshelf_l1_flushes_total{reason=\"tracking_lost\"}";
        let flushes = b.metric(lost).await;

        let old = sentinel.kill_primary();
        // The old primary's stream is gone: B flushes its L1 at once.
        while b.metric(lost).await <= flushes {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let new = sentinel.wait_failover_from(old, Duration::from_secs(30));
        // B finds the new primary through the sentinels and tracks it.
        until_tracking(&b).await;
        let c = b.client(Protocol::Http, None);
        loop {
            // Fail open until the data path has found the new primary too.
            if c.fetch(&ns.label, &hs).await.unwrap().blocks.len() == hs.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(from_b_l1(&b, &ns, &hs).await, hs.len(), "L1 filled again");
        // And it follows the new primary's invalidations.
        let primary = sentinel.data[new].as_ref().unwrap();
        redis_cli(&primary.url(), &["UNLINK", &block_key(&ns.label, &hs[0])]).unwrap();
        until_miss(&c, &ns, &hs[0]).await;
        assert_eq!(from_b_l1(&b, &ns, &hs[1..]).await, hs.len() - 1);
    })
    .await
    .expect("B did not follow the failover");
}

on_every_server!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    one_dead_cluster_primary_costs_l1_only_its_own_slots
);

/// Issue 18 §1: one Cluster primary dies (no replica, `cluster-require-full-coverage no`):
/// the other primaries' streams go on, so their blocks stay in B's L1 and an UNLINK behind
/// kvshelf's back still reaches it; a block of the dead primary's slots is never served.
/// Before, `track()` failed for every primary as long as one was down: B's L1 kept
/// filling without any invalidation and served the unlinked block until `l1_max_ttl`.
async fn one_dead_cluster_primary_costs_l1_only_its_own_slots(server: Server) {
    let _serial = SERIAL.lock().await;
    let mut cluster = RedisCluster::start_on_server(server, 3, 0);
    let store = StoreConfig {
        url: cluster.url(),
        cluster: true,
        connection_timeout: Duration::from_millis(300),
        response_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let ns = namespace("cohc-dead-primary");
    let a = Sidecar::start(config(store.clone(), &ns, false)).await;
    let b = Sidecar::start(config(store.clone(), &ns, true)).await;
    tokio::time::timeout(TEST_LIMIT, async {
        until_tracking(&b).await;
        let hs = hashes(&ns, 24);
        fill_b(&a, &b, &ns, &hs).await;
        let owners: Vec<usize> = hs
            .iter()
            .map(|h| cluster.owner(&block_key(&ns.label, h)).unwrap())
            .collect();
        let dead = owners[0];
        let on = |pick: &dyn Fn(usize) -> bool| -> Vec<BlockHash> {
            (0..hs.len())
                .filter(|&i| pick(owners[i]))
                .map(|i| hs[i])
                .collect()
        };
        let of_dead = on(&|o| o == dead);
        let of_live = on(&|o| o != dead);
        assert!(
            of_live.len() >= 2,
            "blocks on the live primaries: {owners:?}"
        );

        cluster.stop(dead);
        cluster.wait_failed(dead);
        // B follows the two live primaries, not the dead one.
        while b.shelf.l1_coherence() != L1Coherence::Partial {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let c = b.client(Protocol::Http, None);
        // Blocks of the live primaries are served from B's L1 (read again if the loss of
        // the dead primary's stream raced their first read).
        for _ in 0..2 {
            let got = c.fetch(&ns.label, &of_live).await.unwrap();
            assert_eq!(got.blocks.len(), of_live.len());
        }
        assert_eq!(
            from_b_l1(&b, &ns, &of_live).await,
            of_live.len(),
            "the live primaries' blocks are in L1"
        );
        // An UNLINK on a live primary reaches B's L1.
        cluster
            .cli(&["UNLINK", &block_key(&ns.label, &of_live[0])])
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), until_miss(&c, &ns, &of_live[0]))
            .await
            .expect("B served a block a live primary had unlinked");
        assert_eq!(
            from_b_l1(&b, &ns, &of_live[1..]).await,
            of_live.len() - 1,
            "the other blocks stay in L1"
        );
        // The dead primary's blocks: never served (not from L1, and Redis cannot).
        for _ in 0..5 {
            for h in &of_dead {
                let got = c.fetch(&ns.label, &[*h]).await.unwrap();
                assert!(
                    got.blocks.is_empty(),
                    "a block of the dead primary was served"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("B did not keep following the live primaries");
}
