//! The library's one error type, classified so that transports can map it in one place.
//!
//! Expected outcomes are not errors: a miss is `Ok(None)`, a shorter prefix is a shorter
//! `Vec`. A corrupt block found while reading is also a miss (contract 6); [`CodecError`]
//! surfaces only from the codec itself and from inputs a caller hands in.

use crate::codec::CodecError;

/// Everything that can go wrong in the kvshelf library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A namespace or label that breaks the rules of [`crate::Namespace::validate`].
    #[error("invalid namespace: {0}")]
    InvalidNamespace(String),
    /// A dtype name kvshelf does not know.
    #[error(
        "unknown dtype {0:?} (known: float32, float16, bfloat16, float8_e4m3fn, float8_e5m2, int8, uint8)"
    )]
    UnknownDtype(String),
    /// Input that cannot be right: a payload of the wrong length, a malformed hash, …
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A block's bytes that do not decode, or do not match what was asked for.
    #[error("bad block: {0}")]
    Codec(#[from] CodecError),
    /// The backend (Redis) failed: down, timed out, refused the command.
    #[error("backend: {0}")]
    Backend(#[from] BackendError),
    /// Bad configuration (URL, certificate file, …).
    #[error("config: {0}")]
    Config(String),
    /// The backend did not finish within a deadline the caller set (an operator action's).
    #[error("did not finish within {0:?}")]
    Deadline(std::time::Duration),
}

impl Error {
    /// A stable, machine-readable code, the key of every transport's error table.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidNamespace(_) => "invalid_namespace",
            Error::UnknownDtype(_) => "unknown_dtype",
            Error::InvalidInput(_) => "invalid_input",
            Error::Codec(_) => "bad_block",
            Error::Backend(e) if e.is_timeout() => "backend_timeout",
            Error::Backend(_) => "backend_unavailable",
            Error::Deadline(_) => "backend_timeout",
            Error::Config(_) => "config",
        }
    }

    /// True for errors caused by the caller's input (a 4xx), false for the backend's.
    pub fn is_caller_error(&self) -> bool {
        !matches!(
            self,
            Error::Backend(_) | Error::Config(_) | Error::Deadline(_)
        )
    }

    /// True when the backend could not be reached or did not answer in time: the kind of
    /// failure a fail-open caller turns into a miss.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Backend(e) => e.kind() != BackendErrorKind::Refused,
            Error::Deadline(_) => true,
            _ => false,
        }
    }
}

/// What went wrong talking to Redis, in kvshelf's own terms (no client crate's type is
/// part of the library's API, so changing the Redis client is not a breaking change).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    kind: BackendErrorKind,
    message: String,
    /// Made by the client itself (its reconnect pacing, its pool being full), not by
    /// anything the server did or failed to do.
    client_side: bool,
}

/// The class of a [`BackendError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendErrorKind {
    /// No answer within `response_timeout` or `connection_timeout`.
    Timeout,
    /// The connection could not be made, or broke (refused, reset, closed, TLS).
    Io,
    /// Redis answered with bytes that are not the reply expected; the connection was
    /// dropped.
    Protocol,
    /// Redis is there but cannot serve now: loading, a cluster or a failover in progress
    /// (`LOADING`, `CLUSTERDOWN`, `TRYAGAIN`, `MASTERDOWN`, `READONLY`), no node for a
    /// slot, no primary known to the sentinels.
    Unavailable,
    /// Redis refused the command (`NOPERM`, `OOM`, `ERR …`): retrying will not help.
    Refused,
}

impl BackendError {
    /// An error of `kind`.
    pub fn new(kind: BackendErrorKind, message: impl Into<String>) -> BackendError {
        BackendError {
            kind,
            message: message.into(),
            client_side: false,
        }
    }

    /// An error the client made itself (its reconnect pacing, no pool slot free in time):
    /// it says nothing about the server, so it never changes the topology.
    pub(crate) fn client_side(kind: BackendErrorKind, message: impl Into<String>) -> BackendError {
        BackendError {
            client_side: true,
            ..BackendError::new(kind, message)
        }
    }

    /// Whether the client made this error itself (its reconnect pacing, no pool slot free
    /// in time) rather than learning it from the server or the network.
    pub fn is_client_side(&self) -> bool {
        self.client_side
    }

    /// The error of a server error reply (`-CODE message`), classified by its code.
    pub fn from_reply(reply: &str) -> BackendError {
        let code = reply.split(' ').next().unwrap_or_default();
        let kind = match code {
            "LOADING" | "CLUSTERDOWN" | "TRYAGAIN" | "MASTERDOWN" | "READONLY" | "BUSY"
            | "MOVED" | "ASK" => BackendErrorKind::Unavailable,
            _ => BackendErrorKind::Refused,
        };
        BackendError::new(kind, reply)
    }

    /// The error of a failed socket operation.
    pub fn io(context: &str, e: &std::io::Error) -> BackendError {
        let kind = if e.kind() == std::io::ErrorKind::TimedOut {
            BackendErrorKind::Timeout
        } else {
            BackendErrorKind::Io
        };
        BackendError::new(kind, format!("{context}: {e}"))
    }

    /// Its class.
    pub fn kind(&self) -> BackendErrorKind {
        self.kind
    }

    /// Whether Redis did not answer in time.
    pub fn is_timeout(&self) -> bool {
        self.kind == BackendErrorKind::Timeout
    }

    /// The code of a server error reply (`NOPERM`, `WRONGTYPE`, …), if this is one.
    pub fn server_code(&self) -> Option<&str> {
        matches!(
            self.kind,
            BackendErrorKind::Refused | BackendErrorKind::Unavailable
        )
        .then(|| self.message.split(' ').next().unwrap_or_default())
        .filter(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_uppercase()))
    }
}
