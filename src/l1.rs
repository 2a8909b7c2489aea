//! The L1 tier: a byte-bounded in-process cache of verified block payloads in front of the
//! backend, with single-flight loading.
//!
//! Built on quick_cache, which keeps a strict byte bound (moka's weighted eviction can
//! overshoot) and lets one caller hold a placeholder while others wait for its value: N
//! concurrent fetches of one cold block make one backend read.
//!
//! An entry never outlives the block's TTL in the backend: it expires at the earlier of
//! `max_ttl` and the TTL the backend reported when the block was read. Hits in L1 do not
//! slide the backend's TTL; `max_ttl` is short (default 30 s) so that the next backend read,
//! which does, comes soon enough. Deletes, pins and purges through this sidecar drop the
//! affected entries; other sidecars' L1 may serve a deleted block until `max_ttl` passes.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quick_cache::sync::{Cache, GuardResult};
use quick_cache::{DefaultHashBuilder, Lifecycle, Weighter};

use crate::error::Error;
use crate::hashing::BlockHash;
use crate::store::Hit;

type Key = (Arc<str>, BlockHash);

#[derive(Clone)]
struct Entry {
    payload: Bytes,
    expires_at: Instant,
}

#[derive(Clone)]
struct Weigher;

impl Weighter<Key, Entry> for Weigher {
    fn weight(&self, key: &Key, val: &Entry) -> u64 {
        (val.payload.len() + key.0.len() + 96) as u64
    }
}

#[derive(Clone, Default)]
struct CountEvictions;

impl Lifecycle<Key, Entry> for CountEvictions {
    type RequestState = ();

    fn on_evict(&self, _: &mut (), _: Key, _: Entry) {
        metrics::counter!("kvshelf_l1_evictions_total").increment(1);
    }
}

/// How one block of a batch was served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Served {
    /// From L1.
    Hit(Bytes),
    /// Read from the backend by this call.
    Loaded(Bytes),
    /// Read from the backend by a concurrent call that this one waited for.
    Coalesced(Bytes),
    /// Not in the backend (or the backend failed).
    Miss,
}

impl Served {
    /// The payload, if any.
    pub fn into_payload(self) -> Option<Bytes> {
        match self {
            Served::Hit(b) | Served::Loaded(b) | Served::Coalesced(b) => Some(b),
            Served::Miss => None,
        }
    }
}

/// The L1 cache. Share it behind an `Arc`.
pub struct L1 {
    cache: Cache<Key, Entry, Weigher, DefaultHashBuilder, CountEvictions>,
    max_ttl: Duration,
}

impl std::fmt::Debug for L1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L1")
            .field("bytes", &self.cache.weight())
            .field("capacity", &self.cache.capacity())
            .finish()
    }
}

enum Slot<'a> {
    Done(Served),
    Load(
        quick_cache::sync::PlaceholderGuard<
            'a,
            Key,
            Entry,
            Weigher,
            DefaultHashBuilder,
            CountEvictions,
        >,
    ),
    Wait,
}

impl L1 {
    /// An L1 of at most `capacity_bytes`, whose entries live at most `max_ttl`.
    pub fn new(capacity_bytes: u64, max_ttl: Duration) -> L1 {
        let estimated_items = (capacity_bytes / (128 * 1024)).clamp(16, 1 << 20) as usize;
        L1 {
            cache: Cache::with(
                estimated_items,
                capacity_bytes,
                Weigher,
                DefaultHashBuilder::default(),
                CountEvictions,
            ),
            max_ttl,
        }
    }

    /// Bytes held, the bound, and the number of entries.
    pub fn usage(&self) -> (u64, u64, u64) {
        (
            self.cache.weight(),
            self.cache.capacity(),
            self.cache.len() as u64,
        )
    }

    fn key(label: &str, hash: &BlockHash) -> Key {
        (Arc::from(label), *hash)
    }

    /// Whether a live entry is present, without counting it as a use.
    pub fn contains(&self, label: &str, hash: &BlockHash) -> bool {
        self.cache
            .peek(&Self::key(label, hash))
            .is_some_and(|e| e.expires_at > Instant::now())
    }

