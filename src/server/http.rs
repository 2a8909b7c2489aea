//! The HTTP adapter (`docs/api.md`): JSON for control messages, `application/octet-stream`
//! for one block, the framed stream (`crate::frame`) for batches. Bodies are read and
//! parsed here (not by axum extractors) so that every malformed request gets the same JSON
//! error shape: `{"error": code, "message": …}`.

use std::convert::Infallible;

use axum::Extension;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use futures_util::StreamExt;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::deadline::{Cutoff, send_within};
use crate::frame;
use crate::hashing::BlockHash;
use crate::shelf::{
    Admission, ApiError, BodyKind, Caller, FetchItem, LookupInput, PutResult, Shelf,
};

/// The HTTP routes.
pub fn routes(shelf: Shelf) -> Router {
    // No endpoint but the two puts takes a query parameter: one layer refuses any on all of
    // them, before a handler runs. The put handlers parse (and check) their own.
    let no_query = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/namespaces", get(namespaces))
        .route("/v1/stats", get(stats))
        .route("/v1/hash", post(hash))
        .route("/v1/lookup", post(lookup))
        .route("/v1/fetch", post(fetch))
        .route("/v1/delete", post(delete_batch))
        .route(
            "/v1/blocks/{namespace}/{hash}",
            get(get_block).delete(delete_block),
        )
        .route("/v1/blocks/{namespace}/{hash}/pin", post(pin))
        .route("/v1/blocks/{namespace}/{hash}/unpin", post(unpin))
        .route("/v1/namespaces/{namespace}/purge", post(purge))
        .route_layer(axum::middleware::from_fn(refuse_query));
    let with_query = Router::new()
        .route("/v1/put", post(put_batch))
        .route("/v1/blocks/{namespace}/{hash}", put(put_block));
    no_query
        .merge(with_query)
        .with_state(shelf)
        // Each request's cap is enforced by its admission, before and while its body is
        // read (`crate::admission`), so that the error has the API's shape; axum's own
        // default limit (2 MiB) would cut tensor uploads.
        .layer(axum::extract::DefaultBodyLimit::disable())
}

/// Refuses a request to an endpoint that takes no query parameters but got some: unknown
/// parameters are errors, not silently ignored (`docs/api.md` §3).
async fn refuse_query(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match req.uri().query().filter(|q| !q.is_empty()) {
        Some(q) => HttpError(ApiError::InvalidRequest(format!(
            "{} takes no query parameters (got {q:?})",
            req.uri().path()
        )))
        .into_response(),
        None => next.run(req).await,
    }
}

/// Any path no route matches: gRPC's UNIMPLEMENTED for gRPC requests, a JSON 404 otherwise.
pub async fn unknown_route(headers: HeaderMap, uri: Uri) -> Response {
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        return tonic::Status::unimplemented(format!("no such method: {}", uri.path())).into_http();
    }
    HttpError(ApiError::NoSuchRoute(format!(
        "no such endpoint: {}",
        uri.path()
    )))
    .into_response()
}

/// A known path with the wrong method.
pub async fn method_not_allowed(uri: Uri) -> Response {
    HttpError(ApiError::MethodNotAllowed(format!(
        "{} does not take this method",
        uri.path()
    )))
    .into_response()
}

