//! The Rust client against a sidecar that answers wrong: a fetch answer is read against the
//! request and the namespace's block size, never trusted. The fake sidecar is a real HTTP
//! server on port 0 with canned answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use kvshelf::BlockHash;
use kvshelf::client::{Client, ClientConfig, ClientError};
use kvshelf::frame::{self, EndReason};

const BLOCK_BYTES: u64 = 16;

/// A fake sidecar whose fetch answers `body`; counts its `GET /v1/namespaces`.
async fn fake_sidecar(body: Vec<u8>) -> (String, Arc<AtomicUsize>) {
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    let app = Router::new()
        .route(
            "/v1/namespaces",
            get(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                async move {
                    axum::Json(serde_json::json!({"namespaces": [
                        {"label": "ns", "block_bytes": BLOCK_BYTES, "block_size": 4}
                    ]}))
                }
            }),
        )
        .route("/v1/fetch", post(move || async move { body.clone() }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, asked)
}

fn client(url: &str) -> Client {
    Client::new(ClientConfig {
        url: url.into(),
        timeout: Duration::from_secs(5),
        ..Default::default()
    })
    .unwrap()
}

fn hashes() -> Vec<BlockHash> {
    (0..2u8).map(|i| BlockHash([i; 32])).collect()
}

/// A stream whose first frame announces `len` payload bytes and carries `payload`.
fn announcing(len: u64, payload: &[u8]) -> Vec<u8> {
    let mut body = frame::STREAM_MAGIC.to_vec();
    let head = frame::block_head(0, &hashes()[0], 0);
    body.extend_from_slice(&head[..37]);
    body.extend_from_slice(&len.to_le_bytes());
    body.extend_from_slice(payload);
    body.extend_from_slice(&frame::end(1, EndReason::Miss));
    body
}

async fn fetch(body: Vec<u8>) -> Result<kvshelf::client::Fetched, ClientError> {
    let (url, _) = fake_sidecar(body).await;
    tokio::time::timeout(Duration::from_secs(10), client(&url).fetch("ns", &hashes()))
        .await
        .expect("the fetch answers in time")
}

#[tokio::test]
async fn a_frame_length_is_capped_by_the_namespaces_block_size() {
    // Lengths that used to overflow `BLOCK_HEAD_LEN + len` (a panic in the worker), that
    // would size a 1 GiB allocation, and one byte over the block.
    for len in [u64::MAX, u64::MAX - 44, 1 << 30, BLOCK_BYTES + 1] {
        let err = fetch(announcing(len, &[])).await.unwrap_err();
        assert!(
            matches!(&err, ClientError::Protocol(m) if m.contains(&format!("limit of {BLOCK_BYTES}"))),
            "{len}: {err:?}"
        );
    }
    // Shorter than a block: well framed, but not a block of this namespace.
    let err = fetch(announcing(4, &[7; 4])).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Protocol(m) if m.contains("16")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_fetch_answer_must_answer_the_request() {
    let hs = hashes();
    let block = vec![9u8; BLOCK_BYTES as usize];
    // Blocks in order, with the hashes asked for: fine, and the block size is learned once.
    let good = frame::encode_stream(hs.iter().map(|h| (h, &block[..])));
    let (url, asked) = fake_sidecar(good).await;
    let c = client(&url);
    for _ in 0..3 {
        let got = c.fetch("ns", &hs).await.unwrap();
        assert_eq!(got.reason, EndReason::Complete);
        assert_eq!(got.blocks.len(), 2);
    }
    assert_eq!(asked.load(Ordering::SeqCst), 1, "namespaces asked for once");

    // The blocks of another request, out of order.
    let swapped = frame::encode_stream([(&hs[1], &block[..]), (&hs[0], &block[..])]);
    let err = fetch(swapped).await.unwrap_err();
    assert!(matches!(err, ClientError::Protocol(_)), "{err:?}");
    // More blocks than asked for.
    let three: Vec<BlockHash> = (0..3u8).map(|i| BlockHash([i; 32])).collect();
    let extra = frame::encode_stream(three.iter().map(|h| (h, &block[..])));
    let err = fetch(extra).await.unwrap_err();
    assert!(matches!(err, ClientError::Protocol(_)), "{err:?}");
}
