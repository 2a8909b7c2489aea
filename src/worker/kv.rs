//! The worker's KV cache, held in the namespace's dtype, and its conversion to and from the
//! shelf's block payloads (order `lkthd`, little-endian elements).
//!
//! Every K and V element is rounded to the cache dtype the moment it is written, and the cache
//! keeps the f32 value of those rounded elements (an exact widening for `bfloat16`). Attention
//! only ever reads this cache, so the K/V a worker computes and the K/V it loads from a block
//! are the same numbers whichever way they arrived: that is what makes outputs with and
//! without the shelf bitwise identical.

use half::bf16;

use crate::Dtype;

/// Rounds `x` to `dtype` and widens it back to f32 (exact for the dtypes supported).
#[inline]
pub fn round(dtype: Dtype, x: f32) -> f32 {
    match dtype {
        Dtype::Bfloat16 => bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// The dtypes the worker can keep its cache in.
pub fn supported(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::Float32 | Dtype::Bfloat16)
}

/// Per-layer K and V of every token so far, each `[tokens, kv_heads * head_dim]` row-major.
#[derive(Clone, Debug)]
pub struct KvCache {
    dtype: Dtype,
    /// `kv_heads * head_dim`: one token's K (or V) in one layer.
    width: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

impl KvCache {
    /// An empty cache for `layers` layers of `width` (= kv heads × head dim) elements per token.
    pub fn new(dtype: Dtype, layers: usize, width: usize) -> KvCache {
        assert!(
            supported(dtype),
            "the worker keeps KV in float32 or bfloat16"
        );
        KvCache {
            dtype,
            width,
            k: vec![Vec::new(); layers],
            v: vec![Vec::new(); layers],
            len: 0,
        }
    }

    /// Tokens in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The cache dtype.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Appends the K and V rows (`[c, width]`, row-major) of layer `layer` for the chunk being
    /// computed, rounded to the cache dtype. [`KvCache::commit`] then advances the length.
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let d = self.dtype;
        self.k[layer].extend(k.iter().map(|&x| round(d, x)));
        self.v[layer].extend(v.iter().map(|&x| round(d, x)));
    }

    /// Marks `c` appended tokens as part of the cache (after every layer appended them).
    pub fn commit(&mut self, c: usize) {
        self.len += c;
        debug_assert!(self.k.iter().all(|k| k.len() == self.len * self.width));
    }

    /// Layer `layer`'s K of every token so far, including the chunk being appended.
    pub fn k(&self, layer: usize) -> &[f32] {
        &self.k[layer]
    }

    /// Layer `layer`'s V of every token so far, including the chunk being appended.
    pub fn v(&self, layer: usize) -> &[f32] {
        &self.v[layer]
    }

    /// Bytes of one block of `block_size` tokens.
    pub fn block_bytes(&self, block_size: usize) -> usize {
        self.k.len() * 2 * block_size * self.width * self.dtype.size()
    }

    /// The payload of the block of tokens `start..start + block_size`: `[layers, 2, tokens,
    /// kv_heads, head_dim]` in the cache dtype, little-endian.
    pub fn block_payload(&self, start: usize, block_size: usize) -> Vec<u8> {
        assert!(start + block_size <= self.len, "block past the cache");
        let mut out = Vec::with_capacity(self.block_bytes(block_size));
        let range = start * self.width..(start + block_size) * self.width;
        for layer in 0..self.k.len() {
            for src in [&self.k[layer], &self.v[layer]] {
                for &x in &src[range.clone()] {
                    match self.dtype {
                        Dtype::Bfloat16 => {
                            out.extend_from_slice(&bf16::from_f32(x).to_bits().to_le_bytes())
                        }
                        _ => out.extend_from_slice(&x.to_le_bytes()),
                    }
                }
            }
        }
        out
    }

    /// Appends one block (a payload from [`KvCache::block_payload`], possibly another
    /// process's) at the end of the cache. Returns false, changing nothing, when the payload
    /// does not have the size of one block of `block_size` tokens.
    pub fn load_block(&mut self, payload: &[u8], block_size: usize) -> bool {
        if payload.len() != self.block_bytes(block_size) {
            return false;
        }
        let size = self.dtype.size();
        let part = block_size * self.width * size;
        let dtype = self.dtype;
        let decode = |bytes: &[u8]| -> Vec<f32> {
            bytes
                .chunks_exact(size)
                .map(|e| match dtype {
                    Dtype::Bfloat16 => bf16::from_bits(u16::from_le_bytes([e[0], e[1]])).to_f32(),
                    _ => f32::from_le_bytes([e[0], e[1], e[2], e[3]]),
                })
                .collect()
        };
        for layer in 0..self.k.len() {
            let base = layer * 2 * part;
            let k = decode(&payload[base..base + part]);
            let v = decode(&payload[base + part..base + 2 * part]);
            self.k[layer].extend(k);
            self.v[layer].extend(v);
        }
        self.len += block_size;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_round_trip_is_exact() {
        for dtype in [Dtype::Float32, Dtype::Bfloat16] {
            let (layers, width, bs) = (3, 6, 4);
            let mut a = KvCache::new(dtype, layers, width);
            for chunk in 0..2 {
                for l in 0..layers {
                    let k: Vec<f32> = (0..bs * width)
                        .map(|i| (i as f32 * 0.37 + l as f32 + chunk as f32).sin())
                        .collect();
                    let v: Vec<f32> = k.iter().map(|x| x * 3.1 - 0.2).collect();
                    a.append(l, &k, &v);
                }
                a.commit(bs);
            }
            let mut b = KvCache::new(dtype, layers, width);
            for blk in 0..2 {
                let p = a.block_payload(blk * bs, bs);
                assert_eq!(p.len(), a.block_bytes(bs));
                assert!(b.load_block(&p, bs));
            }
            for l in 0..layers {
                let bits = |s: &[f32]| s.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(a.k(l)), bits(b.k(l)));
                assert_eq!(bits(a.v(l)), bits(b.v(l)));
            }
            assert!(!b.load_block(&[0; 3], bs));
        }
    }
}
