//! The block data path against a real Redis: values that are not blocks are misses for
//! their block alone, on the lean RESP path (`src/resp.rs`) and on redis-rs (RESP3 URLs,
//! TLS, Cluster); the lean pool resends on a newly dialled connection after a restart, and
//! paces its reconnects in a brownout.

mod support;

use std::time::Duration;

use kvshelf::client::Protocol;
use kvshelf::frame::EndReason;
use kvshelf::store::{PinOutcome, PutResult, block_key};
use kvshelf::{BlockHash, Namespace, PrefixHasher, RedisStore, StoreConfig};
use redis::AsyncCommands;
use support::{
    RedisServer, Sidecar, namespace, payload, raw, redis_cli, redis_url, sidecar_config, store_with,
};

/// Every call in these tests answers well within this, or the test fails.
const WITHIN: Duration = Duration::from_secs(20);

fn hashes(ns: &Namespace, blocks: usize) -> Vec<BlockHash> {
    PrefixHasher::new(ns, None).hash_prefix(&(0..blocks as u32 * ns.block_size).collect::<Vec<_>>())
}

/// The shared Redis through the lean path, and through redis-rs (a RESP3 URL is one the
/// lean path does not take).
fn both_paths() -> [(&'static str, String); 2] {
    let url = redis_url();
    [
        ("lean", url.clone()),
        (
            "redis-rs",
            format!("{}/?protocol=resp3", url.trim_end_matches('/')),
        ),
    ]
}

/// Puts three blocks of `ns` and returns their hashes and payloads.
async fn three_blocks(s: &RedisStore, ns: &Namespace) -> Vec<(BlockHash, bytes::Bytes)> {
    let blocks: Vec<_> = hashes(ns, 3)
        .into_iter()
        .enumerate()
        .map(|(i, h)| (h, payload(ns, i as u8)))
        .collect();
    s.put(ns, &blocks).await.unwrap();
    blocks
}

async fn make_list(url: &str, key: &str) {
    let mut c = raw(url).await;
    let _: () = c.del(key).await.unwrap();
    let _: () = c.rpush(key, &["not", "a", "block"]).await.unwrap();
}

async fn exists(url: &str, key: &str) -> bool {
    raw(url).await.exists(key).await.unwrap()
}

#[tokio::test]
async fn a_key_holding_another_type_is_a_corrupt_miss_for_that_block_alone() {
    tokio::time::timeout(WITHIN, async {
        for (path, url) in both_paths() {
            let ns = namespace("wrongtype");
            let s = store_with(StoreConfig {
                url: url.clone(),
                ..Default::default()
            });
            let blocks = three_blocks(&s, &ns).await;
            let hs: Vec<_> = blocks.iter().map(|b| b.0).collect();
            let key = block_key(&ns.label, &hs[1]);

            // The store: the blocks around it are served, it is a miss and is deleted.
            make_list(&url, &key).await;
            let got = s
                .get(&ns, &hs)
                .await
                .unwrap_or_else(|e| panic!("{path}: {e}"));
            let served: Vec<_> = got
                .iter()
                .map(|h| h.as_ref().map(|h| h.block.payload.clone()))
                .collect();
            assert_eq!(
                served,
                vec![Some(blocks[0].1.clone()), None, Some(blocks[2].1.clone())],
                "{path}"
            );
            assert!(!exists(&url, &key).await, "{path}: the list is deleted");

            // Through a sidecar: the fetch serves block 0 and ends in a miss (not
            // backend_unavailable), counted as a corrupt block.
            make_list(&url, &key).await;
            let side = Sidecar::start(sidecar_config(Some(url.clone()), vec![ns.clone()])).await;
            let series = "kvshelf_store_corrupt_blocks_total{reason=\"wrong_type\"}";
            let before = side.metric(series).await;
            let fetched = side
                .client(Protocol::Http, None)
                .fetch(&ns.label, &hs)
                .await
                .unwrap();
            assert_eq!(fetched.blocks, blocks[..1].to_vec(), "{path}");
            assert_eq!(fetched.reason, EndReason::Miss, "{path}");
            assert_eq!(side.metric(series).await, before + 1.0, "{path}");
            assert!(!exists(&url, &key).await, "{path}: the list is deleted");
        }
    })
    .await
    .expect("the test finishes in time");
}

#[tokio::test]
async fn a_value_longer_than_any_block_is_a_corrupt_miss_and_is_not_read_whole() {
    tokio::time::timeout(WITHIN, async {
        for (path, url) in both_paths() {
            let ns = namespace("oversized");
            let s = store_with(StoreConfig {
                url: url.clone(),
                ..Default::default()
            });
            let blocks = three_blocks(&s, &ns).await;
            let hs: Vec<_> = blocks.iter().map(|b| b.0).collect();
            let key = block_key(&ns.label, &hs[1]);
            // One byte more than the longest value a block of `ns` can be: the lean path
            // refuses it from its length prefix.
            let too_long =
                vec![b'x'; ns.block_bytes() as usize + kvshelf::codec::MAX_HEADER_LEN + 1];
            let _: () = raw(&url).await.set(&key, too_long).await.unwrap();

            let got = s
                .get(&ns, &hs)
                .await
                .unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(
                got[0].as_ref().map(|h| &h.block.payload),
                Some(&blocks[0].1),
                "{path}"
            );
            assert!(got[1].is_none(), "{path}");
            // The block behind the oversized one on the same pipeline is sent again and
            // served as usual (docs/format.md), in this same call.
            assert_eq!(
                got[2].as_ref().map(|h| &h.block.payload),
                Some(&blocks[2].1),
                "{path}: the block after the oversized one"
            );
            assert!(!exists(&url, &key).await, "{path}: the value is deleted");
            // The lean path dropped that connection without reading the rest of the
            // pipeline; the next read is whole again.
            let again = s.get(&ns, &hs).await.unwrap();
            assert!(
                again[0].is_some() && again[1].is_none() && again[2].is_some(),
                "{path}"
            );
        }
    })
    .await
    .expect("the test finishes in time");
}

/// `INFO` field of a Redis, as a number.
fn info(url: &str, section: &str, field: &str) -> u64 {
    let text = redis_cli(url, &["INFO", section]).expect("redis answers INFO");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in INFO {section}"))
}

/// Makes `s` hold `n` idle connections: `n` puts wait behind `CLIENT PAUSE … WRITE` until
/// Redis sees all `n` connections, then Redis resumes and each gives its connection back.
async fn warm(server: &RedisServer, s: &RedisStore, ns: &Namespace, n: usize) {
    let url = server.url();
    let before = info(&url, "clients", "connected_clients");
    assert_eq!(
        redis_cli(&url, &["CLIENT", "PAUSE", "10000", "WRITE"])
            .as_deref()
            .map(str::trim),
        Some("OK")
    );
    let puts: Vec<_> = hashes(ns, n)
        .into_iter()
        .map(|h| {
            let (s, ns) = (s.clone(), ns.clone());
            tokio::spawn(async move { s.put(&ns, &[(h, payload(&ns, 0))]).await })
        })
        .collect();
    while info(&url, "clients", "connected_clients") < before + n as u64 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        redis_cli(&url, &["CLIENT", "UNPAUSE"])
            .as_deref()
            .map(str::trim),
        Some("OK")
    );
    for p in puts {
        p.await.unwrap().expect("the warm-up puts land");
    }
}

