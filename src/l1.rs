//! The L1 tier: a byte-bounded in-process cache of verified block payloads in front of the
//! backend, with single-flight loading.
//!
//! Built on quick_cache, which keeps a strict byte bound (moka's weighted eviction can
//! overshoot) and lets one caller hold a placeholder while others wait for its value: N
//! concurrent fetches of one cold block make one backend read. A call never waits for
//! another caller while it holds a placeholder of its own, and every wait is bounded
//! ([`L1::get_or_load`] says how), so a stalled or failing backend cannot hang fetches.
//!
//! An entry never outlives the block's TTL in the backend: it expires at the earlier of
//! `max_ttl` and the TTL the backend reported when the block was read. The sidecar slides
//! the backend's TTL for L1 hits itself, off the request path (`shelf::l1_toucher`).
//! Deletes, pins and purges through this sidecar drop the affected entries; other sidecars'
//! L1 may serve a deleted block until `max_ttl` passes.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quick_cache::sync::{Cache, GuardResult};
use quick_cache::{DefaultHashBuilder, Lifecycle, Weighter};

use crate::hashing::BlockHash;
use crate::store::Read;

type Key = (Arc<str>, BlockHash);

/// Payloads smaller than this are copied into L1 rather than kept as slices (see
/// `L1::entry`): a copy this small costs less than the memory a slice could pin.
const COPY_BELOW: usize = 64 * 1024;

#[derive(Clone)]
struct Entry {
    /// `None`: a tombstone, left by a load that found no such block so that the calls
    /// waiting for that load learn it at once; it is already expired when inserted, so it
    /// never serves a miss to a later call.
    payload: Option<Bytes>,
    expires_at: Instant,
}

#[derive(Clone)]
struct Weigher;

