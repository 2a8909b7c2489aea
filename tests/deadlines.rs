//! A request that stops sending or reading is cut off by a deadline (issue 17 §2; docs/design.md,
//! Security): idle sockets cannot hold slots, `body_memory_bytes` or `fetch_memory_bytes`.
//! HTTP/1.1 (raw sockets), HTTP/2 (h2c) and gRPC, each under a test-level timeout that fails
//! instead of hanging. Deadlines are short here (500 ms); nothing asserts timing beyond
//! "within the deadline and a generous margin".

mod support;

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use kvshelf::client::Protocol;
use kvshelf::config::Config;
use kvshelf::frame::EndReason;
use kvshelf::proto::{FetchRequest, PutBlock, PutRequest, shelf_client::ShelfClient};
use kvshelf::{BlockHash, Layout, Namespace, StoreConfig};
use support::{Sidecar, namespace, payload, redis_url, sidecar_config};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// `body_read_timeout` and `response_write_timeout` in these tests.
const DEADLINE: Duration = Duration::from_millis(500);
/// How long past the deadline a test waits for the sidecar to recover before failing.
const MARGIN: Duration = Duration::from_secs(5);

/// Fails the test instead of hanging it.
async fn within<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), test)
        .await
        .expect("the test did not finish within 60 s")
}

fn with_deadlines(mut cfg: Config) -> Config {
    cfg.server.body_read_timeout = DEADLINE;
    cfg.server.response_write_timeout = DEADLINE;
    cfg
}

