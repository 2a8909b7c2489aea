//! `kvshelf-worker bench`: time to first token with the shelf against full recompute, for
//! a range of shared prefix lengths, and the crossover where fetching starts to win.

use std::fmt::Write as _;
use std::time::Duration;

use super::{RunOptions, RunReport, Worker};

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Shared prefix lengths in tokens (rounded down to whole blocks).
    pub prefixes: Vec<usize>,
    /// Tokens after the shared prefix, different in every request.
    pub suffix: usize,
    /// Repetitions of each measurement (the median is reported); prefixes of more than
    /// `long_prefix` tokens are measured once.
    pub reps: usize,
    /// See `reps`.
    pub long_prefix: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            prefixes: vec![16, 32, 64, 128, 256, 512, 2048, 8192],
            suffix: 16,
            reps: 3,
            long_prefix: 4096,
        }
    }
}

/// One prefix length's measurements (medians over the repetitions).
#[derive(Clone, Debug)]
pub struct Row {
    /// Shared prefix, tokens.
    pub prefix: usize,
    /// TTFT recomputing the whole prompt, ms.
    pub full_ttft_ms: f64,
    /// Prefill FLOP/s of the full recompute.
    pub full_flops_per_s: f64,
    /// TTFT with the prefix taken off the shelf, ms.
    pub cached_ttft_ms: f64,
    /// Of which: hashing + lookup, ms.
    pub lookup_ms: f64,
    /// Of which: fetch + load into the KV cache, ms.
    pub fetch_ms: f64,
    /// Of which: prefill of the uncached suffix, ms.
    pub suffix_prefill_ms: f64,
    /// Bytes fetched.
    pub fetch_bytes: usize,
    /// Tokens served from the shelf.
    pub hit_tokens: usize,
    /// Every repetition's (lookup + fetch) ms, with the shelf.
    pub shelf_ms: Vec<f64>,
    /// The fastest repetition's TTFT with the shelf, ms.
    pub cached_best_ms: f64,
}