/// The one table from API error to HTTP status.
pub fn status_of(e: &ApiError) -> StatusCode {
    match e {
        ApiError::Unauthenticated => StatusCode::UNAUTHORIZED,
        ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
        ApiError::UnknownNamespace(_) | ApiError::NotFound | ApiError::NoSuchRoute(_) => {
            StatusCode::NOT_FOUND
        }
        ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
        ApiError::PinLimit { .. } => StatusCode::CONFLICT,
        ApiError::InvalidRequest(_) | ApiError::Library(_) => StatusCode::BAD_REQUEST,
        ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        ApiError::TooManyBlocks { .. } => StatusCode::BAD_REQUEST,
        ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
        ApiError::Overloaded => StatusCode::TOO_MANY_REQUESTS,
        ApiError::BackendUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// An [`ApiError`] as an HTTP response.
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        HttpError(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = status_of(&self.0);
        metrics::counter!("kvshelf_http_errors_total", "code" => self.0.code()).increment(1);
        if super::is_server_side(&self.0) {
            tracing::warn!(code = self.0.code(), error = %self.0, "request failed");
        }
        let body = serde_json::json!({ "error": self.0.code(), "message": self.0.to_string() });
        let mut resp = (status, axum::Json(body)).into_response();
        if matches!(self.0, ApiError::Overloaded) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if matches!(self.0, ApiError::Unauthenticated) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

type Result<T> = std::result::Result<T, HttpError>;

pub(super) fn caller(shelf: &Shelf, headers: &HeaderMap) -> std::result::Result<Caller, ApiError> {
    let authorization = headers.get(header::AUTHORIZATION);
    super::caller(shelf, authorization.and_then(|v| v.to_str().ok()))
}

/// The body length a request announces (`Content-Length`), if it does.
fn announced(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Hands each chunk of `body` to `keep` as it arrives, once `admission` has accounted for it
/// (so a body over its cap, or one the body budget has no room for, stops being read).
async fn each_chunk(
    admission: &Admission,
    body: Body,
    mut keep: impl FnMut(Bytes) -> std::result::Result<(), ApiError>,
) -> std::result::Result<(), ApiError> {
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| match super::deadline::is_stall(&e) {
            true => admission.stalled(),
            false => ApiError::InvalidRequest(format!("cannot read the request body: {e}")),
        })?;
        admission.receive(chunk.len()).await?;
        keep(chunk)?;
    }
    Ok(())
}

/// JSON bodies up to this size are parsed on the async worker; larger ones on a blocking
/// thread (`Shelf::cpu`).
const JSON_INLINE_BYTES: usize = 64 * 1024;

/// Admits a request with a JSON body, then reads and parses the body.
async fn admit_json<T: DeserializeOwned + Send + 'static>(
    shelf: &Shelf,
    headers: &HeaderMap,
    body: Body,
) -> std::result::Result<(Admission, T), ApiError> {
    let admission = shelf.admit(BodyKind::Control, announced(headers)).await?;
    let mut bytes = Vec::new();
    each_chunk(&admission, body, |c| {
        bytes.extend_from_slice(&c);
        Ok(())
    })
    .await?;
    let inline = bytes.len() <= JSON_INLINE_BYTES;
    let parse = move || serde_json::from_slice::<T>(&bytes);
    // A large body (a long prompt's token ids) is parsed off the async workers.
    let parsed = match inline {
        true => parse(),
        false => shelf.cpu(parse).await?,
    };
    let req = parsed.map_err(|e| ApiError::InvalidRequest(format!("malformed JSON body: {e}")))?;
    Ok((admission, req))
}

fn parse_query<T: DeserializeOwned>(uri: &Uri) -> std::result::Result<T, ApiError> {
    Query::<T>::try_from_uri(uri)
        .map(|q| q.0)
        .map_err(|e| ApiError::InvalidRequest(format!("bad query string: {}", e.body_text())))
}

fn parse_hash(s: &str) -> std::result::Result<BlockHash, ApiError> {
    // The same code as a bad hash in a JSON body: the request is malformed.
    s.parse()
        .map_err(|_| ApiError::InvalidRequest(format!("block hash {s:?} is not 64 hex digits")))
}

fn parse_extras(extras: Vec<Vec<String>>) -> std::result::Result<Vec<Vec<Vec<u8>>>, ApiError> {
    extras
        .into_iter()
        .map(|block| {
            block
                .into_iter()
                .map(|k| {
                    hex::decode(&k).map_err(|_| {
                        ApiError::InvalidRequest(format!("extra key {k:?} is not hex"))
                    })
                })
                .collect()
        })
        .collect()
}

async fn readyz(State(shelf): State<Shelf>) -> Response {
    let ready = shelf.ready().await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({ "ready": ready, "backend": shelf.backend_kind() });
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(shelf): State<Shelf>) -> Response {
    let stats = shelf.stats().await;
    metrics::gauge!("kvshelf_l1_bytes").set(stats.l1_bytes as f64);
    metrics::gauge!("kvshelf_put_queue_bytes").set(stats.put_queue_bytes as f64);
    shelf.refresh_pinned_gauges().await;
    metrics::gauge!("kvshelf_body_memory_bytes").set(shelf.body_memory_in_use() as f64);
    metrics::gauge!("kvshelf_fetch_memory_bytes").set(shelf.fetch_memory_in_use() as f64);
    let text = super::metrics_handle().render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn namespaces(State(shelf): State<Shelf>, headers: HeaderMap) -> Result<Response> {
    let who = caller(&shelf, &headers)?;
    let body = serde_json::json!({ "namespaces": shelf.namespaces(), "salted": who.salted() });
    Ok(axum::Json(body).into_response())
}

async fn stats(State(shelf): State<Shelf>, headers: HeaderMap) -> Result<Response> {
    caller(&shelf, &headers)?;
    Ok(axum::Json(shelf.stats().await).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HashBody {
    namespace: String,
    tokens: Vec<u32>,
    #[serde(default)]
    extra_keys: Vec<Vec<String>>,
}

async fn hash(State(shelf): State<Shelf>, headers: HeaderMap, body: Body) -> Result<Response> {
    let who = caller(&shelf, &headers)?;
    let (_admission, req): (_, HashBody) = admit_json(&shelf, &headers, body).await?;
    let extras = parse_extras(req.extra_keys)?;
    let hashes = shelf.hash(&who, &req.namespace, req.tokens, extras).await?;
    Ok(axum::Json(serde_json::json!({ "block_hashes": hashes })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LookupBody {
    namespace: String,
    tokens: Option<Vec<u32>>,
    #[serde(default)]
    extra_keys: Vec<Vec<String>>,
    block_hashes: Option<Vec<BlockHash>>,
    #[serde(default)]
    warm: bool,
}

async fn lookup(State(shelf): State<Shelf>, headers: HeaderMap, body: Body) -> Result<Response> {
    let who = caller(&shelf, &headers)?;
    let (admission, req): (_, LookupBody) = admit_json(&shelf, &headers, body).await?;
    let input = match (req.tokens, req.block_hashes) {
        (Some(t), None) => LookupInput::Tokens(t, parse_extras(req.extra_keys)?),
        (None, Some(h)) => LookupInput::Hashes(h),
        _ => {
            return Err(ApiError::InvalidRequest(
                "give exactly one of tokens and block_hashes".into(),
            )
            .into());
        }
    };
    let result = shelf
        .lookup(admission, &who, &req.namespace, input, req.warm)
        .await?;
    Ok(axum::Json(result).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlocksBody {
    namespace: String,
    block_hashes: Vec<BlockHash>,
}

/// The connection's cutoff, for a response whose client stops taking it (`deadline`).
type Conn = Option<Extension<ConnectInfo<Cutoff>>>;

/// `parts` as a response body whose every part the client must take within
/// `response_write_timeout` (`deadline::send_within`).
fn body_within(
    shelf: &Shelf,
    conn: Conn,
    parts: impl futures_util::Stream<Item = Bytes> + Send + 'static,
) -> Body {
    let timeout = shelf.config().response_write_timeout;
    let parts = send_within(parts, timeout, conn.map(|c| (c.0).0));
    Body::from_stream(parts.map(Ok::<_, Infallible>))
}

async fn fetch(
    State(shelf): State<Shelf>,
    conn: Conn,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let who = caller(&shelf, &headers)?;
    let (admission, req): (_, BlocksBody) = admit_json(&shelf, &headers, body).await?;
    let rx = shelf
        .fetch(admission, &who, &req.namespace, req.block_hashes)
        .await?;
    // Each block goes out as a small frame head followed by the payload `Bytes` itself:
    // the tensor bytes are not copied into a frame buffer on their way to the socket.
    let head = futures_util::stream::once(async { Bytes::from_static(frame::STREAM_MAGIC) });
    let frames = rx.flat_map(|item| {
        let parts = match item {
            FetchItem::Block {
                index,
                hash,
                payload,
            } => {
                vec![frame::block_head(index, &hash, payload.len()), payload]
            }
            FetchItem::End { blocks, reason } => vec![frame::end(blocks, reason)],
        };
        futures_util::stream::iter(parts)
    });
    let body = body_within(&shelf, conn, head.chain(frames));
    Ok(([(header::CONTENT_TYPE, frame::CONTENT_TYPE)], body).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutQuery {
    namespace: Option<String>,
    #[serde(default, rename = "async")]
    asynchronous: bool,
}

async fn put_batch(
    State(shelf): State<Shelf>,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Result<Response> {
    let who = caller(&shelf, &headers)?;
    let q: PutQuery = parse_query(&uri)?;
    let label = q.namespace.ok_or_else(|| {
        ApiError::InvalidRequest("the namespace query parameter is required".into())
    })?;
    let ns = shelf.namespace(&label)?;
    let admission = shelf
        .admit(BodyKind::Frames(ns), announced(&headers))
        .await?;
    // Frames are decoded as the body arrives, each payload copied once out of the received
    // chunks; the whole stream is checked before anything is written.
    let mut batch = shelf.put_batch(&admission, &label)?;
    each_chunk(&admission, body, |chunk| batch.feed(&chunk)).await?;
    let outcomes = shelf.put(admission, &who, batch, q.asynchronous).await?;
    Ok(axum::Json(serde_json::json!({ "outcomes": outcomes })).into_response())
}

async fn get_block(
    State(shelf): State<Shelf>,
    conn: Conn,
    headers: HeaderMap,
    Path((namespace, hash)): Path<(String, String)>,
) -> Result<Response> {
    let who = caller(&shelf, &headers)?;
    let hash = parse_hash(&hash)?;
    let admission = shelf.admit(BodyKind::None, None).await?;
    let payload = shelf.get_one(admission, &who, &namespace, hash).await?;
    // The payload holds its share of fetch_memory_bytes until it is written.
    let len = payload.len();
    let body = body_within(&shelf, conn, futures_util::stream::once(async { payload }));
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (header::CONTENT_LENGTH, HeaderValue::from(len)),
        ],
        body,
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AsyncQuery {
    #[serde(default, rename = "async")]
    asynchronous: bool,
}

async fn put_block(
    State(shelf): State<Shelf>,
    headers: HeaderMap,
    Path((namespace, hash)): Path<(String, String)>,
    uri: Uri,
    body: Body,
) -> Result<Response> {
    let who = caller(&shelf, &headers)?;
    let q: AsyncQuery = parse_query(&uri)?;
    let hash = parse_hash(&hash)?;
    let ns = shelf.namespace(&namespace)?;
    // The cap is exactly one payload: a longer Content-Length is refused unread.
    let admission = shelf
        .admit(BodyKind::Payload(ns), announced(&headers))
        .await?;
    let mut batch = shelf.put_batch(&admission, &namespace)?;
    let mut payload = bytes::BytesMut::with_capacity(admission.cap() as usize);
    each_chunk(&admission, body, |chunk| {
        payload.extend_from_slice(&chunk);
        Ok(())
    })
    .await?;
    batch.push(hash, payload.freeze())?;
    let outcome = shelf
        .put(admission, &who, batch, q.asynchronous)
        .await?
        .remove(0);
    let status = match outcome {
        PutResult::Stored => StatusCode::CREATED,
        PutResult::Queued => StatusCode::ACCEPTED,
        PutResult::AlreadyPresent | PutResult::Dropped => StatusCode::OK,
    };
    Ok((
        status,
        axum::Json(serde_json::json!({ "outcome": outcome })),
    )
        .into_response())
}

async fn delete_block(
    State(shelf): State<Shelf>,
    headers: HeaderMap,
    Path((namespace, hash)): Path<(String, String)>,
) -> Result<Response> {
    let who = caller(&shelf, &headers)?;
    let hash = parse_hash(&hash)?;
    let admission = shelf.admit(BodyKind::None, None).await?;
    let deleted = shelf.delete(admission, &who, &namespace, &[hash]).await?;
    Ok(axum::Json(serde_json::json!({ "deleted": deleted })).into_response())
}

async fn delete_batch(
    State(shelf): State<Shelf>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let who = caller(&shelf, &headers)?;
    let (admission, req): (_, BlocksBody) = admit_json(&shelf, &headers, body).await?;
    let deleted = shelf
        .delete(admission, &who, &req.namespace, &req.block_hashes)
        .await?;
    Ok(axum::Json(serde_json::json!({ "deleted": deleted })).into_response())
}

async fn pin_or_unpin(
    shelf: Shelf,
    headers: HeaderMap,
    namespace: String,
    hash: String,
    pin: bool,
) -> Result<Response> {
    let who = caller(&shelf, &headers)?;
    let hash = parse_hash(&hash)?;
    let admission = shelf.admit(BodyKind::None, None).await?;
    let found = shelf.pin(admission, &who, &namespace, &hash, pin).await?;
    Ok(axum::Json(serde_json::json!({ "found": found })).into_response())
}

async fn pin(
    State(shelf): State<Shelf>,
    headers: HeaderMap,
    Path((namespace, hash)): Path<(String, String)>,
) -> Result<Response> {
    pin_or_unpin(shelf, headers, namespace, hash, true).await
}

async fn unpin(
    State(shelf): State<Shelf>,
    headers: HeaderMap,
    Path((namespace, hash)): Path<(String, String)>,
) -> Result<Response> {
    pin_or_unpin(shelf, headers, namespace, hash, false).await
}

async fn purge(
    State(shelf): State<Shelf>,
    headers: HeaderMap,
    Path(namespace): Path<String>,
) -> Result<Response> {
    let who = caller(&shelf, &headers)?;
    let admission = shelf.admit(BodyKind::None, None).await?;
    let report = shelf.purge(admission, &who, &namespace).await?;
    Ok(axum::Json(report).into_response())
}
