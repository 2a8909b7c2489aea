//! L1 follows Redis (issue 13, item 1, on a standalone Redis): two sidecars on one Redis; a
//! block that sidecar B holds in its L1 leaves it once Redis reports the key gone, whoever
//! removed it, and B's L1 is flushed when its invalidation stream is lost. Without this, B
//! served a deleted block for up to `l1_max_ttl` (30 s), longer than these tests wait.

mod support;

use std::time::Duration;

use kvshelf::client::{Client, Protocol};
use kvshelf::shelf::L1Coherence;
use kvshelf::store::block_key;
use kvshelf::{BlockHash, Namespace, PrefixHasher};
use support::{RedisServer, Sidecar, namespace, payload, redis_cli, sidecar_config};

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
    let blocks: Vec<_> = hs
        .iter()
        .enumerate()
        .map(|(i, h)| (*h, payload(ns, i as u8)))
        .collect();
    a.client(Protocol::Http, None)
        .put(&ns.label, &blocks, false)
        .await
        .unwrap();
    let c = b.client(Protocol::Http, None);
    assert_eq!(c.fetch(&ns.label, hs).await.unwrap().blocks.len(), hs.len());
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_unlinked_with_redis_cli_leaves_the_other_sidecars_l1() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start(&[]);
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

/// Sliding TTLs modify keys too (Redis reports them): a read must not evict what it reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_that_slide_the_ttl_keep_the_entries() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start(&[]);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_through_one_sidecar_empties_the_others_l1() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start(&[]);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_flushes_l1() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start(&[]);
    let ns = namespace("coh-restart");
    let (a, b) = two_sidecars(&redis, &ns).await;
    let hs = hashes(&ns, 2);
    let port = redis.port;
    tokio::time::timeout(TEST_LIMIT, async move {
        fill_b(&a, &b, &ns, &hs).await;
        // A restart without persistence: every block is gone, and no invalidation says so.
        drop(redis);
        let _restarted = RedisServer::start_on(port, &[]);
        until_miss(&b.client(Protocol::Http, None), &ns, &hs).await;
        while b.shelf.l1_coherence() != L1Coherence::Tracking {
            tokio::time::sleep(Duration::from_millis(10)).await; // reconnecting
        }
    })
    .await
    .expect("B served blocks of a Redis that restarted empty");
}
