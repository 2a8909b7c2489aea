//! Hashing cost per token: chained SHA-256 over 16- and 256-token blocks.
//!
//! `cargo bench --bench hashing`. Throughput is reported in tokens/s; ns/token is its
//! inverse. Target (issue #5): ≤ 8 ns/token at 16-token blocks.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kvshelf::{Dtype, Layout, Namespace, PrefixHasher};
use std::hint::black_box;

fn namespace(block_size: u32) -> Namespace {
    Namespace {
        label: "bench".into(),
        model_id: "meta-llama/Llama-3.1-8B".into(),
        model_revision: String::new(),
        kv_dtype: Dtype::Bfloat16,
        layout: Layout {
            num_layers: 32,
            num_kv_heads: 8,
            head_dim: 128,
            tp_size: 1,
            tp_rank: 0,
            order: "lkthd".into(),
        },
        block_size,
        lora_adapter: None,
        ttl: None,
        max_pinned_bytes: None,
        hash_scheme: Default::default(),
    }
}

fn hashing(c: &mut Criterion) {
    let tokens: Vec<u32> = (0..4096u32)
        .map(|i| i.wrapping_mul(2_654_435_761) % 128_256)
        .collect();
    let mut g = c.benchmark_group("hash_prefix_4096_tokens");
    g.throughput(Throughput::Elements(tokens.len() as u64));
    for block_size in [16, 256] {
        let h = PrefixHasher::new(&namespace(block_size), None);
        g.bench_function(format!("block_size_{block_size}"), |b| {
            b.iter(|| h.hash_prefix(black_box(&tokens)))
        });
    }
    g.finish();
    c.bench_function("namespace_root", |b| {
        let ns = namespace(16);
        b.iter(|| kvshelf::hashing::namespace_root(black_box(&ns), Some(b"tenant")))
    });
}

criterion_group!(benches, hashing);
criterion_main!(benches);
