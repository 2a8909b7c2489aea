//! The sidecar's transport-agnostic core: namespaces and tenants, the L1 tier in front of
//! the backend, fail-open timeouts, the asynchronous put queue, limits and metrics.
//!
//! The HTTP and gRPC adapters in [`crate::server`] are thin: they parse a request, call one
//! method here, and map [`ApiError`] to a status in exactly one table each.
//!
//! Fail open (docs/design.md, contract 5): a backend that is down, slow or full never becomes an error
//! on the worker's data path. Lookup answers 0 and fetch ends its stream with
//! `backend_unavailable` within the configured timeout; puts are dropped and counted. Only
//! operator actions (delete, pin, purge) report the backend's failure, since pretending
//! those succeeded would mislead.
//!
//! Knowing a hash is not enough to change a block: with tenants configured, the operator
//! actions need an admin token (`Shelf::require_admin`), checked before anything changes.
//!
//! # Files
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | [`Shelf`]: construction from the config, namespaces, hashing, limits, fail-open |
//! | `error.rs` | [`ApiError`], each with the stable code both transports map to a status |
//! | `auth.rs` | tenants and their tokens: [`Caller`], the admin check of operator actions |
//! | `fetch.rs` | the read path: lookup, fetch streams, the fetch memory budget |
//! | `put.rs` | the write path: synchronous puts, the asynchronous put queue |
//! | `operator.rs` | delete, pin, unpin, ttl, purge: bounded by `operator_timeout`, never failing open |
//! | `status.rs` | what the sidecar reports: namespaces, stats, readiness, pinned-bytes gauges |
//! | `coherence.rs` | how L1 stays true to Redis: invalidation tracking, TTL touches of L1 hits |

mod auth;
mod coherence;
mod error;
mod fetch;
mod operator;
mod put;
mod status;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};

use crate::admission::Admitter;
pub use crate::admission::{Admission, BodyKind, BodyMeter, PutBatch};
use crate::backend::Backend;
use crate::config::{Config, ServerConfig};
use crate::error::Error;
use crate::hashing::{BlockHash, PrefixHasher};
use crate::l1::L1;
use crate::memory::MemoryStore;
use crate::namespace::{Dtype, Layout, Namespace};
pub use crate::outcome::{PurgeReport, PutResult, SkippedNode};
use crate::store::RedisStore;

pub use auth::Caller;
use auth::Tenant;
pub use coherence::L1Coherence;
use coherence::{TOUCH_QUEUE, l1_follower, l1_toucher};
pub use error::ApiError;
pub use fetch::{FetchStream, LookupInput, LookupResult};
use put::{QueuedPut, put_queue_worker};
pub use status::{NamespaceInfo, Stats};

/// One item of a fetch stream: the frames of `crate::frame`, which both transports carry;
/// the sidecar stream's one result type (L1's is [`crate::l1::Served`], the store's
/// [`crate::store::Read`]).
pub use crate::frame::Frame as FetchItem;

/// The sidecar core. Cheap to clone.
#[derive(Clone)]
pub struct Shelf {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    l1: Option<Arc<L1>>,
    namespaces: HashMap<String, Namespace>,
    tenants: HashMap<String, Arc<Tenant>>,
    cfg: ServerConfig,
    /// The concurrency slots and the body budget.
    admitter: Admitter,
    queue_tx: std::sync::Mutex<Option<mpsc::UnboundedSender<QueuedPut>>>,
    queue_budget: Arc<Semaphore>,
    /// `fetch_memory_bytes`, one permit per byte.
    fetch_budget: Arc<Semaphore>,
    queue_done: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    backend_was_ok: AtomicBool,
    /// L1 hits whose Redis TTL is to slide (`l1_toucher`); `None` without L1, without
    /// Redis, or without sliding TTLs.
    touch_tx: Option<mpsc::Sender<(Arc<str>, BlockHash)>>,
    /// Dropped with the shelf: tells `l1_follower` to stop.
    _stop_tracking: tokio::sync::watch::Sender<()>,
    /// Which keys L1 may serve (those whose primary's invalidation stream is up); `None`
    /// without L1 or with the embedded store.
    l1_coverage: Option<Arc<crate::store::Coverage>>,
    /// Background warms of lookups (`warm: true`) running at once, at most [`MAX_WARMING`].
    warming: Arc<Semaphore>,
    /// One permit per core: CPU jobs off the async workers ([`Shelf::cpu`]).
    cpu_jobs: Semaphore,
}

/// Prompts up to this many tokens are hashed on the async worker (~0.1 ms of SHA-256);
/// longer ones on a blocking thread ([`Shelf::cpu`]).
const HASH_INLINE_TOKENS: usize = 16 * 1024;

/// Most lookups warming L1 in the background at once; a lookup past it does not warm.
pub const MAX_WARMING: usize = 16;

