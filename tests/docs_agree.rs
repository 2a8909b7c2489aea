//! Promises of `docs/api.md` (and `docs/hashing.md`) that a user found broken by testing from
//! the docs alone, each pinned against a real sidecar: unknown query parameters, operator
//! deadlines, the responses the HTTP layer sends itself, histogram buckets, hashing from
//! `GET /v1/namespaces` alone, and what `put_queue_bytes` reaching 0 means.

mod support;

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use kvshelf::client::{ClientError, Protocol};
use kvshelf::store::PutResult;
use kvshelf::{Dtype, Layout, Namespace, PrefixHasher};
use support::{Sidecar, namespace, payload, redis_url, sidecar_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every test's bound: a hang fails the test instead of stalling the suite.
const WITHIN: Duration = Duration::from_secs(60);

/// The endpoints of the table in docs/api.md §3, as `(method, path)` with `{ns}` and
/// `{hash}` filled in and optional parts (`[…]`) left out.
fn documented_endpoints(label: &str, hash: &str) -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/api.md")).unwrap();
    let table = doc
        .split("| method and path | request | response | counted |")
        .nth(1)
        .expect("docs/api.md §3 has the endpoint table");
    let mut endpoints = Vec::new();
    for row in table.lines().skip(2).take_while(|l| l.starts_with('|')) {
        let cell = row.split('`').nth(1).expect("a `METHOD /path` cell");
        let (method, path) = cell.split_once(' ').unwrap();
        let mut path = path.replace("{ns}", label).replace("{hash}", hash);
        if let Some(at) = path.find('[') {
            path.truncate(at);
        }
        path = path.replace("namespace=L", &format!("namespace={label}"));
        endpoints.push((method.to_owned(), path));
    }
    endpoints
}

