//! Fail-open that recovers (issue 17 §3, and the tracking heartbeat): big blocks get time
//! for their bytes, a fetch cut off by its deadline does not cost Redis a connection, a
//! tracking connection cut silently is noticed, and a follower that falls behind flushes.
//! Each against a real `redis-server` of its own (they pause or cut it).

mod support;

use std::time::{Duration, Instant};

use kvshelf::admission::BodyKind;
use kvshelf::frame::EndReason;
use kvshelf::shelf::{Caller, FetchItem, L1Coherence, Shelf};
use kvshelf::{BlockHash, Dtype, Layout, Namespace, PrefixHasher, RedisStore, StoreConfig};
use redis::AsyncCommands;
use support::{Proxy, RedisServer, Sidecar, contains_bytes, namespace, payload, sidecar_config};

/// Fails the test instead of hanging it.
const TEST_LIMIT: Duration = Duration::from_secs(60);

async fn fetch(shelf: &Shelf, ns: &Namespace, hashes: &[BlockHash]) -> (usize, EndReason) {
    let admission = shelf.admit(BodyKind::None, None).await.expect("admitted");
    let mut s = shelf
        .fetch(admission, &Caller::default(), &ns.label, hashes.to_vec())
        .await
        .expect("a fetch");
    let mut blocks = 0;
    loop {
        match s.recv().await.expect("a stream ends with an end item") {
            FetchItem::Block { .. } => blocks += 1,
            FetchItem::End { reason, .. } => return (blocks, reason),
        }
    }
}

fn hashes(ns: &Namespace, blocks: u32) -> Vec<BlockHash> {
    let tokens: Vec<u32> = (0..blocks * ns.block_size).collect();
    PrefixHasher::new(ns, None).hash_prefix(&tokens)
}

/// 16 MiB blocks: 128 tokens of an 8B-class model (32 layers, 8 KV heads × 128, bf16).
fn big_namespace(test: &str) -> Namespace {
    Namespace {
        kv_dtype: Dtype::Bfloat16,
        layout: Layout {
            num_layers: 32,
            num_kv_heads: 8,
            head_dim: 128,
            tp_size: 1,
            tp_rank: 0,
            order: "lkthd".into(),
        },
        block_size: 128,
        ..namespace(test)
    }
}

async fn put(url: &str, ns: &Namespace, hs: &[BlockHash]) {
    let store = RedisStore::new(StoreConfig {
        url: url.into(),
        ..Default::default()
    })
    .unwrap();
    let blocks: Vec<_> = hs
        .iter()
        .enumerate()
        .map(|(i, h)| (*h, payload(ns, i as u8)))
        .collect();
    store.put(ns, &blocks).await.unwrap();
}

/// Holds every Redis client (this one's command returns at once) for `ms`.
async fn pause(redis: &mut redis::aio::MultiplexedConnection, ms: u64) {
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(ms)
        .arg("ALL")
        .query_async(redis)
        .await
        .unwrap();
}

async fn connections_received(redis: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(redis)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("INFO stats has total_connections_received")
}

