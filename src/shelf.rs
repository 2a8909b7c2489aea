//! The sidecar's transport-agnostic core: namespaces and tenants, the L1 tier in front of
//! the backend, fail-open timeouts, the asynchronous put queue, limits and metrics.
//!
//! The HTTP and gRPC adapters in [`crate::server`] are thin: they parse a request, call one
//! method here, and map [`ApiError`] to a status in exactly one table each.
//!
//! Fail open (DESIGN contract 5): a backend that is down, slow or full never becomes an error
//! on the worker's data path. Lookup answers 0 and fetch ends its stream with
//! `backend_unavailable` within the configured timeout; puts are dropped and counted. Only
//! operator actions (delete, pin, purge) report the backend's failure, since pretending
//! those succeeded would mislead.
//!
//! Knowing a hash is not enough to change a block: with tenants configured, the operator
//! actions need an admin token (`Shelf::require_admin`), checked before anything changes.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::admission::Admitter;
pub use crate::admission::{Admission, BodyKind, BodyMeter, PutBatch};
use crate::backend::Backend;
use crate::config::{Config, ServerConfig};
use crate::error::Error;
use crate::frame::EndReason;
use crate::hashing::{BlockHash, PrefixHasher};
use crate::l1::{L1, Served};
use crate::memory::MemoryStore;
use crate::namespace::{Dtype, Layout, Namespace};
use crate::store::{Invalidation, PinOutcome, RedisStore};
pub use crate::store::{PurgeReport, PutResult, SkippedNode};

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

/// Who is calling: the tenant their token selects.
#[derive(Clone, Debug, Default)]
pub struct Caller {
    tenant: Option<Arc<Tenant>>,
}

#[derive(Debug)]
struct Tenant {
    name: String,
    salt: Option<Vec<u8>>,
    admin: bool,
}

impl Caller {
    fn salt(&self) -> Option<&[u8]> {
        self.tenant.as_ref().and_then(|t| t.salt.as_deref())
    }

    /// Whether this caller's hashes are salted: then only the sidecar can compute them
    /// (the salt never leaves it), and a client must ask `hash` rather than hash itself.
    pub fn salted(&self) -> bool {
        self.salt().is_some()
    }

    /// The tenant's name, for logs.
    pub fn tenant_name(&self) -> Option<&str> {
        self.tenant.as_ref().map(|t| t.name.as_str())
    }

    fn is_admin(&self) -> bool {
        self.tenant.as_ref().is_some_and(|t| t.admin)
    }
}

/// What a lookup is asked about.
#[derive(Debug)]
pub enum LookupInput {
    /// Token ids (hashed here with the caller's salt) and optional per-block extra keys.
    Tokens(Vec<u32>, Vec<Vec<Vec<u8>>>),
    /// Block hashes the caller computed (or got from `hash`).
    Hashes(Vec<BlockHash>),
}

/// The answer to a lookup.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LookupResult {
    /// Leading blocks present.
    pub hit_blocks: usize,
    /// `hit_blocks × block_size`.
    pub hit_tokens: usize,
    /// The hashes of the request.
    pub block_hashes: Vec<BlockHash>,
    /// False when the backend did not answer in time: the answer is then a miss.
    pub backend_ok: bool,
}

/// One item of a fetch stream: the frames of `crate::frame`, which both transports carry.
pub use crate::frame::Frame as FetchItem;

/// The items of one fetch, in order, ending with [`FetchItem::End`]. The request keeps its
/// concurrency slot until this is dropped (the response has been sent, or the client left).
#[derive(Debug)]
pub struct FetchStream {
    rx: mpsc::Receiver<FetchItem>,
    _admission: Admission,
}

impl FetchStream {
    /// The next item; `None` after the end item.
    pub async fn recv(&mut self) -> Option<FetchItem> {
        self.rx.recv().await
    }
}

impl futures_util::Stream for FetchStream {
    type Item = FetchItem;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<FetchItem>> {
        self.rx.poll_recv(cx)
    }
}

/// A snapshot of the sidecar's state.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Stats {
    /// `redis` or `memory`.
    pub backend: &'static str,
    /// Whether the backend answered a ping just now.
    pub backend_ready: bool,
    /// Bytes in L1.
    pub l1_bytes: u64,
    /// L1's bound.
    pub l1_capacity_bytes: u64,
    /// Entries in L1.
    pub l1_entries: u64,
    /// Bytes of asynchronous puts accepted and not yet written: waiting in the queue or
    /// being written. 0 means every queued put has been written (or dropped and counted).
    pub put_queue_bytes: u64,
    /// The queue's bound.
    pub put_queue_capacity_bytes: u64,
    /// The configured namespaces.
    pub namespaces: Vec<NamespaceInfo>,
}

