//! `kvshelf bench`: fetch throughput and latency of every path to the same blocks in the
//! same Redis, side by side in one run, so that ratios are honest.
//!
//! Paths: the kvshelf library (`RedisStore::get`, which also verifies each block), and the
//! sidecar over HTTP and over gRPC through [`kvshelf::client`]. The sidecar runs in this
//! process on a loopback port, with its L1 off unless `--l1` (so every fetch reaches Redis
//! and the comparison is with the same server). What Redis itself can serve is measured by
//! its own client, redis-benchmark (`--ceilings`).
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | [`run`]: rounds, path order, the [`Report`]; the [`Progress`] display trait |
//! | `setup.rs` | what to run: [`ValueSize`], [`BenchPath`], [`BenchConfig`], [`OVERRIDES`] |
//! | `fixture.rs` | what a run shares: the blocks, the in-process sidecars, one runner per client |
//! | `measure.rs` | one path for one round (fetches, puts); lookup latency against prefix length |
//! | `ceilings.rs` | external tools: redis-benchmark GET/SET, loopback TCP; CPU seconds |
//! | `tool_addr.rs` | the store's reading of the Redis URL (`StoreConfig::first_node`) as redis-benchmark's and redis-cli's flags |
//! | `stats.rs` | medians over rounds |
//! | `table.rs` | the report as text tables |

mod ceilings;
mod fixture;
mod measure;
mod setup;
mod stats;
mod table;
mod tool_addr;

pub use self::measure::lookup_latency;
pub use self::setup::{BenchConfig, BenchPath, ValueSize};
pub use self::table::{lookup_table, table};

use std::time::Duration;

use serde::Serialize;

use self::ceilings::{Ceiling, ceilings, cpu_seconds};
use self::fixture::{Fixture, distinct_blocks};
use self::measure::{PathResult, measure};
use self::stats::{median, median_ceilings};

/// The whole report of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Every path, in the order asked for.
    pub paths: Vec<PathResult>,
    /// The ceilings (empty unless asked for).
    pub ceilings: Vec<Ceiling>,
}

/// Puts the bench blocks, then measures every path (and the ceilings) once per round,
/// rotating the order of paths from round to round, and reports each path's median round.
pub async fn run(cfg: &BenchConfig, progress: &dyn Progress) -> anyhow::Result<Report> {
    anyhow::ensure!(
        cfg.batch >= 1 && cfg.concurrency >= 1 && cfg.requests >= 1 && cfg.rounds >= 1,
        "batch, concurrency, requests and rounds must be at least 1"
    );
    let fixture = Fixture::new(cfg).await?;
    let mut samples: Vec<(Vec<f64>, Vec<Duration>)> = vec![Default::default(); cfg.paths.len()];
    // Per path: bytes moved, CPU seconds of this process, of Redis.
    let mut cpu: Vec<(f64, f64, f64)> = vec![(0.0, 0.0, 0.0); cfg.paths.len()];
    let mut ceiling_rounds: Vec<Vec<Ceiling>> = Vec::new();
    for round in 0..cfg.rounds {
        if cfg.ceilings {
            progress.start(&format!("round {}/{}: ceilings", round + 1, cfg.rounds), 0);
            ceiling_rounds.push(ceilings(cfg, distinct_blocks(cfg)).await?);
            progress.finish();
        }
        for k in 0..cfg.paths.len() {
            let i = (k + round) % cfg.paths.len();
            let path = cfg.paths[i];
            progress.start(
                &format!("round {}/{}: {}", round + 1, cfg.rounds, path.name()),
                cfg.requests as u64,
            );
            let before = cpu_seconds(&fixture.store).await?;
            let (gbps, lat, bytes) = measure(cfg, &fixture, path, round, progress).await?;
            let after = cpu_seconds(&fixture.store).await?;
            if path.is_put() {
                fixture.store.purge(&fixture.put_ns.label).await?;
            }
            progress.finish();
            cpu[i].0 += bytes as f64;
            cpu[i].1 += after.0 - before.0;
            cpu[i].2 += after.1 - before.1;
            samples[i].0.push(gbps);
            samples[i].1.extend(lat);
        }
    }
    let value_bytes = fixture.ns.block_bytes();
    fixture.stop().await?;
    let paths = cfg
        .paths
        .iter()
        .zip(samples)
        .zip(cpu)
        .map(|((&path, (rounds_gbps, mut lat)), (bytes, own, redis))| {
            lat.sort_unstable();
            let pct = |p: f64| {
                lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3
            };
            PathResult {
                path,
                value_bytes,
                batch: cfg.batch,
                concurrency: cfg.concurrency,
                requests: lat.len(),
                gbps: median(&rounds_gbps),
                rounds_gbps,
                p50_ms: pct(0.50),
                p99_ms: pct(0.99),
                p999_ms: pct(0.999),
                cpu_ms_per_gb: own * 1e3 / (bytes / 1e9),
                redis_cpu_ms_per_gb: redis * 1e3 / (bytes / 1e9),
            }
        })
        .collect();
    Ok(Report {
        paths,
        ceilings: median_ceilings(&ceiling_rounds),
    })
}

/// A progress display: one bar per measured step.
pub trait Progress: Sync {
    /// A step starts; `total` requests (0: no count, just a spinner).
    fn start(&self, what: &str, total: u64);
    /// Requests done so far in this step.
    fn set(&self, done: u64);
    /// The step ended.
    fn finish(&self);
}
