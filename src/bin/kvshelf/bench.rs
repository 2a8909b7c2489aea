//! `kvshelf bench`: fetch throughput and latency of every path to the same blocks in the
//! same Redis, side by side in one run, so that ratios are honest.
//!
//! Paths: the kvshelf library (`RedisStore::get`, which also verifies each block), and the
//! sidecar over HTTP and over gRPC through [`kvshelf::client`]. The sidecar runs in this
//! process on a loopback port, with its L1 off unless `--l1` (so every fetch reaches Redis
//! and the comparison is with the same server). What Redis itself can serve is measured by
//! its own client, redis-benchmark (`--ceilings`).

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use kvshelf::client::{Client, ClientConfig, Protocol};
use kvshelf::config::Config;
use kvshelf::hashing::{BlockHash, PrefixHasher};
use kvshelf::namespace::{Dtype, Layout, Namespace};
use kvshelf::store::{PutResult, RedisStore, StoreConfig};

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
            model_id: format!("kvshelf/{label}"),
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
            ttl: Some(Duration::from_secs(3600)),
            max_pinned_bytes: None,
            hash_scheme: Default::default(),
        }
    }
}

/// One path to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchPath {
    /// The kvshelf library straight to Redis (`RedisStore::get`, verifying each block).
    Library,
    /// The library reading each payload straight into a buffer the caller owns and reuses
    /// (`RedisStore::read_into`, verifying in place), as LMCache's client does.
    LibraryInto,
    /// The sidecar over HTTP (framed stream), L1 off: every block is read from Redis.
    Http,
    /// The sidecar over gRPC (server stream), L1 off.
    Grpc,
    /// The sidecar over HTTP, served from its L1 (warmed before the clock starts).
    HttpL1,
    /// The sidecar over gRPC, served from its L1.
    GrpcL1,
    /// The sidecar over HTTP on its Unix socket (`listen_unix`), L1 off.
    HttpUnix,
    /// The sidecar over gRPC on its Unix socket, L1 off.
    GrpcUnix,
    /// Puts of new blocks through the library (`SET NX PX`, pipelined).
    Put,
    /// Puts of new blocks through the sidecar over HTTP (synchronous).
    HttpPut,
}

impl BenchPath {
    /// The path's name as printed and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            BenchPath::Library => "library",
            BenchPath::LibraryInto => "library-into",
            BenchPath::Http => "http",
            BenchPath::Grpc => "grpc",
            BenchPath::HttpL1 => "http-l1",
            BenchPath::GrpcL1 => "grpc-l1",
            BenchPath::HttpUnix => "http-unix",
            BenchPath::GrpcUnix => "grpc-unix",
            BenchPath::Put => "put",
            BenchPath::HttpPut => "http-put",
        }
    }

    fn is_put(self) -> bool {
        matches!(self, BenchPath::Put | BenchPath::HttpPut)
    }
}

/// The settings `kvshelf bench` runs with that differ from a user's defaults, and why;
/// printed under every table. Fetch and lookup deadlines are the defaults.
pub const OVERRIDES: &str = "settings that differ from the defaults: [store] \
response_timeout = 60s (64 clients x 32 MiB queue up behind each other in Redis); \
in-process sidecars: [server] put_timeout = 60s (a synchronous put of 8 x 32 MiB waits \
behind the other clients' puts), max_concurrent_requests = 4096, max_body_bytes and \
body_memory_bytes unbounded (the bench's clients, not the limits, are measured), \
l1_bytes = 0 on the paths without -l1";

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// The store settings (URL, TLS, cluster, `batch_connections`, …) of the library
    /// paths and the in-process sidecars; the response timeout is raised to 60 s.
    pub store: StoreConfig,
    /// Value size.
    pub size: ValueSize,
    /// Blocks per request.
    pub batch: usize,
    /// Concurrent clients, each with its own connection(s).
    pub concurrency: usize,
    /// Requests per path and round.
    pub requests: usize,
    /// Paths, in order (rotated each round).
    pub paths: Vec<BenchPath>,
    /// Rounds: every path (and ceiling) is measured once per round, paths interleaved, and
    /// the median round is reported, so a noisy moment does not decide a ratio.
    pub rounds: usize,
    /// Also measure the ceilings (redis-benchmark GET/SET, loopback TCP) in every round.
    pub ceilings: bool,
    /// Drive this already running sidecar instead of one started in-process (HTTP and gRPC
    /// paths; its config must have the bench namespace).
    pub sidecar: Option<String>,
    /// With `sidecar`: its Unix socket, `unix:<path>` (the `-unix` paths).
    pub sidecar_unix: Option<String>,
}

