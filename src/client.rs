//! The Rust client workers use to call a kvshelf sidecar, over HTTP or gRPC.
//!
//! One [`Client`] holds one connection pool (HTTP keep-alive, or one multiplexed HTTP/2
//! channel for gRPC) and is cheap to clone; create it once per worker. Every call has a
//! timeout. The two protocols have the same methods and the same semantics.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kvshelf::client::ClientError> {
//! use kvshelf::client::{Client, ClientConfig, Protocol};
//! let shelf = Client::new(ClientConfig {
//!     url: "http://127.0.0.1:7070".into(),
//!     protocol: Protocol::Grpc,
//!     ..Default::default()
//! })?;
//! let prompt: Vec<u32> = vec![/* token ids */];
//! let found = shelf.lookup_tokens("qwen2.5-0.5b", &prompt, true).await?;
//! let fetched = shelf.fetch("qwen2.5-0.5b", &found.block_hashes[..found.hit_blocks]).await?;
//! // prefill from token fetched.blocks.len() * block_size on, then put the new blocks
//! # Ok(()) }
//! ```

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;

use crate::frame::{self, Decoder, EndReason, FetchReader};
use crate::hashing::BlockHash;
use crate::outcome::{PurgeReport, PutResult, SkippedNode};
use crate::proto;

/// Which protocol to speak.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 with JSON and the framed binary stream. Default.
    #[default]
    Http,
    /// gRPC over HTTP/2.
    Grpc,
}

/// How to reach the sidecar.
#[derive(Clone)]
pub struct ClientConfig {
    /// Base URL, for example `http://127.0.0.1:7070` (the default), or `unix:<path>` for a
    /// sidecar's Unix socket (`listen_unix`) on the same host.
    pub url: String,
    /// Default: HTTP.
    pub protocol: Protocol,
    /// Bearer token, when the sidecar has tokens configured. Blanks around it (the newline
    /// at the end of a mounted secret file) are ignored. Default: none.
    pub token: Option<String>,
    /// Longest a whole call may take. Default: 30s.
    pub timeout: Duration,
    /// Longest connecting may take. Default: 1s.
    pub connect_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            url: "http://127.0.0.1:7070".into(),
            protocol: Protocol::Http,
            token: None,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(1),
        }
    }
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Destructured, so a new field cannot be left out of the output unnoticed.
        let ClientConfig {
            url,
            protocol,
            token,
            timeout,
            connect_timeout,
        } = self;
        f.debug_struct("ClientConfig")
            .field("url", url)
            .field("protocol", protocol)
            .field("token", &token.as_ref().map(|_| "***"))
            .field("timeout", timeout)
            .field("connect_timeout", connect_timeout)
            .finish()
    }
}

/// What can go wrong calling the sidecar.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The sidecar refused the request; `code` is the API's stable error code.
    #[error("{code}: {message}")]
    Api {
        /// Stable machine-readable code (`docs/api.md`).
        code: String,
        /// Human-readable message.
        message: String,
    },
    /// The sidecar could not be reached, or the call timed out.
    #[error("transport: {0}")]
    Transport(String),
    /// The sidecar answered something this client does not understand.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The [`ClientConfig`] cannot be used (for example a token that cannot be sent in a
    /// header).
    #[error("invalid client configuration: {0}")]
    Config(String),
}

/// The answer to a lookup.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Lookup {
    /// Leading blocks on the shelf.
    pub hit_blocks: usize,
    /// `hit_blocks × block_size`.
    pub hit_tokens: usize,
    /// The request's block hashes (computed by the sidecar when tokens were sent).
    pub block_hashes: Vec<BlockHash>,
    /// False when the backend did not answer in time (the answer is then a miss).
    pub backend_ok: bool,
}

/// The result of a fetch: the leading run of blocks the sidecar returned, and why it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// Blocks in request order, from the first.
    pub blocks: Vec<(BlockHash, Bytes)>,
    /// Why the run ended.
    pub reason: EndReason,
}

#[derive(Clone, Debug)]
enum Transport {
    Http { http: reqwest::Client, base: String },
    Grpc(proto::shelf_client::ShelfClient<tonic::transport::Channel>),
}