/// A namespace as clients need to know it: with `docs/hashing.md`, enough to compute its
/// block hashes (for a caller without a tenant salt).
#[derive(Clone, Debug, serde::Serialize)]
pub struct NamespaceInfo {
    /// Label.
    pub label: String,
    /// Model id.
    pub model_id: String,
    /// Model revision.
    pub model_revision: String,
    /// KV dtype (its canonical name is the one hashed).
    pub kv_dtype: Dtype,
    /// Tokens per block.
    pub block_size: u32,
    /// Payload bytes of one block.
    pub block_bytes: u64,
    /// Shape of one block, axes in `layout_order`.
    pub block_shape: Vec<u64>,
    /// Axis order.
    pub layout_order: String,
    /// Transformer layers.
    pub num_layers: u32,
    /// KV heads of the whole model, before tensor-parallel sharding.
    pub num_kv_heads: u32,
    /// Dimension of one attention head.
    pub head_dim: u32,
    /// Tensor-parallel world size.
    pub tp_size: u32,
    /// Tensor-parallel rank whose shard this namespace stores.
    pub tp_rank: u32,
    /// LoRA adapter; `None` (JSON `null`) for the base model.
    pub lora_adapter: Option<String>,
}

impl NamespaceInfo {
    fn of(ns: &Namespace) -> NamespaceInfo {
        NamespaceInfo {
            label: ns.label.clone(),
            model_id: ns.model_id.clone(),
            model_revision: ns.model_revision.clone(),
            kv_dtype: ns.kv_dtype,
            block_size: ns.block_size,
            block_bytes: ns.block_bytes(),
            block_shape: ns.block_shape(),
            layout_order: ns.layout.order.clone(),
            num_layers: ns.layout.num_layers,
            num_kv_heads: ns.layout.num_kv_heads,
            head_dim: ns.layout.head_dim,
            tp_size: ns.layout.tp_size,
            tp_rank: ns.layout.tp_rank,
            lora_adapter: ns.lora_adapter.clone(),
        }
    }
}

struct QueuedPut {
    ns: Namespace,
    blocks: Vec<(BlockHash, Bytes)>,
    _budget: OwnedSemaphorePermit,
}

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
    /// Whether L1 follows Redis's invalidations right now (`None`: it does not try to).
    l1_tracking: Option<Arc<AtomicBool>>,
}

