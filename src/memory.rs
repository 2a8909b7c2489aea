//! The embedded store: the same semantics as the Redis store (write-once, TTL, sliding
//! expiry, pin, verified reads), held in this process in a byte-bounded cache.
//!
//! It exists so that `kvshelf serve` works with one command on any machine. Blocks in it are
//! neither shared across hosts nor kept across restarts; the server says so loudly when it
//! starts with it. The Redis-backed topology is the way to run kvshelf for real.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quick_cache::sync::{Cache, GuardResult};

use crate::codec::{self, Header};
use crate::error::Error;
use crate::hashing::BlockHash;
use crate::namespace::{Namespace, validate_label};
use crate::store::{Hit, PinOutcome, PutResult};

type Key = (String, BlockHash);

#[derive(Clone)]
struct Entry {
    /// Header and payload, exactly as Redis would hold them.
    value: Bytes,
    /// `None`: pinned.
    expires_at: Option<Instant>,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|t| t > now)
    }
}

#[derive(Clone)]
struct Weigher;

impl quick_cache::Weighter<Key, Entry> for Weigher {
    fn weight(&self, key: &Key, val: &Entry) -> u64 {
        // Value bytes plus a fixed allowance for the key and bookkeeping.
        (val.value.len() + key.0.len() + 96) as u64
    }
}

/// An in-process block store bounded to a number of bytes; least valuable blocks are
/// evicted first (quick_cache's CLOCK-Pro), like Redis with `maxmemory`.
pub struct MemoryStore {
    cache: Cache<Key, Entry, Weigher>,
    ttl: Duration,
    sliding_ttl: bool,
    /// The pinned blocks of each namespace, counted against its cap like Redis's
    /// `kvshelf:pins:v1:<label>` records. The cache may evict a pinned block when full, so
    /// records can go stale; they are pruned when a pin would exceed the cap.
    pins: Mutex<HashMap<String, HashSet<BlockHash>>>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("capacity", &self.cache.capacity())
            .field("bytes", &self.cache.weight())
            .finish()
    }
}

impl MemoryStore {
    /// A store holding at most `capacity_bytes`, with the given default TTL.
    pub fn new(capacity_bytes: u64, ttl: Duration, sliding_ttl: bool) -> MemoryStore {
        let estimated_items = (capacity_bytes / (64 * 1024)).clamp(16, 1 << 20) as usize;
        MemoryStore {
            cache: Cache::with_weighter(estimated_items, capacity_bytes, Weigher),
            ttl,
            sliding_ttl,
            pins: Mutex::new(HashMap::new()),
        }
    }

    /// Bytes held now, and the bound.
    pub fn usage(&self) -> (u64, u64) {
        (self.cache.weight(), self.cache.capacity())
    }

    fn ttl_of(&self, ns: &Namespace) -> Duration {
        ns.ttl.unwrap_or(self.ttl)
    }

    fn live(&self, key: &Key, now: Instant) -> Option<Entry> {
        match self.cache.peek(key) {
            Some(e) if e.live(now) => Some(e),
            Some(_) => {
                self.cache.remove(key);
                None
            }
            None => None,
        }
    }

    /// Write-once put of full blocks of `ns` (see [`crate::RedisStore::put`]).
    pub fn put(
        &self,
        ns: &Namespace,
        blocks: &[(BlockHash, Bytes)],
    ) -> Result<Vec<PutResult>, Error> {
        ns.validate()?;
        crate::store::check_payloads(ns, blocks)?;
        let expires_at = Some(Instant::now() + self.ttl_of(ns));
        Ok(blocks
            .iter()
            .map(|(hash, payload)| {
                let key = (ns.label.clone(), *hash);
                loop {
                    match self.cache.get_value_or_guard(&key, None) {
                        GuardResult::Value(e) if e.live(Instant::now()) => {
                            return PutResult::AlreadyPresent;
                        }
                        GuardResult::Value(_) => {
                            self.cache.remove(&key);
                        }
                        GuardResult::Guard(g) => {
                            let value =
                                codec::encode(&Header::for_block(ns, hash, payload), payload);
                            let _ = g.insert(Entry { value, expires_at });
                            return PutResult::Stored;
                        }
                        GuardResult::Timeout => unreachable!("no timeout was given"),
                    }
                }
            })
            .collect())
    }

    /// Verified reads with sliding expiry (see [`crate::RedisStore::get`]).
    pub fn get(&self, ns: &Namespace, hashes: &[BlockHash]) -> Result<Vec<Option<Hit>>, Error> {
        ns.validate()?;
        let now = Instant::now();
        let ttl = self.ttl_of(ns);
        Ok(hashes
            .iter()
            .map(|hash| {
                let key = (ns.label.clone(), *hash);
                let mut entry = self.cache.get(&key).filter(|e| e.live(now))?;
                if self.sliding_ttl && entry.expires_at.is_some() {
                    entry.expires_at = Some(now + ttl);
                    self.cache.insert(key.clone(), entry.clone());
                }
                match crate::store::verify(ns, hash, entry.value) {
                    Ok(block) => Some(Hit {
                        block,
                        ttl: entry.expires_at.map(|t| t - now),
                    }),
                    Err(e) => {
                        crate::store::count_bad(ns, hash, &e);
                        self.cache.remove(&key);
                        None
                    }
                }
            })
            .collect())
    }

