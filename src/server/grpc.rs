//! The gRPC adapter: `kvshelf.v1.Shelf` from `proto/kvshelf/v1/shelf.proto`, plus the
//! standard `grpc.health.v1.Health` service. Errors carry the API's stable code in the
//! `kvshelf-error` metadata entry.

use std::pin::Pin;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::frame::EndReason;
use crate::hashing::BlockHash;
use crate::proto::{self, shelf_server::ShelfServer};
use crate::shelf::{ApiError, Caller, FetchItem, LookupInput, PutResult, Shelf};

/// The one table from API error to gRPC status code.
pub fn status_of(e: &ApiError) -> Status {
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
        ApiError::BackendUnavailable(_) => Code::Unavailable,
    };
    metrics::counter!("kvshelf_grpc_errors_total", "code" => e.code()).increment(1);
    if super::is_server_side(e) {
        tracing::warn!(code = e.code(), error = %e, "rpc failed");
    }
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

/// The gRPC routes: the Shelf service and gRPC health checking.
pub fn routes(shelf: Shelf) -> axum::Router {
    let limit = usize::try_from(shelf.config().max_body_bytes).unwrap_or(usize::MAX);
    let service = ShelfServer::new(GrpcShelf { shelf })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let (reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        reporter.set_serving::<ShelfServer<GrpcShelf>>().await;
    });
    tonic::service::Routes::new(service)
        .add_service(health)
        .into_axum_router()
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
        let run = || {
            let who = caller_of(&self.shelf, &req)?;
            let r = req.get_ref();
            let extras = extras_of(r.extra_keys.clone());
            self.shelf.hash(&who, &r.namespace, &r.tokens, &extras)
        };
        let hashes = run().map_err(|e| status_of(&e))?;
        Ok(Response::new(proto::HashResponse {
            block_hashes: hashes.iter().map(hash_bytes).collect(),
        }))
    }

    async fn lookup(&self, req: Request<proto::LookupRequest>) -> RpcResult<proto::LookupResponse> {
        let run = async {
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
            self.shelf.lookup(&who, &r.namespace, input, r.warm).await
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
        let run = async {
            let who = caller_of(&self.shelf, &req)?;
            let r = req.into_inner();
            self.shelf
                .fetch(&who, &r.namespace, hashes_of(&r.block_hashes)?)
                .await
        };
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
        Ok(Response::new(Box::pin(stream)))
    }

    async fn put(
        &self,
        req: Request<Streaming<proto::PutRequest>>,
    ) -> RpcResult<proto::PutResponse> {
        let run = async {
            let who = caller_of(&self.shelf, &req)?;
            let limit = self.shelf.config().max_body_bytes;
            let mut stream = req.into_inner();
            let (mut label, mut asynchronous) = (String::new(), false);
            let (mut blocks, mut bytes) = (Vec::new(), 0u64);
            let mut first = true;
            while let Some(msg) = stream.next().await {
                let msg = msg.map_err(|s| match s.code() {
                    // tonic refuses a message over the decoding limit (max_body_bytes).
                    tonic::Code::OutOfRange => ApiError::PayloadTooLarge { limit },
                    _ => ApiError::InvalidRequest(format!("put stream: {}", s.message())),
                })?;
                if first {
                    label = msg.namespace.clone();
                    asynchronous = msg.r#async;
                    first = false;
                } else if !msg.namespace.is_empty() && msg.namespace != label {
                    return Err(ApiError::InvalidRequest(
                        "one put stream carries one namespace".into(),
                    ));
                }
                for b in msg.blocks {
                    bytes += b.payload.len() as u64;
                    if bytes > limit {
                        return Err(ApiError::PayloadTooLarge { limit });
                    }
                    blocks.push((hash_of(&b.block_hash)?, b.payload));
                }
            }
            if first {
                return Err(ApiError::InvalidRequest(
                    "empty put stream: the first message names the namespace".into(),
                ));
            }
            self.shelf.put(&who, &label, blocks, asynchronous).await
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
            let who = caller_of(&self.shelf, &req)?;
            let r = req.get_ref();
            self.shelf
                .delete(&who, &r.namespace, &hashes_of(&r.block_hashes)?)
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
            let who = caller_of(&self.shelf, &req)?;
            self.shelf.purge(&who, &req.get_ref().namespace).await
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
        let who = caller_of(&self.shelf, &req).map_err(|e| status_of(&e))?;
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
            let who = caller_of(&self.shelf, &req)?;
            let r = req.get_ref();
            self.shelf
                .pin(&who, &r.namespace, &hash_of(&r.block_hash)?, pin)
                .await
        };
        let found = run.await.map_err(|e| status_of(&e))?;
        Ok(Response::new(proto::PinResponse { found }))
    }
}
