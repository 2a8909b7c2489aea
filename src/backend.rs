//! The system of record behind a sidecar: Redis, or the embedded in-process store.
//!
//! An enum rather than a trait object: there are exactly two, both are ours, and a match
//! keeps the async code free of boxed futures.

use std::time::Duration;

use bytes::Bytes;

use crate::error::Error;
use crate::hashing::BlockHash;
use crate::memory::MemoryStore;
use crate::namespace::Namespace;
use crate::store::{PinOutcome, PurgeReport, PutResult, Read, RedisStore};

/// Where blocks live.
#[derive(Debug)]
pub enum Backend {
    /// Redis (or Redis Cluster): shared across hosts, the system of record.
    Redis(RedisStore),
    /// In this process only: for trying kvshelf out without Redis.
    Memory(MemoryStore),
}

impl Backend {
    /// `"redis"` or `"memory"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::Redis(_) => "redis",
            Backend::Memory(_) => "memory",
        }
    }

    /// Checks that the backend answers.
    pub async fn ping(&self) -> Result<(), Error> {
        match self {
            Backend::Redis(r) => r.ping().await,
            Backend::Memory(_) => Ok(()),
        }
    }

    /// Write-once put of full blocks.
    pub async fn put(
        &self,
        ns: &Namespace,
        blocks: &[(BlockHash, Bytes)],
    ) -> Result<Vec<PutResult>, Error> {
        match self {
            Backend::Redis(r) => r.put(ns, blocks).await,
            Backend::Memory(m) => m.put(ns, blocks),
        }
    }

    /// Verified reads, sliding the TTL of hits; per block a hit, a miss, or unavailable
    /// (its Redis node did not answer).
    pub async fn read(&self, ns: &Namespace, hashes: &[BlockHash]) -> Result<Vec<Read>, Error> {
        match self {
            Backend::Redis(r) => r.read(ns, hashes).await,
            Backend::Memory(m) => Ok(m
                .get(ns, hashes)?
                .into_iter()
                .map(|h| h.map_or(Read::Miss, Read::Hit))
                .collect()),
        }
    }

    /// Leading blocks present, in one round trip.
    pub async fn lookup(&self, ns: &Namespace, hashes: &[BlockHash]) -> Result<usize, Error> {
        match self {
            Backend::Redis(r) => r.lookup(ns, hashes).await,
            Backend::Memory(m) => m.lookup(ns, hashes),
        }
    }

    /// Deletes blocks (and their pin records); returns how many existed.
    pub async fn delete(&self, label: &str, hashes: &[BlockHash]) -> Result<u64, Error> {
        match self {
            Backend::Redis(r) => r.delete(label, hashes).await,
            Backend::Memory(m) => m.delete(label, hashes),
        }
    }

    /// Keeps a block forever, unless the pinned bytes of `ns` would exceed `max_bytes`.
    pub async fn pin(
        &self,
        ns: &Namespace,
        hash: &BlockHash,
        max_bytes: u64,
    ) -> Result<PinOutcome, Error> {
        match self {
            Backend::Redis(r) => r.pin_within(ns, hash, max_bytes).await,
            Backend::Memory(m) => m.pin_within(ns, hash, max_bytes),
        }
    }

    /// Gives a pinned block back the TTL of `ns`; returns whether it exists.
    pub async fn unpin(&self, ns: &Namespace, hash: &BlockHash) -> Result<bool, Error> {
        match self {
            Backend::Redis(r) => r.unpin_with(&ns.label, hash, r.ttl_of(ns)).await,
            Backend::Memory(m) => m.unpin(ns, hash),
        }
    }

    /// Pinned payload bytes of `ns`, across every sidecar of this backend.
    pub async fn pinned_bytes(&self, ns: &Namespace) -> Result<u64, Error> {
        match self {
            Backend::Redis(r) => r.pinned_bytes(ns).await,
            Backend::Memory(m) => Ok(m.pinned_bytes(ns)),
        }
    }

    /// Time to live left: `None` missing, `Some(None)` pinned.
    pub async fn ttl(
        &self,
        label: &str,
        hash: &BlockHash,
    ) -> Result<Option<Option<Duration>>, Error> {
        match self {
            Backend::Redis(r) => r.ttl(label, hash).await,
            Backend::Memory(m) => m.ttl(label, hash),
        }
    }

    /// Deletes every block of a namespace (and its pin records), each node within `deadline`; says how many,
    /// and which cluster nodes it could not finish.
    pub async fn purge_within(
        &self,
        label: &str,
        deadline: Duration,
    ) -> Result<PurgeReport, Error> {
        match self {
            Backend::Redis(r) => r.purge_within(label, deadline).await,
            Backend::Memory(m) => Ok(PurgeReport {
                deleted: m.purge(label)?,
                skipped: Vec::new(),
            }),
        }
    }
}
