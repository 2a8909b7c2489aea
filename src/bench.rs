//! `kvshelf bench`: fetch throughput and latency of every path to the same blocks in the
//! same Redis, side by side in one run, so that ratios are honest.
//!
//! Paths: a plain redis-rs pipelined GET loop (the baseline: what a Rust worker talking to
//! Redis directly gets), the kvshelf library (`RedisStore::get`, which also verifies each
//! block), and the sidecar over HTTP and over gRPC through [`crate::client`]. The sidecar
//! runs in this process on a loopback port, with its L1 off unless `--l1` (so every fetch
//! reaches Redis and the comparison is with the same server).

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use crate::client::{Client, ClientConfig, Protocol};
use crate::config::Config;
use crate::hashing::{BlockHash, PrefixHasher};
use crate::namespace::{Dtype, Layout, Namespace};
use crate::store::{RedisStore, StoreConfig, block_key};

/// The value sizes the bench knows, named after the KV blocks they stand for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum ValueSize {
    /// 192 KiB: a 16-token block of a 0.5B-class model (24 layers, 2 KV heads × 64, bf16).
    #[value(name = "192KiB")]
    K192,
    /// 2 MiB: a 16-token block of an 8B-class model (32 layers, 8 KV heads × 128, bf16).
    #[value(name = "2MiB")]
    M2,
    /// 32 MiB: a 256-token chunk of the 8B-class model.
    #[value(name = "32MiB")]
    M32,
}

impl ValueSize {
    /// The namespace whose blocks have this size.
    pub fn namespace(self) -> Namespace {
        let (label, layers, heads, dim, block) = match self {
            ValueSize::K192 => ("bench-192kib", 24, 2, 64, 16),
            ValueSize::M2 => ("bench-2mib", 32, 8, 128, 16),
            ValueSize::M32 => ("bench-32mib", 32, 8, 128, 256),
        };
        Namespace {
            label: label.into(),
            model_id: format!("kvshelf/bench-{label}"),
            model_revision: String::new(),
            kv_dtype: Dtype::Bfloat16,
            layout: Layout {
                num_layers: layers,
                num_kv_heads: heads,
                head_dim: dim,
                tp_size: 1,
                tp_rank: 0,
                order: "lkthd".into(),
            },
            block_size: block,
            lora_adapter: None,
            ttl: Some(Duration::from_secs(600)),
        }
    }
}

/// One path to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchPath {
    /// Plain redis-rs: one pipelined `GET` per block of the batch (the baseline).
    RedisRs,
    /// The kvshelf library straight to Redis (`RedisStore::get`, verifying each block).
    Library,
    /// The sidecar over HTTP (framed stream).
    Http,
    /// The sidecar over gRPC (server stream).
    Grpc,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Redis URL.
    pub redis_url: String,
    /// Value size.
    pub size: ValueSize,
    /// Blocks per request.
    pub batch: usize,
    /// Concurrent clients.
    pub concurrency: usize,
    /// Requests per path.
    pub requests: usize,
    /// Paths, in order.
    pub paths: Vec<BenchPath>,
    /// Keep the sidecar's L1 on (fetches then mostly hit L1, not Redis).
    pub l1: bool,
}

/// The measurement of one path.
#[derive(Clone, Debug, Serialize)]
pub struct PathResult {
    /// Which path.
    pub path: BenchPath,
    /// Bytes of payload per block.
    pub value_bytes: u64,
    /// Blocks per request.
    pub batch: usize,
    /// Concurrent clients.
    pub concurrency: usize,
    /// Requests completed.
    pub requests: usize,
    /// Payload GB/s (10^9 bytes per second) over the wall time.
    pub gbps: f64,
    /// Request latency percentiles, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
}

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
}

