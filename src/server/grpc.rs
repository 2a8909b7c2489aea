//! The gRPC adapter: `kvshelf.v1.Shelf` from `proto/kvshelf/v1/shelf.proto`, plus the
//! standard `grpc.health.v1.Health` service. Errors carry the API's stable code in the
//! `kvshelf-error` metadata entry.
//!
//! tonic reads a call's messages before its handler runs, so every `kvshelf.v1.Shelf` call
//! is admitted by a middleware in front of tonic (`admit`): slot and body budget first,
//! then the body is read through the admission's meter, and the handler takes the
//! admission from the request's extensions.

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use axum::extract::{ConnectInfo, State};
use axum::middleware::Next;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::deadline::{Cutoff, send_within};
use crate::frame::EndReason;
use crate::hashing::BlockHash;
use crate::proto::{self, shelf_server::ShelfServer};
use crate::shelf::{
    Admission, ApiError, BodyKind, Caller, FetchItem, LookupInput, PutResult, Shelf,
};

/// The one table from API error to gRPC status code.
pub fn status_of(e: &ApiError) -> Status {
    metrics::counter!("kvshelf_grpc_errors_total", "code" => e.code()).increment(1);
    if super::is_server_side(e) {
        tracing::warn!(code = e.code(), error = %e, "rpc failed");
    }
    uncounted_status(e)
}

/// [`status_of`] without counting it: for a body refused while tonic reads it, which a
/// handler may see again.
fn uncounted_status(e: &ApiError) -> Status {
    use tonic::Code;
    let code = match e {
        ApiError::Unauthenticated => Code::Unauthenticated,
        ApiError::Forbidden(_) => Code::PermissionDenied,
        ApiError::UnknownNamespace(_) | ApiError::NotFound | ApiError::NoSuchRoute(_) => {
            Code::NotFound
        }
        ApiError::MethodNotAllowed(_) => Code::Unimplemented,
        ApiError::InvalidRequest(_) | ApiError::Library(_) => Code::InvalidArgument,
        ApiError::PayloadTooLarge { .. } | ApiError::TooManyBlocks { .. } => Code::InvalidArgument,
        ApiError::Overloaded | ApiError::PinLimit { .. } => Code::ResourceExhausted,
        ApiError::RequestTimeout(_) => Code::DeadlineExceeded,
        ApiError::BackendUnavailable(_) => Code::Unavailable,
    };
    let mut status = Status::new(code, e.to_string());
    status
        .metadata_mut()
        .insert("kvshelf-error", e.code().parse().expect("codes are ascii"));
    status
}

/// The gRPC service over a [`Shelf`].
#[derive(Clone, Debug)]
pub struct GrpcShelf {
    shelf: Shelf,
}

/// The gRPC routes: the Shelf service (behind its admission) and gRPC health checking.
pub fn routes(shelf: Shelf) -> axum::Router {
    // Messages are metered by the admission as they arrive; this only spares tonic from
    // reserving room for a length no request may have.
    let decoding = usize::try_from(shelf.largest_body()).unwrap_or(usize::MAX);
    let encoding = usize::try_from(shelf.config().max_body_bytes).unwrap_or(usize::MAX);
    let service = ShelfServer::new(GrpcShelf {
        shelf: shelf.clone(),
    })
    .max_decoding_message_size(decoding)
    .max_encoding_message_size(encoding);
    let (reporter, health) = tonic_health::server::health_reporter();
    // A health check is a service name: it needs no more.
    let health = health.max_decoding_message_size(HEALTH_MESSAGE_BYTES);
    tokio::spawn(async move {
        reporter.set_serving::<ShelfServer<GrpcShelf>>().await;
    });
    tonic::service::Routes::new(service)
        .add_service(health)
        .into_axum_router()
        .layer(axum::middleware::from_fn_with_state(shelf, admit))
}

const HEALTH_MESSAGE_BYTES: usize = 4096;

/// Carries a call's admission from [`admit`] to its handler.
#[derive(Clone)]
struct Admitted(Arc<Mutex<Option<Admission>>>);