    /// Caches a payload the backend holds for `ttl` more (`None`: pinned).
    pub fn insert(&self, label: &str, hash: &BlockHash, payload: Bytes, ttl: Option<Duration>) {
        let ttl = ttl.map_or(self.max_ttl, |t| t.min(self.max_ttl));
        if ttl.is_zero() {
            return;
        }
        let entry = Entry {
            payload,
            expires_at: Instant::now() + ttl,
        };
        self.cache.insert(Self::key(label, hash), entry);
    }

    /// Drops one entry.
    pub fn remove(&self, label: &str, hash: &BlockHash) {
        self.cache.remove(&Self::key(label, hash));
    }

    /// Drops every entry of a namespace.
    pub fn remove_namespace(&self, label: &str) {
        self.cache.retain(|k, _| &*k.0 != label);
    }

    /// Serves `hashes` of namespace `label` from L1, loading the absent ones with ONE call
    /// of `load` (which returns one entry per hash it is given, in order). A block another
    /// caller is loading right now is not loaded again: this call waits for that value. If
    /// that load leaves nothing in L1 (a miss, a failure, or an entry evicted at once from
    /// a full L1), the waiters make one more call of `load` for such blocks.
    pub async fn get_or_load<F, Fut>(
        &self,
        label: &str,
        hashes: &[BlockHash],
        load: F,
    ) -> Vec<Served>
    where
        F: Fn(Vec<BlockHash>) -> Fut,
        Fut: Future<Output = Result<Vec<Option<Hit>>, Error>>,
    {
        let label: Arc<str> = Arc::from(label);
        let now = Instant::now();
        let mut slots: Vec<Slot<'_>> = Vec::with_capacity(hashes.len());
        for hash in hashes {
            let key = (label.clone(), *hash);
            let slot = loop {
                match self.cache.get_value_or_guard(&key, Some(Duration::ZERO)) {
                    GuardResult::Value(e) if e.expires_at > now => {
                        break Slot::Done(Served::Hit(e.payload));
                    }
                    GuardResult::Value(_) => {
                        self.cache.remove(&key);
                    }
                    GuardResult::Guard(g) => break Slot::Load(g),
                    GuardResult::Timeout => break Slot::Wait,
                }
            };
            slots.push(slot);
        }

        let to_load: Vec<BlockHash> = hashes
            .iter()
            .zip(&slots)
            .filter(|(_, s)| matches!(s, Slot::Load(_)))
            .map(|(h, _)| *h)
            .collect();
        let mut loaded = if to_load.is_empty() {
            Vec::new()
        } else {
            // A failed load is a miss for every block of it; the loader reports the failure.
            load(to_load).await.unwrap_or_default()
        }
        .into_iter();

        let mut out = Vec::with_capacity(slots.len());
        // Waiters whose loader left nothing in the cache: it found a miss, failed, or its
        // entry was evicted at once by a full L1. They load for themselves, together.
        let mut orphans = Vec::new();
        for (i, (hash, slot)) in hashes.iter().zip(slots).enumerate() {
            out.push(match slot {
                Slot::Done(s) => s,
                Slot::Load(guard) => self.fill(guard, loaded.next().flatten()),
                Slot::Wait => match self
                    .cache
                    .get_value_or_guard_async(&(label.clone(), *hash))
                    .await
                {
                    Ok(e) => Served::Coalesced(e.payload),
                    Err(guard) => {
                        orphans.push((i, *hash, guard));
                        Served::Miss
                    }
                },
            });
        }
        if !orphans.is_empty() {
            let hs = orphans.iter().map(|(_, h, _)| *h).collect();
            let mut loaded = load(hs).await.unwrap_or_default().into_iter();
            for (i, _, guard) in orphans {
                out[i] = self.fill(guard, loaded.next().flatten());
            }
        }
        out
    }

