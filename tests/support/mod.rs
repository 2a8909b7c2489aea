//! Shared fixtures for the integration tests: a real Redis, and a fresh namespace per test.
//!
//! Redis comes from `KVSHELF_TEST_REDIS_URL` when it is set; otherwise each test process
//! starts its own `redis-server` on a free port. When neither works the tests fail loudly:
//! a cache test that silently skipped would prove nothing.
//!
//! Servers that can bind port 0 do (the in-process sidecar takes a bound listener);
//! `redis-server` cannot report a port it picked itself, so it is given a free one and
//! started again on another when someone took that port first.
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

/// Why a `redis-server` did not start.
#[derive(Debug)]
pub enum StartError {
    /// One of its ports was taken (by anyone) before it could bind it: try other ports.
    PortTaken(String),
    /// Anything else, with its log.
    Failed(String),
}

/// How many times [`RedisServer::start`] picks new ports after a lost bind race.
const START_ATTEMPTS: usize = 20;

impl RedisServer {
    /// Starts `redis-server` on a free loopback port with the given extra arguments.
    pub fn start(extra: &[&str]) -> RedisServer {
        Self::start_with(|[]| extra.iter().map(|s| s.to_string()).collect()).0
    }

    /// Starts `redis-server` on a free loopback port with the arguments `extra(more)`, where
    /// `more` are `N` more free ports for it to listen on (`--tls-port`, …); returns them.
    ///
    /// A free port is only free until someone binds it, and redis-server cannot bind port 0
    /// and say which port it got: when it loses that race it is started again on new ports.
    pub fn start_with<const N: usize>(
        extra: impl Fn([u16; N]) -> Vec<String>,
    ) -> (RedisServer, [u16; N]) {
        Self::start_on_candidates(std::iter::repeat_with(free_ports::<1>).map(|[p]| p), extra)
    }

    /// [`Self::start_with`], taking its main port from `ports` (for tests of the retry).
    pub fn start_on_candidates<const N: usize>(
        ports: impl IntoIterator<Item = u16>,
        extra: impl Fn([u16; N]) -> Vec<String>,
    ) -> (RedisServer, [u16; N]) {
        let mut lost = Vec::new();
        for port in ports.into_iter().take(START_ATTEMPTS) {
            let more = free_ports::<N>();
            let args = extra(more);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            match Self::try_start_on(port, &args) {
                Ok(server) => return (server, more),
                Err(StartError::PortTaken(log)) => lost.push(log),
                Err(StartError::Failed(log)) => panic!("redis-server did not start:\n{log}"),
            }
        }
        panic!(
            "redis-server lost the race for a free port {} times; its last log:\n{}",
            lost.len(),
            lost.last().map_or("", String::as_str)
        )
    }

    /// Starts `redis-server` on `port` (for restarting a stopped server on the same port).
    pub fn start_on(port: u16, extra: &[&str]) -> RedisServer {
        Self::try_start_on(port, extra)
            .unwrap_or_else(|e| panic!("redis-server on port {port} did not start: {e:?}"))
    }

