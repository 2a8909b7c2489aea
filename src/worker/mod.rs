//! An inference worker on CPU that skips prefill by taking KV blocks off the shelf
//! (feature `worker`; the binary is `kvshelf-worker`, the design is in `docs/worker.md`).
//!
//! One request goes: hash the prompt's full blocks locally ([`PrefixHasher`], the same
//! hashes the sidecar computes), look up the longest cached prefix, fetch those blocks into
//! the KV cache, prefill the rest in chunks of one block, take the first token, put the
//! prompt's new full blocks on the shelf asynchronously (off the critical path), decode.
//!
//! Outputs do not depend on the shelf: prefill always runs in chunks of exactly
//! `block_size` tokens aligned on block boundaries, decode one token at a time, and the KV
//! cache holds K/V in the namespace's dtype, so a chunk computed after fetching blocks sees
//! bitwise the same inputs as the same chunk computed after recomputing them.

pub mod bench;
pub mod kv;
pub mod model;

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use crate::client::Client;
use crate::{BlockHash, Dtype, Layout, Namespace, PrefixHasher};
pub use kv::KvCache;
pub use model::{Model, ModelConfig, argmax};

/// Tokens per block (and per prefill chunk): vLLM's block size.
pub const BLOCK_SIZE: u32 = 16;

/// The namespace label the worker uses by default for `dtype`.
pub fn default_label(dtype: Dtype) -> String {
    format!("kvshelf-worker-{}", short(dtype))
}

fn short(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::Bfloat16 => "bf16",
        Dtype::Float16 => "f16",
        _ => "f32",
    }
}

/// The namespace of the worker's model ([`ModelConfig::DEFAULT`]) with its KV cache in
/// `dtype` (float32 or bfloat16): what the sidecar must be configured with
/// (`examples/worker.toml`).
pub fn namespace(dtype: Dtype) -> Namespace {
    namespace_for(&ModelConfig::DEFAULT, dtype)
}

/// The namespace of a model configuration with its KV cache in `dtype`.
pub fn namespace_for(cfg: &ModelConfig, dtype: Dtype) -> Namespace {
    Namespace {
        label: default_label(dtype),
        model_id: "kvshelf/worker-llama-seeded".into(),
        model_revision: cfg.tag(),
        kv_dtype: dtype,
        layout: Layout {
            num_layers: cfg.layers as u32,
            num_kv_heads: cfg.kv_heads as u32,
            head_dim: cfg.head_dim as u32,
            tp_size: 1,
            tp_rank: 0,
            order: "lkthd".into(),
        },
        block_size: BLOCK_SIZE,
        lora_adapter: None,
        ttl: None,
        max_pinned_bytes: None,
        hash_scheme: Default::default(),
    }
}

/// Byte-level tokenization: one token per byte.
pub fn tokenize(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

/// The text of byte tokens (invalid UTF-8 shown as U+FFFD).
pub fn detokenize(tokens: &[u32]) -> String {
    let bytes: Vec<u8> = tokens.iter().map(|&t| t as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// How to run one request.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Tokens to generate (at least 1).
    pub max_new_tokens: usize,
    /// Use the shelf (lookup, fetch, put). Without it the worker never calls the sidecar.
    pub use_cache: bool,
    /// Wait for the asynchronous put to be answered before returning. Default: true.
    pub await_put: bool,
    /// Test hook: delete block `n` of the prompt from the shelf between lookup and fetch,
    /// so the fetch comes back shorter than the lookup promised.
    pub delete_after_lookup: Option<usize>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            max_new_tokens: 16,
            use_cache: true,
            await_put: true,
            delete_after_lookup: None,
        }
    }
}