impl Weighter<Key, Entry> for Weigher {
    fn weight(&self, key: &Key, val: &Entry) -> u64 {
        (val.payload.as_ref().map_or(0, Bytes::len) + key.0.len() + 96) as u64
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

/// How one block of a batch was served: L1's one result type (the store's is
/// [`Read`], the sidecar stream's `FetchItem`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Served {
    /// From L1.
    Hit(Bytes),
    /// Read from the backend by this call.
    Loaded(Bytes),
    /// Read from the backend by a concurrent call that this one waited for.
    Coalesced(Bytes),
    /// Not in the backend.
    Miss,
    /// Not served because the backend failed or was late: this call's own read, or the
    /// concurrent read it waited for (a wait is bounded; a timed-out wait lands here).
    /// Treated as a miss by callers, but reported as the backend's failure.
    Unavailable,
}

impl Served {
    /// The payload, if any.
    pub fn into_payload(self) -> Option<Bytes> {
        match self {
            Served::Hit(b) | Served::Loaded(b) | Served::Coalesced(b) => Some(b),
            Served::Miss | Served::Unavailable => None,
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

type Guard<'a> = quick_cache::sync::PlaceholderGuard<
    'a,
    Key,
    Entry,
    Weigher,
    DefaultHashBuilder,
    CountEvictions,
>;

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
        if let Some(entry) = self.entry(payload, ttl) {
            self.cache.insert(Self::key(label, hash), entry);
        }
    }

    /// The entry for a payload the backend holds for `ttl` more; `None` if it expires now.
    ///
    /// A small payload is copied: it may be a slice of a larger buffer (a Redis read
    /// buffer holding other replies), which the entry would pin while weighing only the
    /// slice. Big payloads are read into buffers of their own exact size, so they are kept
    /// as they are.
    fn entry(&self, payload: Bytes, ttl: Option<Duration>) -> Option<Entry> {
        let ttl = ttl.map_or(self.max_ttl, |t| t.min(self.max_ttl));
        let payload = match payload.len() < COPY_BELOW {
            true => Bytes::copy_from_slice(&payload),
            false => payload,
        };
        (!ttl.is_zero()).then(|| Entry {
            payload: Some(payload),
            expires_at: Instant::now() + ttl,
        })
    }

    /// Drops one entry.
    pub fn remove(&self, label: &str, hash: &BlockHash) {
        self.cache.remove(&Self::key(label, hash));
    }

    /// Drops every entry.
    pub fn clear(&self) {
        self.cache.clear();
    }

    /// Keeps only the entries for which `keep(label, hash)` is true.
    pub fn retain(&self, keep: impl Fn(&str, &BlockHash) -> bool) {
        self.cache.retain(|k, _| keep(&k.0, &k.1));
    }

    /// Drops every entry of a namespace.
    pub fn remove_namespace(&self, label: &str) {
        self.cache.retain(|k, _| &*k.0 != label);
    }

    /// Serves `hashes` of namespace `label` (duplicates allowed) from L1, reading the
    /// absent ones from the backend with `load`, which is given distinct hashes and returns
    /// one [`Read`] per hash in order (`None` for the whole call: the backend failed; a
    /// block whose node failed is [`Read::Unavailable`], served as [`Served::Unavailable`]).
    ///
    /// Single flight: a block another caller is loading right now is not loaded again;
    /// this call waits for that load, at most `wait` for all such blocks together, and a
    /// wait that times out is [`Served::Unavailable`] (counted in
    /// `kvshelf_l1_wait_timeouts_total`). Each `load` is also cut off after `wait`.
    ///
    /// A load that fails or is cut off does not turn its waiters into N separate reads:
    /// the block's placeholder passes to one waiter, which loads it for all (one shared
    /// retry, bounded by the same deadline); a load that finds no block tells every waiter
    /// so at once (a tombstone entry that is already expired).
    ///
    /// Why it cannot deadlock: a call claims the blocks nobody is loading (placeholder
    /// guards), loads them and fills every guard BEFORE it waits for anyone else, so it
    /// never waits while others wait on it. A guard handed to a waiter is loaded and filled
    /// (or released) by that waiter before it waits for anything else, so the same holds.
    /// A block whose loader left an entry that has expired already is read again, without
    /// single flight, once every wait is over.
    pub async fn get_or_load<F, Fut>(
        &self,
        label: &str,
        hashes: &[BlockHash],
        wait: Duration,
        load: F,
    ) -> Vec<Served>
    where
        F: Fn(Vec<BlockHash>) -> Fut,
        Fut: Future<Output = Option<Vec<Read>>>,
    {
        let label: Arc<str> = Arc::from(label);
        // Each distinct hash once: a request naming X twice must not wait on itself.
        let mut seen = HashMap::with_capacity(hashes.len());
        let mut unique: Vec<BlockHash> = Vec::with_capacity(hashes.len());
        let at: Vec<usize> = hashes
            .iter()
            .map(|h| {
                *seen.entry(*h).or_insert_with(|| {
                    unique.push(*h);
                    unique.len() - 1
                })
            })
            .collect();
        let mut served: Vec<Option<Served>> = vec![None; unique.len()];

        // 1. Claim: hits are served, blocks nobody loads are ours, the rest are waited for.
        let now = Instant::now();
        let mut owned: Vec<(usize, Guard<'_>)> = Vec::new();
        let mut waits = Vec::new();
        for (u, hash) in unique.iter().enumerate() {
            let key = (label.clone(), *hash);
            loop {
                // A zero timeout never blocks: someone else's placeholder gives `Timeout`.
                match self.cache.get_value_or_guard(&key, Some(Duration::ZERO)) {
                    GuardResult::Value(Entry {
                        payload: Some(payload),
                        expires_at,
                    }) if expires_at > now => {
                        served[u] = Some(Served::Hit(payload));
                    }
                    GuardResult::Value(_) => {
                        self.cache.remove(&key);
                        continue;
                    }
                    GuardResult::Guard(g) => owned.push((u, g)),
                    GuardResult::Timeout => waits.push(u),
                }
                break;
            }
        }

        // 2. Load what we claimed and fill every guard, before waiting for anyone.
        if !owned.is_empty() {
            let hs = owned.iter().map(|(u, _)| unique[*u]).collect();
            let loaded = bounded_load(wait, load(hs)).await;
            let mut hits = loaded.map(Vec::into_iter);
            for (u, guard) in owned {
                served[u] = Some(match hits.as_mut() {
                    Some(hits) => self.fill(guard, hits.next().unwrap_or(Read::Miss)),
                    None => Served::Unavailable, // dropping the guard wakes the waiters
                });
            }
        }

        // 3. Wait for other callers' loads, holding no guard.
        let deadline = tokio::time::Instant::now() + wait;
        let mut orphans = Vec::new();
        for u in waits {
            let key = (label.clone(), unique[u]);
            let joined =
                tokio::time::timeout_at(deadline, self.cache.get_value_or_guard_async(&key)).await;
            match joined {
                Ok(Ok(Entry { payload: None, .. })) => served[u] = Some(Served::Miss),
                Ok(Ok(Entry {
                    payload: Some(payload),
                    expires_at,
                })) if expires_at > Instant::now() => {
                    served[u] = Some(Served::Coalesced(payload));
                }
                // The loader's entry has expired already: read it below.
                Ok(Ok(_)) => orphans.push(u),
                // The loader failed or was cut off and its placeholder passed to this call:
                // load the block for every waiter now, before waiting for anything else.
                Ok(Err(guard)) => {
                    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                    let loaded = bounded_load(remaining, load(vec![unique[u]])).await;
                    served[u] = Some(match loaded.and_then(|r| r.into_iter().next()) {
                        Some(read) => self.fill(guard, read),
                        None => Served::Unavailable, // the next waiter tries, if in time
                    });
                }
                Err(_) => {
                    metrics::counter!("kvshelf_l1_wait_timeouts_total").increment(1);
                    served[u] = Some(Served::Unavailable);
                }
            }
        }

        // 4. Orphans: one more read, together, without single flight.
        if !orphans.is_empty() {
            let hs = orphans.iter().map(|u| unique[*u]).collect();
            let loaded = bounded_load(wait, load(hs)).await;
            let mut hits = loaded.map(Vec::into_iter);
            for u in orphans {
                served[u] = Some(match hits.as_mut() {
                    Some(hits) => match hits.next().unwrap_or(Read::Miss) {
                        Read::Hit(hit) => {
                            let payload = hit.block.payload;
                            if let Some(entry) = self.entry(payload.clone(), hit.ttl) {
                                self.cache.insert((label.clone(), unique[u]), entry);
                            }
                            Served::Loaded(payload)
                        }
                        Read::Unavailable => Served::Unavailable,
                        _ => Served::Miss,
                    },
                    None => Served::Unavailable,
                });
            }
        }

        at.into_iter()
            .map(|u| served[u].clone().expect("every distinct block is decided"))
            .collect()
    }

    /// Completes a load this call owns: caches a hit (waking the waiters), leaves a
    /// tombstone on a miss (the waiters learn it is a miss), or drops the guard when the
    /// block's node did not answer (one waiter then loads it for the others).
    fn fill(&self, guard: Guard<'_>, read: Read) -> Served {
        match read {
            Read::Hit(hit) => {
                let payload = hit.block.payload;
                if let Some(entry) = self.entry(payload.clone(), hit.ttl) {
                    let _ = guard.insert(entry);
                }
                Served::Loaded(payload)
            }
            Read::Unavailable => Served::Unavailable,
            _ => {
                let _ = guard.insert(Entry {
                    payload: None,
                    expires_at: Instant::now(),
                });
                Served::Miss
            }
        }
    }
}

/// Runs one `load`, cut off after `wait`: `None` when it failed or was late.
async fn bounded_load<Fut>(wait: Duration, load: Fut) -> Option<Vec<Read>>
where
    Fut: Future<Output = Option<Vec<Read>>>,
{
    match tokio::time::timeout(wait, load).await {
        Ok(loaded) => loaded,
        Err(_) => {
            metrics::counter!("kvshelf_l1_load_timeouts_total").increment(1);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Block, Header};
    use crate::namespace::tests::qwen;
    use crate::store::Hit;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const WAIT: Duration = Duration::from_millis(100);
    /// Every test body runs under this: a deadlock fails the test instead of hanging it.
    /// (With paused time, tokio jumps the clock to it as soon as every task is stuck.)
    const TEST_LIMIT: Duration = Duration::from_secs(30);

    async fn within_limit<T>(f: impl Future<Output = T>) -> T {
        tokio::time::timeout(TEST_LIMIT, f)
            .await
            .expect("the test hung: a fetch never finished")
    }

    /// A block whose payload is derived from its hash, so a wrong answer is detectable.
    fn payload_of(h: &BlockHash) -> Bytes {
        Bytes::from(h.0.repeat(4))
    }

    fn hit_of(h: &BlockHash, ttl: Option<Duration>) -> Hit {
        let payload = payload_of(h);
        Hit {
            block: Block {
                header: Header::for_block(&qwen(), h, &payload),
                payload,
            },
            ttl,
        }
    }

    fn hash(i: u8) -> BlockHash {
        BlockHash([i; 32])
    }

    /// `n` concurrent fetches of one block through `l1`, whose backend holds it. The first
    /// backend load is held until every fetch has reached the cache. Returns what each
    /// fetch got and how many blocks were loaded from the backend.
    async fn concurrent_fetches(l1: &Arc<L1>, n: usize) -> (Vec<Served>, usize) {
        let loads = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let h = hash(1);
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (l1, loads, gate) = (l1.clone(), loads.clone(), gate.clone());
                tokio::spawn(async move {
                    l1.get_or_load("ns", &[h], Duration::from_secs(5), |hs| {
                        let (loads, gate) = (loads.clone(), gate.clone());
                        async move {
                            if loads.fetch_add(hs.len(), Ordering::SeqCst) == 0 {
                                gate.notified().await; // the first load waits for the others
                            }
                            Some(vec![Read::Hit(hit_of(&h, Some(Duration::from_secs(60))))])
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
        let (served, loads) = within_limit(concurrent_fetches(&l1, 8)).await;
        assert_eq!(loads, 1, "one backend read");
        let loaded = served
            .iter()
            .filter(|s| matches!(s, Served::Loaded(_)))
            .count();
        assert_eq!(loaded, 1);
        for s in served {
            assert_eq!(s.into_payload().unwrap(), payload_of(&hash(1)));
        }
    }

    /// A waiter whose loader's entry did not stay in L1 (here: larger than the whole L1)
    /// loads the block itself instead of answering a miss for a block the backend has.
    #[tokio::test]
    async fn waiters_load_for_themselves_when_l1_cannot_keep_the_block() {
        let l1 = Arc::new(L1::new(64, Duration::from_secs(30)));
        let (served, _) = within_limit(concurrent_fetches(&l1, 4)).await;
        for s in served {
            assert_eq!(s.into_payload().expect("not a miss"), payload_of(&hash(1)));
        }
        assert!(!l1.contains("ns", &hash(1)), "the block is too big to keep");
    }

    #[tokio::test]
    async fn entries_never_outlive_the_backend_ttl() {
        let l1 = L1::new(1 << 20, Duration::from_secs(30));
        let (a, b) = (hash(1), hash(2));
        let served = l1
            .get_or_load("ns", &[a, b], WAIT, |_| async move {
                Some(vec![
                    Read::Hit(hit_of(&a, Some(Duration::ZERO))),
                    Read::Miss,
                ])
            })
            .await;
        assert!(matches!(served[0], Served::Loaded(_)));
        assert_eq!(served[1], Served::Miss);
        assert!(
            !l1.contains("ns", &a),
            "a block with no TTL left is not kept"
        );
        l1.insert("ns", &b, payload_of(&b), Some(Duration::from_secs(5)));
        assert!(l1.contains("ns", &b));
        l1.remove_namespace("ns");
        assert!(!l1.contains("ns", &b));
    }

    /// Issue 17 §4: an entry weighs what it holds. A small payload sliced from a big
    /// buffer (a read buffer holding other replies) is copied, so L1 does not pin the
    /// buffer while weighing only the slice.
    #[test]
    fn a_small_slice_does_not_pin_its_buffer() {
        struct Owner(Vec<u8>, Arc<AtomicUsize>);
        impl AsRef<[u8]> for Owner {
            fn as_ref(&self) -> &[u8] {
                &self.0
            }
        }
        impl Drop for Owner {
            fn drop(&mut self) {
                self.1.fetch_add(1, Ordering::SeqCst);
            }
        }
        let freed = Arc::new(AtomicUsize::new(0));
        let big = Bytes::from_owner(Owner(vec![7; 4 << 20], freed.clone()));
        let small = big.slice(100..612);
        drop(big);
        let l1 = L1::new(1 << 20, Duration::from_secs(30));
        l1.insert("ns", &hash(1), small, None);
        assert_eq!(freed.load(Ordering::SeqCst), 1, "the 4 MiB buffer is freed");
        assert!(l1.contains("ns", &hash(1)));
        assert!(
            l1.usage().0 < 1024,
            "weighs its 512 bytes: {:?}",
            l1.usage()
        );
    }

    #[tokio::test]
    async fn the_byte_bound_holds() {
        let l1 = L1::new(10_000, Duration::from_secs(30));
        for i in 0..100u8 {
            l1.insert("ns", &hash(i), Bytes::from(vec![i; 1000]), None);
        }
        let (used, cap, _) = l1.usage();
        assert!(used <= cap, "{used} > {cap}");
    }

    type Loaded = Option<Vec<Read>>;

    /// A loader that holds its read until `gate` is notified, then answers `answer`.
    fn gated(
        gate: Arc<tokio::sync::Notify>,
        answer: Loaded,
    ) -> impl Fn(Vec<BlockHash>) -> std::pin::Pin<Box<dyn Future<Output = Loaded> + Send>> {
        move |_| {
            let (gate, answer) = (gate.clone(), answer.clone());
            Box::pin(async move {
                gate.notified().await;
                answer
            })
        }
    }

    /// A loader that has every block.
    fn backend_has_all(hs: Vec<BlockHash>) -> std::future::Ready<Option<Vec<Read>>> {
        std::future::ready(Some(
            hs.iter().map(|h| Read::Hit(hit_of(h, None))).collect(),
        ))
    }

    /// Lets spawned tasks run until they are parked on the cache.
    async fn settle() {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    }

    /// `n` concurrent fetches of one block whose first load answers `first` (after every
    /// fetch is waiting for it) and whose later loads find the block. Returns what each
    /// fetch got and how many loads ran.
    async fn waiters_of_one_load(n: usize, first: Loaded) -> (Vec<Served>, usize) {
        let l1 = Arc::new(L1::new(1 << 20, Duration::from_secs(30)));
        let x = hash(1);
        let loads = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (l1, loads, gate, first) =
                    (l1.clone(), loads.clone(), gate.clone(), first.clone());
                tokio::spawn(async move {
                    l1.get_or_load("ns", &[x], Duration::from_secs(5), move |hs| {
                        let (loads, gate, first) = (loads.clone(), gate.clone(), first.clone());
                        async move {
                            if loads.fetch_add(1, Ordering::SeqCst) == 0 {
                                gate.notified().await;
                                return first;
                            }
                            Some(hs.iter().map(|h| Read::Hit(hit_of(h, None))).collect())
                        }
                    })
                    .await
                    .remove(0)
                })
            })
            .collect();
        settle().await;
        gate.notify_one();
        let mut served = Vec::new();
        for t in tasks {
            served.push(t.await.unwrap());
        }
        (served, loads.load(Ordering::SeqCst))
    }

    /// Issue 17 §3: when the one load of a hot block fails (Redis slow: cut off), its
    /// waiters share ONE retry instead of each reading the block on its own.
    #[tokio::test(start_paused = true)]
    async fn waiters_of_a_failed_load_share_one_retry() {
        within_limit(async {
            let (served, loads) = waiters_of_one_load(8, None).await;
            assert_eq!(
                loads, 2,
                "the failed load and one shared retry, not one per waiter"
            );
            assert_eq!(
                served.iter().filter(|s| **s == Served::Unavailable).count(),
                1
            );
            for s in served.into_iter().filter(|s| *s != Served::Unavailable) {
                assert_eq!(s.into_payload().unwrap(), payload_of(&hash(1)));
            }
        })
        .await;
    }

    /// A load that finds no block tells its waiters at once: one read, not one per waiter,
    /// and the miss is not remembered for later calls.
    #[tokio::test(start_paused = true)]
    async fn waiters_of_a_load_that_misses_learn_the_miss() {
        within_limit(async {
            let (served, loads) = waiters_of_one_load(8, Some(vec![Read::Miss])).await;
            assert_eq!(loads, 1);
            assert!(served.iter().all(|s| *s == Served::Miss), "{served:?}");
        })
        .await;
        let l1 = L1::new(1 << 20, Duration::from_secs(30));
        let x = hash(1);
        let miss = l1
            .get_or_load("ns", &[x], WAIT, |_| async { Some(vec![Read::Miss]) })
            .await;
        assert_eq!(miss, vec![Served::Miss]);
        assert!(!l1.contains("ns", &x), "a tombstone is no entry");
        let later = l1.get_or_load("ns", &[x], WAIT, backend_has_all).await;
        assert!(matches!(later[0], Served::Loaded(_)), "{later:?}");
    }

    /// The review's first reproduction: a fetch of `[X, X]` while another caller's load of
    /// X fails used to wait on its own placeholder forever.
    #[tokio::test(start_paused = true)]
    async fn duplicate_hashes_while_another_load_fails() {
        within_limit(async {
            let l1 = Arc::new(L1::new(1 << 20, Duration::from_secs(30)));
            let x = hash(1);
            let gate = Arc::new(tokio::sync::Notify::new());
            let failing = {
                let (l1, gate) = (l1.clone(), gate.clone());
                tokio::spawn(
                    async move { l1.get_or_load("ns", &[x], WAIT, gated(gate, None)).await },
                )
            };
            settle().await;
            let dup = {
                let l1 = l1.clone();
                tokio::spawn(
                    async move { l1.get_or_load("ns", &[x, x], WAIT, backend_has_all).await },
                )
            };
            settle().await;
            gate.notify_one();
            assert_eq!(failing.await.unwrap(), vec![Served::Unavailable]);
            let dup = dup.await.unwrap();
            assert_eq!(dup.len(), 2);
            for s in dup {
                assert_eq!(
                    s.into_payload().expect("read again by the waiter"),
                    payload_of(&x)
                );
            }
        })
        .await;
    }

    /// The review's second reproduction: `A = [X, Y, Z]` and `E = [X, Y]` both hung once
    /// the reads of X and Y failed.
    #[tokio::test(start_paused = true)]
    async fn overlapping_lists_whose_reads_fail() {
        within_limit(async {
            let l1 = Arc::new(L1::new(1 << 20, Duration::from_secs(30)));
            let (x, y, z) = (hash(1), hash(2), hash(3));
            // The backend fails every read that includes X or Y.
            let flaky = move |hs: Vec<BlockHash>| async move {
                tokio::task::yield_now().await;
                if hs.contains(&x) || hs.contains(&y) {
                    return None;
                }
                Some(hs.iter().map(|h| Read::Hit(hit_of(h, None))).collect())
            };
            let a = {
                let l1 = l1.clone();
                tokio::spawn(async move { l1.get_or_load("ns", &[x, y, z], WAIT, flaky).await })
            };
            let e = {
                let l1 = l1.clone();
                tokio::spawn(async move { l1.get_or_load("ns", &[x, y], WAIT, flaky).await })
            };
            let (a, e) = (a.await.unwrap(), e.await.unwrap());
            assert_eq!(&a[..2], &[Served::Unavailable, Served::Unavailable]);
            assert_eq!(e, vec![Served::Unavailable, Served::Unavailable]);
        })
        .await;
    }

    /// A loader slower than the wait: it is cut off, its waiters stop waiting at the
    /// deadline, both answer `Unavailable`, and the next fetch loads afresh.
    #[tokio::test(start_paused = true)]
    async fn a_slow_loader_bounds_everyone() {
        within_limit(async {
            let l1 = Arc::new(L1::new(1 << 20, Duration::from_secs(30)));
            let x = hash(7);
            let slow = |hs: Vec<BlockHash>| async move {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Some(hs.iter().map(|h| Read::Hit(hit_of(h, None))).collect())
            };
            let started = tokio::time::Instant::now();
            let loader = {
                let l1 = l1.clone();
                tokio::spawn(async move { l1.get_or_load("ns", &[x], WAIT, slow).await })
            };
            settle().await;
            let waiters: Vec<_> = (0..10)
                .map(|_| {
                    let l1 = l1.clone();
                    tokio::spawn(async move { l1.get_or_load("ns", &[x, x], WAIT, slow).await })
                })
                .collect();
            assert_eq!(loader.await.unwrap(), vec![Served::Unavailable]);
            for w in waiters {
                let served = w.await.unwrap();
                assert!(served.iter().all(|s| s.clone().into_payload().is_none()));
            }
            assert!(
                started.elapsed() <= WAIT * 4,
                "bounded by the wait: {:?}",
                started.elapsed()
            );
            let again = l1.get_or_load("ns", &[x], WAIT, backend_has_all).await;
            assert_eq!(again, vec![Served::Loaded(payload_of(&x))]);
        })
        .await;
    }

    /// Hundreds of tasks on an L1 that holds a few blocks, with random overlapping and
    /// duplicate lists and a backend that randomly answers, misses, fails or stalls. Every
    /// call finishes, and every payload handed out is the right one for its hash.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn hundreds_of_tasks_on_a_small_l1() {
        use rand::{Rng, SeedableRng};
        within_limit(async {
            // ~4 blocks of 128 bytes fit.
            let l1 = Arc::new(L1::new(4 * (128 + 96 + 2), Duration::from_secs(30)));
            let loads = Arc::new(AtomicUsize::new(0));
            let tasks: Vec<_> = (0..400u64)
                .map(|seed| {
                    let (l1, loads) = (l1.clone(), loads.clone());
                    tokio::spawn(async move {
                        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                        let n = rng.random_range(1..8);
                        let hashes: Vec<BlockHash> =
                            (0..n).map(|_| hash(rng.random_range(0..12))).collect();
                        let behaviour: u8 = rng.random_range(0..4);
                        let load = move |hs: Vec<BlockHash>| {
                            let loads = loads.clone();
                            async move {
                                loads.fetch_add(1, Ordering::Relaxed);
                                tokio::task::yield_now().await;
                                match behaviour {
                                    0 => None,                             // fails
                                    1 => Some(vec![Read::Miss; hs.len()]), // misses
                                    2 => {
                                        // stalls past the wait
                                        tokio::time::sleep(Duration::from_millis(150)).await;
                                        Some(
                                            hs.iter().map(|h| Read::Hit(hit_of(h, None))).collect(),
                                        )
                                    }
                                    _ => Some(
                                        hs.iter().map(|h| Read::Hit(hit_of(h, None))).collect(),
                                    ),
                                }
                            }
                        };
                        let served = l1
                            .get_or_load("ns", &hashes, Duration::from_millis(50), load)
                            .await;
                        assert_eq!(served.len(), hashes.len());
                        for (h, s) in hashes.iter().zip(served) {
                            if let Some(p) = s.into_payload() {
                                assert_eq!(p, payload_of(h), "wrong bytes for {h:?}");
                            }
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.expect("no task panicked");
            }
            assert!(loads.load(Ordering::Relaxed) > 0);
            let (used, cap, _) = l1.usage();
            assert!(used <= cap);
        })
        .await;
    }
}