impl std::fmt::Debug for Shelf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shelf")
            .field("backend", &self.inner.backend.kind())
            .field("namespaces", &self.inner.namespaces.len())
            .finish()
    }
}

/// The namespace `kvshelf serve` offers when none is configured: small blocks (2 KiB) so
/// that the API can be tried with `curl` and `head -c 2048 /dev/urandom`.
pub fn demo_namespace() -> Namespace {
    Namespace {
        label: "demo".into(),
        model_id: "kvshelf/demo".into(),
        model_revision: String::new(),
        kv_dtype: Dtype::Float16,
        layout: Layout {
            num_layers: 2,
            num_kv_heads: 2,
            head_dim: 8,
            tp_size: 1,
            tp_rank: 0,
            order: "lkthd".into(),
        },
        block_size: 16,
        lora_adapter: None,
        ttl: None,
        max_pinned_bytes: None,
        hash_scheme: Default::default(),
    }
}

impl Shelf {
    /// Builds the core from a validated config. Must run inside a tokio runtime (it starts
    /// the put queue's worker).
    pub fn new(cfg: &Config) -> Result<Shelf, Error> {
        cfg.validate()?;
        let server = cfg.server.clone();
        let (backend, l1) = match &cfg.store {
            Some(store) => {
                let l1 = (server.l1_bytes > 0)
                    .then(|| Arc::new(L1::new(server.l1_bytes, server.l1_max_ttl)));
                (Backend::Redis(RedisStore::new(store.clone())?), l1)
            }
            None => {
                let defaults = crate::store::StoreConfig::default();
                // The embedded store is already in this process: an L1 would only copy it.
                let m = MemoryStore::new(
                    server.memory_store_bytes,
                    defaults.ttl,
                    defaults.sliding_ttl,
                );
                (Backend::Memory(m), None)
            }
        };
        let mut namespaces: HashMap<String, Namespace> = cfg
            .namespaces
            .iter()
            .map(|n| (n.label.clone(), n.clone()))
            .collect();
        if namespaces.is_empty() {
            let demo = demo_namespace();
            namespaces.insert(demo.label.clone(), demo);
        }
        let tenants = cfg
            .tenants
            .iter()
            .map(|t| (t.token.clone(), Arc::new(Tenant::of(t))))
            .collect();
        let admitter = Admitter::new(&server, namespaces.values());
        // L1 hits slide the Redis TTL as Redis reads do, from a task of their own: batched,
        // at most once per block per `l1_touch_interval`, never on the request path.
        let touch_tx = match (&backend, &l1) {
            (Backend::Redis(store), Some(_)) if store.config().sliding_ttl => {
                let (tx, rx) = mpsc::channel(TOUCH_QUEUE);
                tokio::spawn(l1_toucher(
                    store.clone(),
                    namespaces.clone(),
                    server.l1_touch_interval,
                    server.put_timeout,
                    rx,
                ));
                Some(tx)
            }
            _ => None,
        };
        // L1 follows Redis: entries are dropped when Redis reports their keys changed, and
        // all of them when the report stream is lost. Ends when the shelf is dropped.
        let (stop_tracking, stopped) = tokio::sync::watch::channel(());
        let mut l1_coverage = None;
        if let (Backend::Redis(store), Some(l1)) = (&backend, &l1) {
            let coverage = store.coverage();
            l1_coverage = Some(coverage.clone());
            tokio::spawn(l1_follower(
                store.clone(),
                Arc::downgrade(l1),
                coverage,
                stopped,
            ));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let shelf = Shelf {
            inner: Arc::new(Inner {
                backend,
                l1,
                namespaces,
                tenants,
                admitter,
                queue_budget: Arc::new(Semaphore::new(
                    server.put_queue_bytes.min(Semaphore::MAX_PERMITS as u64) as usize,
                )),
                fetch_budget: Arc::new(Semaphore::new(
                    server
                        .fetch_memory_bytes
                        .clamp(1, Semaphore::MAX_PERMITS as u64) as usize,
                )),
                cfg: server,
                queue_tx: std::sync::Mutex::new(Some(tx)),
                queue_done: tokio::sync::Mutex::new(None),
                backend_was_ok: AtomicBool::new(true),
                touch_tx,
                _stop_tracking: stop_tracking,
                l1_coverage,
                warming: Arc::new(Semaphore::new(MAX_WARMING)),
                cpu_jobs: Semaphore::new(
                    std::thread::available_parallelism().map_or(2, std::num::NonZero::get),
                ),
            }),
        };
        let worker = tokio::spawn(put_queue_worker(shelf.clone(), rx));
        *shelf.inner.queue_done.try_lock().expect("fresh mutex") = Some(worker);
        Ok(shelf)
    }

    /// The settings this core runs with.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.cfg
    }

