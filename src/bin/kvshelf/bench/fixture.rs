//! Everything a run shares: the bench blocks, the in-process sidecars, the store, and
//! one client (runner) per concurrent caller.

use std::time::Duration;

use bytes::Bytes;

use super::setup::{BenchConfig, BenchPath};
use kvshelf::client::{Client, ClientConfig, Protocol};
use kvshelf::config::Config;
use kvshelf::hashing::{BlockHash, PrefixHasher};
use kvshelf::namespace::Namespace;
use kvshelf::store::{RedisStore, StoreConfig};

/// A private directory for the bench sidecar's Unix socket, removed on drop.
pub(super) struct TempDir(std::path::PathBuf);

impl TempDir {
    pub(super) fn new() -> std::io::Result<TempDir> {
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

/// One concurrent client of a path: its own connection(s).
pub(super) enum Runner {
    Library(RedisStore),
    /// With its preallocated buffers, one per block of a batch.
    LibraryInto(RedisStore, tokio::sync::Mutex<Vec<Vec<u8>>>),
    /// Boxed: a client is several times the size of a store handle.
    Sidecar(Box<Client>),
}

/// Everything a run shares: the blocks, the in-process sidecars, the store.
pub(super) struct Fixture {
    pub(super) ns: Namespace,
    pub(super) put_ns: Namespace,
    pub(super) hashes: Vec<BlockHash>,
    pub(super) store: RedisStore,
    /// Sidecar without L1 (every fetch reads Redis) and with L1.
    pub(super) cold: String,
    pub(super) warm: String,
    /// The cold sidecar's Unix socket (`unix:<path>`), in `_dir`.
    pub(super) cold_unix: Option<String>,
    pub(super) _dir: Option<TempDir>,
    pub(super) stops: Vec<tokio::sync::oneshot::Sender<()>>,
    pub(super) servers: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Fixture {
    pub(super) async fn new(cfg: &BenchConfig) -> anyhow::Result<Fixture> {
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
            let server_cfg = sidecar_config(&store_cfg, &ns, &put_ns, l1);
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

    pub(super) async fn runner(&self, path: BenchPath) -> anyhow::Result<Runner> {
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

    pub(super) async fn stop(self) -> anyhow::Result<()> {
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
pub(super) fn distinct_blocks(cfg: &BenchConfig) -> usize {
    let by_bytes = ((2u64 << 30) / cfg.size.namespace().block_bytes()).max(1) as usize;
    (cfg.batch * cfg.concurrency)
        .min(256)
        .min(by_bytes)
        .max(cfg.batch)
}

/// `n` block hashes of `ns`; `salt` makes distinct sets (puts write new blocks each round).
pub(super) fn bench_hashes(ns: &Namespace, n: usize, salt: u64) -> Vec<BlockHash> {
    let tokens: Vec<u32> = (0..n as u32 * ns.block_size).collect();
    let salt = salt.to_le_bytes();
    PrefixHasher::new(ns, (salt != [0; 8]).then_some(&salt[..])).hash_prefix(&tokens)
}

/// Deterministic, incompressible-looking bytes for one block.
pub(super) fn payload(ns: &Namespace, hash: &BlockHash) -> Bytes {
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

/// The config of the bench's in-process sidecars. The fail-open deadlines of fetches and
/// lookups are a user's defaults: a fetch the sidecar cuts off fails the bench. Only what
/// [`OVERRIDES`](super::setup::OVERRIDES) lists differs, and the table says so (a test
/// below holds the two together).
fn sidecar_config(store: &StoreConfig, ns: &Namespace, put_ns: &Namespace, l1: bool) -> Config {
    let mut cfg = Config {
        store: Some(store.clone()),
        namespaces: vec![ns.clone(), put_ns.clone()],
        ..Default::default()
    };
    cfg.server.put_timeout = Duration::from_secs(60);
    cfg.server.max_concurrent_requests = 4096;
    cfg.server.max_body_bytes = u64::MAX;
    cfg.server.body_memory_bytes = u64::MAX;
    if !l1 {
        cfg.server.l1_bytes = 0;
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::setup::OVERRIDES;

    /// The bench's sidecars differ from a user's defaults in exactly the settings
    /// `OVERRIDES` names (printed under every table): fetch and lookup deadlines included.
    #[test]
    fn the_bench_sidecars_differ_from_the_defaults_only_where_the_table_says() {
        let ns = crate::bench::setup::ValueSize::M2.namespace();
        for l1 in [false, true] {
            let mut cfg = sidecar_config(&StoreConfig::default(), &ns, &ns, l1);
            let defaults = Config::default().server;
            for (name, differs) in [
                (
                    "put_timeout",
                    cfg.server.put_timeout != defaults.put_timeout,
                ),
                (
                    "max_concurrent_requests",
                    cfg.server.max_concurrent_requests != defaults.max_concurrent_requests,
                ),
                (
                    "max_body_bytes",
                    cfg.server.max_body_bytes != defaults.max_body_bytes,
                ),
                (
                    "body_memory_bytes",
                    cfg.server.body_memory_bytes != defaults.body_memory_bytes,
                ),
                ("l1_bytes", cfg.server.l1_bytes != defaults.l1_bytes),
            ] {
                if differs {
                    assert!(OVERRIDES.contains(name), "{name} differs but is not listed");
                }
            }
            cfg.server.put_timeout = defaults.put_timeout;
            cfg.server.max_concurrent_requests = defaults.max_concurrent_requests;
            cfg.server.max_body_bytes = defaults.max_body_bytes;
            cfg.server.body_memory_bytes = defaults.body_memory_bytes;
            cfg.server.l1_bytes = defaults.l1_bytes;
            assert_eq!(
                cfg.server, defaults,
                "a setting differs that OVERRIDES does not list"
            );
        }
    }
}
