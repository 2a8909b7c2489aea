//! Shared fixtures for the integration tests: a real Redis, and a fresh namespace per test.
//!
//! Redis comes from `KVSHELF_TEST_REDIS_URL` when it is set; otherwise each test process
//! starts its own `redis-server` on a free port. When neither works the tests fail loudly:
//! a cache test that silently skipped would prove nothing.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kvshelf::{Dtype, Layout, Namespace, RedisStore, StoreConfig};

/// A `redis-server` owned by a test: stopped when dropped, and also when the test process
/// dies, because it is started under a shell that kills it when its stdin (our pipe) closes.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

impl RedisServer {
    /// Starts `redis-server` on a free loopback port with the given extra arguments.
    pub fn start(extra: &[&str]) -> RedisServer {
        Self::start_on(free_port(), extra)
    }

    /// Starts `redis-server` on `port` (for restarting a stopped server on the same port).
    pub fn start_on(port: u16, extra: &[&str]) -> RedisServer {
        let dir = std::env::temp_dir().join(format!("kvshelf-test-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut args = vec![
            "--port".to_owned(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--maxmemory".into(),
            "1gb".into(),
            "--maxmemory-policy".into(),
            "volatile-lfu".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        let script = format!(
            "redis-server {} >'{}/redis.log' 2>&1 & pid=$!; read _; kill $pid; wait $pid",
            quoted.join(" "),
            dir.display()
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .spawn()
            .expect("cannot run sh");
        let server = RedisServer { child, port, dir };
        server.wait_ready();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if redis_cli(&self.url(), &["PING"]).is_some_and(|o| o.trim() == "PONG") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not start; its log:\n{}",
                self.port,
                std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // Closing stdin makes the wrapper shell kill redis-server.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// A free TCP port on loopback (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The URL of the Redis shared by this test process, from (in order):
/// 1. `KVSHELF_TEST_REDIS_URL`, when set;
/// 2. a container started with testcontainers, when a Docker engine is present — image
///    `KVSHELF_TEST_REDIS_IMAGE` (default `redis:7.4`: always a pinned tag, since
///    testcontainers-modules' Redis would default to `redis:5.0`);
/// 3. a local `redis-server` on a free port.
///
/// When the image was named explicitly and cannot be started, the tests fail: CI names its
/// locally built image, and a silent fallback would hide that the container path broke.
/// With the default image on a machine that cannot pull it, the local server is used.
pub fn redis_url() -> String {
    static SHARED: OnceLock<(String, Option<RedisServer>)> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            if let Ok(url) = std::env::var("KVSHELF_TEST_REDIS_URL")
                && !url.is_empty()
            {
                return (url, None);
            }
            if docker_available() {
                match container::start() {
                    Ok(url) => return (url, None),
                    Err(e) if std::env::var_os("KVSHELF_TEST_REDIS_IMAGE").is_some() => {
                        panic!("KVSHELF_TEST_REDIS_IMAGE is set but its container did not start: {e}")
                    }
                    Err(e) => eprintln!("testcontainers: {e}; using a local redis-server"),
                }
            }
            assert!(
                which("redis-server"),
                "no Redis for the tests: set KVSHELF_TEST_REDIS_URL, run a Docker engine, or install redis-server"
            );
            let server = RedisServer::start(&[]);
            (server.url(), Some(server))
        })
        .0
        .clone()
}

fn docker_available() -> bool {
    std::env::var_os("KVSHELF_TEST_NO_DOCKER").is_none()
        && (std::env::var_os("DOCKER_HOST").is_some() || Path::new("/var/run/docker.sock").exists())
}

/// Redis in a container, through testcontainers.
mod container {
    use std::sync::OnceLock;
    use std::time::Duration;

    use testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers::runners::SyncRunner;
    use testcontainers::{Container, GenericImage, ImageExt};

    /// The container lives as long as the test process: it is stopped by the next test run
    /// (see `remove_orphans`) or by CI, since statics are never dropped.
    static CONTAINER: OnceLock<Container<GenericImage>> = OnceLock::new();

    pub fn start() -> Result<String, String> {
        remove_orphans();
        let image =
            std::env::var("KVSHELF_TEST_REDIS_IMAGE").unwrap_or_else(|_| "redis:7.4".into());
        let (name, tag) = image.rsplit_once(':').unwrap_or((image.as_str(), "latest"));
        let request = GenericImage::new(name, tag)
            .with_exposed_port(6379.tcp())
            .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections"))
            .with_cmd([
                "redis-server",
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
                "--maxmemory",
                "1gb",
                "--maxmemory-policy",
                "volatile-lfu",
            ])
            .with_label("kvshelf.test", "1")
            .with_label("kvshelf.test.pid", std::process::id().to_string())
            .with_startup_timeout(Duration::from_secs(60));
        // The blocking runner drives its own runtime, and every blocking call (start, port,
        // drop) panics on a tokio thread: do them all on a plain thread of our own.
        std::thread::spawn(move || {
            let container = request
                .start()
                .map_err(|e| format!("cannot start {image}: {e}"))?;
            let port = container
                .get_host_port_ipv4(6379.tcp())
                .map_err(|e| format!("no port for {image}: {e}"))?;
            let _ = CONTAINER.set(container);
            Ok(format!("redis://127.0.0.1:{port}"))
        })
        .join()
        .map_err(|_| "the testcontainers thread panicked".to_string())?
    }

    /// Removes test containers whose test process is gone.
    fn remove_orphans() {
        let Ok(out) = std::process::Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                "label=kvshelf.test=1",
                "--format",
                "{{.ID}} {{.Label \"kvshelf.test.pid\"}}",
            ])
            .output()
        else {
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let mut it = line.split_whitespace();
            let (Some(id), Some(pid)) = (it.next(), it.next()) else {
                continue;
            };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::process::Command::new("docker")
                    .args(["rm", "-f", id])
                    .output();
            }
        }
    }
}

/// Runs `redis-cli -u url args…` and returns its stdout, or `None` if it failed.
pub fn redis_cli(url: &str, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .arg("-u")
        .arg(url)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn which(bin: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|p| Path::new(&p).join(bin).is_file())
    })
}