/// Admits a `kvshelf.v1.Shelf` call before tonic reads its messages: the caller's token,
/// a slot, the body budget; then the body reaches tonic through the admission's meter, which
/// refuses it past its cap or when the budget has no room.
async fn admit(
    State(shelf): State<Shelf>,
    req: axum::extract::Request,
    next: Next,
) -> axum::response::Response {
    let Some(method) = req.uri().path().strip_prefix("/kvshelf.v1.Shelf/") else {
        return next.run(req).await;
    };
    let body = match method {
        "Put" => BodyKind::GrpcPut(None),
        _ => BodyKind::Control,
    };
    // The token first, so that a caller without one holds neither a slot nor budget.
    if let Err(e) = super::http::caller(&shelf, req.headers()) {
        return status_of(&e).into_http();
    }
    let admission = match shelf.admit(body, None).await {
        Ok(a) => a,
        Err(e) => return status_of(&e).into_http(),
    };
    let meter = admission.meter();
    let (mut parts, body) = req.into_parts();
    parts
        .extensions
        .insert(Admitted(Arc::new(Mutex::new(Some(admission)))));
    let metered =
        futures_util::stream::unfold(Some((body.into_data_stream(), meter)), |state| async move {
            let (mut chunks, meter) = state?;
            match chunks.next().await? {
                Ok(chunk) => match meter.receive(chunk.len()).await {
                    Ok(()) => Some((Ok(chunk), Some((chunks, meter)))),
                    Err(e) => Some((Err(uncounted_status(&e)), None)),
                },
                // The client stopped sending for body_read_timeout (`deadline`).
                Err(e) if super::deadline::is_stall(&e) => {
                    Some((Err(uncounted_status(&meter.stalled())), None))
                }
                // tonic recognises a reset stream (h2) in the error's source chain.
                Err(e) => Some((Err(Status::from_error(e.into_inner())), None)),
            }
        });
    let req = axum::extract::Request::from_parts(parts, axum::body::Body::from_stream(metered));
    next.run(req).await
}

/// The admission [`admit`] made for this call (or one made now, should a call reach the
/// service without the middleware).
async fn admission_of<T>(
    shelf: &Shelf,
    req: &Request<T>,
    body: BodyKind<'_>,
) -> Result<Admission, ApiError> {
    let taken = req
        .extensions()
        .get::<Admitted>()
        .and_then(|a| a.0.lock().unwrap_or_else(|p| p.into_inner()).take());
    match taken {
        Some(a) => Ok(a),
        None => shelf.admit(body, None).await,
    }
}

fn caller_of<T>(shelf: &Shelf, req: &Request<T>) -> Result<Caller, ApiError> {
    let authorization = req.metadata().get("authorization");
    super::caller(shelf, authorization.and_then(|v| v.to_str().ok()))
}

fn hash_of(b: &[u8]) -> Result<BlockHash, ApiError> {
    <[u8; 32]>::try_from(b)
        .map(BlockHash)
        .map_err(|_| ApiError::InvalidRequest(format!("a block hash is 32 bytes, got {}", b.len())))
}

fn hashes_of(v: &[Bytes]) -> Result<Vec<BlockHash>, ApiError> {
    v.iter().map(|b| hash_of(b)).collect()
}

fn extras_of(v: Vec<proto::ExtraKeys>) -> Vec<Vec<Vec<u8>>> {
    v.into_iter()
        .map(|e| e.keys.into_iter().map(|k| k.to_vec()).collect())
        .collect()
}

fn hash_bytes(h: &BlockHash) -> Bytes {
    Bytes::copy_from_slice(&h.0)
}

fn end_reason(r: EndReason) -> proto::EndReason {
    match r {
        EndReason::Complete => proto::EndReason::Complete,
        EndReason::Miss => proto::EndReason::Miss,
        EndReason::BackendUnavailable => proto::EndReason::BackendUnavailable,
    }
}