/// A fetch's deadline grows with the bytes it asks for: a 16 MiB block whose Redis answers
/// after 300 ms is served, while a 1 KiB block that waits as long ends `backend_unavailable`
/// at its 100 ms. On the old code both had 100 ms, and every big block on a busy host failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_chunk_gets_time_for_its_bytes() {
    let redis = RedisServer::start(&[]);
    let (big, small) = (big_namespace("big"), namespace("small"));
    let mut cfg = sidecar_config(Some(redis.url()), vec![big.clone(), small.clone()]);
    cfg.server.l1_bytes = 0;
    cfg.server.fetch_timeout = Duration::from_millis(100);
    // 16 MiB at 8 MiB/s: 2 s more for the big block, 120 µs for the small one.
    cfg.server.fetch_min_bytes_per_second = 8 << 20;
    let side = Sidecar::start(cfg).await;
    let (hb, hs) = (hashes(&big, 1), hashes(&small, 1));
    put(&redis.url(), &big, &hb).await;
    put(&redis.url(), &small, &hs).await;
    let mut raw = support::raw(&redis.url()).await;
    // Connections dialled before the pause, so the pause holds replies, not dials.
    assert_eq!(
        fetch(&side.shelf, &big, &hb).await,
        (1, EndReason::Complete)
    );
    assert_eq!(
        fetch(&side.shelf, &small, &hs).await,
        (1, EndReason::Complete)
    );

    tokio::time::timeout(TEST_LIMIT, async {
        // Pauses of 1 s: far longer than the small block's deadline, even on a busy host.
        pause(&mut raw, 1000).await;
        assert_eq!(
            fetch(&side.shelf, &big, &hb).await,
            (1, EndReason::Complete),
            "a 16 MiB block gets 100 ms + its bytes at 8 MiB/s"
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        pause(&mut raw, 1000).await;
        let started = Instant::now();
        assert_eq!(
            fetch(&side.shelf, &small, &hs).await,
            (0, EndReason::BackendUnavailable)
        );
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
    })
    .await
    .expect("a fetch hung");
}

/// A fetch cut off by its deadline does not cost a connection: the late reply is read in
/// the background and the connection goes back to the pool. Redis's
/// `total_connections_received` stays put across five cut-off fetches (the old code closed
/// the connection each time and dialled a new one: Redis saw a reconnect, and an `AUTH`,
/// per fail-open timeout — in a brownout, that made things worse).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_cut_off_by_their_deadline_keep_their_connections() {
    let redis = RedisServer::start(&[]);
    let ns = namespace("drain");
    let mut cfg = sidecar_config(Some(redis.url()), vec![ns.clone()]);
    cfg.server.l1_bytes = 0;
    let side = Sidecar::start(cfg).await;
    let hs = hashes(&ns, 2);
    put(&redis.url(), &ns, &hs).await;
    let mut raw = support::raw(&redis.url()).await;
    tokio::time::timeout(TEST_LIMIT, async {
        assert_eq!(fetch(&side.shelf, &ns, &hs).await, (2, EndReason::Complete));
        let before = connections_received(&mut raw).await;
        for _ in 0..5 {
            pause(&mut raw, 1000).await;
            assert_eq!(
                fetch(&side.shelf, &ns, &hs).await,
                (0, EndReason::BackendUnavailable),
                "fails open at fetch_timeout"
            );
            tokio::time::sleep(Duration::from_millis(1200)).await;
            assert_eq!(fetch(&side.shelf, &ns, &hs).await, (2, EndReason::Complete));
        }
        let after = connections_received(&mut raw).await;
        assert_eq!(after, before, "no connection was dialled again");
    })
    .await
    .expect("a fetch hung");
}