    /// Completes a load this call owns: caches a hit (waking the waiters) or drops the
    /// guard on a miss (waking them to find nothing).
    fn fill(
        &self,
        guard: quick_cache::sync::PlaceholderGuard<
            '_,
            Key,
            Entry,
            Weigher,
            DefaultHashBuilder,
            CountEvictions,
        >,
        hit: Option<Hit>,
    ) -> Served {
        match hit {
            Some(hit) => {
                let ttl = hit.ttl.map_or(self.max_ttl, |t| t.min(self.max_ttl));
                let payload = hit.block.payload;
                let _ = guard.insert(Entry {
                    payload: payload.clone(),
                    expires_at: Instant::now() + ttl,
                });
                Served::Loaded(payload)
            }
            None => Served::Miss, // dropping the guard wakes the waiters
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Block, Header};
    use crate::namespace::tests::qwen;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn hit(payload: &'static [u8], ttl: Option<Duration>) -> Hit {
        let ns = qwen();
        Hit {
            block: Block {
                header: Header::for_block(&ns, &BlockHash([0; 32]), payload),
                payload: Bytes::from_static(payload),
            },
            ttl,
        }
    }

    /// `n` concurrent fetches of one block through `l1`, whose backend holds `payload`. The
    /// first backend load is held until every fetch has reached the cache. Returns what each
    /// fetch got and how many blocks were loaded from the backend.
    async fn concurrent_fetches(
        l1: &Arc<L1>,
        n: usize,
        payload: &'static [u8],
    ) -> (Vec<Served>, usize) {
        let loads = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let h = BlockHash([1; 32]);
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (l1, loads, gate) = (l1.clone(), loads.clone(), gate.clone());
                tokio::spawn(async move {
                    l1.get_or_load("ns", &[h], |hs| {
                        let (loads, gate) = (loads.clone(), gate.clone());
                        async move {
                            if loads.fetch_add(hs.len(), Ordering::SeqCst) == 0 {
                                gate.notified().await; // the first load waits for the others
                            }
                            Ok(vec![Some(hit(payload, Some(Duration::from_secs(60))))])
                        }
                    })
                    .await
                })
            })
            .collect();
        // Let every task reach the cache, then release the first loader.
        while loads.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        let mut served = Vec::new();
        for t in tasks {
            served.push(t.await.unwrap().remove(0));
        }
        (served, loads.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn concurrent_misses_of_one_block_load_once() {
        let l1 = Arc::new(L1::new(1 << 20, Duration::from_secs(30)));
        let (served, loads) = concurrent_fetches(&l1, 8, b"kv").await;
        assert_eq!(loads, 1, "one backend read");
        let loaded = served
            .iter()
            .filter(|s| matches!(s, Served::Loaded(_)))
            .count();
        assert_eq!(loaded, 1);
        for s in served {
            assert_eq!(s.into_payload().unwrap(), Bytes::from_static(b"kv"));
        }
    }

    /// A waiter whose loader's entry did not stay in L1 (here: larger than the whole L1)
    /// loads the block itself instead of answering a miss for a block the backend has.
    #[tokio::test]
    async fn waiters_load_for_themselves_when_l1_cannot_keep_the_block() {
        static BIG: [u8; 4096] = [7; 4096];
        let l1 = Arc::new(L1::new(64, Duration::from_secs(30)));
        let (served, _) = concurrent_fetches(&l1, 4, &BIG).await;
        for s in served {
            assert_eq!(s.into_payload().expect("not a miss"), &BIG[..]);
        }
        assert!(
            !l1.contains("ns", &BlockHash([1; 32])),
            "the block is too big to keep"
        );
    }

    #[tokio::test]
    async fn entries_never_outlive_the_backend_ttl() {
        let l1 = L1::new(1 << 20, Duration::from_secs(30));
        let (a, b) = (BlockHash([1; 32]), BlockHash([2; 32]));
        let served = l1
            .get_or_load("ns", &[a, b], |_| async {
                Ok(vec![Some(hit(b"a", Some(Duration::ZERO))), None])
            })
            .await;
        assert!(matches!(served[0], Served::Loaded(_)));
        assert_eq!(served[1], Served::Miss);
        assert!(
            !l1.contains("ns", &a),
            "a block with no TTL left is not kept"
        );
        l1.insert(
            "ns",
            &b,
            Bytes::from_static(b"b"),
            Some(Duration::from_secs(5)),
        );
        assert!(l1.contains("ns", &b));
        l1.remove_namespace("ns");
        assert!(!l1.contains("ns", &b));
    }

    #[tokio::test]
    async fn the_byte_bound_holds() {
        let l1 = L1::new(10_000, Duration::from_secs(30));
        for i in 0..100u8 {
            l1.insert("ns", &BlockHash([i; 32]), Bytes::from(vec![i; 1000]), None);
        }
        let (used, cap, _) = l1.usage();
        assert!(used <= cap, "{used} > {cap}");
    }
}
