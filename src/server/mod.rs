//! The sidecar's transports: HTTP (axum) and gRPC (tonic) on ONE listener, plus health,
//! readiness and Prometheus metrics.
//!
//! Both adapters are thin over [`crate::shelf::Shelf`]; each maps [`ApiError`] to its
//! protocol's statuses in one function (`http::status_of`, `grpc::status_of`).
//!
//! [`run`] takes an already-bound listener, so tests run servers on port 0.

pub mod deadline;
pub mod grpc;
pub mod http;

use std::future::Future;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::shelf::{ApiError, Caller, Shelf};

/// Bucket bounds of every `…_seconds` histogram: 100 µs to 10 s, about three per decade.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        // Durations are histograms, not summaries: per-process quantiles cannot be added up
        // across sidecars, bucket counts can.
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), DURATION_BUCKETS)
            .expect("buckets are not empty")
            .install_recorder()
            .expect("no other metrics recorder is installed");
        describe_metrics();
        handle
    })
}

fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "kvshelf_lookup_blocks_total",
        "Blocks asked about by lookups, by result (hit, miss)."
    );
    describe_counter!(
        "kvshelf_fetch_blocks_total",
        "Blocks served by fetches, by tier (l1_hit, backend_hit, coalesced, miss, unavailable)."
    );
    describe_counter!(
        "kvshelf_fetch_bytes_total",
        "Payload bytes streamed to fetchers."
    );
    describe_counter!(
        "kvshelf_backend_block_reads_total",
        "Blocks read from the backend (after L1 and coalescing)."
    );
    describe_counter!(
        "kvshelf_put_blocks_total",
        "Blocks put, by result (stored, already_present, queued, dropped_queue_full, dropped_backend)."
    );
    describe_counter!(
        "kvshelf_backend_failures_total",
        "Backend calls that failed or timed out and were answered as misses or dropped puts."
    );
    describe_counter!(
        "kvshelf_store_corrupt_blocks_total",
        "Blocks that failed verification on read, were deleted and answered as misses."
    );
    describe_counter!(
        "kvshelf_l1_evictions_total",
        "Entries evicted from L1 to keep its byte bound."
    );
    describe_counter!(
        "kvshelf_l1_invalidations_total",
        "L1 entries dropped because Redis reported their block gone."
    );
    describe_counter!(
        "kvshelf_l1_flushes_total",
        "Times L1 dropped what it held of a primary's keys (all of them for flushed_in_redis), by reason (tracking_started, tracking_lost, flushed_in_redis, invalidations_overflowed)."
    );
    describe_gauge!(
        "kvshelf_l1_tracking",
        "1 while L1 follows the invalidations of every primary, 0 while any primary's stream is down."
    );
    describe_counter!(
        "kvshelf_l1_ttl_touches_total",
        "L1 hits whose block's Redis TTL was slid, by result (sent, failed, timeout, dropped)."
    );
    describe_counter!(
        "kvshelf_l1_wait_timeouts_total",
        "Blocks a fetch stopped waiting for: another request's read of them outlasted the chunk's deadline."
    );
    describe_counter!(
        "kvshelf_l1_load_timeouts_total",
        "L1 loads cut off at the chunk's deadline."
    );
    describe_counter!(
        "kvshelf_fetch_budget_timeouts_total",
        "Fetches that found no room in fetch_memory_bytes within the chunk's deadline (ended backend_unavailable)."
    );
    describe_counter!(
        "kvshelf_stalled_requests_total",
        "Requests cut off because their client stalled, by reason (body_read_timeout, response_write_timeout)."
    );
    describe_counter!(
        "kvshelf_warm_skipped_total",
        "Warm lookups that did not warm because MAX_WARMING warms were already running."
    );
    describe_counter!(
        "kvshelf_store_sentinel_lookups_total",
        "Times the store asked the sentinels for the primary because it knew none (the first call, then after each time it forgot it: READONLY, or a sentinel naming another)."
    );
    describe_counter!(
        "kvshelf_store_unlink_unsure_total",
        "Keys a resent UNLINK found gone: deleted, but perhaps by the first sending whose reply was lost, so delete and purge counts may be short by this many."
    );
    describe_counter!(
        "kvshelf_store_connection_drains_total",
        "Redis calls given up mid-exchange whose connection was read back into step (kept), could not be (closed) or did not answer in time (timeout)."
    );
    describe_counter!(
        "kvshelf_rejected_requests_total",
        "Requests refused by a limit, by reason."
    );
    describe_counter!(
        "kvshelf_http_errors_total",
        "HTTP error responses, by code."
    );
    describe_counter!("kvshelf_grpc_errors_total", "gRPC error statuses, by code.");
    describe_counter!(
        "kvshelf_pins_refused_total",
        "Pins refused because the namespace's pinned bytes would pass max_pinned_bytes."
    );
    describe_gauge!(
        "kvshelf_pinned_bytes",
        "Payload bytes pinned per namespace, across every sidecar (read from the backend at each scrape)."
    );
    describe_gauge!(
        "kvshelf_backend_up",
        "1 when the backend answered the last readiness check."
    );
    describe_gauge!("kvshelf_l1_bytes", "Bytes held in L1.");
    describe_gauge!(
        "kvshelf_put_queue_bytes",
        "Bytes of asynchronous puts accepted and not yet written (queued or being written)."
    );
    describe_gauge!(
        "kvshelf_body_memory_bytes",
        "Request body bytes reserved in the body budget (body_memory_bytes)."
    );
    describe_gauge!(
        "kvshelf_fetch_memory_bytes",
        "Payload bytes fetches hold, read and not yet written to their clients (fetch_memory_bytes)."
    );
    describe_histogram!(
        "kvshelf_request_duration_seconds",
        "Time to serve lookups, fetches and puts."
    );
}

