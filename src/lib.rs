//! kvshelf: a shared, Redis-backed shelf of attention KV blocks, keyed by prompt prefix.
//!
//! An inference worker that has computed prefill for a prompt puts the KV tensors of each
//! full block of tokens on the shelf; any other worker whose prompt starts with the same
//! tokens takes them off the shelf instead of recomputing prefill.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`namespace`] | what must match for KV to be reusable: identity, label, dtype, layout |
//! | [`hashing`] | the namespace root and chained SHA-256 block hashes (`docs/hashing.md`) |
//! | [`codec`] | the stored block: text header + raw tensor bytes, checksum (`docs/format.md`) |
//! | [`store`] | Redis: one data path for standalone, Sentinel, Cluster and TLS — key schema, write-once puts with TTL, reads (also into caller memory), lookup, pin, purge, invalidation tracking; one file per concern (its own `# Layout`) |
//! | [`outcome`] | results shared by the store, the sidecar and the client: [`PutResult`], purge reports |
//! | [`resp`] | RESP2: the socket-free reply parser and the pipelined command builder |
//! | [`error`] | the one classified error type |
//! | [`frame`] | the framed binary stream that carries batches of blocks over HTTP |
//! | `l1` | the byte-bounded in-process tier in front of the backend, single-flight loads |
//! | `memory` | the embedded in-process store (no Redis) |
//! | `backend` | Redis or the embedded store, behind one enum |
//! | `shelf` | the sidecar's transport-agnostic core: tenants, fail-open, limits, the fetch budget, put queue, L1 coherence |
//! | `admission` | a request's slot and body budget, taken before its body is read; body caps |
//! | `server` | thin HTTP (axum) and gRPC (tonic) adapters on one port, health, metrics |
//! | `client` | the Rust client workers use to call the sidecar (feature `client`) |
//! | `config` | the TOML configuration of the sidecar (feature `server`) |
//! | `worker` | a small Llama-style model on CPU that reuses prefill KV via the sidecar (feature `worker`) |
//!
//! ```no_run
//! # async fn demo() -> Result<(), kvshelf::Error> {
//! use kvshelf::{Dtype, Layout, Namespace, PrefixHasher, RedisStore, StoreConfig};
//! let ns = Namespace {
//!     label: "qwen2.5-0.5b".into(),
//!     model_id: "Qwen/Qwen2.5-0.5B-Instruct".into(),
//!     model_revision: String::new(),
//!     kv_dtype: Dtype::Bfloat16,
//!     layout: Layout { num_layers: 24, num_kv_heads: 2, head_dim: 64, tp_size: 1, tp_rank: 0,
//!                      order: "lkthd".into() },
//!     block_size: 16,
//!     lora_adapter: None,
//!     ttl: None,
//!     max_pinned_bytes: None,
//!     hash_scheme: Default::default(),
//! };
//! let hashes = PrefixHasher::new(&ns, None).hash_prefix(&[1, 2, 3 /* prompt token ids */]);
//! let store = RedisStore::connect(StoreConfig::default()).await?;
//! let cached = store.lookup(&ns, &hashes).await?; // leading blocks on the shelf
//! let blocks = store.fetch_prefix(&ns, &hashes[..cached]).await?; // may be shorter
//! # let _ = blocks; Ok(()) }
//! ```
#![warn(missing_docs)]

#[cfg(feature = "server")]
pub mod admission;
#[cfg(feature = "server")]
pub mod backend;
#[cfg(feature = "client")]
pub mod client;
pub mod codec;
#[cfg(feature = "server")]
pub mod config;
pub mod error;
pub mod frame;
pub mod hashing;
#[cfg(feature = "server")]
pub mod l1;
#[cfg(feature = "server")]
pub mod memory;
pub mod namespace;
pub mod outcome;
pub mod resp;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod shelf;
pub mod store;
#[cfg(feature = "worker")]
pub mod worker;

pub use codec::{Block, CodecError, Header};
pub use error::{BackendError, BackendErrorKind, Error};
pub use hashing::{BlockHash, PrefixHasher};
pub use namespace::{Dtype, HashScheme, Layout, Namespace};
pub use outcome::PutResult;
pub use store::{Read, ReadInto, RedisStore, StoreConfig};

/// The README's Rust example, compiled as a doctest so it stays true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// The gRPC messages and service generated from `proto/kvshelf/v1/shelf.proto`.
#[cfg(feature = "grpc")]
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("kvshelf.v1");
}