    /// `redis` or `memory`.
    pub fn backend_kind(&self) -> &'static str {
        self.inner.backend.kind()
    }

    /// Lets a request in before its body is read (`crate::admission`): refuses an
    /// `announced` body length over what `body` may carry (`payload_too_large`), takes one of
    /// the `max_concurrent_requests` slots (`overloaded` at once when none is free), and
    /// reserves the body's room in the `body_memory_bytes` budget (waiting at most
    /// `put_timeout`, then `overloaded`). Every counted operation takes the result.
    pub async fn admit(
        &self,
        body: BodyKind<'_>,
        announced: Option<u64>,
    ) -> Result<Admission, ApiError> {
        self.inner.admitter.admit(body, announced).await
    }

    /// The largest body any request may send (`max_body_bytes`, or `body_memory_bytes` when
    /// smaller).
    pub fn largest_body(&self) -> u64 {
        self.inner.admitter.largest_cap()
    }

    /// Request body bytes reserved in the body budget right now.
    pub fn body_memory_in_use(&self) -> u64 {
        self.inner.admitter.in_use()
    }

    /// Payload bytes fetches hold right now in the fetch budget (`fetch_memory_bytes`): read
    /// and not yet written to their clients.
    pub fn fetch_memory_in_use(&self) -> u64 {
        let total = self
            .inner
            .cfg
            .fetch_memory_bytes
            .clamp(1, Semaphore::MAX_PERMITS as u64);
        total - self.inner.fetch_budget.available_permits() as u64
    }

    /// A configured namespace.
    pub fn namespace(&self, label: &str) -> Result<&Namespace, ApiError> {
        crate::namespace::validate_label(label)?;
        self.inner
            .namespaces
            .get(label)
            .ok_or_else(|| ApiError::UnknownNamespace(label.to_owned()))
    }

    fn check_count(&self, count: usize) -> Result<(), ApiError> {
        let limit = self.inner.cfg.max_blocks_per_request;
        if count > limit {
            return Err(ApiError::TooManyBlocks { count, limit });
        }
        Ok(())
    }

    /// Hashes of every full block of `tokens`, with the caller's salt. A long prompt is
    /// hashed off the async workers ([`Shelf::cpu`]): 4096 blocks of 4096 tokens take
    /// ~100 ms of SHA-256, which would stall every request sharing the worker.
    pub async fn hash(
        &self,
        caller: &Caller,
        label: &str,
        tokens: Vec<u32>,
        extras: Vec<Vec<Vec<u8>>>,
    ) -> Result<Vec<BlockHash>, ApiError> {
        let ns = self.namespace(label)?;
        self.check_count(tokens.len() / ns.block_size as usize)?;
        let hasher = PrefixHasher::new(ns, caller.salt());
        let inline = tokens.len() <= HASH_INLINE_TOKENS;
        let hash = move || hasher.hash_prefix_with_extras(&tokens, &extras);
        let hashes = match inline {
            true => hash(),
            false => self.cpu(hash).await?,
        };
        Ok(hashes?)
    }

    /// Runs CPU-heavy work (hashing a long prompt, parsing a large JSON body) on tokio's
    /// blocking threads, at most one job per core at once, so the async workers keep
    /// serving other requests meanwhile.
    pub async fn cpu<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let _core = self
            .inner
            .cpu_jobs
            .acquire()
            .await
            .expect("the CPU semaphore is never closed");
        match tokio::task::spawn_blocking(job).await {
            Ok(v) => Ok(v),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The runtime is shutting down.
            Err(_) => Err(ApiError::Overloaded),
        }
    }

    /// Runs a backend call under `timeout`. Caller errors pass through; a backend that
    /// fails or is late gives `Ok(None)`, counted and logged (once per outage).
    async fn fail_open<T>(
        &self,
        op: &'static str,
        timeout: Duration,
        call: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<Option<T>, ApiError> {
        let kind = match tokio::time::timeout(timeout, call).await {
            Ok(Ok(v)) => {
                if !self.inner.backend_was_ok.swap(true, Ordering::Relaxed) {
                    tracing::info!(op, "backend answers again");
                }
                return Ok(Some(v));
            }
            Ok(Err(e)) if e.is_caller_error() => return Err(e.into()),
            Ok(Err(e)) => {
                if self.inner.backend_was_ok.swap(false, Ordering::Relaxed) {
                    tracing::warn!(op, error = %e, "backend failed; answering misses and dropping puts until it is back");
                }
                e.code()
            }
            Err(_) => {
                if self.inner.backend_was_ok.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        op,
                        ?timeout,
                        "backend too slow; answering misses and dropping puts until it is back"
                    );
                }
                "timeout"
            }
        };
        metrics::counter!("kvshelf_backend_failures_total", "op" => op, "kind" => kind)
            .increment(1);
        Ok(None)
    }
}