/// Polls `ok` until it holds; fails once the deadline and the margin have passed since
/// `since` (the moment the stall began).
async fn recovers<F: Future<Output = bool>>(what: &str, since: Instant, mut ok: impl FnMut() -> F) {
    loop {
        if ok().await {
            return;
        }
        assert!(
            since.elapsed() < DEADLINE + MARGIN,
            "{what}: still not so {:?} after the clients stalled (deadline {DEADLINE:?})",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether a lookup through HTTP/1.1 answers 200 (it waits at most the client's timeout).
async fn lookup_ok(side: &Sidecar, label: &str) -> bool {
    let h = BlockHash([7; 32]);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/lookup", side.url()))
        .json(&serde_json::json!({"namespace": label, "block_hashes": [h]}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    r.status() == 200
}

/// A namespace whose blocks are 1 MiB: a few fill any budget of these tests.
fn big_namespace(test: &str) -> Namespace {
    let mut ns = namespace(test);
    ns.block_size = 16;
    ns.layout = Layout {
        num_layers: 16,
        num_kv_heads: 8,
        head_dim: 128,
        ..ns.layout
    };
    assert_eq!(ns.block_bytes(), 1 << 20);
    ns
}

/// A sidecar with room for `readers` requests at once and a fetch budget of 8 MiB, and one
/// block of `ns` (1 MiB) on it. Returns the block's hash.
async fn fetch_sidecar(ns: &Namespace, readers: usize) -> (Sidecar, BlockHash) {
    let mut cfg = with_deadlines(sidecar_config(Some(redis_url()), vec![ns.clone()]));
    cfg.server.max_concurrent_requests = readers;
    cfg.server.fetch_memory_bytes = 8 << 20;
    cfg.server.fetch_timeout = Duration::from_millis(200);
    let side = Sidecar::start(cfg).await;
    let h = BlockHash(rand::random());
    side.client(Protocol::Http, None)
        .put(&ns.label, &[(h, payload(ns, 1))], false)
        .await
        .unwrap();
    (side, h)
}

/// A fetch of one block by a client of its own is served in full: it got a slot (not
/// `overloaded`) and its room in the fetch budget within fetch_timeout.
async fn fetch_complete(side: &Sidecar, ns: &Namespace, h: BlockHash) -> bool {
    match side
        .client(Protocol::Http, None)
        .fetch(&ns.label, &[h])
        .await
    {
        Ok(got) => got.reason == EndReason::Complete && got.blocks.len() == 1,
        Err(kvshelf::client::ClientError::Api { code, .. }) if code == "overloaded" => false,
        Err(e) => panic!("{e}"),
    }
}

/// The stalled readers hold fetch budget: read from Redis, not taken by their clients.
async fn budget_held(side: &Sidecar, since: Instant) {
    recovers("the stalled readers hold fetch budget", since, || async {
        side.shelf.fetch_memory_in_use() > 0
    })
    .await;
}

/// The request of a fetch of `h` 4096 times: 4 GiB of response, far more than any socket
/// buffer holds.
fn endless_fetch(ns: &Namespace, h: BlockHash) -> serde_json::Value {
    serde_json::json!({"namespace": ns.label, "block_hashes": vec![h; 4096]})
}

/// After a stall was cut: the fetch budget is all back, and the cut was counted.
async fn budget_returned(side: &Sidecar, since: Instant) {
    recovers("fetch budget back to 0", since, || async {
        side.shelf.fetch_memory_in_use() == 0
    })
    .await;
    assert_eq!(side.metric("kvshelf_fetch_memory_bytes").await, 0.0);
    assert!(
        side.metric(r#"kvshelf_stalled_requests_total{reason="response_write_timeout"}"#)
            .await
            >= 1.0
    );
}

/// A raw HTTP/1.1 connection: the stalled client a library would never be.
struct Raw {
    conn: BufReader<TcpStream>,
}

impl Raw {
    async fn connect(side: &Sidecar) -> Raw {
        Raw {
            conn: BufReader::new(TcpStream::connect(side.addr).await.unwrap()),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.conn.get_mut().write_all(bytes).await.unwrap();
    }

    async fn head(&mut self, method: &str, path: &str, headers: &[String]) {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: kvshelf\r\n");
        for h in headers {
            head.push_str(h);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        self.send(head.as_bytes()).await;
    }

    /// The response: status line and JSON body; then the connection must close.
    async fn response_then_close(&mut self) -> (String, serde_json::Value) {
        let mut status = String::new();
        self.conn.read_line(&mut status).await.unwrap();
        let mut len = 0;
        loop {
            let mut line = String::new();
            self.conn.read_line(&mut line).await.unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length: ") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; len];
        self.conn.read_exact(&mut body).await.unwrap();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(MARGIN, self.conn.read_to_end(&mut rest)).await;
        assert!(
            matches!(closed, Ok(Ok(0))),
            "the connection is closed after the answer"
        );
        (
            status.trim_end().to_owned(),
            serde_json::from_slice(&body).unwrap(),
        )
    }
}

/// Issue 17's reproduction: four connections send only the head of a framed put with a
/// 256 MiB `Content-Length` (`qwen2.5-0.5b` of `examples/kvshelf.toml`): together they
/// reserve all of `body_memory_bytes` (1 GiB). On main every lookup then answered 429 for as
/// long as the sockets stayed open; now each is cut off after `body_read_timeout` with
/// `408 request_timeout`, and lookups answer 200 again while the client keeps its sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_headers_only_puts_give_the_body_budget_back() {
    within(async {
        let mut cfg = Config::from_toml(include_str!("../examples/kvshelf.toml")).unwrap();
        cfg.store = Some(StoreConfig {
            url: redis_url(),
            ..Default::default()
        });
        let cfg = with_deadlines(cfg);
        let budget = cfg.server.body_memory_bytes;
        let side = Sidecar::start(cfg).await;
        let mut sockets = Vec::new();
        for _ in 0..4 {
            let mut raw = Raw::connect(&side).await;
            raw.head(
                "POST",
                "/v1/put?namespace=qwen2.5-0.5b",
                &["Content-Length: 268435456".into()],
            )
            .await;
            sockets.push(raw);
        }
        let since = Instant::now();
        recovers("all four admitted", since, || async {
            side.shelf.body_memory_in_use() == budget
        })
        .await;

        recovers("a lookup answers 200", since, || {
            lookup_ok(&side, "qwen2.5-0.5b")
        })
        .await;
        recovers("kvshelf_body_memory_bytes back to 0", since, || async {
            side.metric("kvshelf_body_memory_bytes").await == 0.0
        })
        .await;
        for raw in &mut sockets {
            let (status, body) = raw.response_then_close().await;
            assert_eq!(status, "HTTP/1.1 408 Request Timeout");
            assert_eq!(body["error"], "request_timeout");
        }
        // The recorder is the process's: other tests in this binary count too.
        assert!(
            side.metric(r#"kvshelf_stalled_requests_total{reason="body_read_timeout"}"#)
                .await
                >= 4.0
        );
    })
    .await
}

/// `max_concurrent_requests = 2` and three `PUT /v1/blocks` bodies sent halfway: two hold
/// the slots (the third is refused at once); once they are cut off, counted requests
/// succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_single_block_puts_give_their_slots_back() {
    within(async {
        let ns = namespace("half-sent");
        let mut cfg = with_deadlines(sidecar_config(Some(redis_url()), vec![ns.clone()]));
        cfg.server.max_concurrent_requests = 2;
        let side = Sidecar::start(cfg).await;
        let body = payload(&ns, 3);
        let mut sockets = Vec::new();
        for i in 0..3u8 {
            let mut raw = Raw::connect(&side).await;
            let path = format!("/v1/blocks/{}/{}", ns.label, BlockHash([i; 32]));
            raw.head("PUT", &path, &[format!("Content-Length: {}", body.len())])
                .await;
            raw.send(&body[..body.len() / 2]).await;
            sockets.push(raw);
        }
        let since = Instant::now();
        // Two admitted (each reserved its Content-Length) before anything else asks.
        recovers("two puts admitted", since, || async {
            side.shelf.body_memory_in_use() == 2 * ns.block_bytes()
        })
        .await;
        recovers("a lookup answers 200", since, || {
            lookup_ok(&side, &ns.label)
        })
        .await;
        let mut codes = Vec::new();
        for raw in &mut sockets {
            let (_, body) = raw.response_then_close().await;
            codes.push(body["error"].as_str().unwrap().to_owned());
        }
        codes.sort();
        assert_eq!(codes, ["overloaded", "request_timeout", "request_timeout"]);
        assert_eq!(side.shelf.body_memory_in_use(), 0);
    })
    .await
}

/// An HTTP/1.1 fetch stream whose client reads the response head and then stops reading:
/// with `max_concurrent_requests = 1` it holds the only slot and part of the fetch budget,
/// and every other request is refused (on main: for as long as the socket stays open). Once
/// its connection is closed, another client's fetch is served in full and the budget is
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_http1_fetch_readers_give_the_fetch_budget_back() {
    within(async {
        let ns = big_namespace("h1-reader");
        let (side, h) = fetch_sidecar(&ns, 1).await;
        let body = serde_json::to_vec(&endless_fetch(&ns, h)).unwrap();
        let mut stalled = Vec::new();
        for _ in 0..1 {
            let mut raw = Raw::connect(&side).await;
            let headers = [
                format!("Content-Length: {}", body.len()),
                "Content-Type: application/json".into(),
            ];
            raw.head("POST", "/v1/fetch", &headers).await;
            raw.send(&body).await;
            let mut status = String::new();
            raw.conn.read_line(&mut status).await.unwrap();
            assert_eq!(status.trim_end(), "HTTP/1.1 200 OK");
            stalled.push(raw); // read no further
        }
        let since = Instant::now();
        budget_held(&side, since).await;
        recovers("another client's fetch is served", since, || {
            fetch_complete(&side, &ns, h)
        })
        .await;
        budget_returned(&side, since).await;
        // The stalled client finds its response cut short: the connection closed.
        let mut closed = 0;
        for mut raw in stalled {
            let mut got = 0u64;
            let mut buf = vec![0; 1 << 20];
            loop {
                match tokio::time::timeout(Duration::from_secs(2), raw.conn.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => {
                        closed += 1;
                        break;
                    }
                    Ok(Ok(n)) => got += n as u64,
                    Err(_) => break,
                }
            }
            assert!(got < 4096 << 20, "{got} bytes: cut short");
        }
        assert_eq!(closed, 1, "the stalled reader's connection is closed");
    })
    .await
}

/// An HTTP/2 (h2c) client that keeps reading its socket but stops reading one fetch
/// stream: the stream's flow-control window closes, the socket never stalls. With
/// `max_concurrent_requests = 1` it holds the only slot and part of the fetch budget; the
/// fetch is cut off (with its connection), then another client's fetch is served in full
/// and the budget comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_h2_fetch_reader_gives_the_fetch_budget_back() {
    within(async {
        let ns = big_namespace("h2-reader");
        let (side, h) = fetch_sidecar(&ns, 1).await;
        let h2 = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap();
        let resp = h2
            .post(format!("{}/v1/fetch", side.url()))
            .json(&endless_fetch(&ns, h))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        let since = Instant::now();
        budget_held(&side, since).await;
        recovers("another client's fetch is served", since, || {
            fetch_complete(&side, &ns, h)
        })
        .await;
        budget_returned(&side, since).await;
        // What the stalled client reads now ends in an error, not in a whole stream.
        let mut body = resp.bytes_stream();
        let ended = tokio::time::timeout(MARGIN, async {
            while let Some(chunk) = body.next().await {
                if chunk.is_err() {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(ended, Ok(true), "the stalled stream ends in an error");
    })
    .await
}

/// HTTP/2 (h2c) uploads that stop sending: with `max_concurrent_requests = 2`, two hold the
/// slots until cut off with `408 request_timeout`; counted requests then succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_h2_uploads_give_their_slots_back() {
    within(async {
        let ns = namespace("h2-upload");
        let mut cfg = with_deadlines(sidecar_config(Some(redis_url()), vec![ns.clone()]));
        cfg.server.max_concurrent_requests = 2;
        let side = Sidecar::start(cfg).await;
        let h2 = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap();
        let half = payload(&ns, 4).slice(..ns.block_bytes() as usize / 2);
        let uploads: Vec<_> = (0..3u8)
            .map(|i| {
                let url = format!(
                    "{}/v1/blocks/{}/{}",
                    side.url(),
                    ns.label,
                    BlockHash([i; 32])
                );
                let first = futures_util::stream::once({
                    let half = half.clone();
                    async move { Ok::<_, std::io::Error>(half) }
                });
                let body = first.chain(futures_util::stream::pending());
                let req = h2.put(url).body(reqwest::Body::wrap_stream(body));
                tokio::spawn(async move {
                    let r = req.send().await.unwrap();
                    let v: serde_json::Value = r.json().await.unwrap();
                    v["error"].as_str().unwrap().to_owned()
                })
            })
            .collect();
        let since = Instant::now();
        // Two admitted (a body of unknown length reserves at most its cap, one block, at
        // first) before anything else asks.
        recovers("two uploads admitted", since, || async {
            side.shelf.body_memory_in_use() == 2 * ns.block_bytes()
        })
        .await;
        recovers("a lookup answers 200", since, || {
            lookup_ok(&side, &ns.label)
        })
        .await;
        let mut codes = Vec::new();
        for u in uploads {
            codes.push(u.await.unwrap());
        }
        codes.sort();
        assert_eq!(codes, ["overloaded", "request_timeout", "request_timeout"]);
        assert_eq!(side.shelf.body_memory_in_use(), 0);
    })
    .await
}

async fn grpc(side: &Sidecar) -> ShelfClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(side.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    ShelfClient::new(channel)
}

/// gRPC put streams that send one message and then nothing: with
/// `max_concurrent_requests = 2` they hold both slots until cut off with
/// `DEADLINE_EXCEEDED` (`kvshelf-error: request_timeout`); counted requests then succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_grpc_put_streams_give_their_slots_and_budget_back() {
    within(async {
        let ns = namespace("grpc-upload");
        let mut cfg = with_deadlines(sidecar_config(Some(redis_url()), vec![ns.clone()]));
        cfg.server.max_concurrent_requests = 2;
        let side = Sidecar::start(cfg).await;
        let mut calls = Vec::new();
        for i in 0..2u8 {
            let mut client = grpc(&side).await;
            let first = PutRequest {
                namespace: ns.label.clone(),
                r#async: false,
                blocks: vec![PutBlock {
                    block_hash: Bytes::copy_from_slice(&[i; 32]),
                    payload: payload(&ns, i),
                }],
            };
            let messages = futures_util::stream::once(async move { first })
                .chain(futures_util::stream::pending());
            calls.push(tokio::spawn(async move {
                client.put(messages).await.expect_err("a stalled put fails")
            }));
        }
        let since = Instant::now();
        // Each reserved a first step of 64 KiB (its length is unknown).
        recovers("both streams admitted", since, || async {
            side.shelf.body_memory_in_use() == 2 * (64 << 10)
        })
        .await;
        recovers("a lookup answers 200", since, || {
            lookup_ok(&side, &ns.label)
        })
        .await;
        for call in calls {
            let status = call.await.unwrap();
            assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
            assert_eq!(
                status.metadata().get("kvshelf-error").unwrap(),
                "request_timeout"
            );
        }
        assert_eq!(side.shelf.body_memory_in_use(), 0);
    })
    .await
}

/// A gRPC fetch stream whose client reads one message and then stops, holding the only slot
/// (`max_concurrent_requests = 1`) and part of the fetch budget: cut off (with its
/// connection) within `response_write_timeout`; another client's fetch is then served in
/// full and the fetch budget is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_grpc_fetch_reader_gives_the_fetch_budget_back() {
    within(async {
        let ns = big_namespace("grpc-reader");
        let (side, h) = fetch_sidecar(&ns, 1).await;
        let mut stalled = grpc(&side).await;
        let mut stream = stalled
            .fetch(FetchRequest {
                namespace: ns.label.clone(),
                block_hashes: vec![Bytes::copy_from_slice(&h.0); 4096],
            })
            .await
            .unwrap()
            .into_inner();
        assert!(stream.message().await.unwrap().is_some());
        let since = Instant::now();
        budget_held(&side, since).await;
        recovers("another client's fetch is served", since, || {
            fetch_complete(&side, &ns, h)
        })
        .await;
        budget_returned(&side, since).await;
        let ended = tokio::time::timeout(MARGIN, async {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return None,
                    Err(status) => return Some(status),
                }
            }
        })
        .await
        .expect("the stalled stream ends");
        // A transport error, as docs/api.md §5 says: the connection was closed.
        let status = ended.expect("the stalled stream ends in an error, not with an end");
        assert!(
            matches!(
                status.code(),
                tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Internal
            ),
            "{status:?}"
        );
    })
    .await
}
