//! L1 follows Redis (issue 13, items 1 and 4, on a standalone Redis): two sidecars on one
//! Redis; a block that sidecar B holds in its L1 leaves it once Redis reports the key gone,
//! whoever or whatever removed it (a delete, a purge, expiry, eviction at `maxmemory`), B's
//! L1 is emptied when Redis is flushed or its invalidation stream is lost, and a block pinned
//! elsewhere stays pinned while B serves it from L1. Without tracking, B served a deleted
//! block for up to `l1_max_ttl` (30 s), longer than these tests wait.
//!
//! Each test runs on Redis and on Valkey (`…::redis`, `…::valkey`): Valkey's `CLIENT
//! TRACKING` must report the same changes.

mod support;

use std::time::Duration;

use kvshelf::client::{Client, Protocol};
use kvshelf::shelf::L1Coherence;
use kvshelf::store::block_key;
use kvshelf::{BlockHash, Namespace, PrefixHasher};
use redis::AsyncCommands;
use support::{
    RedisServer, Server, Sidecar, namespace, on_every_server, raw, redis_cli, sidecar_config,
};

const TEST_LIMIT: Duration = Duration::from_secs(20);

/// One test at a time: one of them frees its Redis's port and starts a new Redis on it,
/// which another test starting a Redis at that moment could take.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn hashes(ns: &Namespace, blocks: u32) -> Vec<BlockHash> {
    let tokens: Vec<u32> = (0..blocks * ns.block_size).map(|t| t * 5 + 1).collect();
    PrefixHasher::new(ns, None).hash_prefix(&tokens)
}

async fn two_sidecars(redis: &RedisServer, ns: &Namespace) -> (Sidecar, Sidecar) {
    let a = Sidecar::start(sidecar_config(Some(redis.url()), vec![ns.clone()])).await;
    let b = Sidecar::start(sidecar_config(Some(redis.url()), vec![ns.clone()])).await;
    assert_eq!(b.shelf.l1_coherence(), L1Coherence::Tracking);
    (a, b)
}

/// Puts `hs` through A, then reads them through B until B serves them from its L1 (no
/// Redis read): B's L1 holds them.
async fn fill_b(a: &Sidecar, b: &Sidecar, ns: &Namespace, hs: &[BlockHash]) {
    support::put_via_then_fetch_via(a, b, ns, hs).await;
    from_b_l1(b, ns, hs).await;
}

/// Fetches `hs` through B and checks every block came from B's L1.
async fn from_b_l1(b: &Sidecar, ns: &Namespace, hs: &[BlockHash]) {
    let reads = format!(
        "kvshelf_backend_block_reads_total{{namespace=\"{}\"}}",
        ns.label
    );
    let before = b.metric(&reads).await;
    let got = b
        .client(Protocol::Http, None)
        .fetch(&ns.label, hs)
        .await
        .unwrap();
    assert_eq!(got.blocks.len(), hs.len());
    assert_eq!(b.metric(&reads).await, before, "served from B's L1");
}

/// Fetches through `c` until the first block is a miss.
async fn until_miss(c: &Client, ns: &Namespace, hs: &[BlockHash]) {
    while !c
        .fetch(&ns.label, &hs[..1])
        .await
        .unwrap()
        .blocks
        .is_empty()
    {
        tokio::time::sleep(Duration::from_millis(5)).await; // the invalidation is on its way
    }
}

on_every_server!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_block_unlinked_with_redis_cli_leaves_the_other_sidecars_l1
);

async fn a_block_unlinked_with_redis_cli_leaves_the_other_sidecars_l1(server: Server) {
    let _serial = SERIAL.lock().await;
    let redis = server.start(&[]);
    let ns = namespace("coh-unlink");
    let (a, b) = two_sidecars(&redis, &ns).await;
    let hs = hashes(&ns, 2);
    tokio::time::timeout(TEST_LIMIT, async {
        fill_b(&a, &b, &ns, &hs).await;
        redis_cli(&redis.url(), &["UNLINK", &block_key(&ns.label, &hs[0])]).unwrap();
        until_miss(&b.client(Protocol::Http, None), &ns, &hs).await;
        // The other block was not touched: still served from B's L1.
        from_b_l1(&b, &ns, &hs[1..]).await;
    })
    .await
    .expect("B kept serving a block Redis no longer has");
}