/// A namespace of its own for one test, so tests can run in parallel on one Redis.
pub fn namespace(test: &str) -> Namespace {
    let nonce: u32 = rand::random();
    Namespace {
        label: format!("t-{test}-{nonce:08x}"),
        model_id: "kvshelf/test-model".into(),
        model_revision: "r1".into(),
        kv_dtype: Dtype::Float16,
        layout: Layout {
            num_layers: 2,
            num_kv_heads: 2,
            head_dim: 8,
            tp_size: 1,
            tp_rank: 0,
            order: "lkthd".into(),
        },
        block_size: 4,
        lora_adapter: None,
        ttl: None,
        hash_scheme: Default::default(),
    }
}

/// A store on the shared Redis.
pub fn store() -> RedisStore {
    store_with(StoreConfig {
        url: redis_url(),
        ..Default::default()
    })
}

pub fn store_with(cfg: StoreConfig) -> RedisStore {
    RedisStore::new(cfg).expect("store")
}

/// A raw redis-rs connection, to look at what the store wrote the way an operator would.
pub async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// A payload of one block of `ns`, filled from `seed`.
pub fn payload(ns: &Namespace, seed: u8) -> bytes::Bytes {
    (0..ns.block_bytes())
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

impl RedisServer {
    /// The redis-server process id (to pause it with SIGSTOP, or kill it).
    pub fn pid(&self) -> u32 {
        let info = redis_cli(&self.url(), &["INFO", "server"]).expect("redis answers");
        info.lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|p| p.trim().parse().ok())
            .expect("INFO server has process_id")
    }

    /// Sends a signal (`STOP`, `CONT`, …) to redis-server.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid_cached())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    fn pid_cached(&self) -> String {
        std::fs::read_to_string(self.dir.join("pid"))
            .unwrap_or_else(|_| {
                let pid = self.pid().to_string();
                std::fs::write(self.dir.join("pid"), &pid).unwrap();
                pid
            })
            .trim()
            .to_owned()
    }
}