/// How this sidecar's L1 stays true to Redis (see [`Shelf::l1_coherence`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum L1Coherence {
    /// No L1 (turned off, or the embedded store).
    NoL1,
    /// L1 follows Redis's invalidations: a block deleted, expired or evicted by anyone
    /// leaves L1 as soon as Redis reports it.
    Tracking,
    /// The invalidation stream is not (yet, or no longer) up: L1 was flushed when it was
    /// lost, and entries live at most `l1_max_ttl` until it is back.
    Reconnecting,
    /// No invalidations on this topology (Redis Cluster, for now): entries live at most
    /// `l1_max_ttl`.
    TtlOnly,
}

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
            .map(|t| {
                let tenant = Tenant {
                    name: t.name.clone(),
                    salt: t.salt.as_ref().map(|s| s.as_bytes().to_vec()),
                    admin: t.admin,
                };
                (t.token.clone(), Arc::new(tenant))
            })
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
        let mut l1_tracking = None;
        if let (Backend::Redis(store), Some(l1)) = (&backend, &l1) {
            let live = Arc::new(AtomicBool::new(false));
            l1_tracking = Some(live.clone());
            tokio::spawn(l1_follower(
                store.clone(),
                Arc::downgrade(l1),
                live,
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
                l1_tracking,
            }),
        };
        let worker = tokio::spawn(put_queue_worker(shelf.clone(), rx));
        *shelf.inner.queue_done.try_lock().expect("fresh mutex") = Some(worker);
        Ok(shelf)
    }

    /// How L1 stays true to Redis right now.
    pub fn l1_coherence(&self) -> L1Coherence {
        match (&self.inner.l1, &self.inner.l1_tracking) {
            (None, _) => L1Coherence::NoL1,
            (Some(_), None) => L1Coherence::TtlOnly,
            (Some(_), Some(live)) if live.load(Ordering::Acquire) => L1Coherence::Tracking,
            (Some(_), Some(_)) => L1Coherence::Reconnecting,
        }
    }

    /// The settings this core runs with.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.cfg
    }

    /// `redis` or `memory`.
    pub fn backend_kind(&self) -> &'static str {
        self.inner.backend.kind()
    }

    /// The caller a bearer token stands for. Without configured tokens everyone is the
    /// anonymous caller (no salt); with tokens, a missing or unknown one is refused.
    pub fn authenticate(&self, bearer: Option<&str>) -> Result<Caller, ApiError> {
        if self.inner.tenants.is_empty() {
            return Ok(Caller::default());
        }
        let token = bearer.ok_or(ApiError::Unauthenticated)?;
        // Compare against every token, so response time does not depend on which matched.
        let mut found = None;
        for (t, tenant) in &self.inner.tenants {
            if secrets_equal(t.as_bytes(), token.as_bytes()) {
                found = Some(tenant.clone());
            }
        }
        found
            .map(|tenant| Caller {
                tenant: Some(tenant),
            })
            .ok_or(ApiError::Unauthenticated)
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

    /// A configured namespace.
    pub fn namespace(&self, label: &str) -> Result<&Namespace, ApiError> {
        crate::namespace::validate_label(label)?;
        self.inner
            .namespaces
            .get(label)
            .ok_or_else(|| ApiError::UnknownNamespace(label.to_owned()))
    }

    /// Every configured namespace, sorted by label.
    pub fn namespaces(&self) -> Vec<NamespaceInfo> {
        let mut v: Vec<_> = self
            .inner
            .namespaces
            .values()
            .map(NamespaceInfo::of)
            .collect();
        v.sort_by(|a, b| a.label.cmp(&b.label));
        v
    }

    fn check_count(&self, count: usize) -> Result<(), ApiError> {
        let limit = self.inner.cfg.max_blocks_per_request;
        if count > limit {
            return Err(ApiError::TooManyBlocks { count, limit });
        }
        Ok(())
    }

    /// Hashes of every full block of `tokens`, with the caller's salt.
    pub fn hash(
        &self,
        caller: &Caller,
        label: &str,
        tokens: &[u32],
        extras: &[Vec<Vec<u8>>],
    ) -> Result<Vec<BlockHash>, ApiError> {
        let ns = self.namespace(label)?;
        self.check_count(tokens.len() / ns.block_size as usize)?;
        let hasher = PrefixHasher::new(ns, caller.salt());
        Ok(hasher.hash_prefix_with_extras(tokens, extras)?)
    }

    /// How many leading blocks are on the shelf: leading L1 entries, then ONE backend
    /// round trip for the rest. With `warm`, the hit blocks are read into L1 before the
    /// answer, so a fetch right after is served locally.
    pub async fn lookup(
        &self,
        _admission: Admission,
        caller: &Caller,
        label: &str,
        input: LookupInput,
        warm: bool,
    ) -> Result<LookupResult, ApiError> {
        let started = Instant::now();
        let ns = self.namespace(label)?.clone();
        let hashes = match input {
            LookupInput::Tokens(tokens, extras) => self.hash(caller, label, &tokens, &extras)?,
            LookupInput::Hashes(h) => {
                self.check_count(h.len())?;
                h
            }
        };
        let in_l1 = match &self.inner.l1 {
            Some(l1) => hashes.iter().take_while(|h| l1.contains(label, h)).count(),
            None => 0,
        };
        let rest = &hashes[in_l1..];
        let (found, backend_ok) = if rest.is_empty() {
            (0, true)
        } else {
            match self
                .fail_open(
                    "lookup",
                    self.inner.cfg.lookup_timeout,
                    self.inner.backend.lookup(&ns, rest),
                )
                .await?
            {
                Some(n) => (n, true),
                None => (0, false),
            }
        };
        let hit_blocks = in_l1 + found;
        if warm && hit_blocks > in_l1 && self.inner.l1.is_some() {
            let (tx, mut rx) = mpsc::channel(64);
            let warmer = self.clone();
            let to_warm = hashes[in_l1..hit_blocks].to_vec();
            let ns2 = ns.clone();
            tokio::spawn(async move { warmer.stream_blocks(ns2, to_warm, tx).await });
            while rx.recv().await.is_some() {}
        }
        metrics::counter!("kvshelf_lookup_blocks_total", "namespace" => ns.label.clone(), "result" => "hit")
            .increment(hit_blocks as u64);
        metrics::counter!("kvshelf_lookup_blocks_total", "namespace" => ns.label.clone(), "result" => "miss")
            .increment((hashes.len() - hit_blocks) as u64);
        metrics::histogram!("kvshelf_request_duration_seconds", "op" => "lookup")
            .record(started.elapsed().as_secs_f64());
        Ok(LookupResult {
            hit_blocks,
            hit_tokens: hit_blocks * ns.block_size as usize,
            block_hashes: hashes,
            backend_ok,
        })
    }

    /// Streams the leading run of `hashes` that can be served, then an end item. Errors
    /// (unknown namespace, too many blocks, overload) come before any item; after that the
    /// stream fails open. Memory is bounded: the stream reads one chunk of about
    /// `fetch_chunk_bytes` at a time and waits for the consumer.
    pub async fn fetch(
        &self,
        admission: Admission,
        _caller: &Caller,
        label: &str,
        hashes: Vec<BlockHash>,
    ) -> Result<FetchStream, ApiError> {
        let ns = self.namespace(label)?.clone();
        self.check_count(hashes.len())?;
        // The request is parsed: while its stream is sent it holds its slot, not its body's
        // room (the stream's own memory is the fetch budget's).
        admission.release_body();
        let chunk = self.chunk_blocks(&ns);
        let (tx, rx) = mpsc::channel(chunk);
        let me = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            me.stream_blocks(ns, hashes, tx).await;
            metrics::histogram!("kvshelf_request_duration_seconds", "op" => "fetch")
                .record(started.elapsed().as_secs_f64());
        });
        Ok(FetchStream {
            rx,
            _admission: admission,
        })
    }

    /// One block, or `NotFound`.
    pub async fn get_one(
        &self,
        admission: Admission,
        caller: &Caller,
        label: &str,
        hash: BlockHash,
    ) -> Result<Bytes, ApiError> {
        let mut rx = self.fetch(admission, caller, label, vec![hash]).await?;
        match rx.recv().await {
            Some(FetchItem::Block { payload, .. }) => Ok(payload),
            _ => Err(ApiError::NotFound),
        }
    }

    fn chunk_blocks(&self, ns: &Namespace) -> usize {
        (self.inner.cfg.fetch_chunk_bytes / ns.block_bytes().max(1)).clamp(1, 1024) as usize
    }

    async fn stream_blocks(
        &self,
        ns: Namespace,
        hashes: Vec<BlockHash>,
        tx: mpsc::Sender<FetchItem>,
    ) {
        let mut sent = 0u32;
        let mut reason = EndReason::Complete;
        let block_bytes = ns.block_bytes();
        let fetch_timeout = self.inner.cfg.fetch_timeout;
        let label: Arc<str> = Arc::from(ns.label.as_str());
        'chunks: for chunk in hashes.chunks(self.chunk_blocks(&ns)) {
            // Room for this chunk in the fetch memory budget, before reading it. Each
            // block's share travels with its payload and is given back when the transport
            // drops the bytes (written to the client, or the client went away).
            // The wait is bounded: fetches whose readers stall hold their room, and the
            // others fail open instead of queueing behind them forever.
            let want = chunk.len() as u64 * block_bytes;
            let mut room = match tokio::time::timeout(fetch_timeout, self.fetch_room(want)).await {
                Ok(Some(room)) => room,
                Ok(None) => return,
                Err(_) => {
                    metrics::counter!("kvshelf_fetch_budget_timeouts_total").increment(1);
                    reason = EndReason::BackendUnavailable;
                    break 'chunks;
                }
            };
            let served = self.read_blocks(&ns, chunk).await;
            for (hash, served) in chunk.iter().zip(served) {
                if let (Served::Hit(_), Some(touch)) = (&served, &self.inner.touch_tx) {
                    // Full queue: this hit does not slide the TTL; a later one will.
                    let result = match touch.try_send((label.clone(), *hash)) {
                        Ok(()) => None,
                        Err(_) => Some("dropped"),
                    };
                    if let Some(result) = result {
                        metrics::counter!("kvshelf_l1_ttl_touches_total", "result" => result)
                            .increment(1);
                    }
                }
                let tier = match &served {
                    Served::Hit(_) => "l1_hit",
                    Served::Loaded(_) => "backend_hit",
                    Served::Coalesced(_) => "coalesced",
                    Served::Miss => "miss",
                    Served::Unavailable => "unavailable",
                };
                metrics::counter!("kvshelf_fetch_blocks_total", "namespace" => ns.label.clone(), "result" => tier)
                    .increment(1);
                let unavailable = served == Served::Unavailable;
                let Some(payload) = served.into_payload() else {
                    reason = if unavailable {
                        EndReason::BackendUnavailable
                    } else {
                        EndReason::Miss
                    };
                    break 'chunks;
                };
                metrics::counter!("kvshelf_fetch_bytes_total", "namespace" => ns.label.clone())
                    .increment(payload.len() as u64);
                let share = match room.num_permits() as u64 > block_bytes {
                    true => room.split(block_bytes as usize),
                    false => None,
                };
                let payload = match share {
                    Some(share) => held(payload, share),
                    None => held(payload, std::mem::replace(&mut room, self.no_room())),
                };
                let item = FetchItem::Block {
                    index: sent,
                    hash: *hash,
                    payload,
                };
                if tx.send(item).await.is_err() {
                    return; // the client went away
                }
                sent += 1;
            }
        }
        let _ = tx
            .send(FetchItem::End {
                blocks: sent,
                reason,
            })
            .await;
    }

    /// Waits for `bytes` of room in the fetch memory budget (all of it, for a chunk larger
    /// than the whole budget). `None` only if the budget was closed.
    async fn fetch_room(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let budget = &self.inner.fetch_budget;
        let want = bytes
            .min(self.inner.cfg.fetch_memory_bytes.max(1))
            .min(u32::MAX as u64) as u32;
        budget.clone().acquire_many_owned(want.max(1)).await.ok()
    }

    /// An empty permit of the fetch budget (what is left once a chunk's room is handed out).
    fn no_room(&self) -> OwnedSemaphorePermit {
        self.inner
            .fetch_budget
            .clone()
            .try_acquire_many_owned(0)
            .expect("zero permits are always available")
    }

    /// Reads one chunk through L1 (coalescing concurrent misses) or straight from the
    /// embedded store, every backend read and every wait within `fetch_timeout`.
    async fn read_blocks(&self, ns: &Namespace, hashes: &[BlockHash]) -> Vec<Served> {
        let timeout = self.inner.cfg.fetch_timeout;
        let load = |hs: Vec<BlockHash>| async move {
            metrics::counter!("kvshelf_backend_block_reads_total", "namespace" => ns.label.clone())
                .increment(hs.len() as u64);
            // `None`: the backend failed or was late (a caller error cannot happen here:
            // the namespace and hashes were checked before the stream started).
            self.fail_open("fetch", timeout, self.inner.backend.get(ns, &hs))
                .await
                .ok()
                .flatten()
        };
        match &self.inner.l1 {
            Some(l1) => l1.get_or_load(&ns.label, hashes, timeout, load).await,
            None => match load(hashes.to_vec()).await {
                Some(hits) => hits
                    .into_iter()
                    .map(|h| h.map_or(Served::Miss, |h| Served::Loaded(h.block.payload)))
                    .chain(std::iter::repeat(Served::Miss))
                    .take(hashes.len())
                    .collect(),
                None => vec![Served::Unavailable; hashes.len()],
            },
        }
    }

    /// An empty put of the namespace `label`, for a request `admission` let in: the
    /// transport adds the blocks as they arrive ([`PutBatch::push`], or [`PutBatch::feed`]
    /// for a framed body), each checked then, and hands it to [`Shelf::put`].
    pub fn put_batch(&self, admission: &Admission, label: &str) -> Result<PutBatch, ApiError> {
        let ns = self.namespace(label)?;
        admission.for_put(ns)?;
        Ok(PutBatch::new(
            admission,
            ns,
            self.inner.cfg.max_blocks_per_request,
        ))
    }

    /// Puts blocks. Synchronous: written before the answer (or dropped if the backend fails
    /// or is slower than `put_timeout`). With `asynchronous`: queued, answered at once; a
    /// full queue drops them. Invalid blocks refuse the whole request and write nothing.
    /// The request's body budget is given back once the blocks are written or queued (the
    /// queue has its own budget).
    pub async fn put(
        &self,
        _admission: Admission,
        _caller: &Caller,
        batch: PutBatch,
        asynchronous: bool,
    ) -> Result<Vec<PutResult>, ApiError> {
        let (ns, blocks) = batch.into_blocks()?;
        if asynchronous {
            return Ok(self.enqueue(ns, blocks));
        }
        Ok(self.put_now(&ns, &blocks).await)
    }

    async fn put_now(&self, ns: &Namespace, blocks: &[(BlockHash, Bytes)]) -> Vec<PutResult> {
        if blocks.is_empty() {
            return Vec::new();
        }
        let started = Instant::now();
        let outcome = self
            .fail_open(
                "put",
                self.inner.cfg.put_timeout,
                self.inner.backend.put(ns, blocks),
            )
            .await;
        let results: Vec<PutResult> = match outcome {
            Ok(Some(outcomes)) => outcomes.into_iter().map(PutResult::from).collect(),
            Ok(None) | Err(_) => vec![PutResult::Dropped; blocks.len()],
        };
        for ((hash, payload), r) in blocks.iter().zip(&results) {
            if let (PutResult::Stored, Some(l1)) = (r, &self.inner.l1) {
                // Only our own write: a block already present may hold another writer's bytes.
                l1.insert(&ns.label, hash, payload.clone(), Some(self.ttl_of(ns)));
            }
            let result = match r {
                PutResult::Stored => "stored",
                PutResult::AlreadyPresent => "already_present",
                PutResult::Queued => "queued",
                PutResult::Dropped => "dropped_backend",
            };
            metrics::counter!("kvshelf_put_blocks_total", "namespace" => ns.label.clone(), "result" => result)
                .increment(1);
        }
        metrics::histogram!("kvshelf_request_duration_seconds", "op" => "put")
            .record(started.elapsed().as_secs_f64());
        results
    }

    fn ttl_of(&self, ns: &Namespace) -> Duration {
        match &self.inner.backend {
            Backend::Redis(r) => r.ttl_of(ns),
            Backend::Memory(m) => m.default_ttl(Some(ns)),
        }
    }

    fn enqueue(&self, ns: Namespace, blocks: Vec<(BlockHash, Bytes)>) -> Vec<PutResult> {
        let bytes: usize = blocks.iter().map(|(_, p)| p.len()).sum();
        let n = blocks.len();
        let permit = u32::try_from(bytes).ok().and_then(|b| {
            self.inner
                .queue_budget
                .clone()
                .try_acquire_many_owned(b)
                .ok()
        });
        let sender = self.inner.queue_tx.lock().expect("queue lock").clone();
        let queued = match (permit, sender) {
            (Some(permit), Some(tx)) => tx
                .send(QueuedPut {
                    ns: ns.clone(),
                    blocks,
                    _budget: permit,
                })
                .is_ok(),
            _ => false,
        };
        let result = if queued {
            "queued"
        } else {
            "dropped_queue_full"
        };
        metrics::counter!("kvshelf_put_blocks_total", "namespace" => ns.label.clone(), "result" => result)
            .increment(n as u64);
        let r = if queued {
            PutResult::Queued
        } else {
            PutResult::Dropped
        };
        vec![r; n]
    }

    /// Stops taking asynchronous puts and waits (up to `grace`) for the queued ones.
    pub async fn drain(&self, grace: Duration) {
        drop(self.inner.queue_tx.lock().expect("queue lock").take());
        if let Some(worker) = self.inner.queue_done.lock().await.take()
            && tokio::time::timeout(grace, worker).await.is_err()
        {
            tracing::warn!("queued puts did not finish within the grace period; dropping them");
        }
    }

    /// The one authorization check of operator actions: without configured tokens every
    /// caller is the one trusted tenant; with tokens, only admins may change blocks they did
    /// not just put. A block hash is easy to learn (an unsalted tenant's can be computed from
    /// its prompt), so it must not be enough to delete, pin or unpin the block. Called
    /// before anything changes, the L1 included.
    fn require_admin(&self, caller: &Caller, action: &str) -> Result<(), ApiError> {
        if self.inner.tenants.is_empty() || caller.is_admin() {
            return Ok(());
        }
        tracing::info!(tenant = ?caller.tenant_name(), action, "refused: not an admin token");
        Err(ApiError::Forbidden(format!(
            "{action} needs an admin token (with tokens configured, only admins may delete, \
             pin, unpin or purge)"
        )))
    }

    /// The pinned-bytes cap of `ns`.
    fn max_pinned_bytes(&self, ns: &Namespace) -> u64 {
        ns.max_pinned_bytes
            .unwrap_or(self.inner.cfg.max_pinned_bytes)
    }

    /// Deletes blocks (and this sidecar's L1 copies). Returns how many existed. Needs an
    /// admin token when tokens are configured.
    pub async fn delete(
        &self,
        _admission: Admission,
        caller: &Caller,
        label: &str,
        hashes: &[BlockHash],
    ) -> Result<u64, ApiError> {
        self.require_admin(caller, "deleting blocks")?;
        self.namespace(label)?;
        self.check_count(hashes.len())?;
        if let Some(l1) = &self.inner.l1 {
            hashes.iter().for_each(|h| l1.remove(label, h));
        }
        self.bounded(self.inner.backend.delete(label, hashes)).await
    }

    /// Pins (`true`) or unpins a block. Returns whether it exists. Needs an admin token
    /// when tokens are configured; a pin that would take the namespace over its
    /// `max_pinned_bytes` is refused (`pin_limit`) and changes nothing.
    pub async fn pin(
        &self,
        _admission: Admission,
        caller: &Caller,
        label: &str,
        hash: &BlockHash,
        pin: bool,
    ) -> Result<bool, ApiError> {
        self.require_admin(caller, if pin { "pinning" } else { "unpinning" })?;
        let ns = self.namespace(label)?;
        let found = if pin {
            let limit = self.max_pinned_bytes(ns);
            let outcome = self
                .bounded(self.inner.backend.pin(ns, hash, limit))
                .await?;
            match outcome {
                PinOutcome::Pinned { pinned_bytes } => {
                    metrics::gauge!("kvshelf_pinned_bytes", "namespace" => ns.label.clone())
                        .set(pinned_bytes as f64);
                    true
                }
                PinOutcome::Missing => false,
                PinOutcome::OverLimit { pinned_bytes } => {
                    metrics::gauge!("kvshelf_pinned_bytes", "namespace" => ns.label.clone())
                        .set(pinned_bytes as f64);
                    metrics::counter!("kvshelf_pins_refused_total", "namespace" => ns.label.clone())
                        .increment(1);
                    return Err(ApiError::PinLimit {
                        namespace: ns.label.clone(),
                        pinned_bytes,
                        block_bytes: ns.block_bytes(),
                        limit,
                    });
                }
            }
        } else {
            self.bounded(self.inner.backend.unpin(ns, hash)).await?
        };
        if let Some(l1) = &self.inner.l1 {
            l1.remove(label, hash);
        }
        Ok(found)
    }

    /// Time to live left of a block: `None` missing, `Some(None)` pinned.
    pub async fn ttl(
        &self,
        label: &str,
        hash: &BlockHash,
    ) -> Result<Option<Option<Duration>>, ApiError> {
        self.namespace(label)?;
        self.bounded(self.inner.backend.ttl(label, hash)).await
    }

    /// Deletes every block of a namespace. Needs an admin token when tokens are configured.
    /// Every node works under `operator_timeout`; the report lists the cluster nodes that
    /// failed or did not finish in time. An error only when no node could delete anything.
    pub async fn purge(
        &self,
        _admission: Admission,
        caller: &Caller,
        label: &str,
    ) -> Result<PurgeReport, ApiError> {
        self.require_admin(caller, "purging a namespace")?;
        self.namespace(label)?;
        if let Some(l1) = &self.inner.l1 {
            l1.remove_namespace(label);
        }
        let report = self
            .inner
            .backend
            .purge_within(label, self.inner.cfg.operator_timeout)
            .await
            .map_err(|e| match e {
                Error::Deadline(_) => self.operator_timed_out(),
                e => e.into(),
            })?;
        tracing::info!(namespace = label, deleted = report.deleted, skipped = ?report.skipped,
            tenant = ?caller.tenant_name(), "namespace purged");
        Ok(report)
    }

    /// Sets `kvshelf_pinned_bytes{namespace}` for every namespace from the backend's
    /// records, which every sidecar shares: called at each scrape, so each sidecar reports
    /// the pins all of them made. Bounded by `lookup_timeout`; on a failure the gauges keep
    /// their last values.
    pub async fn refresh_pinned_gauges(&self) {
        let reads = self.inner.namespaces.values().map(|ns| async move {
            let read = self.inner.backend.pinned_bytes(ns);
            match tokio::time::timeout(self.inner.cfg.lookup_timeout, read).await {
                Ok(Ok(bytes)) => {
                    metrics::gauge!("kvshelf_pinned_bytes", "namespace" => ns.label.clone())
                        .set(bytes as f64);
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "cannot read pinned bytes"),
                Err(_) => tracing::debug!("pinned bytes: no answer in time"),
            }
        });
        futures_util::future::join_all(reads).await;
    }

    /// An operator action (delete, pin, unpin, ttl) under `operator_timeout`: these report
    /// the backend's failure instead of failing open, within a deadline of their own rather
    /// than the Redis client's retries.
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, ApiError> {
        match tokio::time::timeout(self.inner.cfg.operator_timeout, call).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(self.operator_timed_out()),
        }
    }

    fn operator_timed_out(&self) -> ApiError {
        ApiError::BackendUnavailable(format!(
            "did not finish within operator_timeout ({:?})",
            self.inner.cfg.operator_timeout
        ))
    }

    /// Whether the backend answers within the lookup timeout.
    pub async fn ready(&self) -> bool {
        let ok = matches!(
            tokio::time::timeout(self.inner.cfg.lookup_timeout, self.inner.backend.ping()).await,
            Ok(Ok(()))
        );
        metrics::gauge!("kvshelf_backend_up").set(if ok { 1.0 } else { 0.0 });
        ok
    }

    /// A snapshot of this sidecar's state.
    pub async fn stats(&self) -> Stats {
        let (l1_bytes, l1_capacity_bytes, l1_entries) =
            self.inner.l1.as_ref().map_or((0, 0, 0), |l1| l1.usage());
        let capacity = self
            .inner
            .cfg
            .put_queue_bytes
            .min(Semaphore::MAX_PERMITS as u64);
        Stats {
            backend: self.inner.backend.kind(),
            backend_ready: self.ready().await,
            l1_bytes,
            l1_capacity_bytes,
            l1_entries,
            put_queue_bytes: capacity - self.inner.queue_budget.available_permits() as u64,
            put_queue_capacity_bytes: capacity,
            namespaces: self.namespaces(),
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

/// Keeps L1 coherent with Redis (standalone, Sentinel or Cluster): a tracking connection
/// per primary ([`RedisStore::track`], BCAST on the block key prefix) reports every block
/// key that is overwritten, deleted, expired or evicted, by any client, and its L1 entry is
/// dropped. When tracking starts (again), and when a connection is lost or the primaries
/// change (failover, resharding), L1 is flushed, as Redis's client-side caching guidance
/// requires: what changed meanwhile was not reported. Reconnects with a backoff of 100 ms
/// to 5 s.
///
/// Not covered: a read that was in flight when its key was invalidated can still put the
/// old value into L1 afterwards (`l1_max_ttl` bounds it).
async fn l1_follower(
    store: RedisStore,
    l1: std::sync::Weak<L1>,
    live: Arc<AtomicBool>,
    mut stopped: tokio::sync::watch::Receiver<()>,
) {
    let flush = |reason: &'static str| {
        if let Some(l1) = l1.upgrade() {
            l1.clear();
            metrics::counter!("kvshelf_l1_flushes_total", "reason" => reason).increment(1);
        }
    };
    let mut backoff = Duration::from_millis(100);
    let mut warned = false;
    loop {
        let (tx, mut pushes) = mpsc::unbounded_channel();
        let tracked = tokio::select! {
            t = store.track(tx) => t,
            _ = stopped.changed() => return,
        };
        match tracked {
            Ok(mut tracker) => {
                backoff = Duration::from_millis(100);
                warned = false;
                flush("tracking_started");
                live.store(true, Ordering::Release);
                metrics::gauge!("kvshelf_l1_tracking").set(1.0);
                let mut batch = Vec::new();
                let why = loop {
                    let received = tokio::select! {
                        n = pushes.recv_many(&mut batch, 256) => n,
                        why = tracker.lost() => break why,
                        _ = stopped.changed() => return,
                    };
                    if received == 0 {
                        break "the invalidation channel closed".to_owned();
                    }
                    let mut keys: HashMap<String, Vec<BlockHash>> = HashMap::new();
                    for event in batch.drain(..) {
                        match event {
                            Invalidation::Keys(named) => {
                                for key in named {
                                    if let Some((label, hash)) = crate::store::parse_block_key(&key)
                                    {
                                        keys.entry(label.to_owned()).or_default().push(hash);
                                    }
                                }
                            }
                            Invalidation::All => flush("flushed_in_redis"),
                        }
                    }
                    drop_gone(&store, &l1, keys).await;
                };
                drop(tracker);
                live.store(false, Ordering::Release);
                metrics::gauge!("kvshelf_l1_tracking").set(0.0);
                flush("tracking_lost");
                tracing::warn!(reason = %why, "L1 invalidation stream lost: L1 flushed; reconnecting");
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "cannot track invalidations; retrying (L1 entries live at most l1_max_ttl meanwhile)");
                    warned = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopped.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Drops the L1 entries of invalidated blocks that are gone from Redis.
///
/// Why check instead of dropping every invalidated key: Redis reports a key whenever it is
/// modified, and a TTL change is a modification, so every read that slides a TTL (ours,
/// or another sidecar's) invalidates the key everywhere. Blocks are write-once, so the
/// only change that matters is that a block is gone (deleted, expired, evicted, purged);
/// one `EXISTS` pipeline per namespace tells which. A block deleted and put again in
/// between keeps its entry: it holds a valid block of the same prefix. When the check
/// fails, every invalidated entry is dropped.
async fn drop_gone(
    store: &RedisStore,
    l1: &std::sync::Weak<L1>,
    keys: HashMap<String, Vec<BlockHash>>,
) {
    for (label, hashes) in keys {
        let exists =
            tokio::time::timeout(Duration::from_secs(1), store.exists(&label, &hashes)).await;
        let Some(l1) = l1.upgrade() else { return };
        let gone: Vec<&BlockHash> = match exists {
            Ok(Ok(present)) => hashes
                .iter()
                .zip(present)
                .filter(|(_, present)| !present)
                .map(|(h, _)| h)
                .collect(),
            _ => hashes.iter().collect(),
        };
        for hash in gone {
            l1.remove(&label, hash);
            metrics::counter!("kvshelf_l1_invalidations_total").increment(1);
        }
    }
}

/// Room for L1 hits waiting to slide their TTL; a hit that finds it full is counted
/// (`dropped`) and the next hit of that block slides it.
const TOUCH_QUEUE: usize = 4096;

/// Slides the Redis TTL of blocks served from L1, as a Redis read would (`PEXPIRE … XX`:
/// pinned blocks stay pinned, deleted ones are not recreated). Takes whatever hits are
/// queued, skips blocks it touched less than `interval` ago, and sends one pipeline per
/// namespace, each within `timeout`. Ends when the shelf is dropped.
async fn l1_toucher(
    store: RedisStore,
    namespaces: HashMap<String, Namespace>,
    interval: Duration,
    timeout: Duration,
    mut rx: mpsc::Receiver<(Arc<str>, BlockHash)>,
) {
    let mut last: HashMap<(Arc<str>, BlockHash), Instant> = HashMap::new();
    let mut pruned = Instant::now();
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, TOUCH_QUEUE).await > 0 {
        let now = Instant::now();
        let mut due: HashMap<Arc<str>, Vec<BlockHash>> = HashMap::new();
        for (label, hash) in batch.drain(..) {
            let key = (label, hash);
            if last
                .get(&key)
                .is_some_and(|t| now.duration_since(*t) < interval)
            {
                continue;
            }
            due.entry(key.0.clone()).or_default().push(hash);
            last.insert(key, now);
        }
        for (label, hashes) in due {
            let Some(ns) = namespaces.get(&*label) else {
                continue;
            };
            let result = match tokio::time::timeout(timeout, store.touch(ns, &hashes)).await {
                Ok(Ok(_)) => "sent",
                Ok(Err(_)) => "failed",
                Err(_) => "timeout",
            };
            metrics::counter!("kvshelf_l1_ttl_touches_total", "result" => result)
                .increment(hashes.len() as u64);
        }
        if now.duration_since(pruned) >= interval {
            last.retain(|_, t| now.duration_since(*t) < interval);
            pruned = now;
        }
    }
}

async fn put_queue_worker(shelf: Shelf, mut rx: mpsc::UnboundedReceiver<QueuedPut>) {
    // A few puts in flight at once keep Redis busy without letting the queue's memory
    // (bounded by its byte budget) turn into unbounded concurrency.
    let in_flight = Arc::new(Semaphore::new(4));
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(job) = rx.recv().await {
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let shelf = shelf.clone();
        // The job's share of the queue budget moves into the task by name: an async block
        // that uses only `job.ns` and `job.blocks` captures only those fields (edition 2021
        // capture rules), so `_budget` was dropped here and the bytes stopped counting in
        // `put_queue_bytes` while they were still being written.
        let QueuedPut {
            ns,
            blocks,
            _budget: budget,
        } = job;
        tasks.spawn(async move {
            shelf.put_now(&ns, &blocks).await;
            drop((permit, budget));
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// Whether two secrets are equal, in a time that depends on neither's content nor length.
/// Both are hashed first, so the compared inputs always have the same length and nothing a
/// caller sends lines up byte by byte with a configured token; `subtle` then compares the
/// digests in a way the optimizer cannot turn into an early exit (a hand-written XOR-fold
/// can be).
fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    Sha256::digest(a)[..].ct_eq(&Sha256::digest(b)[..]).into()
}

/// A payload that keeps its share of the fetch memory budget until it is dropped.
struct Held {
    payload: Bytes,
    _room: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.payload
    }
}

/// `payload` as `Bytes` (no copy) that return `room` to the budget when the last clone drops.
fn held(payload: Bytes, room: OwnedSemaphorePermit) -> Bytes {
    Bytes::from_owner(Held {
        payload,
        _room: room,
    })
}
