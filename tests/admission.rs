//! Memory bounded before admission (issue 10 §2): a request takes its slot and its body
//! budget before its body is read, its cap follows from what it may carry, a
//! `Content-Length` over the cap is refused without `100 Continue`, and a put's blocks are
//! counted and checked as they arrive, over HTTP and gRPC. Raw TCP clients play the slow
//! and lying senders a library client would never be. Every test runs under a test-level
//! timeout that fails instead of hanging.

mod support;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use kvshelf::config::Config;
use kvshelf::frame;
use kvshelf::proto::{PutBlock, PutRequest, shelf_client::ShelfClient};
use kvshelf::shelf::LookupInput;
use kvshelf::{BlockHash, Namespace};
use support::{Sidecar, namespace, payload, redis_url, sidecar_config};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const MAX_BLOCKS: usize = 8;

/// Fails the test instead of hanging it.
async fn within<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), test)
        .await
        .expect("the test did not finish within 60 s")
}

fn config(ns: &Namespace, f: impl FnOnce(&mut Config)) -> Config {
    let mut cfg = sidecar_config(Some(redis_url()), vec![ns.clone()]);
    cfg.server.max_blocks_per_request = MAX_BLOCKS;
    f(&mut cfg);
    cfg
}

fn hashes(ns: &Namespace, n: u32, seed: u32) -> Vec<BlockHash> {
    let tokens: Vec<u32> = (0..n * ns.block_size).map(|t| t * 17 + seed).collect();
    kvshelf::PrefixHasher::new(ns, None).hash_prefix(&tokens)
}

/// The cap of `POST /v1/put` for `ns`: MAX_BLOCKS frames, magic and end frame.
fn frames_cap(ns: &Namespace) -> u64 {
    MAX_BLOCKS as u64 * (frame::BLOCK_HEAD_LEN as u64 + ns.block_bytes()) + 8 + 6
}

/// How many leading `hashes` the sidecar has.
async fn stored(side: &Sidecar, ns: &Namespace, hashes: &[BlockHash]) -> usize {
    let admission = side
        .shelf
        .admit(kvshelf::shelf::BodyKind::None, None)
        .await
        .unwrap();
    side.shelf
        .lookup(
            admission,
            &Default::default(),
            &ns.label,
            LookupInput::Hashes(hashes.to_vec()),
            false,
        )
        .await
        .unwrap()
        .hit_blocks
}

/// A raw HTTP/1.1 connection: the client a library would never be.
struct Raw {
    conn: BufReader<TcpStream>,
}

impl Raw {
    async fn connect(side: &Sidecar) -> Raw {
        Raw {
            conn: BufReader::new(TcpStream::connect(side.addr).await.unwrap()),
        }
    }

    /// Sends a request head; `headers` are extra lines.
    async fn head(&mut self, method: &str, path: &str, headers: &[String]) {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: kvshelf\r\n");
        for h in headers {
            head.push_str(h);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        self.send(head.as_bytes()).await;
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.conn.get_mut().write_all(bytes).await.unwrap();
    }

    /// The next response head: its status line and its header lines.
    async fn response_head(&mut self) -> (String, Vec<String>) {
        let mut status = String::new();
        self.conn.read_line(&mut status).await.unwrap();
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            self.conn.read_line(&mut line).await.unwrap();
            if line == "\r\n" || line.is_empty() {
                return (status.trim_end().to_owned(), headers);
            }
            headers.push(line.trim_end().to_ascii_lowercase());
        }
    }

    /// The next final response (after any interim ones): its status and its JSON body.
    async fn response(&mut self) -> (String, serde_json::Value) {
        let (status, headers) = self.response_head().await;
        let len: usize = headers
            .iter()
            .find_map(|h| h.strip_prefix("content-length: "))
            .expect("a content-length")
            .parse()
            .unwrap();
        let mut body = vec![0; len];
        self.conn.read_exact(&mut body).await.unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }
}

fn put_path(ns: &Namespace) -> String {
    format!("/v1/put?namespace={}", ns.label)
}