#[tokio::test]
async fn every_endpoint_refuses_unknown_query_parameters_and_changes_nothing() {
    let ns = namespace("query");
    let side = Sidecar::start(sidecar_config(None, vec![ns.clone()])).await;
    let http = reqwest::Client::new();
    let h = PrefixHasher::new(&ns, None).hash_prefix(&(0..ns.block_size).collect::<Vec<_>>())[0];
    let block = format!("{}/v1/blocks/{}/{h}", side.url(), ns.label);
    let r = http.put(&block).body(payload(&ns, 1)).send().await.unwrap();
    assert_eq!(r.status(), 201);

    let endpoints = documented_endpoints(&ns.label, &h.to_string());
    assert!(endpoints.len() >= 16, "{endpoints:?}");
    for (method, path) in &endpoints {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = format!("{}{path}{sep}bogus=1", side.url());
        let request = http.request(method.parse().unwrap(), &url).body(format!(
            "{{\"namespace\": \"{}\", \"block_hashes\": [\"{h}\"]}}",
            ns.label
        ));
        let r = tokio::time::timeout(WITHIN, request.send())
            .await
            .unwrap()
            .unwrap();
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().await.expect("a JSON error body");
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_request")),
            "{method} {path}?bogus=1: {body}"
        );
        assert!(
            body["message"].as_str().unwrap().contains("bogus"),
            "{body}"
        );
    }
    // Refused before anything ran: the block is still there, unpinned.
    let r = http.get(&block).send().await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "delete and purge with a bad query changed nothing"
    );
    let ttl = side.shelf.ttl(&ns.label, &h).await.unwrap();
    assert!(
        matches!(ttl, Some(Some(_))),
        "pin with a bad query changed nothing: {ttl:?}"
    );
    // An empty query string is no parameter at all.
    let r = http
        .get(format!("{}/v1/namespaces?", side.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// A Redis that accepts connections and never answers.
async fn silent_redis() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    (url, task)
}

#[tokio::test]
async fn operator_actions_answer_503_at_operator_timeout_when_redis_does_not_answer() {
    let (url, silent) = silent_redis().await;
    let ns = namespace("deadline");
    let mut cfg = sidecar_config(Some(url), vec![ns.clone()]);
    cfg.server.operator_timeout = Duration::from_millis(300);
    let side = Sidecar::start(cfg).await;
    let h = PrefixHasher::new(&ns, None).hash_prefix(&(0..ns.block_size).collect::<Vec<_>>())[0];
    let says_the_deadline = |what: &str, code: &str, message: &str| {
        assert_eq!(code, "backend_unavailable", "{what}: {message}");
        assert!(
            message.contains("operator_timeout (300ms)"),
            "{what}: {message}"
        );
    };
    for protocol in [Protocol::Http, Protocol::Grpc] {
        let c = side.client(protocol, None);
        let calls: Vec<(&str, Result<(), ClientError>)> = vec![
            ("delete", c.delete(&ns.label, &[h]).await.map(drop)),
            ("pin", c.pin(&ns.label, &h, true).await.map(drop)),
            ("unpin", c.pin(&ns.label, &h, false).await.map(drop)),
            ("purge", c.purge(&ns.label).await.map(drop)),
        ];
        for (what, result) in calls {
            match result {
                Err(ClientError::Api { code, message }) => {
                    says_the_deadline(&format!("{protocol:?} {what}"), &code, &message)
                }
                other => panic!("{protocol:?} {what}: expected backend_unavailable, got {other:?}"),
            }
        }
    }
    let r = tokio::time::timeout(
        WITHIN,
        reqwest::Client::new()
            .delete(format!("{}/v1/blocks/{}/{h}", side.url(), ns.label))
            .send(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    says_the_deadline(
        "DELETE /v1/blocks",
        body["error"].as_str().unwrap(),
        body["message"].as_str().unwrap(),
    );
    silent.abort();
}

/// Sends `request` on a fresh connection and reads until the server closes it.
async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may answer (and close) before it has read everything: ignore write errors.
    let _ = conn.write_all(request).await;
    let mut response = Vec::new();
    tokio::time::timeout(WITHIN, conn.read_to_end(&mut response))
        .await
        .expect("the server answers and closes")
        .unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn the_http_layer_answers_malformed_requests_itself_with_an_empty_body() {
    let side = Sidecar::start(sidecar_config(None, vec![])).await;
    let long_uri = format!("GET /v1/{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
    let many_headers = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\n{}\r\n",
        (0..101)
            .map(|i| format!("x-h{i}: 1\r\n"))
            .collect::<String>()
    );
    let big_header = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(500 * 1024)
    );
    let cases: [(&str, &[u8], &str); 5] = [
        (
            "a request line that is not HTTP",
            b"NOT HTTP AT ALL\r\n\r\n",
            "400",
        ),
        (
            "a malformed header",
            b"GET /healthz HTTP/1.1\r\nHost x\r\n\r\n",
            "400",
        ),
        ("a URI over 65534 bytes", long_uri.as_bytes(), "414"),
        ("more than 100 headers", many_headers.as_bytes(), "431"),
        ("a request head over 400 KiB", big_header.as_bytes(), "431"),
    ];
    for (what, request, status) in cases {
        let response = raw_exchange(side.addr, request).await;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("{what}: no response head in {response:?}"));
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{what}: {head}"
        );
        assert!(
            head.to_ascii_lowercase().contains("content-length: 0"),
            "{what}: {head}"
        );
        assert_eq!(body, "", "{what}: the HTTP layer's answers have no body");
    }
    // Everything that reaches kvshelf has the JSON body, e.g. a URI just under the limit.
    let near = format!(
        "GET /v1/{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "a".repeat(60_000)
    );
    let response = raw_exchange(side.addr, near.as_bytes()).await;
    assert!(
        response.starts_with("HTTP/1.1 404 "),
        "{}",
        &response[..100]
    );
    assert!(response.contains("\"error\":\"no_such_route\""));
}

#[tokio::test]
async fn request_durations_are_histograms_with_buckets_from_100us_to_10s() {
    let ns = namespace("histogram");
    let side = Sidecar::start(sidecar_config(None, vec![ns.clone()])).await;
    let c = side.client(Protocol::Http, None);
    c.lookup_tokens(&ns.label, &(0..ns.block_size).collect::<Vec<_>>(), false)
        .await
        .unwrap();
    let text = reqwest::get(format!("{}/metrics", side.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("# TYPE kvshelf_request_duration_seconds histogram"),
        "{text}"
    );
    let buckets: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("kvshelf_request_duration_seconds_bucket{") && l.contains("op=\"lookup\"")
        })
        .collect();
    for le in ["0.0001", "0.001", "0.01", "0.1", "1", "10", "+Inf"] {
        assert!(
            buckets.iter().any(|l| l.contains(&format!("le=\"{le}\""))),
            "no le={le} bucket in {buckets:#?}"
        );
    }
    assert!(!text.contains("quantile="), "no summaries left: {text}");
}

