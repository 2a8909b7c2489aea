//! What the sidecar reports about itself: its namespaces, a stats snapshot, whether the
//! backend is ready, and the pinned-bytes gauges refreshed at each scrape.

use tokio::sync::Semaphore;

use super::Shelf;
use crate::namespace::{Dtype, Namespace};

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

impl Shelf {
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
}