/// A client of one sidecar. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    transport: Transport,
    credential: Option<Credential>,
    /// `block_bytes` per namespace label, learned from `GET /v1/namespaces`: what a fetch
    /// answer's frames may carry. Shared by clones.
    block_bytes: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
}

/// The `Authorization` value of the configured token, ready for either transport. Both are
/// marked sensitive: `Debug` prints `Sensitive`, and HTTP/2 keeps them out of its header
/// compression table.
#[derive(Clone, Debug)]
struct Credential {
    http: reqwest::header::HeaderValue,
    grpc: tonic::metadata::AsciiMetadataValue,
}

impl Credential {
    fn new(token: &str) -> Result<Credential, ClientError> {
        // Secrets mounted from files (Kubernetes, Docker) usually end with a newline.
        let token = token.trim();
        // The messages never include the token itself.
        let invalid = |why: &str| ClientError::Config(format!("the token {why}"));
        if token.is_empty() {
            return Err(invalid("is empty"));
        }
        // The sidecar reads the header as visible ASCII; `HeaderValue` alone would also let
        // other bytes through, which could then never match.
        if !token.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
            return Err(invalid("has characters other than visible ASCII"));
        }
        let value = format!("Bearer {token}");
        let unsendable = || invalid("cannot be sent in a header");
        let mut http = reqwest::header::HeaderValue::from_str(&value).map_err(|_| unsendable())?;
        http.set_sensitive(true);
        let mut grpc = tonic::metadata::AsciiMetadataValue::try_from(value.as_str())
            .map_err(|_| unsendable())?;
        grpc.set_sensitive(true);
        Ok(Credential { http, grpc })
    }
}

/// Connects gRPC channels to a Unix socket.
#[derive(Clone)]
struct UnixConnector(std::sync::Arc<std::path::Path>);

impl tower_service::Service<tonic::codegen::http::Uri> for UnixConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move {
            let stream = tokio::net::UnixStream::connect(&*path).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// What a gRPC message holds besides a block's payload: its hash, index and the protobuf
/// framing, with room to spare.
const MESSAGE_OVERHEAD: usize = 4096;

fn transport_err(e: impl std::fmt::Display) -> ClientError {
    ClientError::Transport(e.to_string())
}

fn from_status(s: tonic::Status) -> ClientError {
    match s
        .metadata()
        .get("kvshelf-error")
        .and_then(|v| v.to_str().ok())
    {
        Some(code) => ClientError::Api {
            code: code.to_owned(),
            message: s.message().to_owned(),
        },
        None => ClientError::Transport(format!("{:?}: {}", s.code(), s.message())),
    }
}

fn hash_of(b: &[u8]) -> Result<BlockHash, ClientError> {
    <[u8; 32]>::try_from(b)
        .map(BlockHash)
        .map_err(|_| ClientError::Protocol("a block hash is not 32 bytes".into()))
}

impl Client {
    /// A client for `cfg`. Connects lazily, on the first call.
    pub fn new(cfg: ClientConfig) -> Result<Client, ClientError> {
        let credential = cfg.token.as_deref().map(Credential::new).transpose()?;
        let unix = cfg
            .url
            .strip_prefix("unix://")
            .or_else(|| cfg.url.strip_prefix("unix:"))
            .map(std::path::PathBuf::from);
        // Over a Unix socket the URL's host is only a name for the Host header.
        let url = match &unix {
            Some(_) => "http://kvshelf".to_owned(),
            None => cfg.url.trim_end_matches('/').to_owned(),
        };
        let transport = match cfg.protocol {
            Protocol::Http => {
                let mut http = reqwest::Client::builder()
                    .timeout(cfg.timeout)
                    .connect_timeout(cfg.connect_timeout)
                    .tcp_nodelay(true);
                if let Some(path) = &unix {
                    http = http.unix_socket(path.as_path());
                }
                Transport::Http {
                    http: http.build().map_err(transport_err)?,
                    base: url,
                }
            }
            Protocol::Grpc => {
                let endpoint = tonic::transport::Endpoint::from_shared(url)
                    .map_err(transport_err)?
                    .timeout(cfg.timeout)
                    .connect_timeout(cfg.connect_timeout)
                    .tcp_nodelay(true)
                    // Blocks are MiBs: large frames and windows, so the sender is not held
                    // back by 16 KiB frames and window updates (HTTP/2's defaults).
                    .max_frame_size(1 << 20)
                    .initial_stream_window_size(16 << 20)
                    .initial_connection_window_size(64 << 20);
                let channel = match unix {
                    Some(path) => endpoint.connect_with_connector_lazy(UnixConnector(path.into())),
                    None => endpoint.connect_lazy(),
                };
                Transport::Grpc(
                    proto::shelf_client::ShelfClient::new(channel)
                        // A message carries one block at most: never more than the largest
                        // block (plus its hash and the message framing).
                        .max_decoding_message_size(
                            crate::codec::MAX_PAYLOAD_LEN as usize + MESSAGE_OVERHEAD,
                        )
                        .max_encoding_message_size(usize::MAX),
                )
            }
        };
        Ok(Client {
            transport,
            credential,
            block_bytes: Default::default(),
        })
    }

