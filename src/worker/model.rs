//! A decoder-only transformer with the Llama architecture (RMSNorm, rotary position
//! embeddings, grouped-query attention, SwiGLU MLP), on CPU with `ndarray` (matrix products
//! by `matrixmultiply`).
//!
//! The weights are generated deterministically from a seed (no checkpoint is fetched): see
//! `docs/worker.md`. The forward pass only ever runs on a *chunk* of tokens appended to a
//! [`KvCache`]; the chunk attends to everything in the cache, itself included. Prefill runs in
//! chunks of exactly one block, decode in chunks of one token, so a chunk's inputs never
//! depend on whether earlier blocks were computed here or fetched from the shelf.

use ndarray::{Array1, Array2, ArrayView2, Axis, s};

use super::kv::KvCache;

/// The model's shape and hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelConfig {
    /// Vocabulary size (byte-level: 256).
    pub vocab: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Transformer layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention: `heads` is a multiple of it).
    pub kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// SwiGLU inner size.
    pub intermediate: usize,
    /// RoPE base.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Seed of the generated weights.
    pub seed: u64,
}

impl ModelConfig {
    /// The worker's model: 4 layers, hidden 256, 8 query heads over 2 KV heads of 32, SwiGLU
    /// 768, byte vocabulary; about 3.2 M parameters.
    pub const DEFAULT: ModelConfig = ModelConfig {
        vocab: 256,
        hidden: 256,
        layers: 4,
        heads: 8,
        kv_heads: 2,
        head_dim: 32,
        intermediate: 768,
        rope_theta: 10_000.0,
        rms_eps: 1e-5,
        seed: 0x6b76_7368_656c_6621,
    };

    /// A short string naming this configuration (it goes into the namespace identity).
    pub fn tag(&self) -> String {
        format!(
            "v{}-h{}-l{}-q{}-kv{}-d{}-ff{}-seed{:x}",
            self.vocab,
            self.hidden,
            self.layers,
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.intermediate,
            self.seed
        )
    }

    /// Weights, counting embeddings and the LM head.
    pub fn parameters(&self) -> usize {
        let q = self.heads * self.head_dim;
        let kv = self.kv_heads * self.head_dim;
        let layer = self.hidden * (q + 2 * kv)
            + q * self.hidden
            + 3 * self.hidden * self.intermediate
            + 2 * self.hidden;
        2 * self.vocab * self.hidden + self.layers * layer + self.hidden
    }

    /// Floating-point operations of the matrix products of one forward chunk of `c` tokens
    /// starting at position `start` (multiply-add = 2), with the LM head when `logits`.
    /// Attention counts what is computed: every chunk row against every cached key.
    pub fn chunk_flops(&self, start: usize, c: usize, logits: bool) -> f64 {
        let (h, q, kv) = (
            self.hidden as f64,
            (self.heads * self.head_dim) as f64,
            (self.kv_heads * self.head_dim) as f64,
        );
        let c = c as f64;
        let t = start as f64 + c;
        let proj = 2.0 * c * h * (q + 2.0 * kv) + 2.0 * c * q * h;
        let mlp = 3.0 * 2.0 * c * h * self.intermediate as f64;
        let attn = 2.0 * 2.0 * c * t * q;
        let head = if logits {
            2.0 * h * self.vocab as f64
        } else {
            0.0
        };
        self.layers as f64 * (proj + mlp + attn) + head
    }
}

struct Layer {
    attn_norm: Array1<f32>,
    wq: Array2<f32>,
    wk: Array2<f32>,
    wv: Array2<f32>,
    wo: Array2<f32>,
    mlp_norm: Array1<f32>,
    w_gate: Array2<f32>,
    w_up: Array2<f32>,
    w_down: Array2<f32>,
}

/// The model with its weights.
pub struct Model {
    cfg: ModelConfig,
    embed: Array2<f32>,
    layers: Vec<Layer>,
    final_norm: Array1<f32>,
    lm_head: Array2<f32>,
    inv_freq: Vec<f32>,
}

/// SplitMix64: a tiny, well-known deterministic generator for the weights.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1), exactly representable (24 random bits).
    fn uniform(&mut self) -> f32 {
        ((self.next() >> 40) as f32) * (2.0 / 16_777_216.0) - 1.0
    }
}

