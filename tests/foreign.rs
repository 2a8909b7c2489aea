//! Foreign-hash namespaces against a real Redis: LMCache's chunks (partial ones included)
//! stored under kvshelf's key schema, with TTL, write-once, checksum and per-key `exists`.

mod support;

use bytes::Bytes;
use kvshelf::codec::{self, CodecError};
use kvshelf::hashing::lmcache_key_hash;
use kvshelf::store::block_key;
use kvshelf::{Error, HashScheme, Namespace, PutResult};
use redis::AsyncCommands;
use support::{namespace, raw, redis_cli, redis_url, store};

fn lmcache_ns(test: &str) -> Namespace {
    Namespace {
        hash_scheme: HashScheme::Lmcache,
        ..namespace(test)
    }
}

fn key(i: u32) -> String {
    format!("Qwen/Qwen3-8B@{:08x}@0@{:064x}", i % 2, i)
}

#[tokio::test]
async fn partial_chunks_round_trip_with_ttl_and_write_once() {
    let (ns, s) = (lmcache_ns("foreign-rt"), store());
    let full = ns.block_bytes() as usize;
    let sizes = [full, full / 2 + 3, 1];
    let blocks: Vec<(kvshelf::BlockHash, Bytes)> = sizes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let bytes: Vec<u8> = (0..*n).map(|b| (b * 31 + i) as u8).collect();
            (
                lmcache_key_hash(&key(i as u32)).unwrap(),
                Bytes::from(bytes),
            )
        })
        .collect();
    let outcomes = s.put(&ns, &blocks).await.unwrap();
    assert_eq!(outcomes, vec![PutResult::Stored; 3]);
    // Write-once: a second writer's different bytes do not replace the first's.
    let again = vec![(blocks[1].0, Bytes::from(vec![0u8; 7]))];
    assert_eq!(
        s.put(&ns, &again).await.unwrap(),
        vec![PutResult::AlreadyPresent]
    );

    let hashes: Vec<_> = blocks.iter().map(|(h, _)| *h).collect();
    let absent = lmcache_key_hash(&key(99)).unwrap();
    let mut asked = hashes.clone();
    asked.insert(1, absent);
    assert_eq!(
        s.exists(&ns.label, &asked).await.unwrap(),
        vec![true, false, true, true]
    );
    let got = s.get(&ns, &asked).await.unwrap();
    assert!(got[1].is_none());
    for (hit, (_, payload)) in [&got[0], &got[2], &got[3]].into_iter().zip(&blocks) {
        let hit = hit.as_ref().expect("stored chunk is a hit");
        assert_eq!(&hit.block.payload, payload);
        assert!(hit.ttl.is_some(), "every chunk has a TTL");
    }

    // An operator reads the header with redis-cli alone.
    let k = block_key(&ns.label, &hashes[2]);
    let head = redis_cli(&redis_url(), &["GETRANGE", &k, "0", "511"]).expect("redis-cli");
    assert!(head.contains(r#""hash_scheme":"lmcache""#), "{head}");
    assert!(head.contains(r#""order":"bytes","shape":[1]"#), "{head}");
}

#[tokio::test]
async fn oversized_and_empty_chunks_are_refused_and_nothing_is_written() {
    let (ns, s) = (lmcache_ns("foreign-bad"), store());
    let h = lmcache_key_hash(&key(1)).unwrap();
    for n in [0, ns.block_bytes() as usize + 1] {
        let blocks = vec![(h, Bytes::from(vec![1u8; n]))];
        assert!(matches!(
            s.put(&ns, &blocks).await,
            Err(Error::InvalidInput(_))
        ));
    }
    assert_eq!(s.exists(&ns.label, &[h]).await.unwrap(), vec![false]);
}

#[tokio::test]
async fn a_corrupt_chunk_is_a_miss_and_is_deleted() {
    let (ns, s) = (lmcache_ns("foreign-corrupt"), store());
    let h = lmcache_key_hash(&key(3)).unwrap();
    s.put(&ns, &[(h, Bytes::from(vec![5u8; 100]))])
        .await
        .unwrap();
    let k = block_key(&ns.label, &h);
    let mut c = raw(&redis_url()).await;
    let mut value: Vec<u8> = c.get(&k).await.unwrap();
    *value.last_mut().unwrap() ^= 1;
    let _: () = c.set(&k, value.clone()).await.unwrap();
    assert!(matches!(
        codec::decode(value.into()),
        Err(CodecError::ChecksumMismatch { .. })
    ));
    assert!(s.get(&ns, &[h]).await.unwrap()[0].is_none());
    assert_eq!(s.exists(&ns.label, &[h]).await.unwrap(), vec![false]);
}