on_every_server!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    reads_that_slide_the_ttl_keep_the_entries
);

/// Sliding TTLs modify keys too (Redis reports them): a read must not evict what it reads.
async fn reads_that_slide_the_ttl_keep_the_entries(server: Server) {
    let _serial = SERIAL.lock().await;
    let redis = server.start(&[]);
    let ns = namespace("coh-slide");
    let (a, b) = two_sidecars(&redis, &ns).await;
    let hs = hashes(&ns, 2);
    tokio::time::timeout(TEST_LIMIT, async {
        fill_b(&a, &b, &ns, &hs).await;
        // Read them from Redis through the library, which slides their TTLs.
        let store = kvshelf::RedisStore::new(kvshelf::StoreConfig {
            url: redis.url(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(store.get(&ns, &hs).await.unwrap().len(), 2); // GET + PEXPIRE per block
        let pttl = redis_cli(&redis.url(), &["PTTL", &block_key(&ns.label, &hs[0])]).unwrap();
        assert!(pttl.trim().parse::<i64>().unwrap() > 0);
        // Give B's follower time to see (and check) the invalidations, then read again.
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            from_b_l1(&b, &ns, &hs).await;
        }
    })
    .await
    .expect("timed out");
}

on_every_server!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_purge_through_one_sidecar_empties_the_others_l1
);

async fn a_purge_through_one_sidecar_empties_the_others_l1(server: Server) {
    let _serial = SERIAL.lock().await;
    let redis = server.start(&[]);
    let ns = namespace("coh-purge");
    let (a, b) = two_sidecars(&redis, &ns).await;
    let hs = hashes(&ns, 3);
    tokio::time::timeout(TEST_LIMIT, async {
        fill_b(&a, &b, &ns, &hs).await;
        assert_eq!(
            a.client(Protocol::Http, None)
                .purge(&ns.label)
                .await
                .unwrap()
                .deleted,
            3
        );
        let c = b.client(Protocol::Http, None);
        until_miss(&c, &ns, &hs).await;
        for h in &hs {
            assert!(c.fetch(&ns.label, &[*h]).await.unwrap().blocks.is_empty());
        }
    })
    .await
    .expect("B kept serving purged blocks");
}

on_every_server!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_redis_restart_flushes_l1
);

async fn a_redis_restart_flushes_l1(server: Server) {
    let _serial = SERIAL.lock().await;
    let redis = server.start(&[]);
    let ns = namespace("coh-restart");
    let (a, b) = two_sidecars(&redis, &ns).await;
    let hs = hashes(&ns, 2);
    let port = redis.port;
    tokio::time::timeout(TEST_LIMIT, async move {
        fill_b(&a, &b, &ns, &hs).await;
        // A restart without persistence: every block is gone, and no invalidation says so.
        drop(redis);
        let _restarted = server.start_on(port, &[]);
        until_miss(&b.client(Protocol::Http, None), &ns, &hs).await;
        while b.shelf.l1_coherence() != L1Coherence::Tracking {
            tokio::time::sleep(Duration::from_millis(10)).await; // reconnecting
        }
    })
    .await
    .expect("B served blocks of a Redis that restarted empty");
}

/// A writer A without L1 and a follower B with one (touching a block's Redis TTL at most once
/// per `touch_interval`): every L1 metric then counts B alone. The recorder is global to the
/// test process and the tests here run one at a time.
async fn writer_and_follower(
    redis: &RedisServer,
    ns: &Namespace,
    touch_interval: Duration,
) -> (Sidecar, Sidecar) {
    let mut a = sidecar_config(Some(redis.url()), vec![ns.clone()]);
    a.server.l1_bytes = 0;
    let mut b = sidecar_config(Some(redis.url()), vec![ns.clone()]);
    b.server.l1_touch_interval = touch_interval;
    let (a, b) = (Sidecar::start(a).await, Sidecar::start(b).await);
    assert_eq!(a.shelf.l1_coherence(), L1Coherence::NoL1);
    assert_eq!(b.shelf.l1_coherence(), L1Coherence::Tracking);
    (a, b)
}