impl Model {
    /// Generates the weights of `cfg` from its seed. Each tensor has its own stream, so the
    /// values do not depend on the order they are made in.
    pub fn new(cfg: ModelConfig) -> Model {
        assert!(cfg.heads.is_multiple_of(cfg.kv_heads) && cfg.head_dim.is_multiple_of(2));
        let mut stream = 0u64;
        let mut tensor = |rows: usize, cols: usize, scale: f32| {
            stream += 1;
            let mut rng = SplitMix64(cfg.seed ^ stream.wrapping_mul(0xd6e8_feb8_6659_fd93));
            Array2::from_shape_fn((rows, cols), |_| rng.uniform() * scale)
        };
        // Uniform(-a, a) has standard deviation a / sqrt(3): a = sqrt(3 / fan_in) keeps
        // activations at unit scale through each projection.
        let fan = |n: usize| (3.0 / n as f32).sqrt();
        let (h, q, kv, ff) = (
            cfg.hidden,
            cfg.heads * cfg.head_dim,
            cfg.kv_heads * cfg.head_dim,
            cfg.intermediate,
        );
        let embed = tensor(cfg.vocab, h, 1.7);
        let mut layers = Vec::with_capacity(cfg.layers);
        for _ in 0..cfg.layers {
            let norm_a = tensor(1, h, 0.1).row(0).mapv(|x| 1.0 + x);
            let norm_m = tensor(1, h, 0.1).row(0).mapv(|x| 1.0 + x);
            layers.push(Layer {
                attn_norm: norm_a,
                // Larger query/key scale: attention that is not uniform over the context.
                wq: tensor(h, q, 2.0 * fan(h)),
                wk: tensor(h, kv, 2.0 * fan(h)),
                wv: tensor(h, kv, fan(h)),
                wo: tensor(q, h, 0.5 * fan(q)),
                mlp_norm: norm_m,
                w_gate: tensor(h, ff, fan(h)),
                w_up: tensor(h, ff, fan(h)),
                w_down: tensor(ff, h, 0.5 * fan(ff)),
            });
        }
        let final_norm = tensor(1, h, 0.1).row(0).mapv(|x| 1.0 + x);
        let lm_head = tensor(h, cfg.vocab, 3.0 * fan(h));
        let inv_freq = (0..cfg.head_dim / 2)
            .map(|i| (f64::from(cfg.rope_theta).powf(-2.0 * i as f64 / cfg.head_dim as f64)) as f32)
            .collect();
        Model {
            cfg,
            embed,
            layers,
            final_norm,
            lm_head,
            inv_freq,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// An empty KV cache for this model in `dtype`.
    pub fn new_cache(&self, dtype: crate::Dtype) -> KvCache {
        KvCache::new(
            dtype,
            self.cfg.layers,
            self.cfg.kv_heads * self.cfg.head_dim,
        )
    }

    fn rms_norm(&self, x: &Array2<f32>, w: &Array1<f32>) -> Array2<f32> {
        let n = x.ncols();
        let mut out = x.clone();
        for mut row in out.rows_mut() {
            let mut ss = 0.0f32;
            for &v in row.iter() {
                ss += v * v;
            }
            let r = 1.0 / (ss / n as f32 + self.cfg.rms_eps).sqrt();
            for (v, &g) in row.iter_mut().zip(w.iter()) {
                *v = *v * r * g;
            }
        }
        out
    }

    /// Rotates `x` (`[c, heads * head_dim]`) in place for positions `start..start + c`
    /// (rotate-half convention, as in Hugging Face's Llama).
    fn rope(&self, x: &mut Array2<f32>, start: usize, heads: usize) {
        let d = self.cfg.head_dim;
        let half = d / 2;
        for (i, mut row) in x.rows_mut().into_iter().enumerate() {
            let pos = (start + i) as f32;
            for (j, &f) in self.inv_freq.iter().enumerate() {
                let (sin, cos) = (pos * f).sin_cos();
                for hh in 0..heads {
                    let a = hh * d + j;
                    let (x1, x2) = (row[a], row[a + half]);
                    row[a] = x1 * cos - x2 * sin;
                    row[a + half] = x2 * cos + x1 * sin;
                }
            }
        }
    }

    /// Causal grouped-query attention of the chunk's queries (`[c, heads * head_dim]`, at
    /// positions `start..start + c`) over layer `layer` of the cache (which already holds the
    /// chunk's own K and V).
    fn attention(&self, q: &Array2<f32>, kv: &KvCache, layer: usize, start: usize) -> Array2<f32> {
        let cfg = &self.cfg;
        let (c, d) = (q.nrows(), cfg.head_dim);
        let t = start + c;
        let width = cfg.kv_heads * d;
        let group = cfg.heads / cfg.kv_heads;
        let keys = ArrayView2::from_shape((t, width), &kv.k(layer)[..t * width]).expect("k shape");
        let vals = ArrayView2::from_shape((t, width), &kv.v(layer)[..t * width]).expect("v shape");
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = Array2::<f32>::zeros((c, cfg.heads * d));
        for g in 0..cfg.kv_heads {
            // The group's query heads stacked: row j * c + i is head g * group + j, token i.
            let mut qg = Array2::<f32>::zeros((group * c, d));
            for j in 0..group {
                let head = g * group + j;
                qg.slice_mut(s![j * c..(j + 1) * c, ..])
                    .assign(&q.slice(s![.., head * d..(head + 1) * d]));
            }
            qg.mapv_inplace(|x| x * scale);
            let kg = keys.slice(s![.., g * d..(g + 1) * d]);
            let vg = vals.slice(s![.., g * d..(g + 1) * d]);
            let mut p = qg.dot(&kg.t());
            for (r, mut row) in p.axis_iter_mut(Axis(0)).enumerate() {
                let visible = start + r % c + 1;
                let mut max = f32::NEG_INFINITY;
                for &v in row.iter().take(visible) {
                    max = max.max(v);
                }
                let mut sum = 0.0f32;
                for (k, v) in row.iter_mut().enumerate() {
                    if k < visible {
                        *v = (*v - max).exp();
                        sum += *v;
                    } else {
                        *v = 0.0;
                    }
                }
                let inv = 1.0 / sum;
                row.mapv_inplace(|v| v * inv);
            }
            let og = p.dot(&vg);
            for j in 0..group {
                let head = g * group + j;
                out.slice_mut(s![.., head * d..(head + 1) * d])
                    .assign(&og.slice(s![j * c..(j + 1) * c, ..]));
            }
        }
        out
    }

    /// Runs `tokens` (the next chunk) through the model, appending their K and V to `kv`.
    /// Returns the logits of the chunk's last token when `logits` is set.
    pub fn forward_chunk(
        &self,
        tokens: &[u32],
        kv: &mut KvCache,
        logits: bool,
    ) -> Option<Vec<f32>> {
        assert!(!tokens.is_empty());
        let cfg = &self.cfg;
        let start = kv.len();
        let c = tokens.len();
        let mut x = Array2::<f32>::zeros((c, cfg.hidden));
        for (i, &tok) in tokens.iter().enumerate() {
            x.row_mut(i)
                .assign(&self.embed.row(tok as usize % cfg.vocab));
        }
        for (l, w) in self.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &w.attn_norm);
            let mut q = h.dot(&w.wq);
            let mut k = h.dot(&w.wk);
            let v = h.dot(&w.wv);
            self.rope(&mut q, start, cfg.heads);
            self.rope(&mut k, start, cfg.kv_heads);
            kv.append(
                l,
                k.as_slice().expect("standard layout"),
                v.as_slice().expect("standard layout"),
            );
            let a = self.attention(&q, kv, l, start);
            x += &a.dot(&w.wo);
            let h = self.rms_norm(&x, &w.mlp_norm);
            let mut gate = h.dot(&w.w_gate);
            let up = h.dot(&w.w_up);
            gate.zip_mut_with(&up, |g, &u| *g = *g / (1.0 + (-*g).exp()) * u);
            x += &gate.dot(&w.w_down);
        }
        kv.commit(c);
        logits.then(|| {
            let last = x.slice(s![c - 1..c, ..]).to_owned();
            let h = self.rms_norm(&last, &self.final_norm);
            h.dot(&self.lm_head).into_raw_vec_and_offset().0
        })
    }
}