/// What happened during one request.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunReport {
    /// Namespace label.
    pub namespace: String,
    /// KV dtype.
    pub dtype: String,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Full blocks of the prompt.
    pub prompt_blocks: usize,
    /// Blocks the lookup said are on the shelf (at most the blocks before the last prompt
    /// token: the last token is always computed, to get its logits).
    pub lookup_blocks: usize,
    /// Blocks actually fetched and loaded (may be fewer than `lookup_blocks`).
    pub fetched_blocks: usize,
    /// Prompt tokens whose KV came from the shelf.
    pub hit_tokens: usize,
    /// Prompt tokens prefilled here.
    pub computed_tokens: usize,
    /// Blocks put on the shelf.
    pub put_blocks: usize,
    /// Put outcomes, when awaited (`stored`, `queued`, `already_present`, `dropped`).
    pub put_outcomes: Vec<String>,
    /// Errors talking to the sidecar (the worker fails open: an error is a miss).
    pub shelf_errors: Vec<String>,
    /// Hashing and lookup, milliseconds.
    pub lookup_ms: f64,
    /// Fetch and load into the KV cache, milliseconds.
    pub fetch_ms: f64,
    /// Payload bytes fetched.
    pub fetch_bytes: usize,
    /// Prefill of the uncached part, milliseconds.
    pub prefill_ms: f64,
    /// Floating-point operations of that prefill's matrix products.
    pub prefill_flops: f64,
    /// Time to first token (request start to first token chosen), milliseconds.
    pub ttft_ms: f64,
    /// Decode of the other tokens, milliseconds.
    pub decode_ms: f64,
    /// Generated token ids.
    pub tokens: Vec<u32>,
    /// Generated text.
    pub text: String,
    /// The logits of every generated position (`tokens.len()` rows of the vocabulary).
    #[serde(skip)]
    pub logits: Vec<Vec<f32>>,
}