/// `redis-benchmark -t set,get` with the same value size and client count, parsed from its
/// CSV output, and a loopback TCP stream (the wire's ceiling, measured in-process like
/// iperf3 would: one sender, one receiver, 1 MiB reads).
pub async fn ceilings(cfg: &BenchConfig) -> anyhow::Result<Vec<Ceiling>> {
    let ns = cfg.size.namespace();
    let size = ns.block_bytes();
    let info = redis::IntoConnectionInfo::into_connection_info(cfg.redis_url.as_str())?;
    let (host, port) = match info.addr() {
        redis::ConnectionAddr::Tcp(h, p)
        | redis::ConnectionAddr::TcpTls {
            host: h, port: p, ..
        } => (h.clone(), *p),
        other => anyhow::bail!("redis-benchmark needs a TCP address, not {other:?}"),
    };
    let requests = (cfg.requests * cfg.batch).max(50);
    let out = tokio::process::Command::new("redis-benchmark")
        .args([
            "-h",
            &host,
            "-p",
            &port.to_string(),
            "-t",
            "set,get",
            "--csv",
        ])
        .args([
            "-d",
            &size.to_string(),
            "-n",
            &requests.to_string(),
            "-c",
            &cfg.concurrency.to_string(),
        ])
        .args(["-P", &cfg.batch.to_string()])
        .output()
        .await
        .map_err(|e| {
            anyhow::anyhow!("redis-benchmark (from redis-tools) is needed for the ceiling: {e}")
        })?;
    anyhow::ensure!(
        out.status.success(),
        "redis-benchmark failed: {}",
        String::from_utf8_lossy(&out.stderr)
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
            });
        }
    }
    anyhow::ensure!(
        result.len() == 2,
        "could not parse redis-benchmark's CSV output"
    );
    result.push(Ceiling {
        name: "loopback TCP".into(),
        gbps: loopback_gbps(Duration::from_secs(2)).await?,
        p50_ms: None,
        p99_ms: None,
    });
    Ok(result)
}

