//! Operator actions: delete, pin, unpin, ttl and purge. Unlike the data path they do not
//! fail open: each reports the backend's failure, within `operator_timeout`, and those that
//! change blocks need an admin token when tenants are configured.

use std::time::Duration;

use super::{Admission, ApiError, Caller, PurgeReport, Shelf};
use crate::error::Error;
use crate::hashing::BlockHash;
use crate::namespace::Namespace;
use crate::store::PinOutcome;

impl Shelf {
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
}
