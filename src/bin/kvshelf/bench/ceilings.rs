//! Ceilings measured in the same run by tools other than kvshelf: redis-benchmark GET/SET
//! of the same values, a loopback TCP stream; and CPU seconds of this process and Redis.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::setup::BenchConfig;
use super::tool_addr::{Tool, ToolAddr};
use kvshelf::store::RedisStore;

/// A ceiling measured in the same run: what Redis's own client or the wire can carry.
#[derive(Clone, Debug, Serialize)]
pub struct Ceiling {
    /// What was measured.
    pub name: String,
    /// Payload GB/s.
    pub gbps: f64,
    /// Median request latency, milliseconds (None for the TCP stream).
    pub p50_ms: Option<f64>,
    /// 99th percentile, milliseconds.
    pub p99_ms: Option<f64>,
    /// Each round's GB/s (the reported one is the median round).
    pub rounds_gbps: Vec<f64>,
}

/// The ceilings for `cfg`'s value size, batch and client count: `redis-benchmark -t set,get`
/// over the same number of distinct keys as the paths read (`-r keys`), the same again on
/// ONE key (redis-benchmark's default, which keeps the value hot in every cache), and a
/// loopback TCP stream (the wire's ceiling, measured in-process like iperf3 would: one
/// sender, one receiver, 1 MiB reads).
///
/// redis-benchmark gives up on some extreme cells (e.g. 32 MiB values pipelined by 8: "All
/// clients disconnected"); such a ceiling is left out with a warning, not the whole run.
pub async fn ceilings(cfg: &BenchConfig, keys: usize) -> anyhow::Result<Vec<Ceiling>> {
    let or_warn = |r: anyhow::Result<Vec<Ceiling>>| {
        r.unwrap_or_else(|e| {
            eprintln!("kvshelf bench: no redis-benchmark ceiling for this cell: {e:#}");
            Vec::new()
        })
    };
    let mut out = or_warn(redis_benchmark(cfg, Some(keys)).await);
    out.extend(
        or_warn(redis_benchmark(cfg, None).await)
            .into_iter()
            .filter(|c| c.name.ends_with("GET"))
            .map(|c| Ceiling {
                name: format!("{} (1 key)", c.name),
                ..c
            }),
    );
    out.push(Ceiling {
        name: "loopback TCP".into(),
        gbps: loopback_gbps(Duration::from_secs(2)).await?,
        p50_ms: None,
        p99_ms: None,
        rounds_gbps: Vec::new(),
    });
    Ok(out)
}

pub(super) async fn redis_benchmark(
    cfg: &BenchConfig,
    keys: Option<usize>,
) -> anyhow::Result<Vec<Ceiling>> {
    let size = cfg.size.namespace().block_bytes();
    let addr = ToolAddr::of(&cfg.store)?;
    // As many values as the paths move in a round, at least 50 and at most ~4 GB.
    let requests = (cfg.requests * cfg.batch)
        .min((4_000_000_000 / size) as usize)
        .max(50);
    let mut cmd = tokio::process::Command::new("redis-benchmark");
    cmd.args(addr.args(Tool::Benchmark))
        .args(["-t", "set,get", "--csv"])
        .args(["-d", &size.to_string(), "-n", &requests.to_string()])
        .args([
            "-c",
            &cfg.concurrency.to_string(),
            "-P",
            &cfg.batch.to_string(),
        ]);
    if let Some(keys) = keys {
        cmd.args(["-r", &keys.to_string()]);
    }
    let out = cmd.output().await.map_err(|e| {
        anyhow::anyhow!("redis-benchmark (from redis-tools) is needed for the ceiling: {e}")
    })?;
    // redis-benchmark reports a bad option on stdout (with its usage), the rest on stderr.
    anyhow::ensure!(
        out.status.success(),
        "redis-benchmark failed: {} {}",
        String::from_utf8_lossy(&out.stderr).trim(),
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
    );
    let mut result = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let cols: Vec<&str> = line.split(',').map(|c| c.trim_matches('"')).collect();
        if let [test @ ("GET" | "SET"), rps, _, _, p50, _, p99, ..] = cols[..] {
            let rps: f64 = rps.parse()?;
            result.push(Ceiling {
                name: format!("redis-benchmark {test}"),
                gbps: rps * size as f64 / 1e9,
                p50_ms: p50.parse().ok(),
                p99_ms: p99.parse().ok(),
                rounds_gbps: Vec::new(),
            });
        }
    }
    anyhow::ensure!(
        result.len() == 2,
        "could not parse redis-benchmark's CSV output"
    );
    // Remove exactly the keys redis-benchmark wrote (`key:__rand_int__`, or with `-r n`
    // `key:` and 12 digits below n), so they hold no memory after the ceiling.
    let doomed: Vec<String> = match keys {
        None => vec!["key:__rand_int__".into()],
        Some(n) => (0..n).map(|i| format!("key:{i:012}")).collect(),
    };
    // With redis-cli, as redis-benchmark wrote them: same address, same credentials.
    for chunk in doomed.chunks(512) {
        let out = tokio::process::Command::new("redis-cli")
            .args(addr.args(Tool::Cli))
            .args(addr.has_password().then_some("--no-auth-warning"))
            .arg("UNLINK")
            .args(chunk)
            .output()
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "redis-cli (from redis-tools) is needed to remove redis-benchmark's keys: {e}"
                )
            })?;
        // redis-cli exits 0 on an error reply too: the reply must be UNLINK's count.
        let reply = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            out.status.success() && reply.trim().parse::<u64>().is_ok(),
            "redis-cli UNLINK of redis-benchmark's keys failed: {} {}",
            reply.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(result)
}

pub(super) async fn loopback_gbps(duration: Duration) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let reader = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = sock.read(&mut buf).await?;
            if n == 0 {
                return anyhow::Ok(total);
            }
            total += n as u64;
        }
    });
    let mut sock = tokio::net::TcpStream::connect(addr).await?;
    sock.set_nodelay(true)?;
    let chunk = vec![0x5au8; 8 << 20];
    let started = Instant::now();
    while started.elapsed() < duration {
        sock.write_all(&chunk).await?;
    }
    sock.shutdown().await?;
    drop(sock);
    let total = reader.await??;
    Ok(total as f64 / started.elapsed().as_secs_f64() / 1e9)
}

/// CPU seconds used so far by this process (`/proc/self/stat`, all threads) and by Redis.
pub(super) async fn cpu_seconds(store: &RedisStore) -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime and stime are the
    // 12th and 13th, in clock ticks of USER_HZ (100 on Linux).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: Vec<f64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse().ok())
        .collect();
    let own = ticks.iter().sum::<f64>() / 100.0;
    let info = store.info("cpu").await?;
    let redis = info
        .lines()
        .filter_map(|l| {
            l.strip_prefix("used_cpu_sys:")
                .or_else(|| l.strip_prefix("used_cpu_user:"))
        })
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum();
    Ok((own, redis))
}