/// The index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Dtype;

    fn small() -> ModelConfig {
        ModelConfig {
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            intermediate: 128,
            ..ModelConfig::DEFAULT
        }
    }

    #[test]
    fn weights_are_deterministic() {
        let a = Model::new(small());
        let b = Model::new(small());
        assert_eq!(a.lm_head, b.lm_head);
        assert_eq!(a.layers[1].w_down, b.layers[1].w_down);
        assert_ne!(a.layers[0].wq, a.layers[1].wq);
    }

    #[test]
    fn chunked_prefill_matches_one_pass_closely() {
        // Chunking changes rounding, not the maths: a sanity check of the causal mask.
        let m = Model::new(small());
        let tokens: Vec<u32> = b"the quick brown fox jumps"
            .iter()
            .map(|&b| b.into())
            .collect();
        let mut one = m.new_cache(Dtype::Float32);
        let a = m.forward_chunk(&tokens, &mut one, true).unwrap();
        let mut chunked = m.new_cache(Dtype::Float32);
        let mut b = None;
        for ch in tokens.chunks(4) {
            b = m.forward_chunk(ch, &mut chunked, true);
        }
        let b = b.unwrap();
        let err = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-3, "chunked prefill differs by {err}");
        assert_eq!(argmax(&a), argmax(&b));
    }
}
