//! L1 hits slide the block's TTL in Redis, as Redis reads do (issue 13, item 2): batched and
//! off the request path, at most once per block per `l1_touch_interval`, and a pinned block
//! served from L1 stays pinned.

mod support;

use std::time::Duration;

use kvshelf::client::Protocol;
use kvshelf::store::block_key;
use kvshelf::{BlockHash, Namespace, PrefixHasher};
use redis::AsyncCommands;
use support::{Sidecar, namespace, payload, raw, redis_url, sidecar_config};

const TEST_LIMIT: Duration = Duration::from_secs(30);
/// What the tests shorten a key's TTL to; the namespace TTL (the store's default, 1 h) is
/// far above it, so a slid TTL is unmistakable.
const SHORT_MS: i64 = 5_000;

async fn sidecar(ns: &Namespace, touch_interval: Duration) -> Sidecar {
    let mut cfg = sidecar_config(Some(redis_url()), vec![ns.clone()]);
    cfg.server.l1_touch_interval = touch_interval;
    Sidecar::start(cfg).await
}

/// A sidecar with `l1_touch_interval`, and two blocks put through it (so in its L1).
async fn sidecar_holding_two_blocks(
    ns: &Namespace,
    touch_interval: Duration,
) -> (Sidecar, Vec<BlockHash>) {
    let side = sidecar(ns, touch_interval).await;
    let hs = hashes(ns, 2);
    let blocks: Vec<_> = hs
        .iter()
        .enumerate()
        .map(|(i, h)| (*h, payload(ns, i as u8)))
        .collect();
    side.client(Protocol::Http, None)
        .put(&ns.label, &blocks, false)
        .await
        .unwrap();
    (side, hs)
}

fn hashes(ns: &Namespace, blocks: u32) -> Vec<BlockHash> {
    let tokens: Vec<u32> = (0..blocks * ns.block_size).map(|t| t * 7 + 3).collect();
    PrefixHasher::new(ns, None).hash_prefix(&tokens)
}

async fn pttl(conn: &mut redis::aio::MultiplexedConnection, ns: &Namespace, h: &BlockHash) -> i64 {
    conn.pttl(block_key(&ns.label, h)).await.unwrap()
}

async fn shorten(conn: &mut redis::aio::MultiplexedConnection, ns: &Namespace, h: &BlockHash) {
    let set: bool = conn
        .pexpire(block_key(&ns.label, h), SHORT_MS)
        .await
        .unwrap();
    assert!(set);
}

/// Fetches `h` through the sidecar and checks it came from L1, not from Redis.
async fn l1_hit(side: &Sidecar, ns: &Namespace, h: BlockHash, seed: u8) {
    let reads = format!(
        "kvshelf_backend_block_reads_total{{namespace=\"{}\"}}",
        ns.label
    );
    let before = side.metric(&reads).await;
    let got = side
        .client(Protocol::Http, None)
        .fetch(&ns.label, &[h])
        .await
        .unwrap();
    assert_eq!(got.blocks.len(), 1);
    assert_eq!(got.blocks[0].1, payload(ns, seed));
    assert_eq!(
        side.metric(&reads).await,
        before,
        "served from L1, not Redis"
    );
}

/// Waits until the key's TTL is back above what the test shortened it to.
async fn wait_slid(conn: &mut redis::aio::MultiplexedConnection, ns: &Namespace, h: &BlockHash) {
    while pttl(conn, ns, h).await <= SHORT_MS {
        tokio::time::sleep(Duration::from_millis(10)).await; // the toucher runs on its own
    }
}

#[tokio::test]
async fn an_l1_hit_slides_the_redis_ttl_at_most_once_per_interval() {
    tokio::time::timeout(TEST_LIMIT, async {
        let ns = namespace("l1-ttl");
        // A long interval: the second hit below falls inside it.
        let (side, hs) = sidecar_holding_two_blocks(&ns, Duration::from_secs(3600)).await;
        let mut conn = raw(&redis_url()).await;

        shorten(&mut conn, &ns, &hs[0]).await;
        l1_hit(&side, &ns, hs[0], 0).await;
        wait_slid(&mut conn, &ns, &hs[0]).await;
        assert!(
            pttl(&mut conn, &ns, &hs[0]).await > 3_000_000,
            "back to the namespace's 1 h"
        );

        // Within the interval a second hit does not touch it again. Block 1's first hit,
        // queued after it, shows when the toucher has seen both.
        shorten(&mut conn, &ns, &hs[0]).await;
        shorten(&mut conn, &ns, &hs[1]).await;
        l1_hit(&side, &ns, hs[0], 0).await;
        l1_hit(&side, &ns, hs[1], 1).await;
        wait_slid(&mut conn, &ns, &hs[1]).await;
        assert!(
            pttl(&mut conn, &ns, &hs[0]).await <= SHORT_MS,
            "touched twice in one interval"
        );
    })
    .await
    .expect("an L1 hit never slid the TTL");
}

#[tokio::test]
async fn a_pinned_block_served_from_l1_stays_pinned() {
    tokio::time::timeout(TEST_LIMIT, async {
        let ns = namespace("l1-pin");
        let (side, hs) = sidecar_holding_two_blocks(&ns, Duration::from_millis(1)).await;
        let c = side.client(Protocol::Http, None);
        assert!(c.pin(&ns.label, &hs[0], true).await.unwrap());
        // The pin dropped the L1 copy: one fetch reads it from Redis into L1 (pinned, no
        // TTL), the next is an L1 hit.
        c.fetch(&ns.label, &hs[..1]).await.unwrap();
        l1_hit(&side, &ns, hs[0], 0).await;
        // An unpinned block's hit queued after it: once its TTL has slid, the pinned
        // block's touch has been sent too.
        let mut conn = raw(&redis_url()).await;
        shorten(&mut conn, &ns, &hs[1]).await;
        l1_hit(&side, &ns, hs[1], 1).await;
        wait_slid(&mut conn, &ns, &hs[1]).await;
        assert_eq!(pttl(&mut conn, &ns, &hs[0]).await, -1, "still pinned");
    })
    .await
    .expect("an L1 hit never slid the TTL");
}
