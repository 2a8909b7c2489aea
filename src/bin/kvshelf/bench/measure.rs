//! Measuring one path for one round (fetches, puts), and lookup latency against prefix
//! length.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use super::Progress;
use super::fixture::{Fixture, Runner, bench_hashes, payload};
use super::setup::{BenchConfig, BenchPath, ValueSize};
use kvshelf::client::{Client, ClientConfig};
use kvshelf::config::Config;
use kvshelf::hashing::{BlockHash, PrefixHasher};
use kvshelf::namespace::Namespace;
use kvshelf::store::{PutResult, RedisStore, StoreConfig};

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
    /// Payload GB/s (10^9 bytes per second) over the wall time: the median round.
    pub gbps: f64,
    /// Each round's GB/s, in order.
    pub rounds_gbps: Vec<f64>,
    /// Request latency percentiles over all rounds' requests, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// CPU time of this process (the clients and the in-process sidecars) per GB moved,
    /// milliseconds, over all rounds: what the path costs besides Redis.
    pub cpu_ms_per_gb: f64,
    /// Redis's CPU time (`INFO cpu`) per GB moved, milliseconds, over all rounds.
    pub redis_cpu_ms_per_gb: f64,
}

/// Runs one path for one round: `concurrency` clients, each with its own connection,
/// `requests` requests in all. Returns GB/s, every request's latency and the bytes moved.
pub(super) async fn measure(
    cfg: &BenchConfig,
    fixture: &Fixture,
    path: BenchPath,
    round: usize,
    progress: &dyn Progress,
) -> anyhow::Result<(f64, Vec<Duration>, u64)> {
    let ns = if path.is_put() {
        &fixture.put_ns
    } else {
        &fixture.ns
    };
    // Puts write blocks nobody has written (write-once would make a second put a no-op);
    // the blocks are made before the clock starts.
    let put_blocks: Vec<(BlockHash, Bytes)> = if path.is_put() {
        let n = cfg.requests * cfg.batch;
        let base = payload(ns, &BlockHash([7; 32]));
        bench_hashes(ns, n, 1 + round as u64 * 1_000_003 + path as u64)
            .into_iter()
            .map(|h| (h, base.clone()))
            .collect()
    } else {
        Vec::new()
    };
    let put_blocks = std::sync::Arc::new(put_blocks);
    let mut runners = Vec::with_capacity(cfg.concurrency);
    for _ in 0..cfg.concurrency {
        runners.push(fixture.runner(path).await?);
    }
    // Warm up each client's connections (and the sidecar's L1 with every block).
    for runner in &runners {
        if !path.is_put() {
            one_fetch(runner, ns, &fixture.hashes, 0, cfg.batch).await?;
        }
    }
    if matches!(path, BenchPath::HttpL1 | BenchPath::GrpcL1) {
        for start in (0..fixture.hashes.len()).step_by(cfg.batch) {
            one_fetch(&runners[0], ns, &fixture.hashes, start, cfg.batch).await?;
        }
    }
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (client, runner) in runners.into_iter().enumerate() {
        let (ns, hashes, done, put_blocks) = (
            ns.clone(),
            fixture.hashes.clone(),
            done.clone(),
            put_blocks.clone(),
        );
        let (batch, total, concurrency) = (cfg.batch, cfg.requests, cfg.concurrency);
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut bytes = 0u64;
            let mut i = client;
            while i < total {
                let t = Instant::now();
                bytes += if put_blocks.is_empty() {
                    let start = (i * batch) % hashes.len();
                    one_fetch(&runner, &ns, &hashes, start, batch).await?
                } else {
                    one_put(&runner, &ns, &put_blocks[i * batch..(i + 1) * batch]).await?
                };
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
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                progress.set(done.load(std::sync::atomic::Ordering::Relaxed) as u64);
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    Ok((bytes as f64 / secs / 1e9, lat, bytes))
}

/// One fetch of `batch` blocks from `start` (wrapping); returns the payload bytes read.
pub(super) async fn one_fetch(
    runner: &Runner,
    ns: &Namespace,
    hashes: &[BlockHash],
    start: usize,
    batch: usize,
) -> anyhow::Result<u64> {
    let idx: Vec<usize> = (0..batch).map(|k| (start + k) % hashes.len()).collect();
    let want = batch as u64 * ns.block_bytes();
    let got = match runner {
        Runner::Library(store) => {
            let hs: Vec<BlockHash> = idx.iter().map(|&i| hashes[i]).collect();
            let hits = store.get(ns, &hs).await?;
            hits.iter()
                .flatten()
                .map(|h| h.block.payload.len() as u64)
                .sum()
        }
        Runner::LibraryInto(store, bufs) => {
            let hs: Vec<BlockHash> = idx.iter().map(|&i| hashes[i]).collect();
            let mut bufs = bufs.lock().await;
            bufs.resize_with(batch, || vec![0; ns.block_bytes() as usize]);
            let mut slices: Vec<&mut [u8]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
            let read = store.read_into(ns, &hs, &mut slices).await?;
            read.iter()
                .map(|r| match r {
                    kvshelf::ReadInto::Hit { len, .. } => *len as u64,
                    _ => 0,
                })
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

/// One put of `blocks`; returns the payload bytes stored.
pub(super) async fn one_put(
    runner: &Runner,
    ns: &Namespace,
    blocks: &[(BlockHash, Bytes)],
) -> anyhow::Result<u64> {
    let stored = match runner {
        Runner::Library(store) | Runner::LibraryInto(store, _) => store
            .put(ns, blocks)
            .await?
            .iter()
            .filter(|o| matches!(o, PutResult::Stored))
            .count(),
        Runner::Sidecar(client) => client
            .put(&ns.label, blocks, false)
            .await?
            .iter()
            .filter(|o| matches!(o, PutResult::Stored))
            .count(),
    };
    anyhow::ensure!(
        stored == blocks.len(),
        "only {stored} of {} new blocks were stored",
        blocks.len()
    );
    Ok(stored as u64 * ns.block_bytes())
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
pub async fn lookup_latency(
    store: &StoreConfig,
    requests: usize,
) -> anyhow::Result<Vec<LookupResult>> {
    let mut ns = ValueSize::K192.namespace();
    // Tiny blocks: lookups never read payloads, and 4096 of them must fit any Redis.
    ns.label = "bench-lookup".into();
    ns.layout.num_layers = 1;
    ns.layout.head_dim = 8;
    let store = RedisStore::connect(store.clone()).await?;
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
    let shelf = kvshelf::shelf::Shelf::new(&cfg)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(kvshelf::server::run(listener, shelf, async {
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
