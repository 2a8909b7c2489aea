//! Redis at `maxmemory` under sustained puts: Redis evicts (volatile-lfu), the sidecar keeps
//! serving, and no key without a TTL ever exists — except the one an operator pinned, which
//! `volatile-*` never evicts.

mod support;

use kvshelf::client::Protocol;
use kvshelf::store::PutResult;
use kvshelf::{BlockHash, PrefixHasher};
use support::{RedisServer, Sidecar, namespace, payload, redis_cli, sidecar_config};

#[tokio::test]
async fn a_full_redis_evicts_and_the_sidecar_keeps_serving() {
    // 8 MiB of memory for blocks of 2 KiB (+ header): room for a few thousand.
    let redis = RedisServer::start(&["--maxmemory", "8mb", "--maxmemory-policy", "volatile-lfu"]);
    let mut ns = namespace("evict");
    ns.layout.head_dim = 32; // 2 layers x 2 x 4 tokens x 2 heads x 32 x 2 bytes = 2 KiB
    let side = Sidecar::start(sidecar_config(Some(redis.url()), vec![ns.clone()])).await;
    let c = side.client(Protocol::Http, None);
    let hasher = PrefixHasher::new(&ns, None);

    // A system prompt an operator pins: it must survive all the evictions.
    let pinned = hasher.hash_prefix(&[9, 9, 9, 9])[0];
    c.put(&ns.label, &[(pinned, payload(&ns, 9))], false)
        .await
        .unwrap();
    assert!(c.pin(&ns.label, &pinned, true).await.unwrap());

    // Inject: 20 MiB of puts into 8 MiB.
    let mut stored = 0;
    for batch in 0..40u32 {
        let tokens: Vec<u32> = (0..256 * ns.block_size)
            .map(|t| t + batch * 1_000_000)
            .collect();
        let blocks: Vec<(BlockHash, _)> = hasher
            .hash_prefix(&tokens)
            .into_iter()
            .map(|h| (h, payload(&ns, 1)))
            .collect();
        let out = c
            .put(&ns.label, &blocks, false)
            .await
            .expect("puts never error");
        stored += out.iter().filter(|o| **o == PutResult::Stored).count();
    }
    assert!(stored > 9000, "writes kept being accepted ({stored})");

    let info = redis_cli(&redis.url(), &["INFO", "stats"]).unwrap();
    let evicted: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("evicted_keys:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(evicted > 1000, "Redis evicted ({evicted})");

    // No key without a TTL but the pinned one.
    let keys = redis_cli(&redis.url(), &["--scan", "--pattern", "kvshelf:v1:*"]).unwrap();
    let keys: Vec<&str> = keys.lines().collect();
    assert!(keys.len() > 1000);
    let mut pipe = redis::pipe();
    for key in &keys {
        pipe.pttl(*key);
    }
    let pttls: Vec<i64> = pipe
        .query_async(&mut support::raw(&redis.url()).await)
        .await
        .unwrap();
    let persistent: Vec<String> = keys
        .iter()
        .zip(&pttls)
        .filter(|(_, t)| **t == -1)
        .map(|(k, _)| k.to_string())
        .collect();
    assert_eq!(
        persistent,
        vec![kvshelf::store::block_key(&ns.label, &pinned)]
    );

    // The sidecar still serves: the pinned block, and the most recent puts.
    let got = c.fetch(&ns.label, &[pinned]).await.unwrap();
    assert_eq!(got.blocks, vec![(pinned, payload(&ns, 9))]);
    let g = side.client(Protocol::Grpc, None);
    let recent: Vec<u32> = (0..256 * ns.block_size)
        .map(|t| t + 39 * 1_000_000)
        .collect();
    let l = g.lookup_tokens(&ns.label, &recent, false).await.unwrap();
    assert!(l.backend_ok);
    let r = reqwest::get(format!("{}/readyz", side.url()))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