/// A private directory for the bench sidecar's Unix socket, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> std::io::Result<TempDir> {
        let dir = std::env::temp_dir().join(format!(
            "kvshelf-bench-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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

/// CPU seconds used so far by this process (`/proc/self/stat`, all threads) and by Redis.
async fn cpu_seconds(store: &RedisStore) -> anyhow::Result<(f64, f64)> {
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

/// Where Redis's own tools (redis-benchmark, redis-cli) reach the Redis of a URL.
struct ToolAddr {
    host: String,
    port: u16,
    password: Option<String>,
}

impl ToolAddr {
    /// Reads `redis://[user][:password@]host[:port][/db]` (also `rediss://`, `valkey://`,
    /// `valkeys://`) as the library's Redis client does: port 6379 unless given, the
    /// password percent-decoded, an IPv6 host without its brackets. The user name and the
    /// database are not passed on: the tools authenticate with the password alone (as the
    /// default user) and use database 0.
    fn of(url: &str) -> anyhow::Result<ToolAddr> {
        let parsed =
            url::Url::parse(url).map_err(|e| anyhow::anyhow!("Redis URL did not parse: {e}"))?;
        match parsed.scheme() {
            "redis" | "rediss" | "valkey" | "valkeys" => {}
            "redis+unix" | "valkey+unix" | "unix" => anyhow::bail!(
                "redis-benchmark needs a TCP address, not the Unix socket {}",
                parsed.path()
            ),
            other => anyhow::bail!("not a Redis URL: scheme {other:?}"),
        }
        let host = match parsed.host() {
            Some(url::Host::Domain(name)) => name.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => anyhow::bail!("the Redis URL names no host"),
        };
        let password = match parsed.password() {
            Some(p) => Some(
                percent_encoding::percent_decode_str(p)
                    .decode_utf8()
                    .map_err(|_| anyhow::anyhow!("the Redis URL's password is not UTF-8"))?
                    .into_owned(),
            ),
            None => None,
        };
        Ok(ToolAddr {
            host,
            port: parsed.port().unwrap_or(6379),
            password,
        })
    }

    /// `-h host -p port`, and `-a password` with a password: what both tools take.
    /// (redis-cli also wants `--no-auth-warning`, which redis-benchmark refuses.)
    fn args(&self) -> Vec<String> {
        let mut args = vec![
            "-h".to_owned(),
            self.host.clone(),
            "-p".to_owned(),
            self.port.to_string(),
        ];
        if let Some(password) = &self.password {
            args.extend(["-a".to_owned(), password.clone()]);
        }
        args
    }
}

async fn redis_benchmark(cfg: &BenchConfig, keys: Option<usize>) -> anyhow::Result<Vec<Ceiling>> {
    let size = cfg.size.namespace().block_bytes();
    let addr = ToolAddr::of(&cfg.store.url)?;
    // As many values as the paths move in a round, at least 50 and at most ~4 GB.
    let requests = (cfg.requests * cfg.batch)
        .min((4_000_000_000 / size) as usize)
        .max(50);
    let mut cmd = tokio::process::Command::new("redis-benchmark");
    cmd.args(addr.args())
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
            .args(addr.args())
            .args(addr.password.is_some().then_some("--no-auth-warning"))
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

/// One concurrent client of a path: its own connection(s).
enum Runner {
    Library(RedisStore),
    /// With its preallocated buffers, one per block of a batch.
    LibraryInto(RedisStore, tokio::sync::Mutex<Vec<Vec<u8>>>),
    /// Boxed: a client is several times the size of a store handle.
    Sidecar(Box<Client>),
}

/// Everything a run shares: the blocks, the in-process sidecars, the store.
struct Fixture {
    ns: Namespace,
    put_ns: Namespace,
    hashes: Vec<BlockHash>,
    store: RedisStore,
    /// Sidecar without L1 (every fetch reads Redis) and with L1.
    cold: String,
    warm: String,
    /// The cold sidecar's Unix socket (`unix:<path>`), in `_dir`.
    cold_unix: Option<String>,
    _dir: Option<TempDir>,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    servers: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Fixture {
    async fn new(cfg: &BenchConfig) -> anyhow::Result<Fixture> {
        let ns = cfg.size.namespace();
        let mut put_ns = ns.clone();
        put_ns.label = format!("{}-put", ns.label);
        put_ns.ttl = Some(Duration::from_secs(120));
        let store_cfg = StoreConfig {
            response_timeout: Duration::from_secs(60),
            ..cfg.store.clone()
        };
        let store = RedisStore::connect(store_cfg.clone()).await?;
        let hashes = bench_hashes(&ns, distinct_blocks(cfg), 0);
        // Fresh blocks with a full TTL: blocks left by an earlier run keep that run's expiry
        // (write-once), and reads served from a sidecar's L1 do not slide it.
        store.delete(&ns.label, &hashes).await?;
        for chunk in hashes.chunks(8) {
            let blocks: Vec<(BlockHash, Bytes)> =
                chunk.iter().map(|h| (*h, payload(&ns, h))).collect();
            store.put(&ns, &blocks).await?;
        }
        let mut fixture = Fixture {
            ns: ns.clone(),
            put_ns: put_ns.clone(),
            hashes,
            store,
            cold: String::new(),
            warm: String::new(),
            cold_unix: None,
            _dir: None,
            stops: Vec::new(),
            servers: Vec::new(),
        };
        if let Some(url) = &cfg.sidecar {
            fixture.cold = url.clone();
            fixture.warm = url.clone();
            fixture.cold_unix = cfg.sidecar_unix.clone();
            return Ok(fixture);
        }
        for l1 in [false, true] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("http://{}", listener.local_addr()?);
            let mut server_cfg = Config {
                store: Some(store_cfg.clone()),
                namespaces: vec![ns.clone(), put_ns.clone()],
                ..Default::default()
            };
            // The fail-open deadlines of fetches and lookups are a user's defaults: a
            // fetch the sidecar cuts off fails the bench. Only what [`OVERRIDES`] lists
            // differs, and the table says so.
            server_cfg.server.put_timeout = Duration::from_secs(60);
            server_cfg.server.max_concurrent_requests = 4096;
            server_cfg.server.max_body_bytes = u64::MAX;
            server_cfg.server.body_memory_bytes = u64::MAX;
            if !l1 {
                server_cfg.server.l1_bytes = 0;
            }
            let shelf = kvshelf::shelf::Shelf::new(&server_cfg)?;
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let unix = if l1 {
                None
            } else {
                let dir = TempDir::new()?;
                let path = dir.0.join("kvshelf.sock");
                let unix = kvshelf::server::bind_unix(&path)?;
                fixture.cold_unix = Some(format!("unix:{}", path.display()));
                fixture._dir = Some(dir);
                Some(unix)
            };
            fixture
                .servers
                .push(tokio::spawn(kvshelf::server::run_with_unix(
                    listener,
                    unix,
                    shelf,
                    async {
                        let _ = stop_rx.await;
                    },
                )));
            fixture.stops.push(stop_tx);
            if l1 {
                fixture.warm = url;
            } else {
                fixture.cold = url;
            }
        }
        Ok(fixture)
    }

    async fn runner(&self, path: BenchPath) -> anyhow::Result<Runner> {
        let sidecar = |url: &str, protocol| {
            Client::new(ClientConfig {
                url: url.to_owned(),
                protocol,
                timeout: Duration::from_secs(120),
                ..Default::default()
            })
            .map(Box::new)
        };
        Ok(match path {
            // A store of its own per client: its own connections, as a worker process has.
            BenchPath::Library | BenchPath::Put => {
                Runner::Library(RedisStore::connect(self.store.config().clone()).await?)
            }
            BenchPath::LibraryInto => Runner::LibraryInto(
                RedisStore::connect(self.store.config().clone()).await?,
                tokio::sync::Mutex::new(Vec::new()),
            ),
            BenchPath::Http | BenchPath::HttpPut => {
                Runner::Sidecar(sidecar(&self.cold, Protocol::Http)?)
            }
            BenchPath::Grpc => Runner::Sidecar(sidecar(&self.cold, Protocol::Grpc)?),
            BenchPath::HttpL1 => Runner::Sidecar(sidecar(&self.warm, Protocol::Http)?),
            BenchPath::GrpcL1 => Runner::Sidecar(sidecar(&self.warm, Protocol::Grpc)?),
            BenchPath::HttpUnix | BenchPath::GrpcUnix => {
                let Some(url) = &self.cold_unix else {
                    anyhow::bail!(
                        "{} needs the sidecar's Unix socket (--sidecar-unix)",
                        path.name()
                    );
                };
                let protocol = match path {
                    BenchPath::HttpUnix => Protocol::Http,
                    _ => Protocol::Grpc,
                };
                Runner::Sidecar(sidecar(url, protocol)?)
            }
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        for stop in self.stops {
            let _ = stop.send(());
        }
        for server in self.servers {
            server.await??;
        }
        self.store.purge(&self.put_ns.label).await?;
        Ok(())
    }
}

/// Distinct blocks to read: enough that concurrent requests read different keys, bounded
/// so the set fits a modest Redis (at most 256 blocks and 2 GiB).
fn distinct_blocks(cfg: &BenchConfig) -> usize {
    let by_bytes = ((2u64 << 30) / cfg.size.namespace().block_bytes()).max(1) as usize;
    (cfg.batch * cfg.concurrency)
        .min(256)
        .min(by_bytes)
        .max(cfg.batch)
}

/// `n` block hashes of `ns`; `salt` makes distinct sets (puts write new blocks each round).
fn bench_hashes(ns: &Namespace, n: usize, salt: u64) -> Vec<BlockHash> {
    let tokens: Vec<u32> = (0..n as u32 * ns.block_size).collect();
    let salt = salt.to_le_bytes();
    PrefixHasher::new(ns, (salt != [0; 8]).then_some(&salt[..])).hash_prefix(&tokens)
}

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

/// Each ceiling's median round (latencies of that same round).
fn median_ceilings(rounds: &[Vec<Ceiling>]) -> Vec<Ceiling> {
    let mut names: Vec<&str> = Vec::new();
    for c in rounds.iter().flatten() {
        if !names.contains(&c.name.as_str()) {
            names.push(&c.name);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let mut these: Vec<&Ceiling> =
                rounds.iter().flatten().filter(|c| c.name == name).collect();
            let rounds_gbps = these.iter().map(|c| c.gbps).collect();
            these.sort_by(|a, b| a.gbps.total_cmp(&b.gbps));
            Ceiling {
                rounds_gbps,
                ..these[these.len() / 2].clone()
            }
        })
        .collect()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
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

/// Runs one path for one round: `concurrency` clients, each with its own connection,
/// `requests` requests in all. Returns GB/s, every request's latency and the bytes moved.
async fn measure(
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
async fn one_fetch(
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
async fn one_put(
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

fn human(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{}MiB", b >> 20)
    } else {
        format!("{}KiB", b >> 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bench_sidecar_config_has_the_bench_namespaces() {
        let cfg = Config::from_toml(include_str!("../../../examples/bench.toml")).expect("parses");
        for size in [ValueSize::K192, ValueSize::M2, ValueSize::M32] {
            let ns = size.namespace();
            assert_eq!(cfg.namespace(&ns.label), Some(&ns), "{}", ns.label);
            let mut put = ns.clone();
            put.label = format!("{}-put", ns.label);
            put.ttl = Some(Duration::from_secs(120));
            assert_eq!(cfg.namespace(&put.label), Some(&put), "{}", put.label);
        }
    }

    #[test]
    fn redis_tools_get_the_host_port_and_decoded_password_of_the_url() {
        let args = |url: &str| ToolAddr::of(url).expect(url).args();
        assert_eq!(args("redis://127.0.0.1"), ["-h", "127.0.0.1", "-p", "6379"]);
        assert_eq!(
            args("rediss://kv:p%40ss+w@redis.internal:6390/2"),
            ["-h", "redis.internal", "-p", "6390", "-a", "p@ss+w"]
        );
        assert_eq!(args("redis://[::1]:6390"), ["-h", "::1", "-p", "6390"]);
        for url in [
            "redis+unix:///tmp/redis.sock",
            "unix:///tmp/redis.sock",
            "http://h:1",
        ] {
            assert!(ToolAddr::of(url).is_err(), "{url}");
        }
    }
}
