//! Runs every ```sh example of `docs/api.md`, in order, against a real `kvshelf serve`
//! started with no config (embedded store, `demo` namespace), so the API reference stays
//! true. Each block runs on its own under `bash -euo pipefail`; blocks share only `KV`,
//! `KV_GRPC` and the files of one temporary working directory, which holds a copy of
//! `proto/` as the repository root would (the grpcurl examples use `-import-path proto`).
//!
//! Needs `curl`, `jq`, `python3`, `xxd` and `grpcurl` on PATH (`./test.sh` installs them),
//! and fails when one is missing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The sidecar and its working directory: killed and removed when dropped, even on panic.
struct Sidecar {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Sidecar {
    /// Starts `kvshelf serve` on port 0 and reads the port it got from its log: a port
    /// picked here and handed over could be taken by someone else in between.
    fn start(dir: PathBuf) -> Sidecar {
        let log = std::fs::File::create(dir.join("server.log")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvshelf"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env_remove("KVSHELF_REDIS_URL")
            .env_remove("KVSHELF_CONFIG")
            .env_remove("KVSHELF_LISTEN")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start kvshelf");
        let deadline = Instant::now() + Duration::from_secs(30);
        let log = || std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
        let addr = loop {
            if let Some(addr) = listening_on(&log()) {
                break addr;
            }
            let exited = child.try_wait().unwrap();
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "kvshelf did not say where it listens ({exited:?}); its log:\n{}",
                    log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let sidecar = Sidecar { child, dir, addr };
        while !healthz_ok(addr) {
            assert!(
                Instant::now() < deadline,
                "kvshelf did not answer /healthz; its log:\n{}",
                sidecar.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        sidecar
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

/// The address of `kvshelf serve`'s startup line (`… kvshelf serving HTTP and gRPC
/// addr=127.0.0.1:40123`).
fn listening_on(log: &str) -> Option<SocketAddr> {
    log.lines()
        .filter(|l| l.contains("serving HTTP and gRPC"))
        .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("addr=")))
        .and_then(|a| a.parse().ok())
}

fn healthz_ok(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let request = "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut response = String::new();
    s.write_all(request.as_bytes()).is_ok()
        && s.read_to_string(&mut response).is_ok()
        && response.starts_with("HTTP/1.1 200")
}

/// The bodies of the ```sh blocks of a Markdown document, in order.
fn sh_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim()) {
            (None, "```sh") => current = Some(Vec::new()),
            (Some(body), "```") => {
                blocks.push(body.join("\n"));
                current = None;
            }
            (Some(body), _) => body.push(line),
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "an unclosed ```sh block");
    blocks
}

fn require_tools() {
    for tool in ["curl", "jq", "python3", "xxd", "grpcurl"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "`{tool}` is not on PATH: run the tests with ./test.sh, which installs it"
        );
    }
}

#[test]
fn every_sh_example_of_docs_api_md_runs() {
    require_tools();
    let doc = std::fs::read_to_string(Path::new(REPO).join("docs/api.md")).unwrap();
    let blocks = sh_blocks(&doc);
    assert!(
        blocks.len() >= 10,
        "only {} ```sh blocks found",
        blocks.len()
    );

    let dir = std::env::temp_dir().join(format!("kvshelf-docs-api-{}", std::process::id()));
    let proto = dir.join("proto/kvshelf/v1");
    std::fs::create_dir_all(&proto).unwrap();
    std::fs::copy(
        Path::new(REPO).join("proto/kvshelf/v1/shelf.proto"),
        proto.join("shelf.proto"),
    )
    .unwrap();
    let sidecar = Sidecar::start(dir.clone());
    let addr = sidecar.addr;

    for (i, block) in blocks.iter().enumerate() {
        let out = Command::new("timeout")
            .args(["120", "bash", "-euo", "pipefail", "-c", block])
            .current_dir(&dir)
            .env("KV", format!("http://{addr}"))
            .env("KV_GRPC", addr.to_string())
            .stdin(Stdio::null())
            .output()
            .expect("cannot run bash");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "```sh block {} of docs/api.md failed ({}):\n{block}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- server log\n{}",
            i + 1,
            out.status,
            sidecar.log()
        );
        println!("block {} ok:\n{stdout}", i + 1);
    }
}