impl Row {
    /// Fetch throughput, GB/s (10^9 bytes).
    pub fn fetch_gbps(&self) -> f64 {
        self.fetch_bytes as f64 / (self.fetch_ms * 1e-3) / 1e9
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Deterministic filler text of `n` bytes, starting with `tag` (so that each benchmark run
/// and prefix has prefixes of its own, absent from the shelf at first).
fn text(tag: &str, n: usize) -> Vec<u32> {
    const WORDS: &[&str] = &[
        "the",
        "shelf",
        "holds",
        "blocks",
        "of",
        "keys",
        "and",
        "values",
        "that",
        "a",
        "worker",
        "fetches",
        "instead",
        "recomputing",
        "prefill",
        "for",
        "every",
        "prompt",
    ];
    let mut out: Vec<u32> = tag.bytes().map(u32::from).collect();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let w = WORDS[(x % WORDS.len() as u64) as usize];
        out.extend(w.bytes().map(u32::from));
        out.push(u32::from(b' '));
    }
    out.truncate(n);
    out
}

/// Runs the benchmark; `progress` gets a line per measurement.
pub async fn run(
    worker: &Worker,
    opts: &BenchOptions,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<Vec<Row>> {
    let bs = worker.namespace().block_size as usize;
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let once = RunOptions {
        max_new_tokens: 1,
        ..Default::default()
    };
    let mut rows = Vec::new();
    for &p in &opts.prefixes {
        let p = (p / bs).max(1) * bs;
        let reps = if p > opts.long_prefix {
            1
        } else {
            opts.reps.max(1)
        };
        let prefix = text(&format!("[bench {nonce:x} prefix {p}] "), p);
        let prompt = |i: usize| {
            let mut t = prefix.clone();
            t.extend(text(&format!("<suffix {i}> "), opts.suffix.max(1)));
            t
        };

        // Full recompute: the shelf is not touched.
        let mut full: Vec<RunReport> = Vec::new();
        for i in 0..reps {
            let r = worker
                .generate(
                    &prompt(1000 + i),
                    &RunOptions {
                        use_cache: false,
                        ..once.clone()
                    },
                )
                .await;
            progress(&format!("prefix {p}: full recompute {:.1} ms", r.ttft_ms));
            full.push(r);
        }

        // Warm the shelf with the prefix, wait until its blocks landed.
        let warm = prompt(0);
        let r = worker.generate(&warm, &once).await;
        anyhow::ensure!(
            r.shelf_errors.is_empty(),
            "warming the shelf failed: {:?}",
            r.shelf_errors
        );
        anyhow::ensure!(
            worker
                .wait_cached(&warm, p / bs, Duration::from_secs(30))
                .await,
            "the prefix's blocks did not land on the shelf"
        );

        // With the shelf: a different suffix each time.
        let mut cached: Vec<RunReport> = Vec::new();
        for i in 0..reps {
            let r = worker.generate(&prompt(1 + i), &once).await;
            anyhow::ensure!(
                r.hit_tokens == p,
                "expected {p} cached tokens, got {} ({:?})",
                r.hit_tokens,
                r.shelf_errors
            );
            progress(&format!(
                "prefix {p}: cached {:.1} ms (lookup {:.1}, fetch {:.1}, prefill {:.1})",
                r.ttft_ms, r.lookup_ms, r.fetch_ms, r.prefill_ms
            ));
            cached.push(r);
        }
        let m = |v: &[RunReport], f: fn(&RunReport) -> f64| median(v.iter().map(f).collect());
        rows.push(Row {
            prefix: p,
            full_ttft_ms: m(&full, |r| r.ttft_ms),
            full_flops_per_s: m(&full, |r| r.prefill_flops / (r.prefill_ms * 1e-3)),
            cached_ttft_ms: m(&cached, |r| r.ttft_ms),
            lookup_ms: m(&cached, |r| r.lookup_ms),
            fetch_ms: m(&cached, |r| r.fetch_ms),
            suffix_prefill_ms: m(&cached, |r| r.prefill_ms),
            fetch_bytes: cached[0].fetch_bytes,
            hit_tokens: cached[0].hit_tokens,
            shelf_ms: cached.iter().map(|r| r.lookup_ms + r.fetch_ms).collect(),
            cached_best_ms: cached
                .iter()
                .map(|r| r.ttft_ms)
                .fold(f64::INFINITY, f64::min),
        });
    }
    Ok(rows)
}

/// The results as a Markdown table, the crossover and its explanation.
pub fn report(worker: &Worker, opts: &BenchOptions, rows: &[Row]) -> String {
    let ns = worker.namespace();
    let cfg = worker.model().config();
    let bs = ns.block_size as usize;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "model: {} ({:.2} M parameters), KV {} in namespace `{}`, block {} tokens = {} bytes, \
         suffix {} tokens, median of {} repetitions (1 above {} tokens)\n",
        cfg.tag(),
        cfg.parameters() as f64 / 1e6,
        ns.kv_dtype,
        ns.label,
        bs,
        ns.block_bytes(),
        opts.suffix,
        opts.reps,
        opts.long_prefix,
    );
    let _ = writeln!(
        s,
        "| shared prefix (tokens) | TTFT full recompute (ms) | TTFT with shelf (ms) | \
         = lookup + fetch + suffix prefill (ms) | best TTFT with shelf (ms) | speed-up | \
         fetched | fetch GB/s | prefill GFLOP/s |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---|---:|---:|---:|---:|---:|");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {:.1} | {:.1} | {:.1} + {:.1} + {:.1} | {:.1} | {:.2}× | {:.2} MiB | {:.2} | {:.2} |",
            r.prefix,
            r.full_ttft_ms,
            r.cached_ttft_ms,
            r.lookup_ms,
            r.fetch_ms,
            r.suffix_prefill_ms,
            r.cached_best_ms,
            r.full_ttft_ms / r.cached_ttft_ms,
            r.fetch_bytes as f64 / (1 << 20) as f64,
            r.fetch_gbps(),
            r.full_flops_per_s / 1e9,
        );
    }
    if rows.is_empty() {
        return s;
    }

