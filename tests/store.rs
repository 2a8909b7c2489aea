//! The Redis store against a real Redis: TTLs, write-once, sliding expiry, lookup, purge,
//! corruption and bad input.

mod support;

use std::time::Duration;

use kvshelf::store::{block_key, namespace_pattern};
use kvshelf::{BlockHash, Error, PrefixHasher, PutResult, StoreConfig};
use redis::AsyncCommands;
use support::{namespace, payload, raw, redis_url, store, store_with};

fn hashes(ns: &kvshelf::Namespace, blocks: usize, seed: u32) -> Vec<BlockHash> {
    let tokens: Vec<u32> = (0..blocks as u32 * ns.block_size)
        .map(|t| t * 7 + seed)
        .collect();
    PrefixHasher::new(ns, None).hash_prefix(&tokens)
}

async fn keys_of(url: &str, label: &str) -> Vec<String> {
    let mut c = raw(url).await;
    let mut keys = Vec::new();
    let mut iter: redis::AsyncIter<String> = c.scan_match(namespace_pattern(label)).await.unwrap();
    while let Some(k) = iter.next_item().await {
        keys.push(k.unwrap());
    }
    keys
}

#[tokio::test]
async fn every_key_written_has_a_ttl() {
    let (ns, s) = (namespace("ttl"), store());
    let hs = hashes(&ns, 10, 1);
    let blocks: Vec<_> = hs.iter().map(|h| (*h, payload(&ns, 1))).collect();
    let outcomes = s.put(&ns, &blocks).await.unwrap();
    assert_eq!(outcomes, vec![PutResult::Stored; 10]);
    s.get(&ns, &hs).await.unwrap();
    s.unpin(&ns.label, &hs[0]).await.unwrap();

    let keys = keys_of(&redis_url(), &ns.label).await;
    assert_eq!(keys.len(), 10);
    let mut c = raw(&redis_url()).await;
    for k in keys {
        let pttl: i64 = c.pttl(&k).await.unwrap();
        assert!(pttl > 0, "{k} has PTTL {pttl}");
        assert!(pttl <= 3_600_000);
    }
}

#[tokio::test]
async fn put_then_get_returns_the_same_bytes() {
    let (ns, s) = (namespace("roundtrip"), store());
    let hs = hashes(&ns, 3, 2);
    let blocks: Vec<_> = hs
        .iter()
        .enumerate()
        .map(|(i, h)| (*h, payload(&ns, i as u8)))
        .collect();
    s.put(&ns, &blocks).await.unwrap();
    let got = s.get(&ns, &hs).await.unwrap();
    for ((_, want), got) in blocks.iter().zip(got) {
        let got = got.expect("hit");
        assert_eq!(&got.block.payload, want);
        assert_eq!(got.block.header.tokens, ns.block_size);
    }
}