    /// Starts `redis-server` on `port`, and waits until it is ready (or failed).
    pub fn try_start_on(port: u16, extra: &[&str]) -> Result<RedisServer, StartError> {
        let dir = std::env::temp_dir().join(format!("kvshelf-test-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // What the readiness check reads must come from this start, not an earlier one.
        for file in ["redis.log", "pid"] {
            let _ = std::fs::remove_file(dir.join(file));
        }
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
            "redis-server {} >'{dir}/redis.log' 2>&1 & pid=$!; echo $pid >'{dir}/pid'; \
             read _; kill $pid 2>/dev/null; wait $pid",
            quoted.join(" "),
            dir = dir.display()
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .spawn()
            .expect("cannot run sh");
        let server = RedisServer { child, port, dir };
        server.wait_ready()?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// Waits until our redis-server says it is ready, or has exited. A PING alone could be
    /// answered by another server that holds the port.
    fn wait_ready(&self) -> Result<(), StartError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if log.contains("Ready to accept connections")
                && redis_cli(&self.url(), &["PING"]).is_some_and(|o| o.trim() == "PONG")
            {
                return Ok(());
            }
            if self.exited() {
                let log = self.log();
                return Err(if log.contains("Address already in use") {
                    StartError::PortTaken(log)
                } else {
                    StartError::Failed(log)
                });
            }
            if Instant::now() > deadline {
                return Err(StartError::Failed(format!("not ready after 10 s:\n{log}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether redis-server has exited (its wrapper shell reaps it only when told to stop,
    /// so until then it stays a zombie).
    fn exited(&self) -> bool {
        let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) else {
            return false; // not even started yet
        };
        process_state(pid.trim().parse().unwrap_or(0)).is_none_or(|state| state == 'Z')
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // Closing stdin makes the wrapper shell kill redis-server.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The state letter (`R`, `S`, `Z`, …) of process `pid`, or `None` when there is none.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// `N` distinct TCP ports that were free on loopback a moment ago. Only for programs that
/// cannot bind port 0 themselves (redis-server): they must cope with losing one.
pub fn free_ports<const N: usize>() -> [u16; N] {
    // Held together, so the N are distinct.
    let held: [TcpListener; N] = std::array::from_fn(|_| TcpListener::bind("127.0.0.1:0").unwrap());
    held.map(|l| l.local_addr().unwrap().port())
}

/// A loopback port where connections are refused, for as long as the returned socket lives:
/// it is bound (so no one else can listen there) but not listening.
pub fn refused_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
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
                "no Redis for the tests: run them with ./test.sh (it installs redis-server), set KVSHELF_TEST_REDIS_URL, or run a Docker engine"
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

    /// The container lives as long as the test process: statics are never dropped. It is
    /// removed by `./test.sh` when the run that made it ends (label `kvshelf.test.run`), or
    /// else by a later test process on this host (see `remove_orphans`).
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
            .with_label(
                "kvshelf.test.run",
                std::env::var("KVSHELF_TEST_RUN_ID").unwrap_or_default(),
            )
            .with_label("kvshelf.test.owner", super::owner_label())
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

    /// Removes the test containers left behind by test processes that are provably gone
    /// (see [`super::is_orphan`]); every other one is left alone, whoever made it.
    fn remove_orphans() {
        let Ok(out) = std::process::Command::new("docker")
            // Not `-q`: it overrides `--format`.
            .args([
                "ps",
                "-a",
                "--filter",
                "label=kvshelf.test=1",
                "--format",
                "{{.ID}} {{.Label \"kvshelf.test.owner\"}}",
            ])
            .output()
        else {
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some((id, owner)) = line.split_once(' ') else {
                continue; // no owner label: not ours to judge
            };
            if super::is_orphan(owner) {
                let _ = std::process::Command::new("docker")
                    .args(["rm", "-f", id])
                    .output();
            }
        }
    }
}

/// Who made a test container: `<boot id>/<pid namespace>/<pid>/<start time>` of this test
/// process. A pid alone names a process only within one pid namespace of one boot: on a
/// Docker daemon shared with other containers or machines, another run's pid is not in our
/// `/proc`, and a pid can be reused.
pub fn owner_label() -> String {
    let pid = std::process::id();
    match (pid_namespace(), start_time(pid)) {
        (Some(namespace), Some(started)) => format!("{namespace}/{pid}/{started}"),
        _ => String::new(), // no /proc: no container is ever judged an orphan
    }
}

/// Whether a container labelled `owner` (see [`owner_label`]) is an orphan we may remove:
/// only when its test process provably no longer exists — made in this boot and this pid
/// namespace (so its pid means the same here), and that pid is now gone or is a process
/// started at another time. Anything else (another host, another container, a label we
/// cannot read) is left to the run that made it: removing it could pull Redis out from
/// under a test that is still running.
pub fn is_orphan(owner: &str) -> bool {
    let Some(here) = pid_namespace() else {
        return false;
    };
    let Some((pid, started)) = owner
        .strip_prefix(&format!("{here}/"))
        .and_then(|rest| rest.split_once('/'))
    else {
        return false;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    !started.is_empty() && start_time(pid).as_deref() != Some(started)
}

/// This kernel boot and this process's pid namespace, e.g. `<uuid>/pid:[4026531836]`.
fn pid_namespace() -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
    Some(format!("{}/{}", boot.trim(), ns.display()))
}

/// The start time of process `pid` (field 22 of `/proc/<pid>/stat`, in clock ticks since
/// boot), or `None` when there is no such process.
fn start_time(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(22 - 3)
        .map(str::to_owned)
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
        max_pinned_bytes: None,
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
        // Tests expect what they put to stay in L1: wait until L1 follows Redis, since
        // tracking flushes L1 when it starts. Not forever: a few tests give the sidecar a
        // Redis that never answers (tests that need tracking assert it themselves).
        let deadline = Instant::now() + Duration::from_secs(3);
        while shelf.l1_coherence() == kvshelf::shelf::L1Coherence::Reconnecting
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
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
        // Every node must see the whole cluster before a test starts: all slots assigned,
        // every node known, state ok.
        let settled = [
            "cluster_state:ok".to_owned(),
            "cluster_slots_assigned:16384".to_owned(),
            format!("cluster_known_nodes:{n}"),
        ];
        let deadline = Instant::now() + Duration::from_secs(15);
        for s in &nodes {
            loop {
                let info = redis_cli(&s.url(), &["CLUSTER", "INFO"]).unwrap_or_default();
                if settled
                    .iter()
                    .all(|line| info.lines().any(|l| l.trim() == line))
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster did not settle; node {}:\n{info}",
                    s.port
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        RedisCluster {
            nodes: nodes.into_iter().map(Some).collect(),
            ports,
        }
    }

    /// Waits until every live node has marked node `i` as failed (`fail` in `CLUSTER
    /// NODES`, not just the local suspicion `fail?`), after `cluster-node-timeout`.
    pub fn wait_failed(&self, i: usize) {
        let lost = format!("127.0.0.1:{}@", self.ports[i]);
        let deadline = Instant::now() + Duration::from_secs(15);
        for n in self.nodes.iter().flatten() {
            loop {
                let nodes = redis_cli(&n.url(), &["CLUSTER", "NODES"]).unwrap_or_default();
                let flags = nodes
                    .lines()
                    .find(|l| {
                        l.split_whitespace()
                            .nth(1)
                            .is_some_and(|a| a.starts_with(&lost))
                    })
                    .and_then(|l| l.split_whitespace().nth(2));
                if flags.is_some_and(|f| f.split(',').any(|f| f == "fail")) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {} never marked node {i} failed:\n{nodes}",
                    n.port
                );
                std::thread::sleep(Duration::from_millis(50));
            }
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
