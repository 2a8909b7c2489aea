//! The report as text tables.

use super::Report;
use super::measure::LookupResult;
use super::setup::OVERRIDES;

/// Lookup latencies as a table.
pub fn lookup_table(rows: &[LookupResult]) -> String {
    let mut out = format!(
        "{:>13} {:>12} {:>12} {:>12} {:>12}\n",
        "prefix blocks", "lib p50 ms", "lib p99 ms", "http p50 ms", "http p99 ms"
    );
    for r in rows {
        out.push_str(&format!(
            "{:>13} {:>12.3} {:>12.3} {:>12.3} {:>12.3}\n",
            r.prefix_blocks, r.library_p50_ms, r.library_p99_ms, r.http_p50_ms, r.http_p99_ms
        ));
    }
    out
}

/// The report as text: one row per path with its GB/s (median round, and the range over
/// rounds), its ratios to the ceilings measured in the same run (fetches against
/// redis-benchmark GET, puts against SET; both against loopback TCP) or, without ceilings,
/// to the first path, and its latency percentiles; then the ceilings.
pub fn table(report: &Report) -> String {
    let ceiling = |name: &str| {
        report
            .ceilings
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.gbps)
    };
    let (get, set, wire) = (
        ceiling("redis-benchmark GET"),
        ceiling("redis-benchmark SET"),
        ceiling("loopback TCP"),
    );
    let first = report.paths.first().map_or(1.0, |r| r.gbps);
    let (vs_redis, vs_wire) = if report.ceilings.is_empty() {
        ("vs first", "")
    } else {
        ("vs rb", "vs wire")
    };
    let mut out = format!(
        "{:<9} {:>6} {:>5} {:>5} {:>7} {:>11} {:>7} {:>7} {:>8} {:>8} {:>9} {:>9}\n",
        "path",
        "value",
        "batch",
        "conc",
        "GB/s",
        "rounds",
        vs_redis,
        vs_wire,
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "cpu ms/GB"
    );
    let ratio =
        |v: f64, base: Option<f64>| base.map_or(String::new(), |b| format!("{:.2}x", v / b));
    for r in &report.paths {
        let base = if report.ceilings.is_empty() {
            Some(first)
        } else if r.path.is_put() {
            set
        } else {
            get
        };
        let lo = r.rounds_gbps.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = r.rounds_gbps.iter().copied().fold(0.0, f64::max);
        out.push_str(&format!(
            "{:<9} {:>6} {:>5} {:>5} {:>7.3} {:>11} {:>7} {:>7} {:>8.2} {:>8.2} {:>9.2} {:>9}\n",
            r.path.name(),
            human(r.value_bytes),
            r.batch,
            r.concurrency,
            r.gbps,
            format!("{lo:.2}-{hi:.2}"),
            ratio(r.gbps, base),
            ratio(r.gbps, wire),
            r.p50_ms,
            r.p99_ms,
            r.p999_ms,
            format!("{:.0}+{:.0}", r.cpu_ms_per_gb, r.redis_cpu_ms_per_gb)
        ));
    }
    out.push_str("(cpu ms/GB: this process - clients, in-process sidecars - + Redis)\n");
    if !report.ceilings.is_empty() {
        out.push_str(&format!(
            "\n{:<28} {:>7} {:>13} {:>9} {:>9}\n",
            "ceiling", "GB/s", "rounds", "p50 ms", "p99 ms"
        ));
        let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
        for c in &report.ceilings {
            let rounds: Vec<String> = c.rounds_gbps.iter().map(|g| format!("{g:.2}")).collect();
            out.push_str(&format!(
                "{:<28} {:>7.3} {:>13} {:>9} {:>9}\n",
                c.name,
                c.gbps,
                rounds.join(","),
                ms(c.p50_ms),
                ms(c.p99_ms)
            ));
        }
    }
    out.push_str(&format!("\n{OVERRIDES}\n"));
    out
}

pub(super) fn human(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{}MiB", b >> 20)
    } else {
        format!("{}KiB", b >> 10)
    }
}