#[tokio::test]
async fn concurrent_puts_of_one_block_keep_the_first_writer() {
    let (ns, s) = (namespace("writeonce"), store());
    let h = hashes(&ns, 1, 3)[0];
    let tasks: Vec<_> = (0..16u8)
        .map(|i| {
            let (s, ns) = (s.clone(), ns.clone());
            tokio::spawn(async move {
                let p = payload(&ns, i);
                (p.clone(), s.put(&ns, &[(h, p)]).await.unwrap()[0])
            })
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        let (p, outcome) = t.await.unwrap();
        if outcome == PutResult::Stored {
            winners.push(p);
        }
    }
    assert_eq!(winners.len(), 1, "exactly one writer stores the block");
    let got = s.get(&ns, &[h]).await.unwrap().remove(0).unwrap();
    assert_eq!(
        got.block.payload, winners[0],
        "the stored bytes are the winner's, intact"
    );
}

#[tokio::test]
async fn a_hit_slides_the_ttl_unless_disabled_or_pinned() {
    let url = redis_url();
    let ttl = Duration::from_secs(600);
    let sliding = store_with(StoreConfig {
        url: url.clone(),
        ttl,
        ..Default::default()
    });
    let fixed = store_with(StoreConfig {
        url: url.clone(),
        ttl,
        sliding_ttl: false,
        ..Default::default()
    });
    let ns = namespace("sliding");
    let hs = hashes(&ns, 3, 4);
    let blocks: Vec<_> = hs.iter().map(|h| (*h, payload(&ns, 4))).collect();
    sliding.put(&ns, &blocks).await.unwrap();
    let mut c = raw(&url).await;
    for h in &hs {
        let _: bool = c.pexpire(block_key(&ns.label, h), 1_000).await.unwrap();
    }
    // Instead of sleeping, age the keys to 1 s left, then read.
    sliding.get(&ns, &hs[..1]).await.unwrap();
    fixed.get(&ns, &hs[1..2]).await.unwrap();
    let slid: i64 = c.pttl(block_key(&ns.label, &hs[0])).await.unwrap();
    let kept: i64 = c.pttl(block_key(&ns.label, &hs[1])).await.unwrap();
    assert!(slid > 500_000, "a hit restores the full TTL, got {slid} ms");
    assert!(
        (1..=1_000).contains(&kept),
        "sliding off leaves the TTL, got {kept} ms"
    );

    // Pinned blocks stay pinned when hit, and get a TTL back when unpinned.
    assert!(sliding.pin(&ns.label, &hs[2]).await.unwrap());
    sliding.get(&ns, &hs[2..]).await.unwrap();
    assert_eq!(sliding.ttl(&ns.label, &hs[2]).await.unwrap(), Some(None));
    assert!(sliding.unpin(&ns.label, &hs[2]).await.unwrap());
    let back = sliding
        .ttl(&ns.label, &hs[2])
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(back > Duration::from_secs(500));
    let missing = hashes(&ns, 1, 99)[0];
    assert!(!sliding.pin(&ns.label, &missing).await.unwrap());
    assert!(!sliding.unpin(&ns.label, &missing).await.unwrap());
    assert_eq!(sliding.ttl(&ns.label, &missing).await.unwrap(), None);
}

#[tokio::test]
async fn lookup_counts_only_leading_contiguous_blocks() {
    let (ns, s) = (namespace("lookup"), store());
    let hs = hashes(&ns, 6, 5);
    let present = [0, 1, 2, 4, 5];
    let blocks: Vec<_> = present.iter().map(|&i| (hs[i], payload(&ns, 5))).collect();
    s.put(&ns, &blocks).await.unwrap();
    assert_eq!(
        s.lookup(&ns, &hs).await.unwrap(),
        3,
        "the hole at block 3 stops the count"
    );
    assert_eq!(s.lookup(&ns, &hs[..2]).await.unwrap(), 2);
    assert_eq!(s.lookup(&ns, &[]).await.unwrap(), 0);
    assert_eq!(s.fetch_prefix(&ns, &hs).await.unwrap().len(), 3);
    s.delete(&ns.label, &hs[..1]).await.unwrap();
    assert_eq!(
        s.lookup(&ns, &hs).await.unwrap(),
        0,
        "block 5 present with block 0 missing is no hit"
    );
    assert!(s.fetch_prefix(&ns, &hs).await.unwrap().is_empty());
}

#[tokio::test]
async fn lookup_of_a_long_prefix_is_side_effect_free() {
    let (ns, s) = (namespace("longlookup"), store());
    let hs = hashes(&ns, 4096, 6);
    let blocks: Vec<_> = hs[..1000].iter().map(|h| (*h, payload(&ns, 6))).collect();
    s.put(&ns, &blocks).await.unwrap();
    let mut c = raw(&redis_url()).await;
    let key = block_key(&ns.label, &hs[0]);
    let _: bool = c.pexpire(&key, 50_000).await.unwrap();
    assert_eq!(s.lookup(&ns, &hs).await.unwrap(), 1000);
    let pttl: i64 = c.pttl(&key).await.unwrap();
    assert!(pttl <= 50_000, "lookup must not refresh TTLs (PTTL {pttl})");
}

#[tokio::test]
async fn purge_touches_only_its_namespace() {
    let s = store();
    let (a, b) = (namespace("purge-a"), namespace("purge-b"));
    // A label that extends A's: a prefix-matching pattern would wrongly catch it.
    let mut a2 = a.clone();
    a2.label = format!("{}x", a.label);
    for ns in [&a, &b, &a2] {
        let blocks: Vec<_> = hashes(ns, 20, 7)
            .iter()
            .map(|h| (*h, payload(ns, 7)))
            .collect();
        s.put(ns, &blocks).await.unwrap();
    }
    let url = redis_url();
    let mut c = raw(&url).await;
    let other = format!("unrelated:{}", a.label);
    let _: () = c.set(&other, "precious").await.unwrap();

    assert_eq!(s.purge(&a.label).await.unwrap().deleted, 20);
    assert_eq!(s.count(&a.label).await.unwrap(), 0);
    assert_eq!(s.count(&b.label).await.unwrap(), 20);
    assert_eq!(s.count(&a2.label).await.unwrap(), 20);
    let kept: String = c.get(&other).await.unwrap();
    assert_eq!(kept, "precious");
    let per_ns = s.count_by_namespace().await.unwrap();
    assert_eq!(per_ns.get(&b.label), Some(&20));
    assert_eq!(per_ns.get(&a.label), None);
}

#[tokio::test]
async fn a_flipped_payload_byte_is_a_miss_and_deletes_the_key() {
    let (ns, s) = (namespace("corrupt"), store());
    let hs = hashes(&ns, 3, 8);
    let blocks: Vec<_> = hs.iter().map(|h| (*h, payload(&ns, 8))).collect();
    s.put(&ns, &blocks).await.unwrap();
    let mut c = raw(&redis_url()).await;
    let key = block_key(&ns.label, &hs[1]);
    let value: Vec<u8> = c.get(&key).await.unwrap();
    let last = value.len() - 1;
    let flipped = [value[last] ^ 0x01];
    let _: i64 = redis::cmd("SETRANGE")
        .arg(&key)
        .arg(last)
        .arg(&flipped[..])
        .query_async(&mut c)
        .await
        .unwrap();

    let got = s.get(&ns, &hs).await.unwrap();
    assert!(got[0].is_some() && got[1].is_none() && got[2].is_some());
    let exists: bool = c.exists(&key).await.unwrap();
    assert!(!exists, "a corrupt block is deleted");
    assert_eq!(s.fetch_prefix(&ns, &hs).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_block_of_another_namespace_or_layout_is_a_miss() {
    let s = store();
    let a = namespace("foreign-a");
    let b = namespace("foreign-b");
    let h = hashes(&a, 1, 9)[0];
    s.put(&a, &[(h, payload(&a, 9))]).await.unwrap();
    let mut c = raw(&redis_url()).await;
    // An operator (or a bug) copies A's block under B's key.
    let value: Vec<u8> = c.get(block_key(&a.label, &h)).await.unwrap();
    let _: () = c.set(block_key(&b.label, &h), &value).await.unwrap();
    assert!(s.get(&b, &[h]).await.unwrap()[0].is_none());
    let exists: bool = c.exists(block_key(&b.label, &h)).await.unwrap();
    assert!(!exists);

    // Same label, but the reader expects another layout: a miss, and the block goes.
    let mut other_layout = a.clone();
    other_layout.layout.num_layers = 4;
    assert!(s.get(&other_layout, &[h]).await.unwrap()[0].is_none());
    assert!(
        s.get(&a, &[h]).await.unwrap()[0].is_none(),
        "deleted on the mismatch"
    );

    // A value that is not a block at all.
    let junk = hashes(&a, 2, 10)[1];
    let _: () = c
        .set(block_key(&a.label, &junk), "not a block")
        .await
        .unwrap();
    assert!(s.get(&a, &[junk]).await.unwrap()[0].is_none());
}

#[tokio::test]
async fn bad_input_is_a_typed_error_and_writes_nothing() {
    let (ns, s) = (namespace("badinput"), store());
    let hs = hashes(&ns, 2, 11);
    let short = payload(&ns, 1).slice(1..);
    let err = s
        .put(&ns, &[(hs[0], payload(&ns, 1)), (hs[1], short)])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    assert_eq!(err.code(), "invalid_input");
    assert!(err.is_caller_error());
    assert_eq!(
        s.count(&ns.label).await.unwrap(),
        0,
        "nothing written, not even block 0"
    );

    let mut bad = ns.clone();
    bad.label = "bad:label".into();
    for err in [
        s.put(&bad, &[(hs[0], payload(&ns, 1))]).await.unwrap_err(),
        s.get(&bad, &hs).await.unwrap_err(),
        s.lookup(&bad, &hs).await.unwrap_err(),
        s.purge("*").await.unwrap_err(),
    ] {
        assert!(matches!(err, Error::InvalidNamespace(_)), "{err}");
        assert_eq!(err.code(), "invalid_namespace");
    }
    let mut bad = ns.clone();
    bad.layout.order = "xyz".into();
    assert!(matches!(
        s.put(&bad, &[]).await,
        Err(Error::InvalidNamespace(_))
    ));
    assert!(matches!(
        "float4".parse::<kvshelf::Dtype>(),
        Err(Error::UnknownDtype(_))
    ));
    assert!(matches!(
        "12ab".parse::<BlockHash>(),
        Err(Error::InvalidInput(_))
    ));
}

#[tokio::test]
async fn inspect_reads_the_header_without_the_payload() {
    let (ns, s) = (namespace("inspect"), store());
    let h = hashes(&ns, 1, 12)[0];
    s.put(&ns, &[(h, payload(&ns, 12))]).await.unwrap();
    let (header, ttl) = s.inspect(&block_key(&ns.label, &h)).await.unwrap().unwrap();
    assert_eq!(header.namespace, ns.label);
    assert_eq!(header.block, h);
    assert_eq!(header.payload_len, ns.block_bytes());
    assert!(ttl.unwrap() > Duration::from_secs(3000));
    assert!(s.inspect("kvshelf:v1:nope:00").await.unwrap().is_none());
}

#[tokio::test]
async fn an_unreachable_redis_is_a_classified_error() {
    let (_refusing, port) = support::refused_port();
    let s = store_with(StoreConfig {
        url: format!("redis://127.0.0.1:{port}"),
        connection_timeout: Duration::from_millis(200),
        ..Default::default()
    });
    let ns = namespace("down");
    let err = s.lookup(&ns, &hashes(&ns, 1, 1)).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(!err.is_caller_error());
    assert!(err.code().starts_with("backend_"));
}

/// Multi-MiB values, hits and misses interleaved in one pipeline, on a non-default database:
/// the lean RESP path reads each value into its own buffer and must stay in step.
#[tokio::test]
async fn large_values_and_misses_in_one_pipeline_on_a_selected_db() {
    let mut ns = namespace("large");
    ns.layout.num_layers = 32;
    ns.layout.num_kv_heads = 8;
    ns.layout.head_dim = 128;
    ns.block_size = 16;
    assert_eq!(ns.block_bytes(), 2 << 20);
    let url = format!("{}/5", redis_url().trim_end_matches('/'));
    let s = store_with(StoreConfig {
        url: url.clone(),
        ..Default::default()
    });
    let hs = hashes(&ns, 8, 9);
    let stored: Vec<_> = [0usize, 1, 3, 4, 6, 7]
        .iter()
        .map(|&i| (hs[i], payload(&ns, i as u8)))
        .collect();
    assert_eq!(
        s.put(&ns, &stored).await.unwrap(),
        vec![PutResult::Stored; 6]
    );
    let got = s.get(&ns, &hs).await.unwrap();
    for (i, got) in got.iter().enumerate() {
        match got {
            Some(hit) => {
                assert!(![2, 5].contains(&i), "block {i} was never stored");
                assert_eq!(hit.block.payload, payload(&ns, i as u8), "block {i}");
                assert!(hit.ttl.is_some());
            }
            None => assert!([2, 5].contains(&i), "block {i} is missing"),
        }
    }
    assert_eq!(keys_of(&url, &ns.label).await.len(), 6);
    assert!(keys_of(&redis_url(), &ns.label).await.is_empty());
    s.purge(&ns.label).await.unwrap();
}