    /// Leading blocks present, without touching them.
    pub fn lookup(&self, ns: &Namespace, hashes: &[BlockHash]) -> Result<usize, Error> {
        validate_label(&ns.label)?;
        let now = Instant::now();
        Ok(hashes
            .iter()
            .take_while(|h| self.live(&(ns.label.clone(), **h), now).is_some())
            .count())
    }

    /// Deletes blocks (and their pin records); returns how many existed.
    pub fn delete(&self, label: &str, hashes: &[BlockHash]) -> Result<u64, Error> {
        validate_label(label)?;
        if let Some(pinned) = self.pins.lock().expect("pins lock").get_mut(label) {
            hashes.iter().for_each(|h| {
                pinned.remove(h);
            });
        }
        let now = Instant::now();
        Ok(hashes
            .iter()
            .filter_map(|h| self.cache.remove(&(label.to_owned(), *h)))
            .filter(|(_, e)| e.live(now))
            .count() as u64)
    }

    /// Pins (`ttl: None`) or unpins (`Some(ttl)`) a block; returns whether it exists.
    pub fn set_expiry(
        &self,
        label: &str,
        hash: &BlockHash,
        ttl: Option<Duration>,
    ) -> Result<bool, Error> {
        validate_label(label)?;
        let key = (label.to_owned(), *hash);
        let now = Instant::now();
        match self.live(&key, now) {
            Some(mut e) => {
                e.expires_at = ttl.map(|t| now + t);
                self.cache.insert(key, e);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Pins a block unless that would take the pinned payload bytes of `ns` over
    /// `max_bytes` (see [`crate::RedisStore::pin_within`]). One lock makes it exact here.
    pub fn pin_within(
        &self,
        ns: &Namespace,
        hash: &BlockHash,
        max_bytes: u64,
    ) -> Result<PinOutcome, Error> {
        validate_label(&ns.label)?;
        let block_bytes = ns.block_bytes();
        let mut pins = self.pins.lock().expect("pins lock");
        let pinned = pins.entry(ns.label.clone()).or_default();
        let now = Instant::now();
        let counted = |pinned: &HashSet<BlockHash>| pinned.len() as u64 * block_bytes;
        if !pinned.contains(hash) && counted(pinned) + block_bytes > max_bytes {
            pinned.retain(|h| self.live(&(ns.label.clone(), *h), now).is_some());
            if counted(pinned) + block_bytes > max_bytes {
                return Ok(PinOutcome::OverLimit {
                    pinned_bytes: counted(pinned),
                });
            }
        }
        if !self.set_expiry(&ns.label, hash, None)? {
            pinned.remove(hash);
            return Ok(PinOutcome::Missing);
        }
        pinned.insert(*hash);
        Ok(PinOutcome::Pinned {
            pinned_bytes: counted(pinned),
        })
    }

    /// Gives a block the TTL of `ns` back and drops its pin record; returns whether it
    /// exists.
    pub fn unpin(&self, ns: &Namespace, hash: &BlockHash) -> Result<bool, Error> {
        let found = self.set_expiry(&ns.label, hash, Some(self.ttl_of(ns)))?;
        if let Some(pinned) = self.pins.lock().expect("pins lock").get_mut(&ns.label) {
            pinned.remove(hash);
        }
        Ok(found)
    }

    /// Pinned payload bytes of `ns`, as recorded.
    pub fn pinned_bytes(&self, ns: &Namespace) -> u64 {
        let pins = self.pins.lock().expect("pins lock");
        pins.get(&ns.label).map_or(0, |p| p.len() as u64) * ns.block_bytes()
    }

    /// Time to live left: `None` missing, `Some(None)` pinned.
    pub fn ttl(&self, label: &str, hash: &BlockHash) -> Result<Option<Option<Duration>>, Error> {
        validate_label(label)?;
        let now = Instant::now();
        Ok(self
            .live(&(label.to_owned(), *hash), now)
            .map(|e| e.expires_at.map(|t| t - now)))
    }

    /// The TTL `unpin` gives back to blocks of `ns`.
    pub fn default_ttl(&self, ns: Option<&Namespace>) -> Duration {
        ns.map_or(self.ttl, |n| self.ttl_of(n))
    }

    /// Deletes every block of a namespace; returns how many.
    pub fn purge(&self, label: &str) -> Result<u64, Error> {
        validate_label(label)?;
        // Held throughout, so that no pin lands between the blocks and their records.
        let mut pins = self.pins.lock().expect("pins lock");
        let n = self.count(label)?;
        self.cache.retain(|k, _| k.0 != label);
        pins.remove(label);
        Ok(n)
    }

    /// Blocks of one namespace.
    pub fn count(&self, label: &str) -> Result<u64, Error> {
        validate_label(label)?;
        let now = Instant::now();
        Ok(self
            .cache
            .iter()
            .filter(|(k, e)| k.0 == label && e.live(now))
            .count() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PrefixHasher;
    use crate::namespace::tests::qwen;

    fn setup() -> (MemoryStore, Namespace, Vec<(BlockHash, Bytes)>) {
        let ns = qwen();
        let tokens: Vec<u32> = (0..64).collect();
        let blocks = PrefixHasher::new(&ns, None)
            .hash_prefix(&tokens)
            .into_iter()
            .enumerate()
            .map(|(i, h)| (h, Bytes::from(vec![i as u8; ns.block_bytes() as usize])))
            .collect();
        (
            MemoryStore::new(64 << 20, Duration::from_secs(60), true),
            ns,
            blocks,
        )
    }

    #[test]
    fn same_semantics_as_redis() {
        let (s, ns, blocks) = setup();
        let hashes: Vec<BlockHash> = blocks.iter().map(|b| b.0).collect();
        assert_eq!(
            s.put(&ns, &blocks[..3]).unwrap(),
            vec![PutResult::Stored; 3]
        );
        assert_eq!(
            s.put(&ns, &blocks[..1]).unwrap(),
            vec![PutResult::AlreadyPresent]
        );
        assert_eq!(s.lookup(&ns, &hashes).unwrap(), 3);
        let got = s.get(&ns, &hashes).unwrap();
        assert_eq!(got[1].as_ref().unwrap().block.payload, blocks[1].1);
        assert!(got[3].is_none());
        assert!(s.set_expiry(&ns.label, &hashes[0], None).unwrap());
        assert_eq!(s.ttl(&ns.label, &hashes[0]).unwrap(), Some(None));
        assert_eq!(s.delete(&ns.label, &hashes[2..]).unwrap(), 1);
        assert_eq!(s.lookup(&ns, &hashes).unwrap(), 2);
        assert_eq!(s.purge(&ns.label).unwrap(), 2);
        assert_eq!(s.count(&ns.label).unwrap(), 0);
        let short = vec![(hashes[0], Bytes::from_static(b"short"))];
        assert!(matches!(s.put(&ns, &short), Err(Error::InvalidInput(_))));
    }

    #[test]
    fn expired_blocks_are_gone_and_can_be_put_again() {
        let (s, mut ns, blocks) = setup();
        ns.ttl = Some(Duration::ZERO);
        s.put(&ns, &blocks[..1]).unwrap();
        assert_eq!(s.lookup(&ns, &[blocks[0].0]).unwrap(), 0);
        ns.ttl = None;
        assert_eq!(s.put(&ns, &blocks[..1]).unwrap(), vec![PutResult::Stored]);
    }

    #[test]
    fn pins_are_capped_and_stale_records_pruned() {
        let (s, ns, blocks) = setup();
        let hashes: Vec<BlockHash> = blocks.iter().map(|b| b.0).collect();
        let bb = ns.block_bytes();
        s.put(&ns, &blocks).unwrap();
        let pin = |h| s.pin_within(&ns, h, 2 * bb).unwrap();
        assert_eq!(pin(&hashes[0]), PinOutcome::Pinned { pinned_bytes: bb });
        assert_eq!(
            pin(&hashes[1]),
            PinOutcome::Pinned {
                pinned_bytes: 2 * bb
            }
        );
        assert_eq!(
            pin(&hashes[0]),
            PinOutcome::Pinned {
                pinned_bytes: 2 * bb
            }
        );
        assert_eq!(
            pin(&hashes[2]),
            PinOutcome::OverLimit {
                pinned_bytes: 2 * bb
            }
        );
        assert_eq!(
            s.ttl(&ns.label, &hashes[2]).unwrap().map(|t| t.is_some()),
            Some(true)
        );
        // A pinned block that left the cache (evicted when full) gives its room back.
        s.cache.remove(&(ns.label.clone(), hashes[0]));
        assert_eq!(
            pin(&hashes[2]),
            PinOutcome::Pinned {
                pinned_bytes: 2 * bb
            }
        );
        assert!(s.unpin(&ns, &hashes[1]).unwrap());
        assert_eq!(s.pinned_bytes(&ns), bb);
        assert_eq!(pin(&hashes[0]), PinOutcome::Missing);
        assert_eq!(s.purge(&ns.label).unwrap(), 3);
        assert_eq!(s.pinned_bytes(&ns), 0);
    }

    #[test]
    fn the_byte_bound_holds() {
        let (_, ns, blocks) = setup();
        let s = MemoryStore::new(ns.block_bytes() * 2 + 4096, Duration::from_secs(60), true);
        s.put(&ns, &blocks).unwrap();
        let (used, cap) = s.usage();
        assert!(used <= cap, "{used} > {cap}");
        assert!(s.count(&ns.label).unwrap() <= 2);
    }
}