async fn loopback_gbps(duration: Duration) -> anyhow::Result<f64> {
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

/// The ceilings as a table.
pub fn ceiling_table(ceilings: &[Ceiling]) -> String {
    let mut out = format!(
        "{:<22} {:>8} {:>9} {:>9}\n",
        "ceiling", "GB/s", "p50 ms", "p99 ms"
    );
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
    for c in ceilings {
        out.push_str(&format!(
            "{:<22} {:>8.3} {:>9} {:>9}\n",
            c.name,
            c.gbps,
            ms(c.p50_ms),
            ms(c.p99_ms)
        ));
    }
    out
}

/// Lookup latency for one prefix length.
#[derive(Clone, Debug, Serialize)]
pub struct LookupResult {
    /// Blocks in the prefix looked up.
    pub prefix_blocks: usize,
    /// Through the library (one pipelined round trip to Redis).
    pub library_p50_ms: f64,
    /// 99th percentile.
    pub library_p99_ms: f64,
    /// Through the sidecar over HTTP, by block hashes.
    pub http_p50_ms: f64,
    /// 99th percentile.
    pub http_p99_ms: f64,
}

/// Lookup latency against prefix length (1 … 4096 blocks, all present), sequential
/// requests, `requests` per length and path.
pub async fn lookup_latency(redis_url: &str, requests: usize) -> anyhow::Result<Vec<LookupResult>> {
    let mut ns = ValueSize::K192.namespace();
    // Tiny blocks: lookups never read payloads, and 4096 of them must fit any Redis.
    ns.label = "bench-lookup".into();
    ns.layout.num_layers = 1;
    ns.layout.head_dim = 8;
    let store = RedisStore::connect(StoreConfig {
        url: redis_url.to_owned(),
        ..Default::default()
    })
    .await?;
    let tokens: Vec<u32> = (0..4096 * ns.block_size).collect();
    let hashes = PrefixHasher::new(&ns, None).hash_prefix(&tokens);
    for chunk in hashes.chunks(512) {
        let blocks: Vec<(BlockHash, Bytes)> = chunk.iter().map(|h| (*h, payload(&ns, h))).collect();
        store.put(&ns, &blocks).await?;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut cfg = Config {
        store: Some(store.config().clone()),
        namespaces: vec![ns.clone()],
        ..Default::default()
    };
    cfg.server.l1_bytes = 0;
    let shelf = crate::shelf::Shelf::new(&cfg)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::server::run(listener, shelf, async {
        let _ = stop_rx.await;
    }));
    let client = Client::new(ClientConfig {
        url: format!("http://{addr}"),
        ..Default::default()
    })?;
    let mut out = Vec::new();
    for len in [1usize, 16, 64, 256, 1024, 4096] {
        let prefix = &hashes[..len];
        let (mut lib, mut http) = (Vec::new(), Vec::new());
        for _ in 0..requests {
            let t = Instant::now();
            anyhow::ensure!(
                store.lookup(&ns, prefix).await? == len,
                "lookup lost blocks"
            );
            lib.push(t.elapsed());
            let t = Instant::now();
            anyhow::ensure!(
                client
                    .lookup_hashes(&ns.label, prefix, false)
                    .await?
                    .hit_blocks
                    == len
            );
            http.push(t.elapsed());
        }
        let pct = |v: &mut Vec<Duration>, p: f64| {
            v.sort_unstable();
            v[((v.len() as f64 * p) as usize).min(v.len() - 1)].as_secs_f64() * 1e3
        };
        out.push(LookupResult {
            prefix_blocks: len,
            library_p50_ms: pct(&mut lib, 0.5),
            library_p99_ms: pct(&mut lib, 0.99),
            http_p50_ms: pct(&mut http, 0.5),
            http_p99_ms: pct(&mut http, 0.99),
        });
    }
    let _ = stop_tx.send(());
    let _ = server.await;
    store.purge(&ns.label).await?;
    Ok(out)
}

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

enum Runner {
    RedisRs(redis::aio::MultiplexedConnection, Vec<String>),
    Library(RedisStore),
    Sidecar(Client),
}

/// Puts the bench blocks, runs every path, and returns one result per path.
pub async fn run(
    cfg: &BenchConfig,
    mut progress: impl FnMut(BenchPath, usize),
) -> anyhow::Result<Vec<PathResult>> {
    let ns = cfg.size.namespace();
    let store = RedisStore::connect(StoreConfig {
        url: cfg.redis_url.clone(),
        response_timeout: Duration::from_secs(30),
        ..Default::default()
    })
    .await?;
    // Enough distinct blocks that concurrent requests read different keys.
    let n_blocks = (cfg.batch * cfg.concurrency).clamp(cfg.batch, 256);
    let tokens: Vec<u32> = (0..n_blocks as u32 * ns.block_size).collect();
    let hashes = PrefixHasher::new(&ns, None).hash_prefix(&tokens);
    for chunk in hashes.chunks(8) {
        let blocks: Vec<(BlockHash, Bytes)> = chunk.iter().map(|h| (*h, payload(&ns, h))).collect();
        store.put(&ns, &blocks).await?;
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut server_cfg = Config {
        store: Some(StoreConfig {
            url: cfg.redis_url.clone(),
            response_timeout: Duration::from_secs(30),
            ..Default::default()
        }),
        namespaces: vec![ns.clone()],
        ..Default::default()
    };
    // Measure throughput, not the fail-open budget: generous timeouts and limits.
    server_cfg.server.fetch_timeout = Duration::from_secs(30);
    server_cfg.server.lookup_timeout = Duration::from_secs(30);
    server_cfg.server.max_concurrent_requests = 4096;
    server_cfg.server.fetch_chunk_bytes = 64 << 20;
    if !cfg.l1 {
        server_cfg.server.l1_bytes = 0;
    }
    let shelf = crate::shelf::Shelf::new(&server_cfg)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::server::run(listener, shelf, async {
        let _ = stop_rx.await;
    }));

    let mut results = Vec::new();
    for &path in &cfg.paths {
        let runner = match path {
            BenchPath::RedisRs => {
                let conn = redis::Client::open(cfg.redis_url.as_str())?
                    .get_multiplexed_async_connection_with_config(
                        &redis::AsyncConnectionConfig::new()
                            .set_response_timeout(Some(Duration::from_secs(30))),
                    )
                    .await?;
                Runner::RedisRs(
                    conn,
                    hashes.iter().map(|h| block_key(&ns.label, h)).collect(),
                )
            }
            BenchPath::Library => Runner::Library(store.clone()),
            BenchPath::Http | BenchPath::Grpc => Runner::Sidecar(Client::new(ClientConfig {
                url: format!("http://{addr}"),
                protocol: if path == BenchPath::Http {
                    Protocol::Http
                } else {
                    Protocol::Grpc
                },
                timeout: Duration::from_secs(60),
                ..Default::default()
            })?),
        };
        let runner = std::sync::Arc::new(runner);
        // Warm up connections (and the sidecar's L1 when on).
        one_request(&runner, &ns, &hashes, 0, cfg.batch).await?;
        let started = Instant::now();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for client in 0..cfg.concurrency {
            let (runner, ns, hashes, done) =
                (runner.clone(), ns.clone(), hashes.clone(), done.clone());
            let (batch, total, concurrency) = (cfg.batch, cfg.requests, cfg.concurrency);
            tasks.spawn(async move {
                let mut lat = Vec::new();
                let mut bytes = 0u64;
                let mut i = client;
                while i < total {
                    let start = (i * batch) % hashes.len();
                    let t = Instant::now();
                    bytes += one_request(&runner, &ns, &hashes, start, batch).await?;
                    lat.push(t.elapsed());
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    i += concurrency;
                }
                anyhow::Ok((lat, bytes))
            });
        }
        let mut lat = Vec::new();
        let mut bytes = 0;
        loop {
            tokio::select! {
                joined = tasks.join_next() => match joined {
                    Some(r) => {
                        let (l, b) = r??;
                        lat.extend(l);
                        bytes += b;
                    }
                    None => break,
                },
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    progress(path, done.load(std::sync::atomic::Ordering::Relaxed));
                }
            }
        }
        progress(path, cfg.requests);
        let secs = started.elapsed().as_secs_f64();
        lat.sort_unstable();
        let pct =
            |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3;
        results.push(PathResult {
            path,
            value_bytes: ns.block_bytes(),
            batch: cfg.batch,
            concurrency: cfg.concurrency,
            requests: lat.len(),
            gbps: bytes as f64 / secs / 1e9,
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            p999_ms: pct(0.999),
        });
    }
    let _ = stop_tx.send(());
    let _ = server.await;
    Ok(results)
}

