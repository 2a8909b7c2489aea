//! How this sidecar's L1 stays true to Redis: `l1_follower` drops the entries of blocks
//! Redis reports gone (`CLIENT TRACKING`), `l1_toucher` slides the Redis TTL of blocks
//! served from L1 as a Redis read would.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::Shelf;
use crate::hashing::BlockHash;
use crate::l1::L1;
use crate::namespace::Namespace;
use crate::store::{Coverage, FELL_BEHIND, Invalidation, RedisStore};

/// How this sidecar's L1 stays true to Redis (see [`Shelf::l1_coherence`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum L1Coherence {
    /// No L1 (turned off, or the embedded store).
    NoL1,
    /// L1 follows Redis's invalidations: a block deleted, expired or evicted by anyone
    /// leaves L1 as soon as Redis reports it.
    Tracking,
    /// No invalidation stream is up (not yet, or no longer): L1 serves nothing and reads
    /// go to Redis until one is back (L1 dropped what it held when the stream was lost).
    Reconnecting,
    /// Some primaries' streams are up, others not (a Redis Cluster primary that is down):
    /// L1 serves the blocks of the tracked primaries' slots only.
    Partial,
    /// No invalidation stream: the embedded in-process store (nothing else writes to it).
    /// Kept for API stability; a Redis store of any topology is `Tracking` or
    /// `Reconnecting`.
    TtlOnly,
}

impl Shelf {
    /// How L1 stays true to Redis right now.
    pub fn l1_coherence(&self) -> L1Coherence {
        match (&self.inner.l1, &self.inner.l1_coverage) {
            (None, _) => L1Coherence::NoL1,
            (Some(_), None) => L1Coherence::TtlOnly,
            (Some(_), Some(coverage)) => match coverage.primaries() {
                (0, _) => L1Coherence::Reconnecting,
                (covered, known) if covered >= known => L1Coherence::Tracking,
                _ => L1Coherence::Partial,
            },
        }
    }

    /// Whether L1 may serve (and keep) this block: its primary's invalidation stream is
    /// up. Always, without a Redis store.
    pub(super) fn l1_covers(&self, label: &str, hash: &BlockHash) -> bool {
        self.inner
            .l1_coverage
            .as_ref()
            .is_none_or(|c| c.covers(&crate::store::block_key(label, hash)))
    }
}

/// Invalidation messages (each naming one or more keys) queued for the follower. A follower
/// this far behind (its `EXISTS` checks stalled) ends the streams that cannot deliver and
/// drops what L1 holds of their primaries' keys, counted as
/// `kvshelf_l1_flushes_total{reason="invalidations_overflowed"}`: memory stays bounded and
/// no report is lost silently.
pub(super) const INVALIDATION_QUEUE: usize = 1024;

/// Keeps L1 coherent with Redis (standalone, Sentinel or Cluster): a tracking connection
/// per primary ([`RedisStore::track`], BCAST on the block key prefix) reports every block
/// key that is overwritten, deleted, expired or evicted, by any client, and its L1 entry is
/// dropped. Each primary's stream comes and goes on its own (reconnecting 100 ms to 5 s
/// apart): L1 serves only blocks whose primary's stream is up ([`Shelf::l1_covers`]), and
/// drops what it holds of a primary's keys when that stream is lost and again when it is
/// back, as Redis's client-side caching guidance requires: what changed meanwhile was not
/// reported. One dead Cluster primary costs L1 only that primary's slots.
///
/// Not covered: a read that was in flight when its key was invalidated can still put the
/// old value into L1 afterwards (`l1_max_ttl` bounds it).
pub(super) async fn l1_follower(
    store: RedisStore,
    l1: std::sync::Weak<L1>,
    coverage: Arc<Coverage>,
    mut stopped: tokio::sync::watch::Receiver<()>,
) {
    let count_flush = |reason: &'static str| {
        metrics::counter!("kvshelf_l1_flushes_total", "reason" => reason).increment(1);
    };
    let (tx, mut pushes) = mpsc::channel(INVALIDATION_QUEUE);
    let _tracker = store.track(tx, coverage.clone());
    metrics::gauge!("kvshelf_l1_tracking").set(0.0);
    let mut batch = Vec::new();
    loop {
        let received = tokio::select! {
            n = pushes.recv_many(&mut batch, 256) => n,
            _ = stopped.changed() => return,
        };
        if received == 0 {
            return;
        }
        let Some(cache) = l1.upgrade() else { return };
        let mut keys: HashMap<String, Vec<BlockHash>> = HashMap::new();
        for event in batch.drain(..) {
            match event {
                Invalidation::Keys(named) => {
                    for key in named {
                        if let Some((label, hash)) = crate::store::parse_block_key(&key) {
                            keys.entry(label.to_owned()).or_default().push(hash);
                        }
                    }
                }
                Invalidation::All => {
                    cache.clear();
                    count_flush("flushed_in_redis");
                }
                Invalidation::Tracking(node) => {
                    // Nothing of this primary's keys was reported before now.
                    cache.retain(|label, hash| {
                        !coverage.owned_by(&crate::store::block_key(label, hash), &node)
                    });
                    coverage.cover(&node);
                    count_flush("tracking_started");
                    tracing::info!(primary = %node, "L1 follows this primary's invalidations");
                }
                Invalidation::Lost { node, why } => {
                    cache.retain(|label, hash| {
                        coverage.covers(&crate::store::block_key(label, hash))
                    });
                    count_flush(if why == FELL_BEHIND {
                        "invalidations_overflowed"
                    } else {
                        "tracking_lost"
                    });
                    tracing::warn!(primary = %node, reason = %why, "L1 invalidation stream lost: L1 dropped this primary's blocks; reconnecting");
                }
            }
        }
        drop(cache);
        let (covered, known) = coverage.primaries();
        metrics::gauge!("kvshelf_l1_tracking").set(if covered > 0 && covered >= known {
            1.0
        } else {
            0.0
        });
        drop_gone(&store, &l1, keys).await;
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
    for (label, mut hashes) in keys {
        // Only what this L1 holds: with BCAST every block put anywhere is reported, and
        // asking Redis about each would cost it an EXISTS per change per sidecar
        // (BENCHMARKS.md, "Invalidation traffic").
        {
            let Some(l1) = l1.upgrade() else { return };
            hashes.retain(|h| l1.contains(&label, h));
        }
        if hashes.is_empty() {
            continue;
        }
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
pub(super) const TOUCH_QUEUE: usize = 4096;

/// Slides the Redis TTL of blocks served from L1, as a Redis read would (`PEXPIRE … XX`:
/// pinned blocks stay pinned, deleted ones are not recreated). Takes whatever hits are
/// queued, skips blocks it touched less than `interval` ago, and sends one pipeline per
/// namespace, each within `timeout`. Ends when the shelf is dropped.
pub(super) async fn l1_toucher(
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