/// A tracking connection cut silently (no FIN, no RST: a proxy stops forwarding it) is
/// noticed by its heartbeat: L1 is flushed, so a block deleted in Redis meanwhile is not
/// served from L1, and tracking starts again on a new connection. Before, nothing was ever
/// sent on it: `kvshelf_l1_tracking` stayed 1 and L1 served the deleted block until
/// `l1_max_ttl` (30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_cut_tracking_connection_is_noticed() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start(redis.port).await;
    let ns = namespace("heartbeat");
    let mut cfg = sidecar_config(Some(proxy.url()), vec![ns.clone()]);
    cfg.store.as_mut().unwrap().response_timeout = Duration::from_millis(500);
    let side = Sidecar::start(cfg).await;
    assert_eq!(side.shelf.l1_coherence(), L1Coherence::Tracking);
    let hs = hashes(&ns, 1);
    put(&redis.url(), &ns, &hs).await;
    tokio::time::timeout(TEST_LIMIT, async {
        assert_eq!(fetch(&side.shelf, &ns, &hs).await, (1, EndReason::Complete));
        let cut = proxy.blackhole(|sent| contains_bytes(sent, b"TRACKING"));
        assert_eq!(cut, 1, "one tracking connection");
        // Deleted behind the sidecar's back, its invalidation lost in the cut.
        let mut raw = support::raw(&redis.url()).await;
        let key = kvshelf::store::block_key(&ns.label, &hs[0]);
        let _: u64 = raw.unlink(&key).await.unwrap();
        let started = Instant::now();
        loop {
            if fetch(&side.shelf, &ns, &hs).await == (0, EndReason::Miss) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "L1 still serves a block deleted in Redis after a silent cut"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        while side.shelf.l1_coherence() != L1Coherence::Tracking {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "tracking never came back"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("hung");
}

/// A follower that falls behind (its `EXISTS` check stalled on a cut data connection while
/// thousands of block keys change) does not queue invalidations without bound: the stream
/// ends, L1 is flushed (`reason="invalidations_overflowed"`) and tracking starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_falls_behind_flushes_instead_of_queueing() {
    let redis = RedisServer::start(&[]);
    let proxy = Proxy::start(redis.port).await;
    let ns = namespace("behind");
    let mut cfg = sidecar_config(Some(proxy.url()), vec![ns.clone()]);
    // One data connection (the pacer's burst of two covers it and the tracking dial).
    let store = cfg.store.as_mut().unwrap();
    store.max_connections = 2;
    store.batch_connections = 1;
    let side = Sidecar::start(cfg).await;
    assert_eq!(side.shelf.l1_coherence(), L1Coherence::Tracking);
    let hs = hashes(&ns, 40);
    put(&redis.url(), &ns, &hs).await;
    let series = "kvshelf_l1_flushes_total{reason=\"invalidations_overflowed\"}";
    tokio::time::timeout(TEST_LIMIT, async {
        assert_eq!(
            fetch(&side.shelf, &ns, &hs).await,
            (40, EndReason::Complete)
        );
        assert_eq!(side.metric(series).await, 0.0);
        // The fetch slid the blocks' TTLs, which Redis reports as changes: let the follower
        // check those (on the healthy connection) before the cut, so that L1 still holds
        // the 40 blocks the flood below changes one by one.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(side.shelf.stats().await.l1_entries, 40);
        // The sidecar's one data connection goes silent; its tracking stays up.
        let cut = proxy.blackhole(|sent| !contains_bytes(sent, b"TRACKING"));
        assert!(cut >= 1);
        let mut raw = support::raw(&redis.url()).await;
        // Block keys change, one message each (Redis sends what changed in one event loop
        // turn as one message: one command per round trip). Every 50th change is a block
        // L1 holds, which the follower checks (EXISTS) on the cut connection, for up to 1 s
        // per batch: it takes ~256 messages a second while thousands arrive.
        let started = Instant::now();
        let mut i = 0usize;
        while side.metric(series).await < 1.0 {
            assert!(
                started.elapsed() < Duration::from_secs(40),
                "the follower never flushed for falling behind"
            );
            for _ in 0..500 {
                if i.is_multiple_of(50) && i / 50 < hs.len() {
                    let key = kvshelf::store::block_key(&ns.label, &hs[i / 50]);
                    let _: u64 = raw.unlink(&key).await.unwrap();
                }
                let _: () = raw
                    .set_ex(format!("kvshelf:v1:{}:flood-{i}", ns.label), "x", 60)
                    .await
                    .unwrap();
                i += 1;
            }
        }
    })
    .await
    .expect("hung");
}

async fn lookup_warm(shelf: &Shelf, ns: &Namespace, hs: &[BlockHash]) -> usize {
    let admission = shelf
        .admit(BodyKind::Control, None)
        .await
        .expect("admitted");
    shelf
        .lookup(
            admission,
            &Caller::default(),
            &ns.label,
            kvshelf::shelf::LookupInput::Hashes(hs.to_vec()),
            true,
        )
        .await
        .expect("a lookup")
        .hit_blocks
}

/// Issue 17 §4: a warm lookup answers without waiting for the warm. Here the warm cannot
/// even start (a fetch whose reader stalls holds the whole fetch budget): the lookup still
/// answers at once. Before, it waited for the warm's full fetch, up to its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_lookup_answers_without_waiting_for_the_warm() {
    let redis = RedisServer::start(&[]);
    let ns = namespace("warm-wait");
    let mut cfg = sidecar_config(Some(redis.url()), vec![ns.clone()]);
    cfg.server.fetch_memory_bytes = ns.block_bytes();
    cfg.server.fetch_timeout = Duration::from_secs(3);
    let side = Sidecar::start(cfg).await;
    let hs = hashes(&ns, 4);
    put(&redis.url(), &ns, &hs).await;
    tokio::time::timeout(TEST_LIMIT, async {
        // A reader that never reads: its first block holds the whole budget.
        let admission = side.shelf.admit(BodyKind::None, None).await.unwrap();
        let _stalled = side
            .shelf
            .fetch(admission, &Caller::default(), &ns.label, hs[..1].to_vec())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        assert_eq!(lookup_warm(&side.shelf, &ns, &hs[1..]).await, 3);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the lookup waited {:?} for its warm",
            started.elapsed()
        );
    })
    .await
    .expect("hung");
}

