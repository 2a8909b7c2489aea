//! The Redis store: the key schema, write-once puts with a TTL, batched gets with sliding
//! expiry, one-round-trip lookups, pin/unpin, delete and namespace purge.
//!
//! Redis is the system of record. Every key this module writes has a TTL (`SET … NX PX`),
//! so a `volatile-*` eviction policy can always evict kvshelf's blocks and never touches
//! other data in the same Redis; the only way to keep a block forever is [`RedisStore::pin`].
//! Every read verifies the block (checksum, namespace, layout, hash): a bad block is deleted,
//! counted in `kvshelf_store_corrupt_blocks_total` and reported as a miss.
//!
//! # Layout
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | [`RedisStore`], its constructor, `ping`, helpers shared by the files below |
//! | `read.rs` | `get`, `read`, `read_into`, `fetch_prefix`, `lookup`, `exists`; verification of what a read found |
//! | `write.rs` | `put` (write-once, TTL), `touch`, `delete`; payload size checks |
//! | `pins.rs` | `pin`, `pin_within` (capped), `unpin`, `pinned_bytes`, `prune_pins` |
//! | `admin.rs` | operators' commands: `purge`, `count`, `count_by_namespace`, `info`, `inspect`, `ttl`; `SCAN` |
//! | `route.rs` | `keyed`: the one way commands on keys reach Redis (group per node, send, follow redirects) |
//! | `config.rs` | [`StoreConfig`]: URL, TLS, timeouts, pool sizes; the dialer they make |
//! | `url.rs` | the URL forms (one Redis, Cluster, Sentinel): parsing, logins |
//! | `redact.rs` | URLs as logs and errors show them: every login hidden |
//! | `keys.rs` | the key schema (`docs/format.md`) |
//! | `topology.rs` | which node owns a key: standalone, Sentinel, Cluster |
//! | `cluster.rs` | a Cluster's slots: the slot of a key, the slot map from `CLUSTER NODES` and its refreshes |
//! | `conn.rs` | one connection: pipelines, reads into caller memory, what a dropped call still owes |
//! | `conn/dial.rs` | a node's address and login; dialling it over TCP or TLS |
//! | `conn/pool.rs` | per-node pools: slots, paced reconnects, retries, draining connections whose calls were dropped |
//! | `tracking.rs` | `CLIENT TRACKING` invalidations for an L1 in front of the store |

mod admin;
mod cluster;
mod config;
mod conn;
mod keys;
mod pins;
mod read;
mod redact;
mod route;
mod topology;
mod tracking;
mod url;
mod write;

use std::sync::Arc;
use std::time::Duration;

pub use self::config::StoreConfig;
use self::conn::all;
pub use self::keys::{
    KEY_PREFIX, PINS_PREFIX, block_key, namespace_pattern, parse_block_key, pins_key,
};
pub use self::pins::PinOutcome;
pub use self::read::{Hit, Read, ReadInto};
#[cfg(feature = "server")]
pub(crate) use self::read::{count_bad, verify};
pub use self::redact::redact_url;
use self::topology::Topology;
pub use self::tracking::{Coverage, FELL_BEHIND, Invalidation, TrackedNode, Tracker};
pub use self::url::NodeAddress;
#[cfg(feature = "server")]
pub(crate) use self::write::{check_payloads, wrong_size};
use crate::error::{BackendError, BackendErrorKind, Error};
use crate::namespace::Namespace;
pub use crate::outcome::{PurgeReport, PutResult, SkippedNode};
use crate::resp::{Arg, Reply, Request};

/// A handle to the Redis store. Cheap to clone: clones share the connection pools (one
/// per node), which reconnect by themselves after Redis restarts.
#[derive(Clone)]
pub struct RedisStore {
    topo: Arc<Topology>,
    cfg: Arc<StoreConfig>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl RedisStore {
    /// A store for `cfg`. It connects lazily, so it can be created while Redis is down;
    /// the first command (or [`ping`](Self::ping)) connects.
    pub fn new(cfg: StoreConfig) -> Result<Self, Error> {
        let target = cfg.target()?;
        let dialer = cfg.dialer(&target)?;
        Ok(RedisStore {
            topo: Arc::new(Topology::new(&target, dialer)),
            cfg: Arc::new(cfg),
        })
    }

    /// Whether this store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(*self.topo, Topology::Cluster(_))
    }

    /// A store for `cfg` that has checked Redis answers.
    pub async fn connect(cfg: StoreConfig) -> Result<Self, Error> {
        let store = Self::new(cfg)?;
        store.ping().await?;
        Ok(store)
    }

    /// The configuration this store runs with.
    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    /// The TTL of blocks of `ns`: its own, else the store's.
    pub fn ttl_of(&self, ns: &Namespace) -> Duration {
        ns.ttl.unwrap_or(self.cfg.ttl)
    }

    /// Checks that Redis answers: every primary (on a cluster, those not marked failed).
    pub async fn ping(&self) -> Result<(), Error> {
        let mut req = Request::default();
        req.cmd(&[Arg::Small(b"PING")]);
        for primary in self.topo.primaries().await? {
            if let Some(pool) = primary.pool {
                all(self.exec_on(&pool, &req).await?)?;
            }
        }
        Ok(())
    }
}

/// An integer reply, or the error it is.
pub(super) fn int(r: &Reply) -> Result<i64, Error> {
    match r {
        Reply::Error(e) => Err(BackendError::from_reply(e).into()),
        r => r.int().ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::Protocol,
                format!("expected an integer, got {r:?}"),
            )
            .into()
        }),
    }
}

pub(super) fn ttl_of_pttl(pttl: i64) -> Option<Duration> {
    (pttl >= 0).then(|| Duration::from_millis(pttl as u64))
}

pub(super) fn ttl_millis(ttl: Duration) -> u64 {
    (ttl.as_millis() as u64).max(1)
}