/// Fetches each of `hs` through B until it is a miss.
async fn until_all_miss(b: &Sidecar, ns: &Namespace, hs: &[BlockHash]) {
    let c = b.client(Protocol::Http, None);
    for h in hs {
        until_miss(&c, ns, &[*h]).await;
    }
}

/// Waits until B's L1 toucher has sent `at_least` touches in all (it runs on its own).
async fn until_touched(b: &Sidecar, at_least: f64) {
    let sent = "kvshelf_l1_ttl_touches_total{result=\"sent\"}";
    while b.metric(sent).await < at_least {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A fence for B's invalidation stream: unlinks `fence` (held in B's L1) and waits until B
/// misses it. Redis reports changes in order on the one tracking connection and B handles
/// them in order, so every change made before the fence has been handled by then.
async fn fence(redis: &RedisServer, b: &Sidecar, ns: &Namespace, fence: BlockHash) {
    redis_cli(&redis.url(), &["UNLINK", &block_key(&ns.label, &fence)]).unwrap();
    until_miss(&b.client(Protocol::Http, None), ns, &[fence]).await;
}

fn evicted_keys(redis: &RedisServer) -> u64 {
    redis_cli(&redis.url(), &["INFO", "stats"])
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("evicted_keys:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("INFO stats has evicted_keys")
}

on_every_server!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_block_redis_evicts_at_maxmemory_leaves_the_other_sidecars_l1
);

async fn a_block_redis_evicts_at_maxmemory_leaves_the_other_sidecars_l1(server: Server) {
    let _serial = SERIAL.lock().await;
    // A few MiB of other keys push the blocks out. allkeys-lru: the filler needs no TTL,
    // and the least recently used keys, the blocks, go first (the EXISTS polls below do not
    // count as use).
    let redis = server.start(&["--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru"]);
    let ns = namespace("coh-evict");
    let (a, b) = writer_and_follower(&redis, &ns, Duration::from_secs(1)).await;
    let hs = hashes(&ns, 2);
    let invalidations = "kvshelf_l1_invalidations_total";
    tokio::time::timeout(TEST_LIMIT, async {
        fill_b(&a, &b, &ns, &hs).await;
        let before = b.metric(invalidations).await;
        let mut conn = raw(&redis.url()).await;
        let keys: Vec<String> = hs.iter().map(|h| block_key(&ns.label, h)).collect();
        let filler = vec![7u8; 64 << 10];
        let mut n = 0u32;
        while conn.exists::<_, u32>(&keys).await.unwrap() > 0 {
            for _ in 0..16 {
                let _: () = conn.set(format!("filler:{n}"), &filler).await.unwrap();
                n += 1;
            }
        }
        assert!(evicted_keys(&redis) >= 2, "Redis evicted the blocks");
        // Evicted, not deleted by anyone: Redis reports it like a delete, and B drops both.
        until_all_miss(&b, &ns, &hs).await;
        assert!(
            b.metric(invalidations).await >= before + 2.0,
            "B dropped them because Redis reported them, not for another reason"
        );
    })
    .await
    .expect("B kept serving blocks Redis had evicted");
}

on_every_server!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_block_that_expires_in_redis_leaves_the_other_sidecars_l1
);