/// A warm lookup reads at most half of L1 (a longer prefix would evict its own first
/// blocks before they are fetched), and slides the Redis TTL of the blocks it finds in L1
/// already, as docs/api.md says a warm lookup does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_lookup_warms_at_most_half_of_l1_and_slides_l1_hits() {
    let redis = RedisServer::start(&[]);
    let ns = Namespace {
        ttl: Some(Duration::from_secs(100)),
        ..namespace("warm-half")
    };
    let mut cfg = sidecar_config(Some(redis.url()), vec![ns.clone()]);
    // Room for 8 blocks and their bookkeeping; a warm takes half: 6 blocks of 512 bytes.
    cfg.server.l1_bytes = 8 * (ns.block_bytes() + 256);
    let half = cfg.server.l1_bytes / 2 / ns.block_bytes();
    assert_eq!(half, 6);
    cfg.server.l1_touch_interval = Duration::from_millis(100);
    let side = Sidecar::start(cfg).await;
    let hs = hashes(&ns, 12);
    put(&redis.url(), &ns, &hs).await;
    let mut raw = support::raw(&redis.url()).await;
    let key0 = kvshelf::store::block_key(&ns.label, &hs[0]);
    tokio::time::timeout(TEST_LIMIT, async {
        // Block 0 in L1; its TTL then runs down in Redis.
        assert_eq!(fetch(&side.shelf, &ns, &hs[..1]).await, (1, EndReason::Complete));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let before: i64 = raw.pttl(&key0).await.unwrap();
        assert!(before < 99_000, "{before}");
        assert_eq!(lookup_warm(&side.shelf, &ns, &hs).await, 12);
        let started = Instant::now();
        loop {
            let stats = side.shelf.stats().await;
            let pttl: i64 = raw.pttl(&key0).await.unwrap();
            if stats.l1_entries == half && pttl > 99_000 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "L1 holds {} entries (want {half}: half of L1), block 0's TTL is {pttl} ms (want slid to ~100 s)",
                stats.l1_entries
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(side.shelf.stats().await.l1_entries, half, "no more than half of L1");
    })
    .await
    .expect("hung");
}