/// HTTP routes and the gRPC service (with gRPC health checking) in one router.
pub fn router(shelf: Shelf) -> axum::Router {
    metrics_handle();
    let grpc = grpc::routes(shelf.clone());
    let body_read_timeout = shelf.config().body_read_timeout;
    // tonic's router answers every unknown path with gRPC's UNIMPLEMENTED; replace that
    // fallback so plain HTTP clients get the API's JSON 404 instead.
    http::routes(shelf)
        .merge(grpc)
        .fallback(http::unknown_route)
        .method_not_allowed_fallback(http::method_not_allowed)
        // Every request body, HTTP and gRPC: one that sends nothing for this long fails, and
        // its reader ends the request `request_timeout` (`deadline`).
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            body_read_timeout,
        ))
}

/// Serves HTTP/1.1, HTTP/2 and gRPC on `listener` until `shutdown` resolves, then lets
/// in-flight requests finish and flushes queued puts (up to the configured grace period).
pub async fn run(
    listener: TcpListener,
    shelf: Shelf,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    run_with_unix(listener, None, shelf, shutdown).await
}

/// [`run`], also serving the same API on a Unix socket.
pub async fn run_with_unix(
    listener: TcpListener,
    unix: Option<tokio::net::UnixListener>,
    shelf: Shelf,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = shelf.config().shutdown_grace;
    let write_timeout = shelf.config().response_write_timeout;
    // Each connection carries its `Cutoff`, for responses that must close it.
    let app = router(shelf.clone()).into_make_service_with_connect_info::<deadline::Cutoff>();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    // TCP_NODELAY: a fetch ends with a small end frame after large payloads; with Nagle on,
    // that frame can wait for the client's delayed ACK (40 ms on Linux).
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let listener = deadline::Deadlines::new(listener, write_timeout);
    let tcp = axum::serve(listener, app.clone())
        .with_graceful_shutdown(stopped(stop_rx.clone()))
        .into_future();
    let unix = async {
        match unix {
            Some(unix) => {
                axum::serve(deadline::Deadlines::new(unix, write_timeout), app)
                    .with_graceful_shutdown(stopped(stop_rx.clone()))
                    .await
            }
            None => Ok(()),
        }
    };
    let both = async {
        let (tcp, unix) = tokio::join!(tcp, unix);
        tcp.and(unix)
    };
    let stop = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        res = both => res?,
        _ = stop => {
            tracing::warn!(?grace, "in-flight requests did not finish within the grace period");
        }
    }
    shelf.drain(grace).await;
    Ok(())
}

/// Binds a Unix socket at `path`, replacing a stale socket file left by an earlier run
/// (but never another kind of file).
pub fn bind_unix(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    tokio::net::UnixListener::bind(path)
}

/// The caller an `Authorization` value stands for, the HTTP header and the gRPC metadata
/// entry alike (so both transports accept exactly the same credentials).
fn caller(shelf: &Shelf, authorization: Option<&str>) -> Result<Caller, ApiError> {
    shelf.authenticate(authorization.and_then(bearer_token))
}

/// The token of a `Bearer <token>` credential: the scheme in any case (RFC 9110 §11.1),
/// blanks around the token ignored. Any other value carries no token.
fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once([' ', '\t'])?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Classifies an error for logs: 5xx-like failures are worth a warning, caller errors not.
fn is_server_side(e: &ApiError) -> bool {
    matches!(e, ApiError::BackendUnavailable(_))
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn bearer_tokens_are_parsed_one_way() {
        for (value, token) in [
            ("Bearer tok", Some("tok")),
            ("bearer tok", Some("tok")),
            ("BEARER tok", Some("tok")),
            ("Bearer   tok  ", Some("tok")),
            ("Bearer\ttok", Some("tok")),
            (" Bearer tok", Some("tok")),
            ("Bearer ", None),
            ("Bearer", None),
            ("Basic dXNlcjpwdw==", None),
            ("Bearertok", None),
            ("tok", None),
            ("", None),
        ] {
            assert_eq!(bearer_token(value), token, "{value:?}");
        }
    }
}
