//! The write path: synchronous puts, written before the answer, and the asynchronous put
//! queue, bounded by its byte budget (`put_queue_bytes`) and drained on shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::{Admission, ApiError, Caller, PutBatch, PutResult, Shelf};
use crate::backend::Backend;
use crate::hashing::BlockHash;
use crate::namespace::Namespace;

/// An asynchronous put waiting in the queue, holding its bytes' share of the queue budget.
pub(super) struct QueuedPut {
    ns: Namespace,
    blocks: Vec<(BlockHash, Bytes)>,
    _budget: OwnedSemaphorePermit,
}

impl Shelf {
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
            Ok(Some(outcomes)) => outcomes,
            Ok(None) | Err(_) => vec![PutResult::Dropped; blocks.len()],
        };
        for ((hash, payload), r) in blocks.iter().zip(&results) {
            if let (PutResult::Stored, Some(l1)) = (r, &self.inner.l1)
                && self.l1_covers(&ns.label, hash)
            {
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
}

pub(super) async fn put_queue_worker(shelf: Shelf, mut rx: mpsc::UnboundedReceiver<QueuedPut>) {
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