/// docs/hashing.md, implemented again in Python from the document, fed only with what
/// `GET /v1/namespaces` says (stdin: `{"namespace": NamespaceInfo, "tokens": [...]}`).
const HASH_FROM_API_PY: &str = r#"
import hashlib, json, struct, sys
req = json.load(sys.stdin)
ns, tokens = req["namespace"], req["tokens"]
def u32(x): return struct.pack("<I", x)
def bts(b): return u32(len(b)) + b
def field(name, v): return bts(name.encode()) + bts(v)
def opt(v): return b"" if v is None else b"\x01" + v
lora = ns["lora_adapter"]
root = hashlib.sha256(
    b"kvshelf.root.v1\0"
    + field("model_id", ns["model_id"].encode())
    + field("model_revision", ns["model_revision"].encode())
    + field("kv_dtype", ns["kv_dtype"].encode())
    + field("num_layers", u32(ns["num_layers"]))
    + field("num_kv_heads", u32(ns["num_kv_heads"]))
    + field("head_dim", u32(ns["head_dim"]))
    + field("tp_size", u32(ns["tp_size"]))
    + field("tp_rank", u32(ns["tp_rank"]))
    + field("layout_order", ns["layout_order"].encode())
    + field("block_size", u32(ns["block_size"]))
    + field("lora_adapter", opt(None if lora is None else lora.encode()))
    + field("salt", opt(None))
).digest()
out, parent, n = [], root, ns["block_size"]
for i in range(len(tokens) // n):
    block = tokens[i * n:(i + 1) * n]
    m = b"KVB1" + parent + u32(len(block)) + b"".join(u32(t) for t in block) + u32(0)
    parent = hashlib.sha256(m).digest()
    out.append(parent.hex())
print(json.dumps(out))
"#;

#[tokio::test]
async fn a_client_hashes_from_get_namespaces_and_docs_hashing_md_alone() {
    // Every field of the root away from its default, so that each one must come from the API.
    let lora = Namespace {
        model_revision: "rev-9".into(),
        kv_dtype: Dtype::Bfloat16,
        layout: Layout {
            num_layers: 3,
            num_kv_heads: 8,
            head_dim: 16,
            tp_size: 2,
            tp_rank: 1,
            order: "ltkhd".into(),
        },
        block_size: 5,
        lora_adapter: Some("sql-lora".into()),
        ..namespace("hash-lora")
    };
    let base = Namespace {
        lora_adapter: None,
        ..namespace("hash-base")
    };
    let side = Sidecar::start(sidecar_config(None, vec![lora.clone(), base.clone()])).await;
    let http = reqwest::Client::new();
    let listed: serde_json::Value = http
        .get(format!("{}/v1/namespaces", side.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["salted"], false, "{listed}");
    let tokens: Vec<u32> = (0..23).map(|t| t * 7919 + 3).collect();
    for ns in [&lora, &base] {
        let info = listed["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["label"] == ns.label.as_str())
            .unwrap();
        let mut python = tokio::process::Command::new("python3")
            .args(["-c", HASH_FROM_API_PY])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 is on PATH");
        let input = serde_json::json!({ "namespace": info, "tokens": tokens });
        let mut stdin = python.stdin.take().unwrap();
        stdin.write_all(input.to_string().as_bytes()).await.unwrap();
        drop(stdin);
        let out = tokio::time::timeout(WITHIN, python.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let computed: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
        let served: serde_json::Value = http
            .post(format!("{}/v1/hash", side.url()))
            .json(&serde_json::json!({ "namespace": ns.label, "tokens": tokens }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let served: Vec<String> = serde_json::from_value(served["block_hashes"].clone()).unwrap();
        assert_eq!(served.len(), 23 / ns.block_size as usize);
        assert_eq!(computed, served, "{}: {info}", ns.label);
    }

    // gRPC's Stats carries the same fields.
    let channel = tonic::transport::Endpoint::from_shared(side.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let stats = kvshelf::proto::shelf_client::ShelfClient::new(channel)
        .stats(kvshelf::proto::StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!stats.salted);
    for n in &stats.namespaces {
        let json = listed["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["label"] == n.label.as_str())
            .unwrap();
        let grpc = serde_json::json!({
            "kv_dtype": n.kv_dtype, "num_layers": n.num_layers, "num_kv_heads": n.num_kv_heads,
            "head_dim": n.head_dim, "tp_size": n.tp_size, "tp_rank": n.tp_rank,
            "layout_order": n.layout_order, "block_size": n.block_size,
            "lora_adapter": n.lora_adapter, "model_revision": n.model_revision,
        });
        for (field, value) in grpc.as_object().unwrap() {
            assert_eq!(&json[field], value, "{}: {field}", n.label);
        }
    }
}

/// A TCP proxy in front of the test Redis that holds back the first `SET` command it sees
/// until released: a put that the sidecar has handed to Redis, and Redis has not received.
struct SetGate {
    url: String,
    seen: Arc<tokio::sync::Notify>,
    open: tokio::sync::watch::Sender<bool>,
}

impl SetGate {
    async fn start(redis: &str) -> SetGate {
        let target = redis.trim_start_matches("redis://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        let seen = Arc::new(tokio::sync::Notify::new());
        let (open, opened) = tokio::sync::watch::channel(false);
        let gate_seen = seen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(&target).await.unwrap();
                let (mut client_rx, client_tx) = client.into_split();
                let (server_rx, mut server_tx) = server.into_split();
                tokio::spawn(copy(server_rx, client_tx));
                let (seen, mut opened) = (gate_seen.clone(), opened.clone());
                tokio::spawn(async move {
                    let mut tail = Vec::new();
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match client_rx.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        tail.extend_from_slice(&buf[..n]);
                        let is_set = tail.windows(9).any(|w| w == b"$3\r\nSET\r\n");
                        tail.drain(..tail.len().saturating_sub(8));
                        if is_set && !*opened.borrow() {
                            seen.notify_one();
                            let _ = opened.wait_for(|open| *open).await;
                        }
                        if server_tx.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        SetGate { url, seen, open }
    }
}

async fn copy(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf) {
    let _ = tokio::io::copy(&mut from, &mut to).await;
}

async fn put_queue_bytes(side: &Sidecar) -> u64 {
    let stats: serde_json::Value = reqwest::get(format!("{}/v1/stats", side.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    stats["put_queue_bytes"].as_u64().unwrap()
}

#[tokio::test]
async fn put_queue_bytes_counts_an_async_put_until_it_is_written() {
    let gate = SetGate::start(&redis_url()).await;
    let ns = namespace("queue-written");
    let mut cfg = sidecar_config(Some(gate.url.clone()), vec![ns.clone()]);
    cfg.server.put_timeout = WITHIN; // the held write must not be dropped meanwhile
    let side = Sidecar::start(cfg).await;
    let c = side.client(Protocol::Http, None);
    let h = PrefixHasher::new(&ns, None).hash_prefix(&(0..ns.block_size).collect::<Vec<_>>())[0];
    let outcome = c
        .put(&ns.label, &[(h, payload(&ns, 6))], true)
        .await
        .unwrap();
    assert_eq!(outcome, vec![PutResult::Queued]);

    // The queue has handed the block to a Redis write; Redis has not received it yet.
    tokio::time::timeout(WITHIN, gate.seen.notified())
        .await
        .expect("the queued put reaches Redis's connection");
    assert_eq!(
        put_queue_bytes(&side).await,
        ns.block_bytes(),
        "a block being written still counts"
    );
    gate.open.send(true).unwrap();
    tokio::time::timeout(WITHIN, async {
        while put_queue_bytes(&side).await > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the queue drains");
    // 0 means written: the block is in Redis now, not merely on its way.
    assert_eq!(support::store().lookup(&ns, &[h]).await.unwrap(), 1);
}