async fn a_block_that_expires_in_redis_leaves_the_other_sidecars_l1(server: Server) {
    let _serial = SERIAL.lock().await;
    let redis = server.start(&[]);
    let ns = namespace("coh-expire");
    // One touch per block per hour: the touch of B's first L1 hit is the only one, so no
    // later hit can slide the TTL that the test shortens.
    let (a, b) = writer_and_follower(&redis, &ns, Duration::from_secs(3600)).await;
    let hs = hashes(&ns, 2);
    let invalidations = "kvshelf_l1_invalidations_total";
    tokio::time::timeout(TEST_LIMIT, async {
        fill_b(&a, &b, &ns, &hs).await; // its L1 hits queue one touch per block
        until_touched(&b, hs.len() as f64).await;
        let before = b.metric(invalidations).await;
        let key = block_key(&ns.label, &hs[0]);
        redis_cli(&redis.url(), &["PEXPIRE", &key, "50"]).unwrap();
        until_miss(&b.client(Protocol::Http, None), &ns, &hs).await;
        assert_eq!(
            redis_cli(&redis.url(), &["EXISTS", &key]).unwrap().trim(),
            "0"
        );
        assert!(b.metric(invalidations).await > before);
        // The other block did not expire: still served from B's L1.
        from_b_l1(&b, &ns, &hs[1..]).await;
    })
    .await
    .expect("B kept serving a block that expired in Redis");
}

on_every_server!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_flushdb_empties_the_other_sidecars_l1
);

async fn a_flushdb_empties_the_other_sidecars_l1(server: Server) {
    let _serial = SERIAL.lock().await;
    let redis = server.start(&[]);
    let ns = namespace("coh-flushdb");
    let (a, b) = writer_and_follower(&redis, &ns, Duration::from_secs(1)).await;
    let hs = hashes(&ns, 2);
    let flushes = "kvshelf_l1_flushes_total{reason=\"flushed_in_redis\"}";
    tokio::time::timeout(TEST_LIMIT, async {
        fill_b(&a, &b, &ns, &hs).await;
        let before = b.metric(flushes).await;
        // Redis names no keys for a flush: B must empty its whole L1.
        redis_cli(&redis.url(), &["FLUSHDB"]).unwrap();
        until_all_miss(&b, &ns, &hs).await;
        assert_eq!(b.metric(flushes).await, before + 1.0);
        assert_eq!(b.shelf.l1_coherence(), L1Coherence::Tracking);
    })
    .await
    .expect("B kept serving blocks of a flushed Redis");
}

on_every_server!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_block_pinned_elsewhere_stays_in_l1_and_stays_pinned
);

/// Pinning is a change Redis reports (`PERSIST`); the block is still there, so B keeps it,
/// and B's L1 hits slide TTLs with `PEXPIRE … XX`, which leaves a pinned block pinned.
async fn a_block_pinned_elsewhere_stays_in_l1_and_stays_pinned(server: Server) {
    let _serial = SERIAL.lock().await;
    let redis = server.start(&[]);
    let ns = namespace("coh-pin");
    // Every L1 hit is touched (at most once per millisecond).
    let (a, b) = writer_and_follower(&redis, &ns, Duration::from_millis(1)).await;
    let hs = hashes(&ns, 2); // hs[0] is pinned, hs[1] is the fence
    let key = block_key(&ns.label, &hs[0]);
    let sent = "kvshelf_l1_ttl_touches_total{result=\"sent\"}";
    tokio::time::timeout(TEST_LIMIT, async {
        fill_b(&a, &b, &ns, &hs).await;
        assert!(
            a.client(Protocol::Http, None)
                .pin(&ns.label, &hs[0], true)
                .await
                .unwrap()
        );
        fence(&redis, &b, &ns, hs[1]).await; // B has handled the PERSIST
        let touched = b.metric(sent).await;
        from_b_l1(&b, &ns, &hs[..1]).await;
        until_touched(&b, touched + 1.0).await;
        let pttl = redis_cli(&redis.url(), &["PTTL", &key]).unwrap();
        assert_eq!(
            pttl.trim(),
            "-1",
            "still pinned after B's L1 hit was touched"
        );
        from_b_l1(&b, &ns, &hs[..1]).await;
    })
    .await
    .expect("timed out");
}