#[tokio::test]
async fn after_a_restart_the_resend_goes_on_a_newly_dialled_connection() {
    tokio::time::timeout(WITHIN, async {
        let server = RedisServer::start(&[]);
        let port = server.port;
        let ns = namespace("restart");
        let store = |retries| {
            store_with(StoreConfig {
                url: server.url(),
                command_retries: retries,
                ..Default::default()
            })
        };
        let (resends, fails) = (store(1), store(0));
        // Several idle connections each: after the restart all of them are dead.
        warm(&server, &resends, &ns, 4).await;
        warm(&server, &fails, &ns, 4).await;

        drop(server);
        let server = RedisServer::start_on(port, &[]);
        let hs = hashes(&ns, 2);

        // command_retries = 1: the first call's pooled connection is dead, the resend goes on
        // a new one (not on the next dead idle one) and succeeds.
        assert_eq!(resends.lookup(&ns, &hs).await.unwrap(), 0);
        // command_retries = 0: the first call fails, and drops its dead siblings with it, so
        // the next call dials.
        let err = fails.lookup(&ns, &hs).await.unwrap_err();
        assert!(err.is_unavailable(), "{err:?}");
        assert_eq!(fails.lookup(&ns, &hs).await.unwrap(), 0);
        assert_eq!(resends.lookup(&ns, &hs).await.unwrap(), 0);
        drop(server);
    })
    .await
    .expect("the test finishes in time");
}