/// One request of `batch` blocks from `start` (wrapping); returns the payload bytes read.
async fn one_request(
    runner: &Runner,
    ns: &Namespace,
    hashes: &[BlockHash],
    start: usize,
    batch: usize,
) -> anyhow::Result<u64> {
    let idx: Vec<usize> = (0..batch).map(|k| (start + k) % hashes.len()).collect();
    let want = batch as u64 * ns.block_bytes();
    let got = match runner {
        Runner::RedisRs(conn, keys) => {
            let mut pipe = redis::pipe();
            for &i in &idx {
                pipe.get(&keys[i]);
            }
            let values: Vec<Bytes> = pipe.query_async(&mut conn.clone()).await?;
            // The stored value includes kvshelf's header; count the payload bytes only.
            values.iter().map(|v| v.len() as u64).sum::<u64>()
                - values.len() as u64 * header_len(ns)
        }
        Runner::Library(store) => {
            let hs: Vec<BlockHash> = idx.iter().map(|&i| hashes[i]).collect();
            let hits = store.get(ns, &hs).await?;
            hits.iter()
                .flatten()
                .map(|h| h.block.payload.len() as u64)
                .sum()
        }
        Runner::Sidecar(client) => {
            let hs: Vec<BlockHash> = idx.iter().map(|&i| hashes[i]).collect();
            let fetched = client.fetch(&ns.label, &hs).await?;
            fetched.blocks.iter().map(|(_, p)| p.len() as u64).sum()
        }
    };
    anyhow::ensure!(
        got == want,
        "a bench block is missing: got {got} of {want} bytes (evicted?)"
    );
    Ok(got)
}

fn header_len(ns: &Namespace) -> u64 {
    crate::codec::Header::for_block(ns, &BlockHash([0; 32]), &[])
        .encode()
        .len() as u64
}

/// Deterministic, incompressible-looking bytes for one block.
fn payload(ns: &Namespace, hash: &BlockHash) -> Bytes {
    let mut state = u64::from_le_bytes(hash.0[..8].try_into().expect("8 bytes")) | 1;
    let mut out = Vec::with_capacity(ns.block_bytes() as usize);
    while out.len() < ns.block_bytes() as usize {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(ns.block_bytes() as usize);
    out.into()
}

/// The results as a table, each path's throughput also as a ratio to the first path's.
pub fn table(results: &[PathResult]) -> String {
    let base = results.first().map_or(1.0, |r| r.gbps);
    let mut out = format!(
        "{:<10} {:>9} {:>6} {:>5} {:>8} {:>8} {:>9} {:>9} {:>9}\n",
        "path", "value", "batch", "conc", "GB/s", "ratio", "p50 ms", "p99 ms", "p99.9 ms"
    );
    for r in results {
        out.push_str(&format!(
            "{:<10} {:>9} {:>6} {:>5} {:>8.3} {:>7.2}x {:>9.2} {:>9.2} {:>9.2}\n",
            serde_json::to_value(r.path)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            human(r.value_bytes),
            r.batch,
            r.concurrency,
            r.gbps,
            r.gbps / base,
            r.p50_ms,
            r.p99_ms,
            r.p999_ms
        ));
    }
    out
}

fn human(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{}MiB", b >> 20)
    } else {
        format!("{}KiB", b >> 10)
    }
}