impl RunReport {
    /// The logits as raw little-endian f32 bytes, row after row.
    pub fn logits_bytes(&self) -> Vec<u8> {
        self.logits
            .iter()
            .flatten()
            .flat_map(|x| x.to_le_bytes())
            .collect()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A worker: the model, a client of the sidecar, and the namespace it shares KV in.
pub struct Worker {
    model: Model,
    shelf: Client,
    ns: Namespace,
}

impl Worker {
    /// A worker for `ns` (which must be [`namespace_for`] the model's config in float32 or
    /// bfloat16, label aside).
    pub fn new(model: Model, shelf: Client, ns: Namespace) -> Worker {
        assert!(
            kv::supported(ns.kv_dtype),
            "KV dtype must be float32 or bfloat16"
        );
        Worker { model, shelf, ns }
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The namespace.
    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    /// The sidecar client.
    pub fn client(&self) -> &Client {
        &self.shelf
    }

    /// Hashes of the full blocks of `tokens` (no tenant salt: the sidecar has no tokens
    /// configured, or the caller's tenant has no salt).
    pub fn hashes(&self, tokens: &[u32]) -> Vec<BlockHash> {
        PrefixHasher::new(&self.ns, None).hash_prefix(tokens)
    }

    /// Waits until the first `blocks` full blocks of `tokens` are on the shelf (an
    /// asynchronous put lands a little after it is answered). Returns whether they are.
    pub async fn wait_cached(&self, tokens: &[u32], blocks: usize, timeout: Duration) -> bool {
        let hashes = self.hashes(tokens);
        let blocks = blocks.min(hashes.len());
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(l) = self
                .shelf
                .lookup_hashes(&self.ns.label, &hashes[..blocks], false)
                .await
                && l.hit_blocks >= blocks
            {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Serves one request: reuse what the shelf has, prefill the rest, decode greedily.
    pub async fn generate(&self, prompt: &[u32], opts: &RunOptions) -> RunReport {
        assert!(!prompt.is_empty(), "empty prompt");
        let bs = self.ns.block_size as usize;
        let label = self.ns.label.as_str();
        let t0 = Instant::now();
        let mut r = RunReport {
            namespace: label.to_owned(),
            dtype: self.ns.kv_dtype.name().to_owned(),
            prompt_tokens: prompt.len(),
            prompt_blocks: prompt.len() / bs,
            ..Default::default()
        };
        let mut kv = self.model.new_cache(self.ns.kv_dtype);
        let hashes = if opts.use_cache {
            self.hashes(prompt)
        } else {
            Vec::new()
        };

        // 1. Lookup: the longest cached prefix, leaving the last prompt token to compute.
        let usable = hashes.len().min((prompt.len() - 1) / bs);
        if opts.use_cache && usable > 0 {
            match self
                .shelf
                .lookup_hashes(label, &hashes[..usable], false)
                .await
            {
                Ok(l) => r.lookup_blocks = l.hit_blocks.min(usable),
                Err(e) => r.shelf_errors.push(format!("lookup: {e}")),
            }
        }
        r.lookup_ms = ms(t0.elapsed());

        // 2. Fetch the promised blocks; load the leading run that is intact.
        let t1 = Instant::now();
        if r.lookup_blocks > 0 {
            if let Some(n) = opts.delete_after_lookup.filter(|&n| n < r.lookup_blocks)
                && let Err(e) = self.shelf.delete(label, &hashes[n..=n]).await
            {
                r.shelf_errors.push(format!("test delete: {e}"));
            }
            match self.shelf.fetch(label, &hashes[..r.lookup_blocks]).await {
                Ok(f) => {
                    for (i, (hash, payload)) in f.blocks.iter().enumerate() {
                        if *hash != hashes[i] || !kv.load_block(payload, bs) {
                            r.shelf_errors
                                .push(format!("fetch: block {i} does not fit"));
                            break;
                        }
                        r.fetched_blocks += 1;
                        r.fetch_bytes += payload.len();
                    }
                }
                Err(e) => r.shelf_errors.push(format!("fetch: {e}")),
            }
        }
        r.hit_tokens = kv.len();
        r.fetch_ms = ms(t1.elapsed());

        // 3. Prefill the rest, one block-aligned chunk at a time.
        let t2 = Instant::now();
        let mut logits = None;
        let mut pos = kv.len();
        while pos < prompt.len() {
            let end = ((pos / bs + 1) * bs).min(prompt.len());
            let last = end == prompt.len();
            r.prefill_flops += self.model.config().chunk_flops(pos, end - pos, last);
            logits = self.model.forward_chunk(&prompt[pos..end], &mut kv, last);
            pos = end;
        }
        r.computed_tokens = prompt.len() - r.hit_tokens;
        r.prefill_ms = ms(t2.elapsed());
        let logits = logits.expect("the last prompt token is always computed");
        let mut next = argmax(&logits);
        r.ttft_ms = ms(t0.elapsed());
        r.tokens.push(next);
        r.logits.push(logits);

        // 4. Put the prompt's full blocks that were not fetched, asynchronously.
        let put = if opts.use_cache && r.prompt_blocks > r.fetched_blocks {
            let blocks: Vec<(BlockHash, Bytes)> = (r.fetched_blocks..r.prompt_blocks)
                .map(|i| (hashes[i], Bytes::from(kv.block_payload(i * bs, bs))))
                .collect();
            r.put_blocks = blocks.len();
            let shelf = self.shelf.clone();
            let label = label.to_owned();
            Some(tokio::spawn(async move {
                shelf.put(&label, &blocks, true).await
            }))
        } else {
            None
        };

        // 5. Decode, one token at a time.
        let t3 = Instant::now();
        while r.tokens.len() < opts.max_new_tokens.max(1) {
            let l = self
                .model
                .forward_chunk(&[next], &mut kv, true)
                .expect("logits");
            next = argmax(&l);
            r.tokens.push(next);
            r.logits.push(l);
        }
        r.decode_ms = ms(t3.elapsed());
        r.text = detokenize(&r.tokens);

        if let Some(put) = put
            && opts.await_put
        {
            match put.await {
                Ok(Ok(outcomes)) => {
                    r.put_outcomes = outcomes
                        .iter()
                        .map(|o| {
                            serde_json::to_value(o)
                                .ok()
                                .and_then(|v| v.as_str().map(str::to_owned))
                                .unwrap_or_else(|| format!("{o:?}"))
                        })
                        .collect()
                }
                Ok(Err(e)) => r.shelf_errors.push(format!("put: {e}")),
                Err(e) => r.shelf_errors.push(format!("put task: {e}")),
            }
        }
        r
    }
}