#[tokio::test]
async fn a_content_length_over_the_cap_is_refused_without_100_continue() {
    within(async {
        let ns = namespace("cl-cap");
        let side = Sidecar::start(config(&ns, |_| {})).await;
        let h = hashes(&ns, 1, 1)[0];
        let over = [
            (
                "POST",
                put_path(&ns),
                frames_cap(&ns) + 1,
                "a framed put: max_blocks frames",
            ),
            (
                "PUT",
                format!("/v1/blocks/{}/{h}", ns.label),
                ns.block_bytes() + 1,
                "one block: exactly block_bytes",
            ),
            (
                "POST",
                "/v1/lookup".to_owned(),
                10 << 20,
                "a control message: the hashes or tokens of max_blocks blocks",
            ),
        ];
        for (method, path, len, what) in over {
            let mut raw = Raw::connect(&side).await;
            let headers = [
                format!("Content-Length: {len}"),
                "Expect: 100-continue".into(),
            ];
            raw.head(method, &path, &headers).await;
            // The body is never sent: the answer must come without it.
            let (status, body) = raw.response().await;
            assert_eq!(status, "HTTP/1.1 413 Payload Too Large", "{what}");
            assert_eq!(body["error"], "payload_too_large", "{what}");
        }
        assert_eq!(side.shelf.body_memory_in_use(), 0);

        // At the cap, the same request is let in: `100 Continue`, then the body is read.
        let mut raw = Raw::connect(&side).await;
        let body = frame::encode_stream([(&h, &payload(&ns, 1)[..])]);
        let headers = [
            format!("Content-Length: {}", body.len()),
            "Expect: 100-continue".into(),
        ];
        raw.head("POST", &put_path(&ns), &headers).await;
        assert_eq!(raw.response_head().await.0, "HTTP/1.1 100 Continue");
        raw.send(&body).await;
        let (status, out) = raw.response().await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(out["outcomes"], serde_json::json!(["stored"]));
    })
    .await
}

#[tokio::test]
async fn a_single_block_put_larger_than_block_bytes_is_refused_unread() {
    within(async {
        let ns = namespace("block-cap");
        let side = Sidecar::start(config(&ns, |_| {})).await;
        let h = hashes(&ns, 1, 2)[0];
        let url = format!("{}/v1/blocks/{}/{h}", side.url(), ns.label);
        // Announced: refused from the head, the body never read (not even sent).
        let mut raw = Raw::connect(&side).await;
        let path = format!("/v1/blocks/{}/{h}", ns.label);
        let headers = [format!("Content-Length: {}", ns.block_bytes() + 1)];
        raw.head("PUT", &path, &headers).await;
        let (status, body) = raw.response().await;
        assert_eq!(status, "HTTP/1.1 413 Payload Too Large");
        assert_eq!(body["error"], "payload_too_large");
        assert_eq!(
            body["message"],
            format!(
                "request body exceeds the limit of {} bytes",
                ns.block_bytes()
            )
        );
        // Not announced (chunked): refused once more than block_bytes has arrived.
        let chunks = (0..4).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![0u8; 200])));
        let r = reqwest::Client::new()
            .put(&url)
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks.collect::<Vec<_>>(),
            )))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413);
        assert_eq!(stored(&side, &ns, &[h]).await, 0, "nothing written");
    })
    .await
}

#[tokio::test]
async fn a_slow_body_holds_its_slot_and_its_budget_while_it_arrives() {
    within(async {
        let ns = namespace("slow-slot");
        let side = Sidecar::start(config(&ns, |c| c.server.max_concurrent_requests = 1)).await;
        let hs = hashes(&ns, 2, 3);
        let body = frame::encode_stream(
            hs.iter()
                .zip([payload(&ns, 1), payload(&ns, 2)].iter().map(|p| &p[..])),
        );
        let mut slow = Raw::connect(&side).await;
        let headers = [
            format!("Content-Length: {}", body.len()),
            "Expect: 100-continue".into(),
        ];
        slow.head("POST", &put_path(&ns), &headers).await;
        // `100 Continue` comes once the request is admitted, before its body is read.
        assert_eq!(slow.response_head().await.0, "HTTP/1.1 100 Continue");
        assert_eq!(side.shelf.body_memory_in_use(), body.len() as u64);
        slow.send(&body[..body.len() / 2]).await;

        // The only slot is held while the body trickles in.
        let http = reqwest::Client::new();
        let r = http
            .post(format!("{}/v1/lookup", side.url()))
            .json(&serde_json::json!({"namespace": ns.label, "block_hashes": hs}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 429);
        let body429: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body429["error"], "overloaded");
        let g = side.client(kvshelf::client::Protocol::Grpc, None);
        let e = g.lookup_hashes(&ns.label, &hs, false).await.unwrap_err();
        assert!(
            matches!(e, kvshelf::client::ClientError::Api { ref code, .. } if code == "overloaded"),
            "{e}"
        );

        slow.send(&body[body.len() / 2..]).await;
        let (status, out) = slow.response().await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(out["outcomes"], serde_json::json!(["stored", "stored"]));
        assert_eq!(stored(&side, &ns, &hs).await, 2);
        assert_eq!(side.shelf.body_memory_in_use(), 0, "the budget is back");
    })
    .await
}

