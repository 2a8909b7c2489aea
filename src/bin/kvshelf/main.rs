//! `kvshelf`: the operator's command line. Parses flags, sets up logging and calls the
//! library; all logic lives in `kvshelf::*`, except `kvshelf bench` (`bench/`), which
//! measures the library, the sidecar and Redis from outside, through the public API only.

/// mimalloc rather than glibc's malloc: blocks are MiB-sized buffers allocated and freed
/// at GB/s, and glibc returns them to the kernel and faults them back in (`BENCHMARKS.md`,
/// "What each change bought").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use kvshelf::config::Config;
use kvshelf::store::block_key;
use kvshelf::{BlockHash, Dtype, Layout, Namespace, PrefixHasher, PutResult, RedisStore};

#[derive(Parser)]
#[command(
    version,
    about = "kvshelf: a shared, Redis-backed shelf of attention KV blocks"
)]
struct Cli {
    /// TOML config file (store settings and namespaces).
    #[arg(long, env = "KVSHELF_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Redis URL; overrides the config file. `rediss://` for TLS, `redis://user:pass@host`
    /// for an ACL user.
    #[arg(
        long = "redis",
        env = "KVSHELF_REDIS_URL",
        global = true,
        hide_env_values = true
    )]
    redis: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the sidecar: HTTP and gRPC on one port, L1 in front of Redis. Without a Redis
    /// URL it runs on an in-process store (not shared, not persistent) for trying it out.
    Serve {
        /// Address to listen on (HTTP and gRPC).
        #[arg(long, env = "KVSHELF_LISTEN")]
        listen: Option<std::net::SocketAddr>,
        /// Also serve on this Unix socket (clients use `unix:<path>`).
        #[arg(long, env = "KVSHELF_LISTEN_UNIX")]
        listen_unix: Option<std::path::PathBuf>,
    },
    /// Two simulated workers share a prompt prefix through Redis: worker A puts the KV
    /// blocks of its prompt, worker B finds and fetches the shared prefix.
    Demo {
        /// Tokens of the shared system prompt.
        #[arg(long, default_value_t = 2048)]
        shared_tokens: u32,
    },
    /// Measures fetch throughput and latency of every path (the library, the sidecar over
    /// HTTP and gRPC) against the same Redis, in one run.
    Bench {
        /// Value size (a 16-token block of a 0.5B or 8B model, a 256-token chunk of 8B).
        #[arg(long, value_enum, default_value = "2MiB")]
        size: bench::ValueSize,
        /// Blocks per request.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Concurrent clients.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Requests per path.
        #[arg(long, default_value_t = 200)]
        requests: usize,
        /// Paths to measure, in order; ratios are against the first.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "library,http,grpc,http-unix,grpc-unix,http-l1,grpc-l1,put,http-put"
        )]
        paths: Vec<bench::BenchPath>,
        /// Rounds: every path is measured once per round (order rotated), and each path's
        /// median round is reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Drive this running sidecar (e.g. http://127.0.0.1:7070) instead of one started
        /// in-process; its config must define the bench namespaces (`docs/benchmarks`).
        #[arg(long)]
        sidecar: Option<String>,
        /// With --sidecar: its Unix socket (`unix:<path>`), for the -unix paths.
        #[arg(long, requires = "sidecar")]
        sidecar_unix: Option<String>,
        /// Measure lookup latency against prefix length (1 … 4096 blocks) instead.
        #[arg(long)]
        lookup: bool,
        /// Also measure the ceilings: redis-benchmark GET/SET of the same size and a
        /// loopback TCP stream (needs redis-benchmark and redis-cli on PATH).
        #[arg(long)]
        ceilings: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Prints the block hashes and Redis keys of a prompt.
    Hash {
        /// Namespace label from the config file.
        namespace: String,
        /// Comma-separated token ids.
        #[arg(long, conflicts_with = "text")]
        tokens: Option<String>,
        /// Text, tokenized as UTF-8 bytes (one token per byte), for quick experiments.
        #[arg(long)]
        text: Option<String>,
    },
    /// Reads the header and TTL of a block key, without touching its TTL.
    Inspect {
        /// A key such as `kvshelf:v1:<label>:<hash>`.
        key: String,
    },
    /// Blocks per namespace, and Redis's memory and eviction counters.
    Stats,
    /// Deletes every block of a namespace (SCAN + UNLINK).
    Purge {
        /// Namespace label.
        label: String,
        /// Really delete.
        #[arg(long)]
        yes: bool,
    },
    /// Keeps a block forever (PERSIST). Fails when the block does not exist.
    Pin { label: String, hash: String },
    /// Gives a pinned block its TTL back: the namespace's `ttl` from the config file, else
    /// the store's. Fails when the block does not exist.
    Unpin {
        label: String,
        hash: String,
        /// The TTL to give it instead (e.g. `6h`).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut cfg = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(url) = cli.redis {
        cfg.store.get_or_insert_with(Default::default).url = url;
    }
    let store_cfg = cfg.store.clone().unwrap_or_default();
    let store = || -> Result<RedisStore> { Ok(RedisStore::new(store_cfg.clone())?) };
    match cli.command {
        Command::Serve {
            listen,
            listen_unix,
        } => {
            if let Some(addr) = listen {
                cfg.server.listen = addr;
            }
            if listen_unix.is_some() {
                cfg.server.listen_unix = listen_unix;
            }
            serve(cfg).await
        }
        Command::Demo { shared_tokens } => demo(store()?, shared_tokens).await,
        Command::Bench {
            size,
            batch,
            concurrency,
            requests,
            paths,
            rounds,
            sidecar,
            sidecar_unix,
            lookup,
            ceilings,
            json,
        } => {
            if lookup {
                let rows = bench::lookup_latency(&store_cfg, requests).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                } else {
                    print!("{}", bench::lookup_table(&rows));
                }
                return Ok(());
            }
            let bench = bench::BenchConfig {
                store: store_cfg.clone(),
                size,
                batch,
                concurrency,
                requests,
                paths,
                rounds,
                ceilings,
                sidecar,
                sidecar_unix,
            };
            let report = bench::run(&bench, &Bar::default()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", bench::table(&report));
            }
            Ok(())
        }
        Command::Hash {
            namespace,
            tokens,
            text,
        } => {
            let ns = cfg
                .namespace(&namespace)
                .with_context(|| format!("namespace {namespace:?} is not in the config file"))?;
            let tokens: Vec<u32> = match (tokens, text) {
                (Some(t), _) => t
                    .split(',')
                    .map(|x| x.trim().parse::<u32>())
                    .collect::<Result<_, _>>()
                    .context("--tokens takes comma-separated u32 token ids")?,
                (None, Some(text)) => text.bytes().map(u32::from).collect(),
                (None, None) => bail!("give --tokens or --text"),
            };
            let hasher = PrefixHasher::new(ns, None);
            println!("root {}", hasher.root());
            for (i, h) in hasher.hash_prefix(&tokens).iter().enumerate() {
                println!("block {i} {h} {}", block_key(&ns.label, h));
            }
            Ok(())
        }
        Command::Inspect { key } => match store()?.inspect(&key).await? {
            None => bail!("no such key: {key}"),
            Some((header, ttl)) => {
                println!("{}", serde_json::to_string_pretty(&header)?);
                match ttl {
                    Some(t) => println!("ttl: {}", humantime::format_duration(t)),
                    None => println!("ttl: none (pinned)"),
                }
                Ok(())
            }
        },
        Command::Stats => stats(&store()?).await,
        Command::Purge { label, yes } => {
            let s = store()?;
            if !yes {
                let n = s.count(&label).await?;
                println!("{label}: {n} blocks would be deleted; run again with --yes");
                return Ok(());
            }
            let report = s.purge(&label).await?;
            println!("{label}: {} blocks deleted", report.deleted);
            for node in &report.skipped {
                println!(
                    "skipped node {}: {} ({} blocks deleted there before it stopped)",
                    node.node, node.error, node.deleted
                );
            }
            if !report.skipped.is_empty() {
                bail!(
                    "the purge of {label} is incomplete: {} node(s) skipped, their blocks stay; \
                     run it again once they are back",
                    report.skipped.len()
                );
            }
            Ok(())
        }
        Command::Pin { label, hash } => {
            if !store()?.pin(&label, &hash.parse()?).await? {
                bail!("no such block: {label} {hash}");
            }
            println!("pinned");
            Ok(())
        }
        Command::Unpin { label, hash, ttl } => {
            // The same TTL the sidecar's unpin gives: the namespace's, else the store's.
            let (ttl, whose) = match (ttl, cfg.namespace(&label).and_then(|ns| ns.ttl)) {
                (Some(ttl), _) => (ttl, "--ttl"),
                (None, Some(ttl)) => (ttl, "the namespace's ttl"),
                (None, None) if cfg.namespace(&label).is_some() => {
                    (store_cfg.ttl, "the store's ttl")
                }
                (None, None) => (
                    store_cfg.ttl,
                    "the store's ttl; the namespace is not in the config file, which may give it another",
                ),
            };
            if !store()?.unpin_with(&label, &hash.parse()?, ttl).await? {
                bail!("no such block: {label} {hash}");
            }
            println!(
                "unpinned: ttl {} ({whose})",
                humantime::format_duration(ttl)
            );
            Ok(())
        }
    }
}

