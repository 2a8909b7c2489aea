//! A Redis that stalls or a reader that stalls never hangs a fetch: the review's deadlock
//! reproductions (issue 10, §1 and §2), end to end through the sidecar core on a real Redis.

mod support;

use std::time::Duration;

use kvshelf::admission::BodyKind;
use kvshelf::frame::EndReason;
use kvshelf::shelf::{Caller, FetchItem, FetchStream, Shelf};
use kvshelf::{BlockHash, Namespace, PrefixHasher};
use support::{RedisServer, Sidecar, namespace, payload, sidecar_config};

/// Fails the test instead of hanging it.
const TEST_LIMIT: Duration = Duration::from_secs(20);

/// Reads a fetch stream to its end: the payloads and the end reason.
async fn drain(mut s: FetchStream) -> (Vec<bytes::Bytes>, EndReason) {
    let mut blocks = Vec::new();
    loop {
        match s.recv().await.expect("a stream ends with an end item") {
            FetchItem::Block { payload, .. } => blocks.push(payload),
            FetchItem::End { reason, .. } => return (blocks, reason),
        }
    }
}

async fn fetch(
    shelf: &Shelf,
    ns: &Namespace,
    hashes: &[BlockHash],
) -> (Vec<bytes::Bytes>, EndReason) {
    let admission = shelf.admit(BodyKind::None, None).await.expect("admitted");
    let s = shelf
        .fetch(admission, &Caller::default(), &ns.label, hashes.to_vec())
        .await
        .expect("admitted");
    drain(s).await
}

fn hashes(ns: &Namespace, blocks: u32) -> Vec<BlockHash> {
    let tokens: Vec<u32> = (0..blocks * ns.block_size).collect();
    PrefixHasher::new(ns, None).hash_prefix(&tokens)
}

/// Overlapping and duplicate fetches while Redis is stopped (SIGSTOP: connections stay
/// open, nothing answers — a brownout) all end `backend_unavailable` within the fetch
/// timeout; once Redis is back they are served again. On the old single-flight, `[X, Y, Z]`
/// and `[X, Y]` (and `[X, X]`) waited for each other's abandoned loads forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_fetches_survive_a_redis_stall() {
    let redis = RedisServer::start(&[]);
    let ns = namespace("stall");
    let mut cfg = sidecar_config(Some(redis.url()), vec![ns.clone()]);
    cfg.server.fetch_timeout = Duration::from_millis(200);
    let side = Sidecar::start(cfg).await;
    let hs = hashes(&ns, 3);
    let (x, y, z) = (hs[0], hs[1], hs[2]);
    let blocks: Vec<_> = hs
        .iter()
        .enumerate()
        .map(|(i, h)| (*h, payload(&ns, i as u8)))
        .collect();
    // Put behind the sidecar's back, so that its L1 is cold and every fetch below goes to
    // the stopped Redis.
    kvshelf::RedisStore::new(kvshelf::StoreConfig {
        url: redis.url(),
        ..Default::default()
    })
    .unwrap()
    .put(&ns, &blocks)
    .await
    .unwrap();

    redis.signal("STOP");
    let lists: Vec<Vec<BlockHash>> = vec![
        vec![x, y, z],
        vec![x, y],
        vec![x, x],
        vec![y, x, y],
        vec![z],
    ];
    let outcome = tokio::time::timeout(TEST_LIMIT, async {
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let (shelf, ns, list) = (
                    side.shelf.clone(),
                    ns.clone(),
                    lists[i % lists.len()].clone(),
                );
                tokio::spawn(async move { fetch(&shelf, &ns, &list).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    })
    .await;
    redis.signal("CONT");
    for (blocks, reason) in outcome.expect("fetches hung while Redis was stalled") {
        assert!(blocks.is_empty());
        assert_eq!(reason, EndReason::BackendUnavailable);
    }

    let (blocks, reason) = tokio::time::timeout(TEST_LIMIT, fetch(&side.shelf, &ns, &[x, y, z, x]))
        .await
        .expect("hung after Redis came back");
    assert_eq!(
        reason,
        EndReason::Complete,
        "served again once Redis answers"
    );
    assert_eq!(
        blocks,
        vec![
            payload(&ns, 0),
            payload(&ns, 1),
            payload(&ns, 2),
            payload(&ns, 0)
        ]
    );
}

/// A fetch whose reader never reads holds its share of `fetch_memory_bytes`; other fetches
/// wait for room at most `fetch_timeout`, then fail open (counted), instead of forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_does_not_block_other_fetches() {
    let redis = RedisServer::start(&[]);
    let ns = namespace("budget");
    let mut cfg = sidecar_config(Some(redis.url()), vec![ns.clone()]);
    cfg.server.fetch_memory_bytes = ns.block_bytes();
    cfg.server.fetch_timeout = Duration::from_millis(200);
    let side = Sidecar::start(cfg).await;
    let hs = hashes(&ns, 2);
    let blocks: Vec<_> = hs
        .iter()
        .enumerate()
        .map(|(i, h)| (*h, payload(&ns, i as u8)))
        .collect();
    let admission = side.shelf.admit(BodyKind::None, None).await.unwrap();
    let mut batch = side.shelf.put_batch(&admission, &ns.label).unwrap();
    for (h, p) in blocks {
        batch.push(h, p).unwrap();
    }
    side.shelf
        .put(admission, &Caller::default(), batch, false)
        .await
        .unwrap();

    tokio::time::timeout(TEST_LIMIT, async {
        // Opened, never read: its first block holds the whole budget.
        let admission = side.shelf.admit(BodyKind::None, None).await.unwrap();
        let stalled = side
            .shelf
            .fetch(admission, &Caller::default(), &ns.label, vec![hs[0]])
            .await
            .unwrap();
        tokio::task::yield_now().await;
        let before = side.metric("kvshelf_fetch_budget_timeouts_total").await;
        let (blocks, reason) = fetch(&side.shelf, &ns, &hs[1..]).await;
        assert!(blocks.is_empty());
        assert_eq!(reason, EndReason::BackendUnavailable);
        assert_eq!(
            side.metric("kvshelf_fetch_budget_timeouts_total").await,
            before + 1.0
        );
        // The stalled reader goes away: its room comes back.
        drop(stalled);
        let (blocks, reason) = fetch(&side.shelf, &ns, &hs[1..]).await;
        assert_eq!(reason, EndReason::Complete);
        assert_eq!(blocks, vec![payload(&ns, 1)]);
    })
    .await
    .expect("a fetch waited forever for the memory budget");
}