/// Issue 17 §4: a large JSON body (a long prompt's token ids: 4,096 blocks of 256 tokens,
/// ~8 MB) is parsed off the async worker it arrived on. On a one-thread runtime that also
/// runs the sidecar and this client, a 1 ms ticker records its longest gap while the lookup
/// is served; parsing the same body on this thread takes `parse`. Parsed inline, the
/// ticker would stand still for about `parse`; offloaded, its longest gap stays well below.
#[tokio::test(flavor = "current_thread")]
async fn parsing_a_large_json_body_leaves_the_async_worker_free() {
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Lookup {
        namespace: String,
        tokens: Vec<u32>,
    }
    let ns = Namespace {
        block_size: 256,
        ..namespace("json")
    };
    let sidecar = Sidecar::start(sidecar_config(None, vec![ns.clone()])).await;
    let tokens: Vec<u32> = (0..4096 * 256).map(|i| 1_000_000 + i).collect();
    let body =
        serde_json::to_vec(&serde_json::json!({"namespace": ns.label, "tokens": tokens})).unwrap();
    let started = Instant::now();
    let parsed: Lookup = serde_json::from_slice(&body).unwrap();
    let parse = started.elapsed();
    assert_eq!(parsed.tokens.len(), tokens.len());
    let longest = std::sync::Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let ticker = {
        let longest = longest.clone();
        tokio::spawn(async move {
            loop {
                let t = Instant::now();
                tokio::time::sleep(Duration::from_millis(1)).await;
                let gap = t.elapsed();
                let mut l = longest.lock().unwrap();
                *l = (*l).max(gap);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    *longest.lock().unwrap() = Duration::ZERO;
    let answer = tokio::time::timeout(TEST_LIMIT, async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
        let head = format!(
            "POST /v1/lookup HTTP/1.1\r\nhost: kvshelf\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.write_all(&body).await.unwrap();
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).await.unwrap();
        answer
    })
    .await
    .expect("hung");
    let gap = *longest.lock().unwrap();
    ticker.abort();
    let status = String::from_utf8_lossy(&answer[..answer.len().min(12)]).into_owned();
    assert_eq!(
        status,
        "HTTP/1.1 200",
        "{}",
        String::from_utf8_lossy(&answer[..answer.len().min(300)])
    );
    eprintln!("parsing alone: {parse:?}; the worker's longest stall while served: {gap:?}");
    assert!(
        parse >= Duration::from_millis(20),
        "too quick to tell: {parse:?}"
    );
    assert!(
        gap < parse / 2,
        "the worker stalled for {gap:?}; parsing the body takes {parse:?}"
    );
}

/// Issue 17 §4: hashing a long prompt (here 4,096 blocks of 256 tokens) does not stall the
/// async worker it was asked on: on a one-thread runtime, a ticker keeps ticking while the
/// sidecar hashes. Before, the hash ran on the worker and the ticker stood still.
#[tokio::test(flavor = "current_thread")]
async fn hashing_a_long_prompt_leaves_the_async_worker_free() {
    let ns = Namespace {
        block_size: 256,
        ..namespace("cpu")
    };
    // The embedded store: no Redis needed to hash.
    let shelf = Shelf::new(&sidecar_config(None, vec![ns.clone()])).unwrap();
    let tokens: Vec<u32> = (0..4096 * 256).collect();
    let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let ticker = {
        let ticks = ticks.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(1)).await;
                ticks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (started, before) = (
        Instant::now(),
        ticks.load(std::sync::atomic::Ordering::SeqCst),
    );
    let hashes = tokio::time::timeout(
        TEST_LIMIT,
        shelf.hash(&Caller::default(), &ns.label, tokens.clone(), Vec::new()),
    )
    .await
    .expect("hung")
    .unwrap();
    let (took, ticked) = (
        started.elapsed(),
        ticks.load(std::sync::atomic::Ordering::SeqCst) - before,
    );
    ticker.abort();
    assert_eq!(hashes, PrefixHasher::new(&ns, None).hash_prefix(&tokens));
    // A 1 ms ticker on a free worker ticks about every 2 ms; leave room for a busy host.
    let expected = (took.as_millis() as u64 / 10).max(1);
    assert!(
        ticked >= expected,
        "the worker stalled: {ticked} ticks in {took:?} of hashing"
    );
    eprintln!("hashed in {took:?}; {ticked} ticks meanwhile");
    assert!(
        took >= Duration::from_millis(20),
        "too quick to tell: {took:?}"
    );
}