type RpcResult<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl proto::shelf_server::Shelf for GrpcShelf {
    async fn hash(&self, req: Request<proto::HashRequest>) -> RpcResult<proto::HashResponse> {
        let run = async {
            let _admission = admission_of(&self.shelf, &req, BodyKind::Control).await?;
            let who = caller_of(&self.shelf, &req)?;
            let r = req.into_inner();
            let extras = extras_of(r.extra_keys);
            self.shelf.hash(&who, &r.namespace, r.tokens, extras).await
        };
        let hashes = run.await.map_err(|e| status_of(&e))?;
        Ok(Response::new(proto::HashResponse {
            block_hashes: hashes.iter().map(hash_bytes).collect(),
        }))
    }

    async fn lookup(&self, req: Request<proto::LookupRequest>) -> RpcResult<proto::LookupResponse> {
        let run = async {
            let admission = admission_of(&self.shelf, &req, BodyKind::Control).await?;
            let who = caller_of(&self.shelf, &req)?;
            let r = req.into_inner();
            let input = match (r.tokens.is_empty(), r.block_hashes.is_empty()) {
                (false, true) => LookupInput::Tokens(r.tokens, extras_of(r.extra_keys)),
                (true, false) => LookupInput::Hashes(hashes_of(&r.block_hashes)?),
                (true, true) => LookupInput::Hashes(Vec::new()),
                (false, false) => {
                    return Err(ApiError::InvalidRequest(
                        "give tokens or block_hashes, not both".into(),
                    ));
                }
            };
            self.shelf
                .lookup(admission, &who, &r.namespace, input, r.warm)
                .await
        };
        let res = run.await.map_err(|e| status_of(&e))?;
        Ok(Response::new(proto::LookupResponse {
            hit_blocks: res.hit_blocks as u32,
            hit_tokens: res.hit_tokens as u32,
            block_hashes: res.block_hashes.iter().map(hash_bytes).collect(),
            backend_ok: res.backend_ok,
        }))
    }

    type FetchStream = Pin<Box<dyn Stream<Item = Result<proto::FetchResponse, Status>> + Send>>;

    async fn fetch(&self, req: Request<proto::FetchRequest>) -> RpcResult<Self::FetchStream> {
        let req_cutoff = req.extensions().get::<ConnectInfo<Cutoff>>().cloned();
        let run = async {
            let admission = admission_of(&self.shelf, &req, BodyKind::Control).await?;
            let who = caller_of(&self.shelf, &req)?;
            let r = req.into_inner();
            self.shelf
                .fetch(admission, &who, &r.namespace, hashes_of(&r.block_hashes)?)
                .await
        };
        let cutoff = req_cutoff.map(|c| c.0);
        let rx = run.await.map_err(|e| status_of(&e))?;
        let stream = rx.map(|item| {
            use proto::fetch_response::Kind;
            let kind = match item {
                FetchItem::Block {
                    index,
                    hash,
                    payload,
                } => Kind::Block(proto::Block {
                    index,
                    block_hash: hash_bytes(&hash),
                    payload,
                }),
                FetchItem::End { blocks, reason } => Kind::End(proto::FetchEnd {
                    blocks_sent: blocks,
                    reason: end_reason(reason) as i32,
                }),
            };
            Ok(proto::FetchResponse { kind: Some(kind) })
        });
        // Each message must be taken by the client within response_write_timeout.
        let timeout = self.shelf.config().response_write_timeout;
        Ok(Response::new(Box::pin(send_within(
            stream, timeout, cutoff,
        ))))
    }

    async fn put(
        &self,
        req: Request<Streaming<proto::PutRequest>>,
    ) -> RpcResult<proto::PutResponse> {
        let run = async {
            let admission = admission_of(&self.shelf, &req, BodyKind::GrpcPut(None)).await?;
            let who = caller_of(&self.shelf, &req)?;
            let mut stream = req.into_inner();
            let mut batch = None;
            let mut asynchronous = false;
            // Blocks are counted and their sizes checked as each message arrives: a stream
            // of empty payloads is refused at block max_blocks_per_request + 1.
            while let Some(msg) = stream.next().await {
                let msg = msg.map_err(|s| match admission.refusal() {
                    Some(refused) => refused,
                    // tonic refuses a message longer than any request may be.
                    None if s.code() == tonic::Code::OutOfRange => ApiError::PayloadTooLarge {
                        limit: self.shelf.largest_body(),
                    },
                    None => ApiError::InvalidRequest(format!("put stream: {}", s.message())),
                })?;
                let batch = match &mut batch {
                    None => {
                        asynchronous = msg.r#async;
                        batch.insert(self.shelf.put_batch(&admission, &msg.namespace)?)
                    }
                    Some(b) if msg.namespace.is_empty() || msg.namespace == b.label() => b,
                    Some(_) => {
                        return Err(ApiError::InvalidRequest(
                            "one put stream carries one namespace".into(),
                        ));
                    }
                };
                for b in msg.blocks {
                    // prost hands out payloads as slices of tonic's decode buffer, which
                    // holds the whole message (and may be larger still): a block kept in
                    // the put queue or L1 would pin all of it while being weighed as its
                    // own length. One copy makes each block own exactly its bytes.
                    let payload = bytes::Bytes::copy_from_slice(&b.payload);
                    batch.push(hash_of(&b.block_hash)?, payload)?;
                }
            }
            let Some(batch) = batch else {
                return Err(ApiError::InvalidRequest(
                    "empty put stream: the first message names the namespace".into(),
                ));
            };
            self.shelf.put(admission, &who, batch, asynchronous).await
        };
        let results = run.await.map_err(|e| status_of(&e))?;
        let outcomes = results
            .into_iter()
            .map(|r| {
                (match r {
                    PutResult::Stored => proto::PutOutcome::Stored,
                    PutResult::AlreadyPresent => proto::PutOutcome::AlreadyPresent,
                    PutResult::Queued => proto::PutOutcome::Queued,
                    PutResult::Dropped => proto::PutOutcome::Dropped,
                }) as i32
            })
            .collect();
        Ok(Response::new(proto::PutResponse { outcomes }))
    }

    async fn delete(&self, req: Request<proto::DeleteRequest>) -> RpcResult<proto::DeleteResponse> {
        let run = async {
            let admission = admission_of(&self.shelf, &req, BodyKind::Control).await?;
            let who = caller_of(&self.shelf, &req)?;
            let r = req.get_ref();
            self.shelf
                .delete(admission, &who, &r.namespace, &hashes_of(&r.block_hashes)?)
                .await
        };
        let deleted = run.await.map_err(|e| status_of(&e))?;
        Ok(Response::new(proto::DeleteResponse { deleted }))
    }

    async fn pin(&self, req: Request<proto::PinRequest>) -> RpcResult<proto::PinResponse> {
        self.pin_or_unpin(req, true).await
    }

    async fn unpin(&self, req: Request<proto::PinRequest>) -> RpcResult<proto::PinResponse> {
        self.pin_or_unpin(req, false).await
    }

    async fn purge(&self, req: Request<proto::PurgeRequest>) -> RpcResult<proto::PurgeResponse> {
        let run = async {
            let admission = admission_of(&self.shelf, &req, BodyKind::Control).await?;
            let who = caller_of(&self.shelf, &req)?;
            self.shelf
                .purge(admission, &who, &req.get_ref().namespace)
                .await
        };
        let report = run.await.map_err(|e| status_of(&e))?;
        Ok(Response::new(proto::PurgeResponse {
            deleted: report.deleted,
            skipped: report
                .skipped
                .into_iter()
                .map(|s| proto::SkippedNode {
                    node: s.node,
                    deleted: s.deleted,
                    error: s.error,
                })
                .collect(),
        }))
    }

    async fn stats(&self, req: Request<proto::StatsRequest>) -> RpcResult<proto::StatsResponse> {
        let run = async {
            let admission = admission_of(&self.shelf, &req, BodyKind::Control).await?;
            let who = caller_of(&self.shelf, &req)?;
            Ok::<_, ApiError>((admission, who))
        };
        let (_admission, who) = run.await.map_err(|e| status_of(&e))?;
        let s = self.shelf.stats().await;
        Ok(Response::new(proto::StatsResponse {
            backend: s.backend.to_owned(),
            backend_ready: s.backend_ready,
            l1_bytes: s.l1_bytes,
            l1_capacity_bytes: s.l1_capacity_bytes,
            l1_entries: s.l1_entries,
            put_queue_bytes: s.put_queue_bytes,
            put_queue_capacity_bytes: s.put_queue_capacity_bytes,
            namespaces: s
                .namespaces
                .into_iter()
                .map(|n| proto::NamespaceInfo {
                    label: n.label,
                    model_id: n.model_id,
                    model_revision: n.model_revision,
                    kv_dtype: n.kv_dtype.name().to_owned(),
                    block_size: n.block_size,
                    block_bytes: n.block_bytes,
                    block_shape: n.block_shape,
                    layout_order: n.layout_order,
                    num_layers: n.num_layers,
                    num_kv_heads: n.num_kv_heads,
                    head_dim: n.head_dim,
                    tp_size: n.tp_size,
                    tp_rank: n.tp_rank,
                    lora_adapter: n.lora_adapter,
                })
                .collect(),
            salted: who.salted(),
        }))
    }
}

impl GrpcShelf {
    async fn pin_or_unpin(
        &self,
        req: Request<proto::PinRequest>,
        pin: bool,
    ) -> RpcResult<proto::PinResponse> {
        let run = async {
            let admission = admission_of(&self.shelf, &req, BodyKind::Control).await?;
            let who = caller_of(&self.shelf, &req)?;
            let r = req.get_ref();
            self.shelf
                .pin(admission, &who, &r.namespace, &hash_of(&r.block_hash)?, pin)
                .await
        };
        let found = run.await.map_err(|e| status_of(&e))?;
        Ok(Response::new(proto::PinResponse { found }))
    }
}
