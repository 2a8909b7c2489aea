//! The sidecar API's errors: each has a stable machine-readable code, the key of the one
//! status table of each transport.

use crate::error::Error;

/// Errors of the sidecar API, each with a stable machine-readable code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// No or unknown bearer token where tokens are configured.
    #[error("missing or unknown bearer token")]
    Unauthenticated,
    /// The token may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// The namespace label is well-formed but not configured on this sidecar.
    #[error("namespace {0:?} is not configured on this sidecar (GET /v1/namespaces lists them)")]
    UnknownNamespace(String),
    /// A malformed request: bad JSON, protobuf or frames, a bad hash, a wrong payload size.
    #[error("{0}")]
    InvalidRequest(String),
    /// The body is larger than what the request may carry (its cap, `docs/api.md` §9).
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit.
        limit: u64,
    },
    /// The request names more blocks than `max_blocks_per_request`.
    #[error("request names {count} blocks; at most {limit} are allowed")]
    TooManyBlocks {
        /// Blocks named.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// The request body stopped arriving: no byte for `body_read_timeout` while it was read.
    #[error(
        "the request body sent nothing for {0:?} (body_read_timeout): the request is cut off; \
         send the body without pauses, or retry"
    )]
    RequestTimeout(std::time::Duration),
    /// More concurrent requests than `max_concurrent_requests`.
    #[error("too many concurrent requests; retry shortly")]
    Overloaded,
    /// The single block asked for is not on the shelf.
    #[error("block not found")]
    NotFound,
    /// No endpoint at this path (HTTP only).
    #[error("{0}")]
    NoSuchRoute(String),
    /// The endpoint exists but not with this method (HTTP only).
    #[error("{0}")]
    MethodNotAllowed(String),
    /// Pinning one more block would take the namespace's pinned bytes over its cap.
    #[error(
        "namespace {namespace:?} has {pinned_bytes} bytes pinned; one more block of {block_bytes} \
         bytes would pass its limit of {limit} (max_pinned_bytes): unpin blocks first, or \
         raise the limit"
    )]
    PinLimit {
        /// The namespace.
        namespace: String,
        /// Its pinned payload bytes now.
        pinned_bytes: u64,
        /// The bytes the refused pin would have added.
        block_bytes: u64,
        /// Its cap.
        limit: u64,
    },
    /// The backend failed an operator action (delete, pin, purge), which does not fail open.
    #[error("backend unavailable: {0}")]
    BackendUnavailable(String),
    /// A library error caused by the request (invalid namespace, input or dtype).
    #[error(transparent)]
    Library(Error),
}

impl ApiError {
    /// The stable code: the key of both transports' status tables.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthenticated => "unauthenticated",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::UnknownNamespace(_) => "unknown_namespace",
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::TooManyBlocks { .. } => "too_many_blocks",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::Overloaded => "overloaded",
            ApiError::NotFound => "not_found",
            ApiError::NoSuchRoute(_) => "no_such_route",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::PinLimit { .. } => "pin_limit",
            ApiError::BackendUnavailable(_) => "backend_unavailable",
            ApiError::Library(e) => e.code(),
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        if e.is_caller_error() {
            ApiError::Library(e)
        } else {
            ApiError::BackendUnavailable(e.to_string())
        }
    }
}