    /// The `block_bytes` of `namespace`, asked of the sidecar once (`None`: it does not know
    /// the namespace, and the fetch will say so).
    async fn block_bytes(&self, namespace: &str) -> Result<Option<u64>, ClientError> {
        if let Some(&n) = self.known_block_bytes().get(namespace) {
            return Ok(Some(n));
        }
        let Transport::Http { http, base } = &self.transport else {
            unreachable!("only HTTP fetches decode frames")
        };
        #[derive(Deserialize)]
        struct Info {
            label: String,
            block_bytes: u64,
        }
        #[derive(Deserialize)]
        struct R {
            namespaces: Vec<Info>,
        }
        let r: R = self
            .http_send(http.get(format!("{base}/v1/namespaces")))
            .await?
            .json()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut known = self.known_block_bytes();
        known.extend(r.namespaces.into_iter().map(|i| (i.label, i.block_bytes)));
        Ok(known.get(namespace).copied())
    }

    fn known_block_bytes(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, u64>> {
        self.block_bytes.lock().expect("block_bytes lock")
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(c) = &self.credential {
            req.metadata_mut().insert("authorization", c.grpc.clone());
        }
        req
    }

    async fn http_send(
        &self,
        rb: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let rb = match &self.credential {
            Some(c) => rb.header(reqwest::header::AUTHORIZATION, c.http.clone()),
            None => rb,
        };
        let resp = rb.send().await.map_err(transport_err)?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        #[derive(Deserialize)]
        struct ErrorBody {
            error: String,
            message: String,
        }
        let status = resp.status();
        let body = resp.bytes().await.map_err(transport_err)?;
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => Err(ClientError::Api {
                code: e.error,
                message: e.message,
            }),
            Err(_) => Err(ClientError::Protocol(format!(
                "HTTP {status} without an error body"
            ))),
        }
    }