#[tokio::test]
async fn in_a_brownout_timeouts_do_not_make_every_call_reconnect() {
    tokio::time::timeout(WITHIN, async {
        let server = RedisServer::start(&[]);
        let url = server.url();
        let ns = namespace("brownout");
        let (burst, rate) = (4u64, 5u32);
        let s = store_with(StoreConfig {
            url: url.clone(),
            response_timeout: Duration::from_millis(50),
            max_connections: burst as usize,
            connect_rate: rate,
            ..Default::default()
        });
        warm(&server, &s, &ns, 1).await;

        // Writes hang (a brownout as the data path sees it): every put times out, and each
        // timeout costs the connection it was using.
        let before = info(&url, "stats", "total_connections_received");
        assert_eq!(
            redis_cli(&url, &["CLIENT", "PAUSE", "10000", "WRITE"]).as_deref().map(str::trim),
            Some("OK")
        );
        let started = tokio::time::Instant::now();
        let calls = 40;
        for h in hashes(&ns, calls) {
            let err = s.put(&ns, &[(h, payload(&ns, 1))]).await.unwrap_err();
            assert!(err.is_unavailable(), "{err:?}");
        }
        let elapsed = started.elapsed();
        assert_eq!(
            redis_cli(&url, &["CLIENT", "UNPAUSE"]).as_deref().map(str::trim),
            Some("OK")
        );
        // Connections Redis accepted meanwhile, less redis-cli's PAUSE, UNPAUSE and INFO.
        let dials = info(&url, "stats", "total_connections_received") - before - 3;
        let allowed = burst + (rate as f64 * elapsed.as_secs_f64()).ceil() as u64 + 1;
        assert!(
            dials <= allowed,
            "{dials} connections in {elapsed:?}: at most {allowed} (a burst of {burst}, then {rate}/s)"
        );
        assert!(dials < calls as u64 / 2, "{dials} connections for {calls} timed-out calls");

        // Redis is back: calls go through again, on as few new connections as they need.
        let h = hashes(&ns, calls + 1)[calls];
        let mut attempts = 0;
        while s.put(&ns, &[(h, payload(&ns, 2))]).await.is_err() {
            attempts += 1;
            assert!(attempts < 100, "puts never resumed");
            // Waiting for the pacer's next dial (1/rate at most).
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(server);
    })
    .await
    .expect("the test finishes in time");
}

/// A store that reaches a fresh Redis through a proxy the test controls (it can drop the
/// reply of one command), and a namespace `label`.
async fn behind_a_proxy(label: &str) -> (RedisServer, support::Proxy, Namespace, RedisStore) {
    let server = RedisServer::start(&[]);
    let proxy = support::Proxy::start(server.port).await;
    let s = store_with(StoreConfig {
        url: proxy.url(),
        ..Default::default()
    });
    (server, proxy, namespace(label), s)
}

/// Issue 18 §2: a command that ran but whose reply was lost (its connection broke) is
/// resent on a new connection; the outcome reported is the first sending's, not the
/// resend's. A put whose `SET NX` ran reports `stored` (the resend alone said "not set").
#[tokio::test]
async fn a_put_whose_reply_was_lost_reports_stored() {
    tokio::time::timeout(WITHIN, async {
        let (_server, proxy, ns, s) = behind_a_proxy("lost-put").await;
        let hs = hashes(&ns, 2);
        s.ping().await.unwrap();
        proxy.drop_reply_to(b"NX");
        let blocks = vec![(hs[0], payload(&ns, 1)), (hs[1], payload(&ns, 2))];
        assert_eq!(
            s.put(&ns, &blocks).await.unwrap(),
            vec![PutResult::Stored, PutResult::Stored],
            "the first sending stored them"
        );
        // Someone else's bytes are still told apart: a block already there is not ours.
        assert_eq!(
            s.put(&ns, &blocks[..1]).await.unwrap(),
            vec![PutResult::AlreadyPresent]
        );
        proxy.drop_reply_to(b"NX");
        let other = vec![(hs[0], payload(&ns, 9))];
        assert_eq!(
            s.put(&ns, &other).await.unwrap(),
            vec![PutResult::AlreadyPresent],
            "another writer's block, resent or not"
        );
    })
    .await
    .expect("the test finishes in time");
}

/// A pin whose record (`HSETNX`) ran but whose reply was lost still passes the pin cap:
/// the resent `HSETNX` answers "already recorded", which used to skip the check and pin
/// past `max_pinned_bytes`.
#[tokio::test]
async fn a_pin_whose_record_reply_was_lost_still_passes_the_cap() {
    tokio::time::timeout(WITHIN, async {
        let (_server, proxy, ns, s) = behind_a_proxy("lost-pin").await;
        let hs = hashes(&ns, 2);
        let blocks = vec![(hs[0], payload(&ns, 1)), (hs[1], payload(&ns, 2))];
        s.put(&ns, &blocks).await.unwrap();
        let cap = ns.block_bytes();
        assert!(matches!(
            s.pin_within(&ns, &hs[0], cap).await.unwrap(),
            PinOutcome::Pinned { .. }
        ));
        proxy.drop_reply_to(b"HSETNX");
        let second = s.pin_within(&ns, &hs[1], cap).await.unwrap();
        assert!(
            matches!(second, PinOutcome::OverLimit { .. }),
            "one block fits the cap: {second:?}"
        );
        assert_eq!(
            s.ttl(&ns.label, &hs[1]).await.unwrap().map(|t| t.is_some()),
            Some(true)
        );
        assert_eq!(s.pinned_bytes(&ns).await.unwrap(), cap);
    })
    .await
    .expect("the test finishes in time");
}

/// A delete whose `UNLINK` ran but whose reply was lost: the resend finds the block gone.
/// The block is gone either way (what a delete promises); the count says 0, short by the
/// one block the first sending deleted, as docs/operations.md ("A command sent twice")
/// says, where a count that claimed certainty would be a lie either way.
#[tokio::test]
async fn a_delete_whose_reply_was_lost_removes_the_block_and_may_count_short() {
    tokio::time::timeout(WITHIN, async {
        let (_server, proxy, ns, s) = behind_a_proxy("lost-unlink").await;
        let hs = hashes(&ns, 2);
        let blocks = vec![(hs[0], payload(&ns, 1)), (hs[1], payload(&ns, 2))];
        s.put(&ns, &blocks).await.unwrap();
        proxy.drop_reply_to(b"UNLINK");
        assert_eq!(s.delete(&ns.label, &hs[..1]).await.unwrap(), 0);
        assert!(s.get(&ns, &hs[..1]).await.unwrap()[0].is_none(), "deleted");
        // Without a lost reply the count is exact.
        assert_eq!(s.delete(&ns.label, &hs[1..]).await.unwrap(), 1);
        assert_eq!(s.delete(&ns.label, &hs[1..]).await.unwrap(), 0);
    })
    .await
    .expect("the test finishes in time");
}