#[tokio::test]
async fn an_exhausted_body_budget_refuses_as_overloaded_after_a_bounded_wait() {
    within(async {
        let ns = namespace("budget");
        let budget = frames_cap(&ns);
        let side = Sidecar::start(config(&ns, |c| {
            c.server.body_memory_bytes = budget;
            c.server.put_timeout = Duration::from_millis(300);
        }))
        .await;
        let h = hashes(&ns, 2, 4);
        // One slow put holds the whole budget.
        let mut slow = Raw::connect(&side).await;
        let headers = [
            format!("Content-Length: {budget}"),
            "Expect: 100-continue".into(),
        ];
        slow.head("POST", &put_path(&ns), &headers).await;
        assert_eq!(slow.response_head().await.0, "HTTP/1.1 100 Continue");
        assert_eq!(side.shelf.body_memory_in_use(), budget);

        // Slots are free, room is not: refused once the wait (put_timeout) is over.
        let one = frame::encode_stream([(&h[1], &payload(&ns, 1)[..])]);
        let r = reqwest::Client::new()
            .post(format!("{}{}", side.url(), put_path(&ns)))
            .body(one.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "1");
        let g = side.client(kvshelf::client::Protocol::Grpc, None);
        let e = g
            .put(&ns.label, &[(h[1], payload(&ns, 1))], false)
            .await
            .unwrap_err();
        assert!(
            matches!(e, kvshelf::client::ClientError::Api { ref code, .. } if code == "overloaded"),
            "{e}"
        );
        assert!(
            side.metric(r#"kvshelf_rejected_requests_total{reason="body_memory"}"#)
                .await
                >= 2.0
        );

        // The slow client goes away: its room comes back.
        drop(slow);
        let mut ok = false;
        for _ in 0..200 {
            if side.shelf.body_memory_in_use() == 0 {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(ok, "a dropped connection gives its reservation back");
        let out = g
            .put(&ns.label, &[(h[1], payload(&ns, 1))], false)
            .await
            .unwrap();
        assert_eq!(out, vec![kvshelf::store::PutResult::Stored]);
    })
    .await
}

/// An endless gRPC put stream whose messages come from `block(i)`; counts the messages the
/// client produced. With `one_by_one`, each message is produced after a yield, so that the
/// client sends it on its own instead of batching messages into one write: the server sees
/// them one at a time. (Thousands of tiny writes would trip h2's flood protection instead.)
async fn endless_grpc_put(
    side: &Sidecar,
    ns: &Namespace,
    one_by_one: bool,
    block: impl Fn(usize) -> Option<PutBlock> + Send + Sync + 'static,
) -> (tonic::Status, usize) {
    let channel = tonic::transport::Endpoint::from_shared(side.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let label = ns.label.clone();
    let block = Arc::new(block);
    let messages = futures_util::stream::iter(0..).then(move |i| {
        counter.fetch_add(1, Ordering::Relaxed);
        let (label, block) = (label.clone(), block.clone());
        async move {
            if one_by_one {
                tokio::task::yield_now().await;
            }
            PutRequest {
                namespace: if i == 0 { label } else { String::new() },
                r#async: false,
                blocks: block(i).into_iter().collect(),
            }
        }
    });
    let status = ShelfClient::new(channel)
        .put(messages)
        .await
        .expect_err("an endless put stream must be refused");
    (status, sent.load(Ordering::Relaxed))
}

fn code(s: &tonic::Status) -> String {
    s.metadata()
        .get("kvshelf-error")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_else(|| format!("no kvshelf-error: {s:?}"))
}

#[tokio::test]
async fn a_grpc_put_is_refused_as_its_blocks_arrive() {
    within(async {
        let ns = namespace("grpc-count");
        let side = Sidecar::start(config(&ns, |_| {})).await;
        let hs = hashes(&ns, MAX_BLOCKS as u32 + 1, 5);

        // Empty payloads: refused at the first one (wrong size), not at the stream's end.
        let (status, _) = endless_grpc_put(&side, &ns, true, move |i| {
            Some(PutBlock {
                block_hash: Bytes::copy_from_slice(&BlockHash([i as u8; 32]).0),
                payload: Bytes::new(),
            })
        })
        .await;
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(code(&status), "invalid_input");

        // Valid blocks: refused at block max_blocks + 1.
        let (h, p) = (hs.clone(), payload(&ns, 7));
        let (status, _) = endless_grpc_put(&side, &ns, true, move |i| {
            Some(PutBlock {
                block_hash: Bytes::copy_from_slice(&h[i.min(MAX_BLOCKS)].0),
                payload: p.clone(),
            })
        })
        .await;
        assert_eq!(code(&status), "too_many_blocks");
        assert!(status.message().contains("at most 8"), "{status:?}");

        // Messages without blocks: counted as bytes, refused past the stream's cap.
        let (status, sent) = endless_grpc_put(&side, &ns, false, |_| None).await;
        assert_eq!(code(&status), "payload_too_large");
        assert!(sent > 100, "{sent} messages");

        assert_eq!(
            stored(&side, &ns, &hs[..MAX_BLOCKS]).await,
            0,
            "nothing written"
        );
        assert_eq!(stored(&side, &ns, &hs[MAX_BLOCKS..]).await, 0);
        assert_eq!(side.shelf.body_memory_in_use(), 0);
    })
    .await
}

#[tokio::test]
async fn a_frame_longer_than_block_bytes_is_invalid_input_as_documented() {
    within(async {
        let ns = namespace("long-frame");
        let side = Sidecar::start(config(&ns, |_| {})).await;
        let h = hashes(&ns, 2, 6);
        let mut body = frame::STREAM_MAGIC.to_vec();
        body.extend_from_slice(&frame::block_head(0, &h[0], ns.block_bytes() as usize));
        body.extend_from_slice(&payload(&ns, 1));
        let long = ns.block_bytes() as usize + 1;
        body.extend_from_slice(&frame::block_head(1, &h[1], long));
        body.extend_from_slice(&vec![0u8; long]);
        body.extend_from_slice(&frame::end(2, frame::EndReason::Complete));
        let r = reqwest::Client::new()
            .post(format!("{}{}", side.url(), put_path(&ns)))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let err: serde_json::Value = r.json().await.unwrap();
        assert_eq!(err["error"], "invalid_input");
        let msg = err["message"].as_str().unwrap();
        assert!(
            msg.contains(&format!("block 1 has {long} bytes of payload")),
            "{msg}"
        );
        // docs/api.md says so where it lists the put's errors and in the error table.
        let api = include_str!("../docs/api.md");
        assert!(api.contains(
            "a frame whose `len` is not the namespace's `block_bytes` (`invalid_input`)"
        ));
        assert_eq!(stored(&side, &ns, &h).await, 0, "nothing written");
    })
    .await
}

#[tokio::test]
async fn a_chunked_json_body_over_its_cap_is_refused() {
    within(async {
        let ns = namespace("json-cap");
        let side = Sidecar::start(config(&ns, |c| c.server.max_body_bytes = 64 << 10)).await;
        // 100 KiB of whitespace before the JSON: well-formed, but over any control cap here.
        let chunks: Vec<Result<Bytes, std::io::Error>> = (0..100)
            .map(|_| Ok(Bytes::from(vec![b' '; 1024])))
            .chain([Ok(Bytes::from(format!(
                r#"{{"namespace": "{}", "block_hashes": []}}"#,
                ns.label
            )))])
            .collect();
        let r = reqwest::Client::new()
            .post(format!("{}/v1/lookup", side.url()))
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413);
        assert_eq!(side.shelf.body_memory_in_use(), 0);
    })
    .await
}