    // Measured crossover: the shortest prefix from which the shelf wins at every longer one.
    let measured = rows
        .iter()
        .rposition(|r| r.cached_ttft_ms >= r.full_ttft_ms)
        .map_or(Some(rows[0].prefix), |i| rows.get(i + 1).map(|r| r.prefix));
    // Model: skipping a prefix of P tokens saves flops(P) / F of compute and costs a fixed
    // round trip C plus P × b / B of transfer.
    let longest = rows.iter().max_by_key(|r| r.prefix).expect("rows");
    let bw = longest.fetch_bytes as f64 / (longest.fetch_ms * 1e-3); // bytes/s
    let per_token_bytes = ns.block_bytes() as f64 / bs as f64;
    // The fixed cost of using the shelf: lookup + fetch minus the transfer itself, for the
    // fastest repetition of each prefix, median over prefixes. Repetitions more than 30 ms
    // above it are counted as stalls.
    let overhead = |ms: f64, r: &Row| (ms * 1e-3 - r.fetch_bytes as f64 / bw).max(0.0);
    let fixed_s = median(
        rows.iter()
            .map(|r| overhead(r.shelf_ms.iter().copied().fold(f64::INFINITY, f64::min), r))
            .collect(),
    );
    let stalls: Vec<f64> = rows
        .iter()
        .flat_map(|r| r.shelf_ms.iter().map(move |&ms| overhead(ms, r)))
        .filter(|&o| o > fixed_s + 0.030)
        .collect();
    let fetches: usize = rows.iter().map(|r| r.shelf_ms.len()).sum();
    let ref_row = rows.iter().find(|r| r.prefix >= 512).unwrap_or(longest);
    let f = ref_row.full_flops_per_s;
    // FLOPs of the first tokens of a prompt, per token (attention over a short context).
    let flop_per_token = cfg.chunk_flops(0, bs, false) / bs as f64;
    let compute_per_token = flop_per_token / f;
    let fetch_per_token = per_token_bytes / bw;
    let saved_per_token = compute_per_token - fetch_per_token;
    let predicted = fixed_s / saved_per_token;
    let _ = writeln!(s);
    match measured {
        Some(p) => {
            let _ = writeln!(
                s,
                "Measured crossover: the shelf wins from a shared prefix of {p} tokens on \
                 (the shortest measured length from which its median TTFT wins at every \
                 longer one)."
            );
        }
        None => {
            let _ = writeln!(s, "Measured crossover: the shelf never won in this run.");
        }
    }
    let _ = writeln!(
        s,
        "\nWhy: recomputing a prompt token costs {:.2} MFLOP of matrix products (more with a \
         longer context, for attention); at the measured {:.2} GFLOP/s prefill rate (prefix \
         {}) that is {:.1} µs per token. Fetching it moves {} bytes of KV; at the measured \
         {:.2} GB/s fetch rate (prefix {}, fetch and load into the KV cache) that is {:.2} µs \
         per token, {:.0}× cheaper. What the shelf adds is a fixed cost of about {:.2} ms per \
         request (lookup and fetch round trips: the fastest repetition of each prefix, median \
         over prefixes), so it wins once P × ({:.1} − {:.2}) µs > {:.2} ms, i.e. from \
         P ≈ {:.1} tokens: from the first block of {}, the smallest hit there is.",
        flop_per_token / 1e6,
        f / 1e9,
        ref_row.prefix,
        compute_per_token * 1e6,
        per_token_bytes,
        bw / 1e9,
        longest.prefix,
        fetch_per_token * 1e6,
        compute_per_token / fetch_per_token,
        fixed_s * 1e3,
        compute_per_token * 1e6,
        fetch_per_token * 1e6,
        fixed_s * 1e3,
        predicted,
        bs,
    );
    if !stalls.is_empty() {
        let stall_s = median(stalls.clone());
        let _ = writeln!(
            s,
            "\nStalls: {} of {} fetches with the shelf took about {:.0} ms more than that \
             (median of those), the TCP delayed-ACK time: when one hits, the fixed cost is \
             {:.1} ms and the shelf only wins from P ≈ {:.0} tokens ({:.1} blocks). That is \
             what moves the measured crossover above one block when a short prefix's median \
             repetition stalled.",
            stalls.len(),
            fetches,
            (stall_s - fixed_s) * 1e3,
            stall_s * 1e3,
            stall_s / saved_per_token,
            stall_s / saved_per_token / bs as f64,
        );
    }
    s
}