/// A running sidecar on a free port, stopped when dropped.
pub struct Sidecar {
    pub addr: std::net::SocketAddr,
    pub shelf: kvshelf::shelf::Shelf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Sidecar {
    pub async fn start(cfg: kvshelf::config::Config) -> Sidecar {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shelf = kvshelf::shelf::Shelf::new(&cfg).expect("valid config");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(kvshelf::server::run(listener, shelf.clone(), async move {
            let _ = stopped.await;
        }));
        Sidecar {
            addr,
            shelf,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn client(
        &self,
        protocol: kvshelf::client::Protocol,
        token: Option<&str>,
    ) -> kvshelf::client::Client {
        kvshelf::client::Client::new(kvshelf::client::ClientConfig {
            url: self.url(),
            protocol,
            token: token.map(Into::into),
            ..Default::default()
        })
        .unwrap()
    }

    /// Stops like SIGTERM would: in-flight requests and queued puts finish first.
    pub async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }

    /// The value of a Prometheus counter line, e.g. `kvshelf_backend_block_reads_total{namespace="x"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A sidecar config on Redis `url` serving `namespaces`.
pub fn sidecar_config(url: Option<String>, namespaces: Vec<Namespace>) -> kvshelf::config::Config {
    kvshelf::config::Config {
        store: url.map(|url| StoreConfig {
            url,
            ..Default::default()
        }),
        namespaces,
        ..Default::default()
    }
}

/// A Redis Cluster of `n` primaries (no replicas) on free loopback ports.
pub struct RedisCluster {
    pub nodes: Vec<Option<RedisServer>>,
    pub ports: Vec<u16>,
}

impl RedisCluster {
    pub fn start(n: usize) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..n)
            .map(|_| {
                RedisServer::start(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                    // A cache must keep serving the slots it has when a primary is lost;
                    // with full coverage required the whole cluster would refuse queries.
                    "--cluster-require-full-coverage",
                    "no",
                ])
            })
            .collect();
        let ports: Vec<u16> = nodes.iter().map(|s| s.port).collect();
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(ports.iter().map(|p| format!("127.0.0.1:{p}")));
        args.extend([
            "--cluster-replicas".into(),
            "0".into(),
            "--cluster-yes".into(),
        ]);
        let out = Command::new("redis-cli")
            .args(&args)
            .output()
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        for s in &nodes {
            while !redis_cli(&s.url(), &["CLUSTER", "INFO"])
                .is_some_and(|i| i.contains("cluster_state:ok"))
            {
                assert!(Instant::now() < deadline, "cluster did not become ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        RedisCluster {
            nodes: nodes.into_iter().map(Some).collect(),
            ports,
        }
    }

    /// Seed URLs for `StoreConfig { cluster: true, url, .. }`.
    pub fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the node that holds `key` (asked of every live node).
    pub fn owner(&self, key: &str) -> Option<usize> {
        self.nodes.iter().position(|n| {
            n.as_ref().is_some_and(|n| {
                redis_cli(&n.url(), &["EXISTS", key]).is_some_and(|o| o.trim() == "1")
            })
        })
    }

    /// Keys stored on node `i`.
    pub fn dbsize(&self, i: usize) -> u64 {
        let n = self.nodes[i].as_ref().expect("node running");
        redis_cli(&n.url(), &["DBSIZE"])
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Kills node `i`.
    pub fn stop(&mut self, i: usize) {
        self.nodes[i].take();
    }
}