async fn serve(cfg: Config) -> Result<()> {
    let shelf = kvshelf::shelf::Shelf::new(&cfg)?;
    match &cfg.store {
        Some(store) => {
            tracing::info!(redis = %store.redacted_url(), ttl = ?store.ttl, "backend: redis")
        }
        None => tracing::warn!(
            "NO REDIS CONFIGURED: serving from an in-process store. Blocks are NOT shared with \
             other hosts or sidecars and are LOST on restart. Set --redis / KVSHELF_REDIS_URL \
             (or [store] url in the config file) to run kvshelf for real."
        ),
    }
    if cfg.namespaces.is_empty() {
        tracing::warn!(
            "no namespaces configured: serving only the built-in `demo` namespace (2 KiB blocks)"
        );
    }
    for ns in shelf.namespaces() {
        tracing::info!(namespace = %ns.label, model = %ns.model_id, dtype = %ns.kv_dtype,
            block_size = ns.block_size, block_bytes = ns.block_bytes, "namespace");
    }
    tracing::info!(tenants = cfg.tenants.len(), server = ?cfg.server, "configuration");
    let listener = tokio::net::TcpListener::bind(cfg.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.server.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "kvshelf serving HTTP and gRPC");
    let unix = match &cfg.server.listen_unix {
        Some(path) => {
            let unix = kvshelf::server::bind_unix(path)
                .with_context(|| format!("cannot listen on {}", path.display()))?;
            tracing::info!(path = %path.display(), "kvshelf serving HTTP and gRPC on a Unix socket");
            Some(unix)
        }
        None => None,
    };
    kvshelf::server::run_with_unix(listener, unix, shelf, shutdown_signal()).await?;
    if let Some(path) = &cfg.server.listen_unix {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: draining in-flight requests and queued puts");
}

async fn stats(store: &RedisStore) -> Result<()> {
    let per_ns = store.count_by_namespace().await?;
    println!("{:<40} {:>10}", "namespace", "blocks");
    for (label, n) in &per_ns {
        println!("{label:<40} {n:>10}");
    }
    let info = store.info("memory").await? + &store.info("stats").await?;
    for field in [
        "used_memory_human",
        "maxmemory_human",
        "maxmemory_policy",
        "evicted_keys",
        "expired_keys",
    ] {
        if let Some(v) = info
            .lines()
            .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        {
            println!("{field}: {}", v.trim());
        }
    }
    Ok(())
}

/// The demo's namespace: the KV shape of Qwen2.5-0.5B in bf16 (192 KiB per 16-token block).
fn demo_namespace() -> Namespace {
    Namespace {
        label: "demo-qwen2.5-0.5b".into(),
        model_id: "Qwen/Qwen2.5-0.5B-Instruct".into(),
        model_revision: String::new(),
        kv_dtype: Dtype::Bfloat16,
        layout: Layout {
            num_layers: 24,
            num_kv_heads: 2,
            head_dim: 64,
            tp_size: 1,
            tp_rank: 0,
            order: "lkthd".into(),
        },
        block_size: 16,
        lora_adapter: None,
        ttl: None,
        max_pinned_bytes: None,
        hash_scheme: Default::default(),
    }
}

/// Stand-in KV of one block: a deterministic function of the block's hash. Real workers put
/// the tensors their prefill produced; the demo only needs bytes it can check after a fetch.
fn synthetic_kv(ns: &Namespace, hash: &BlockHash) -> Bytes {
    let mut state = u64::from_le_bytes(hash.0[..8].try_into().expect("8 bytes"));
    (0..ns.block_bytes() / 8)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect::<Vec<u8>>()
        .into()
}

async fn demo(store: RedisStore, shared_tokens: u32) -> Result<()> {
    let ns = demo_namespace();
    store
        .ping()
        .await
        .with_context(|| format!("cannot reach Redis at {}", store.config().redacted_url()))?;
    let hasher = PrefixHasher::new(&ns, None);
    let system: Vec<u32> = (0..shared_tokens).map(|i| (i * 7919) % 151_936).collect();
    let prompt = |question: u32| -> Vec<u32> {
        let mut p = system.clone();
        p.extend((0..100).map(|i| 100_000 + question * 1000 + i));
        p
    };

    println!(
        "namespace {} ({} per block of {} tokens)",
        ns.label,
        human(ns.block_bytes()),
        ns.block_size
    );
    for (worker, question) in [("A", 1), ("B", 2)] {
        let tokens = prompt(question);
        let hashes = hasher.hash_prefix(&tokens);
        let t = Instant::now();
        let hit = store.lookup(&ns, &hashes).await?;
        let lookup_time = t.elapsed();
        let t = Instant::now();
        let fetched = store.fetch_prefix(&ns, &hashes[..hit]).await?;
        let fetch_time = t.elapsed();
        for (block, h) in fetched.iter().zip(&hashes) {
            if block.payload != synthetic_kv(&ns, h) {
                bail!("fetched block {h} differs from what was put");
            }
        }
        let missing: Vec<(BlockHash, Bytes)> = hashes[fetched.len()..]
            .iter()
            .map(|h| (*h, synthetic_kv(&ns, h)))
            .collect();
        let t = Instant::now();
        let outcomes = store.put(&ns, &missing).await?;
        let put_time = t.elapsed();
        let stored = outcomes.iter().filter(|o| **o == PutResult::Stored).count();
        let bytes = fetched.len() as u64 * ns.block_bytes();
        println!(
            "worker {worker}: prompt {} tokens = {} full blocks; lookup {hit} hit in {lookup_time:.2?}; \
             fetched {} blocks ({}) in {fetch_time:.2?}, verified; put {stored} new blocks in {put_time:.2?}",
            tokens.len(),
            hashes.len(),
            fetched.len(),
            human(bytes),
        );
    }
    let first = block_key(&ns.label, &hasher.hash_prefix(&system)[0]);
    println!("\nlook at it with redis-cli:");
    println!(
        "  redis-cli --scan --pattern 'kvshelf:v1:{}:*' | head",
        ns.label
    );
    println!("  redis-cli GETRANGE {first} 0 511");
    println!("  redis-cli PTTL {first}");
    println!("  kvshelf purge {} --yes", ns.label);
    Ok(())
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
    } else {
        format!("{} KiB", bytes / 1024)
    }
}

/// `kvshelf bench`'s progress bar (on stderr; hidden when stderr is not a terminal).
#[derive(Default)]
struct Bar(std::sync::Mutex<Option<indicatif::ProgressBar>>);

impl bench::Progress for Bar {
    fn start(&self, what: &str, total: u64) {
        let bar = if total == 0 {
            indicatif::ProgressBar::new_spinner()
        } else {
            indicatif::ProgressBar::new(total).with_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:<28} [{bar:30}] {pos}/{len} requests, {elapsed}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            )
        };
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        bar.set_message(what.to_owned());
        *self.0.lock().expect("bar lock") = Some(bar);
    }

    fn set(&self, done: u64) {
        if let Some(bar) = &*self.0.lock().expect("bar lock") {
            bar.set_position(done);
        }
    }

    fn finish(&self) {
        if let Some(bar) = self.0.lock().expect("bar lock").take() {
            bar.finish_and_clear();
        }
    }
}