    async fn http_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<T, ClientError> {
        let Transport::Http { http, base } = &self.transport else {
            unreachable!("http_json is only called on HTTP clients")
        };
        let resp = self
            .http_send(http.post(format!("{base}{path}")).json(&body))
            .await?;
        resp.json()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Block hashes of every full block of `tokens` (with this token's tenant salt).
    pub async fn hash(
        &self,
        namespace: &str,
        tokens: &[u32],
    ) -> Result<Vec<BlockHash>, ClientError> {
        match &self.transport {
            Transport::Http { .. } => {
                #[derive(Deserialize)]
                struct R {
                    block_hashes: Vec<BlockHash>,
                }
                let r: R = self
                    .http_json(
                        "/v1/hash",
                        serde_json::json!({ "namespace": namespace, "tokens": tokens }),
                    )
                    .await?;
                Ok(r.block_hashes)
            }
            Transport::Grpc(c) => {
                let req = self.request(proto::HashRequest {
                    namespace: namespace.into(),
                    tokens: tokens.to_vec(),
                    extra_keys: vec![],
                });
                let r = c.clone().hash(req).await.map_err(from_status)?.into_inner();
                r.block_hashes.iter().map(|b| hash_of(b)).collect()
            }
        }
    }

    /// How many leading blocks of the prompt `tokens` are on the shelf; `warm` also reads
    /// them into the sidecar's L1.
    pub async fn lookup_tokens(
        &self,
        namespace: &str,
        tokens: &[u32],
        warm: bool,
    ) -> Result<Lookup, ClientError> {
        self.lookup(namespace, Some(tokens), None, warm).await
    }

    /// How many leading blocks of `hashes` are on the shelf.
    pub async fn lookup_hashes(
        &self,
        namespace: &str,
        hashes: &[BlockHash],
        warm: bool,
    ) -> Result<Lookup, ClientError> {
        self.lookup(namespace, None, Some(hashes), warm).await
    }

    async fn lookup(
        &self,
        namespace: &str,
        tokens: Option<&[u32]>,
        hashes: Option<&[BlockHash]>,
        warm: bool,
    ) -> Result<Lookup, ClientError> {
        match &self.transport {
            Transport::Http { .. } => {
                let mut body = serde_json::json!({ "namespace": namespace, "warm": warm });
                if let Some(t) = tokens {
                    body["tokens"] = serde_json::json!(t);
                }
                if let Some(h) = hashes {
                    body["block_hashes"] = serde_json::json!(h);
                }
                self.http_json("/v1/lookup", body).await
            }
            Transport::Grpc(c) => {
                let req = self.request(proto::LookupRequest {
                    namespace: namespace.into(),
                    tokens: tokens.unwrap_or_default().to_vec(),
                    extra_keys: vec![],
                    block_hashes: hashes
                        .unwrap_or_default()
                        .iter()
                        .map(|h| Bytes::copy_from_slice(&h.0))
                        .collect(),
                    warm,
                });
                let r = c
                    .clone()
                    .lookup(req)
                    .await
                    .map_err(from_status)?
                    .into_inner();
                Ok(Lookup {
                    hit_blocks: r.hit_blocks as usize,
                    hit_tokens: r.hit_tokens as usize,
                    block_hashes: r
                        .block_hashes
                        .iter()
                        .map(|b| hash_of(b))
                        .collect::<Result<_, _>>()?,
                    backend_ok: r.backend_ok,
                })
            }
        }
    }

    /// Fetches the leading run of `hashes` the sidecar can serve.
    ///
    /// The answer is checked against the request ([`FetchReader`]): blocks in request
    /// order with the hashes asked for, each exactly the namespace's `block_bytes` (over
    /// HTTP the client learns it from `GET /v1/namespaces` on its first fetch of a namespace,
    /// and never accepts a frame longer than that). Anything else is a
    /// [`ClientError::Protocol`].
    pub async fn fetch(
        &self,
        namespace: &str,
        hashes: &[BlockHash],
    ) -> Result<Fetched, ClientError> {
        let protocol = |e: frame::FrameError| ClientError::Protocol(e.to_string());
        let (blocks, reason) = match &self.transport {
            Transport::Http { http, base } => {
                let block_bytes = self.block_bytes(namespace).await?;
                let body = serde_json::json!({ "namespace": namespace, "block_hashes": hashes });
                let resp = self
                    .http_send(http.post(format!("{base}/v1/fetch")).json(&body))
                    .await?;
                let mut stream = resp.bytes_stream();
                let mut decoder =
                    Decoder::new(block_bytes.unwrap_or(crate::codec::MAX_PAYLOAD_LEN));
                let mut reader = FetchReader::new(hashes, block_bytes);
                let read = async {
                    while let Some(chunk) = stream.next().await {
                        decoder.feed(&chunk.map_err(transport_err)?);
                        while let Some(f) = decoder.next_frame().map_err(protocol)? {
                            reader.frame(f).map_err(protocol)?;
                        }
                    }
                    decoder.finish().map_err(protocol)
                };
                if let Err(e) = read.await {
                    if matches!(e, ClientError::Protocol(_)) {
                        // Perhaps the namespace changed shape: learn it again next time.
                        self.known_block_bytes().remove(namespace);
                    }
                    return Err(e);
                }
                reader.finish().map_err(protocol)?
            }
            Transport::Grpc(c) => {
                let req = self.request(proto::FetchRequest {
                    namespace: namespace.into(),
                    block_hashes: hashes
                        .iter()
                        .map(|h| Bytes::copy_from_slice(&h.0))
                        .collect(),
                });
                let mut stream = c
                    .clone()
                    .fetch(req)
                    .await
                    .map_err(from_status)?
                    .into_inner();
                let mut reader = FetchReader::new(hashes, None);
                while let Some(msg) = stream.message().await.map_err(from_status)? {
                    match msg.kind {
                        Some(proto::fetch_response::Kind::Block(b)) => reader
                            .block(b.index, hash_of(&b.block_hash)?, b.payload)
                            .map_err(protocol)?,
                        Some(proto::fetch_response::Kind::End(e)) => {
                            let reason = match proto::EndReason::try_from(e.reason) {
                                Ok(proto::EndReason::Complete) => EndReason::Complete,
                                Ok(proto::EndReason::BackendUnavailable) => {
                                    EndReason::BackendUnavailable
                                }
                                _ => EndReason::Miss,
                            };
                            reader.end(e.blocks_sent, reason).map_err(protocol)?
                        }
                        None => return Err(ClientError::Protocol("empty fetch message".into())),
                    }
                }
                reader.finish().map_err(protocol)?
            }
        };
        Ok(Fetched { blocks, reason })
    }

    /// Puts blocks, write-once. With `asynchronous` the sidecar answers once they are
    /// queued (or dropped, when its queue is full).
    pub async fn put(
        &self,
        namespace: &str,
        blocks: &[(BlockHash, Bytes)],
        asynchronous: bool,
    ) -> Result<Vec<PutResult>, ClientError> {
        match &self.transport {
            Transport::Http { http, base } => {
                // Frame heads and payloads go out as separate chunks: no copy of the tensors.
                // The length is announced, so that the sidecar reserves the body's memory
                // once, before reading it (a body of unknown length reserves step by step).
                let mut parts: Vec<Bytes> = Vec::with_capacity(2 * blocks.len() + 2);
                parts.push(Bytes::from_static(frame::STREAM_MAGIC));
                for (i, (hash, payload)) in blocks.iter().enumerate() {
                    parts.push(frame::block_head(i as u32, hash, payload.len()));
                    parts.push(payload.clone());
                }
                parts.push(frame::end(blocks.len() as u32, EndReason::Complete));
                let len: usize = parts.iter().map(Bytes::len).sum();
                let body = reqwest::Body::wrap_stream(futures_util::stream::iter(
                    parts.into_iter().map(Ok::<_, std::convert::Infallible>),
                ));
                let url = format!("{base}/v1/put?namespace={namespace}&async={asynchronous}");
                let rb = http
                    .post(url)
                    .header(reqwest::header::CONTENT_TYPE, frame::CONTENT_TYPE)
                    .header(reqwest::header::CONTENT_LENGTH, len)
                    .body(body);
                #[derive(Deserialize)]
                struct R {
                    outcomes: Vec<PutResult>,
                }
                let r: R = self
                    .http_send(rb)
                    .await?
                    .json()
                    .await
                    .map_err(|e| ClientError::Protocol(e.to_string()))?;
                Ok(r.outcomes)
            }
            Transport::Grpc(c) => {
                // One message per block (the first also names the namespace): the sidecar
                // checks each block as its message arrives, and no message is larger than
                // one block.
                let first = proto::PutRequest {
                    namespace: namespace.into(),
                    r#async: asynchronous,
                    blocks: Vec::new(),
                };
                let msgs =
                    std::iter::once(first).chain(blocks.iter().map(|(h, p)| proto::PutRequest {
                        blocks: vec![proto::PutBlock {
                            block_hash: Bytes::copy_from_slice(&h.0),
                            payload: p.clone(),
                        }],
                        ..Default::default()
                    }));
                let msgs: Vec<proto::PutRequest> = msgs.collect();
                let req = self.request(futures_util::stream::iter(msgs));
                let r = c.clone().put(req).await.map_err(from_status)?.into_inner();
                r.outcomes
                    .into_iter()
                    .map(|o| match proto::PutOutcome::try_from(o) {
                        Ok(proto::PutOutcome::Stored) => Ok(PutResult::Stored),
                        Ok(proto::PutOutcome::AlreadyPresent) => Ok(PutResult::AlreadyPresent),
                        Ok(proto::PutOutcome::Queued) => Ok(PutResult::Queued),
                        Ok(proto::PutOutcome::Dropped) => Ok(PutResult::Dropped),
                        _ => Err(ClientError::Protocol(format!("unknown put outcome {o}"))),
                    })
                    .collect()
            }
        }
    }

    /// Deletes blocks; returns how many existed (admin token needed when tokens are
    /// configured).
    pub async fn delete(&self, namespace: &str, hashes: &[BlockHash]) -> Result<u64, ClientError> {
        match &self.transport {
            Transport::Http { .. } => {
                #[derive(Deserialize)]
                struct R {
                    deleted: u64,
                }
                let body = serde_json::json!({ "namespace": namespace, "block_hashes": hashes });
                Ok(self.http_json::<R>("/v1/delete", body).await?.deleted)
            }
            Transport::Grpc(c) => {
                let req = self.request(proto::DeleteRequest {
                    namespace: namespace.into(),
                    block_hashes: hashes
                        .iter()
                        .map(|h| Bytes::copy_from_slice(&h.0))
                        .collect(),
                });
                Ok(c.clone()
                    .delete(req)
                    .await
                    .map_err(from_status)?
                    .into_inner()
                    .deleted)
            }
        }
    }

    /// Pins (`true`) or unpins a block; returns whether it exists (admin token needed when
    /// tokens are configured). A pin over the namespace's cap is the API error `pin_limit`.
    pub async fn pin(
        &self,
        namespace: &str,
        hash: &BlockHash,
        pin: bool,
    ) -> Result<bool, ClientError> {
        match &self.transport {
            Transport::Http { .. } => {
                #[derive(Deserialize)]
                struct R {
                    found: bool,
                }
                let verb = if pin { "pin" } else { "unpin" };
                let path = format!("/v1/blocks/{namespace}/{hash}/{verb}");
                Ok(self
                    .http_json::<R>(&path, serde_json::json!({}))
                    .await?
                    .found)
            }
            Transport::Grpc(c) => {
                let req = self.request(proto::PinRequest {
                    namespace: namespace.into(),
                    block_hash: Bytes::copy_from_slice(&hash.0),
                });
                let mut c = c.clone();
                let r = if pin {
                    c.pin(req).await
                } else {
                    c.unpin(req).await
                };
                Ok(r.map_err(from_status)?.into_inner().found)
            }
        }
    }

    /// Deletes every block of a namespace (admin token needed when tokens are configured).
    /// On a Redis Cluster with a primary down, the others are purged and the report lists
    /// the skipped node.
    pub async fn purge(&self, namespace: &str) -> Result<PurgeReport, ClientError> {
        match &self.transport {
            Transport::Http { .. } => {
                let path = format!("/v1/namespaces/{namespace}/purge");
                self.http_json::<PurgeReport>(&path, serde_json::json!({}))
                    .await
            }
            Transport::Grpc(c) => {
                let req = self.request(proto::PurgeRequest {
                    namespace: namespace.into(),
                });
                let r = c
                    .clone()
                    .purge(req)
                    .await
                    .map_err(from_status)?
                    .into_inner();
                Ok(PurgeReport {
                    deleted: r.deleted,
                    skipped: r
                        .skipped
                        .into_iter()
                        .map(|s| SkippedNode {
                            node: s.node,
                            deleted: s.deleted,
                            error: s.error,
                        })
                        .collect(),
                })
            }
        }
    }
}
