//! L1 hit cost: serving a batch of blocks that are all in the sidecar's L1 (the path of
//! `Shelf::fetch` before any Redis call), per block, at batch sizes 1, 8 and 256.
//!
//! `cargo bench --bench l1`. A hit hands out a reference-counted `Bytes` (no copy), so
//! the time is per block, not per byte: it is reported as elements (blocks) per second.

use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kvshelf::BlockHash;
use kvshelf::l1::{L1, Served};
use std::hint::black_box;

fn l1_hit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let l1 = L1::new(1 << 30, Duration::from_secs(30));
    let payload = Bytes::from(vec![0x5au8; 2 << 20]);
    let hashes: Vec<BlockHash> = (0..256u32)
        .map(|i| {
            let mut h = [0u8; 32];
            h[..4].copy_from_slice(&i.to_le_bytes());
            BlockHash(h)
        })
        .collect();
    for h in &hashes {
        l1.insert("bench", h, payload.clone(), None);
    }
    let mut group = c.benchmark_group("l1_hit");
    for batch in [1usize, 8, 256] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(format!("batch {batch}"), |b| {
            b.iter(|| {
                let served = rt.block_on(l1.get_or_load(
                    "bench",
                    black_box(&hashes[..batch]),
                    std::time::Duration::from_millis(100),
                    |_| async { unreachable!("every block is in L1") },
                ));
                assert!(served.iter().all(|s| matches!(s, Served::Hit(_))));
                black_box(served)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, l1_hit);
criterion_main!(benches);
