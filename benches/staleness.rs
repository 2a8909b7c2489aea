//! How long a sidecar's L1 serves a block after it was deleted in Redis (issue 13): two
//! sidecar cores on one standalone Redis; a block is put through A and read through B until
//! B serves it from its L1; then the key is `UNLINK`ed (as `redis-cli` would) and B is
//! asked again in a tight loop. The delay is from the `UNLINK` to B's first miss: the
//! invalidation message, B's `EXISTS` check and the L1 removal. Reports p50, p99 and max
//! over the trials. (Without tracking, B served it until `l1_max_ttl`, 30 s by default.)
//!
//! ```sh
//! redis-server --port 6399 --save '' &
//! KVSHELF_BENCH_REDIS=redis://127.0.0.1:6399 cargo bench --bench staleness
//! ```
//!
//! Environment: `KVSHELF_BENCH_REDIS` (default `redis://127.0.0.1:6379`, whose blocks of
//! the namespace `staleness-bench` it deletes), `KVSHELF_BENCH_TRIALS` (default 300).

use std::time::{Duration, Instant};

use bytes::Bytes;
use kvshelf::admission::BodyKind;
use kvshelf::config::Config;
use kvshelf::frame::EndReason;
use kvshelf::shelf::{Caller, FetchItem, L1Coherence, Shelf};
use kvshelf::store::block_key;
use kvshelf::{BlockHash, Namespace, StoreConfig};

fn namespace() -> Namespace {
    Namespace {
        label: "staleness-bench".into(),
        ..kvshelf::shelf::demo_namespace()
    }
}

/// Whether B served the block (from wherever).
async fn served(shelf: &Shelf, ns: &Namespace, h: BlockHash) -> bool {
    let admission = shelf.admit(BodyKind::None, None).await.expect("admitted");
    let mut s = shelf
        .fetch(admission, &Caller::default(), &ns.label, vec![h])
        .await
        .expect("a fetch");
    let mut got = false;
    while let Some(item) = s.recv().await {
        match item {
            FetchItem::Block { .. } => got = true,
            FetchItem::End { reason, .. } => {
                assert_ne!(reason, EndReason::BackendUnavailable, "Redis must answer");
                break;
            }
        }
    }
    got
}

fn main() {
    let url = std::env::var("KVSHELF_BENCH_REDIS").unwrap_or("redis://127.0.0.1:6379".into());
    let trials: usize = std::env::var("KVSHELF_BENCH_TRIALS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(300);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let ns = namespace();
        let cfg = Config {
            store: Some(StoreConfig {
                url: url.clone(),
                ..Default::default()
            }),
            namespaces: vec![ns.clone()],
            ..Default::default()
        };
        let (a, b) = (Shelf::new(&cfg).unwrap(), Shelf::new(&cfg).unwrap());
        let started = Instant::now();
        while b.l1_coherence() != L1Coherence::Tracking {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "B never tracked"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut redis = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let payload = Bytes::from(vec![7u8; ns.block_bytes() as usize]);
        let mut delays = Vec::with_capacity(trials);
        let mut polls = 0u64;
        for i in 0..trials {
            let mut h = [0u8; 32];
            h[..8].copy_from_slice(&(i as u64).to_le_bytes());
            h[8..16].copy_from_slice(&(std::process::id() as u64).to_le_bytes());
            let h = BlockHash(h);
            let admission = a.admit(BodyKind::None, None).await.unwrap();
            let mut batch = a.put_batch(&admission, &ns.label).unwrap();
            batch.push(h, payload.clone()).unwrap();
            a.put(admission, &Caller::default(), batch, false)
                .await
                .unwrap();
            assert!(
                served(&b, &ns, h).await,
                "B reads it from Redis into its L1"
            );
            assert!(served(&b, &ns, h).await, "then from its L1");
            let t0 = Instant::now();
            let _: i64 = redis::cmd("UNLINK")
                .arg(block_key(&ns.label, &h))
                .query_async(&mut redis)
                .await
                .unwrap();
            while served(&b, &ns, h).await {
                polls += 1;
                assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "B served it for 20 s"
                );
            }
            delays.push(t0.elapsed());
        }
        delays.sort();
        let at = |q: f64| delays[((delays.len() - 1) as f64 * q).round() as usize];
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "staleness after UNLINK, {trials} trials: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms \
             ({polls} stale answers in all; without tracking: until l1_max_ttl, {:?})",
            ms(at(0.5)),
            ms(at(0.99)),
            ms(*delays.last().unwrap()),
            cfg.server.l1_max_ttl
        );
    });
}
