//! Block codec throughput (encode, decode with checksum, checksum alone, header alone) at
//! the value sizes that matter, and a measurement of whether lossless compression pays
//! for bf16/fp16 KV (byte-plane shuffle + LZ4).
//!
//! `cargo bench --bench codec`. Throughput is reported in bytes/s of payload.

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kvshelf::codec::{self, Header};
use kvshelf::{BlockHash, Dtype, Layout, Namespace};
use rand::{Rng, SeedableRng};
use std::hint::black_box;

/// A namespace whose blocks are `bytes` long in bf16 (16 tokens, 128-dim heads).
fn namespace(kv_heads: u32, layers: u32) -> Namespace {
    Namespace {
        label: "bench".into(),
        model_id: "bench".into(),
        model_revision: String::new(),
        kv_dtype: Dtype::Bfloat16,
        layout: Layout {
            num_layers: layers,
            num_kv_heads: kv_heads,
            head_dim: 64,
            tp_size: 1,
            tp_rank: 0,
            order: "lkthd".into(),
        },
        block_size: 16,
        lora_adapter: None,
        ttl: None,
        max_pinned_bytes: None,
        hash_scheme: Default::default(),
    }
}

/// Normally distributed activations (Box-Muller), the rough statistics of K and V.
fn normal_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let (u1, u2): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random());
            (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
        .collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
        .collect()
}

/// Byte-plane shuffle of 2-byte elements: all low bytes, then all high bytes.
fn shuffle2(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    out.extend(b.iter().step_by(2));
    out.extend(b.iter().skip(1).step_by(2));
    out
}

fn unshuffle2(s: &[u8]) -> Vec<u8> {
    let half = s.len() / 2;
    let mut out = Vec::with_capacity(s.len());
    for i in 0..half {
        out.push(s[i]);
        out.push(s[half + i]);
    }
    out
}

fn codec(c: &mut Criterion) {
    // 192 KiB: a 16-token block of a 0.5B-class model; 2 MiB: of an 8B-class model.
    for (name, ns) in [("192KiB", namespace(2, 24)), ("2MiB", namespace(8, 32))] {
        let payload: Bytes = bf16_bytes(&normal_f32(ns.block_bytes() as usize / 2, 1)).into();
        let hash = BlockHash([7; 32]);
        let header = Header::for_block(&ns, &hash, &payload);
        let value = codec::encode(&header, &payload);
        let mut g = c.benchmark_group(format!("codec_{name}"));
        g.throughput(Throughput::Bytes(payload.len() as u64));
        g.bench_function("encode", |b| {
            b.iter(|| {
                codec::encode(
                    &Header::for_block(&ns, &hash, &payload),
                    black_box(&payload),
                )
            })
        });
        g.bench_function("decode_and_verify", |b| {
            b.iter(|| {
                let block = codec::decode(black_box(value.clone())).unwrap();
                block.header.check(&ns, &hash).unwrap();
                block
            })
        });
        g.bench_function("checksum", |b| {
            b.iter(|| codec::checksum(black_box(&payload)))
        });
        // The floor: one copy into an already allocated buffer of the same alignment.
        let mut dst = vec![0u8; payload.len()];
        g.bench_function("memcpy_baseline", |b| {
            b.iter(|| dst.copy_from_slice(black_box(&payload[..])))
        });
        g.finish();
    }
    let ns = namespace(8, 32);
    let header = Header::for_block(&ns, &BlockHash([7; 32]), &[]);
    let head = header.encode();
    c.bench_function("header_encode", |b| b.iter(|| black_box(&header).encode()));
    c.bench_function("header_decode", |b| {
        b.iter(|| codec::decode_header(black_box(&head)).unwrap())
    });
}

fn compression(c: &mut Criterion) {
    let values = normal_f32(1 << 20, 2); // 2 MiB of bf16, 2 MiB of fp16
    for (dtype, raw) in [("bf16", bf16_bytes(&values)), ("fp16", f16_bytes(&values))] {
        let shuffled = shuffle2(&raw);
        let packed = lz4_flex::compress_prepend_size(&shuffled);
        let plain = lz4_flex::compress_prepend_size(&raw);
        eprintln!(
            "compression {dtype}: shuffle+lz4 ratio {:.3}, lz4 alone {:.3} (original/compressed)",
            raw.len() as f64 / packed.len() as f64,
            raw.len() as f64 / plain.len() as f64
        );
        let mut g = c.benchmark_group(format!("compression_{dtype}_2MiB"));
        g.throughput(Throughput::Bytes(raw.len() as u64));
        g.bench_function("shuffle_lz4_compress", |b| {
            b.iter(|| lz4_flex::compress_prepend_size(&shuffle2(black_box(&raw))))
        });
        g.bench_function("lz4_decompress_unshuffle", |b| {
            b.iter(|| unshuffle2(&lz4_flex::decompress_size_prepended(black_box(&packed)).unwrap()))
        });
        g.finish();
    }
}

criterion_group!(benches, codec, compression);
criterion_main!(benches);
