//! The Redis store: the key schema, write-once puts with a TTL, batched gets with sliding
//! expiry, one-round-trip lookups, pin/unpin, delete and namespace purge.
//!
//! Redis is the system of record. Every key this module writes has a TTL (`SET … NX PX`),
//! so a `volatile-*` eviction policy can always evict kvshelf's blocks and never touches
//! other data in the same Redis; the only way to keep a block forever is [`RedisStore::pin`].
//! Every read verifies the block (checksum, namespace, layout, hash): a bad block is deleted,
//! counted in `kvshelf_store_corrupt_blocks_total` and reported as a miss.

mod config;
mod conn;
mod keys;
mod topology;
mod tracking;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use self::config::{StoreConfig, redact_url};
use self::conn::{Addr, Pool, Replies, Sink, all};
pub use self::keys::{
    KEY_PREFIX, PINS_PREFIX, block_key, namespace_pattern, parse_block_key, pins_key,
};
use self::topology::{TEXT_REPLY, Topology};
pub use self::tracking::{FELL_BEHIND, Invalidation, Tracker};
use crate::codec::{self, Block, Header};
use crate::error::{BackendError, BackendErrorKind, Error};
use crate::hashing::BlockHash;
use crate::namespace::{Namespace, validate_label};
use crate::resp::{Arg, Reply, Request};

/// What happened to one block of a put: the one put result of the library, the sidecar
/// and the client (the store answers the first and the last; the sidecar's queue, `Queued`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PutResult {
    /// Written, with the namespace's TTL.
    Stored,
    /// Already on the shelf: the first writer's bytes stay (write-once).
    AlreadyPresent,
    /// Accepted into the sidecar's asynchronous queue.
    Queued,
    /// Not confirmed stored: the node that owns the block did not answer, the sidecar's
    /// queue was full, or the backend failed or did not answer in time (counted). A put to
    /// a backend that was merely slow may still land later, which is harmless: puts are
    /// write-once and expire.
    Dropped,
}

/// What a capped pin did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinOutcome {
    /// The block is pinned (now, or already was). `pinned_bytes`: the namespace's pinned
    /// payload bytes as counted when this pin was recorded, this block included.
    Pinned {
        /// Pinned payload bytes of the namespace.
        pinned_bytes: u64,
    },
    /// No such block; nothing changed.
    Missing,
    /// Refused: pinning one more block would take the namespace's pinned bytes over the
    /// limit. Nothing changed.
    OverLimit {
        /// Pinned payload bytes of the namespace, without this block.
        pinned_bytes: u64,
    },
}

/// What a purge did: the blocks it unlinked, and the nodes it could not finish.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeReport {
    /// Blocks unlinked, on every node together.
    pub deleted: u64,
    /// The nodes (Redis Cluster primaries) that failed or did not finish in time: their
    /// blocks of the namespace stay, or some of them do. Empty when the purge is complete.
    pub skipped: Vec<SkippedNode>,
}

/// A node a purge could not finish.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedNode {
    /// `host:port` of the cluster primary (the redacted URL for a single Redis).
    pub node: String,
    /// Blocks it had unlinked before it stopped (included in the report's `deleted`).
    pub deleted: u64,
    /// Why it stopped.
    pub error: String,
}

/// A block read from the store, and how long it has left there (`None`: pinned, no TTL).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hit {
    /// The verified block.
    pub block: Block,
    /// Time to live left in the store after this read.
    pub ttl: Option<Duration>,
}

/// What a read found for one block.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Read {
    /// The verified block.
    Hit(Hit),
    /// Not on the shelf (or found bad: deleted and counted).
    Miss,
    /// The node that holds it did not answer: not known whether it is on the shelf.
    Unavailable,
}

impl Read {
    /// The hit, if this is one.
    pub fn hit(self) -> Option<Hit> {
        match self {
            Read::Hit(h) => Some(h),
            _ => None,
        }
    }
}

/// What a read into the caller's memory found for one block.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReadInto {
    /// The payload is in the caller's buffer (its first `len` bytes), verified there.
    Hit {
        /// Payload bytes written.
        len: usize,
        /// The block's header.
        header: Header,
        /// Time to live left in the store after this read.
        ttl: Option<Duration>,
    },
    /// Not on the shelf (or found bad: deleted and counted).
    Miss,
    /// The node that holds it did not answer.
    Unavailable,
}

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

/// Per key: its replies, or why there are none.
enum KeyReplies {
    Replies(Vec<Reply>),
    /// Its value was longer than the command allows (the announced length).
    Oversized(u64),
    Failed(BackendError),
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

    /// Puts full blocks of `ns`, write-once (`SET … NX PX ttl`), one pipeline per node.
    ///
    /// Every payload must be exactly one block of the namespace's shape and dtype; if any is
    /// not, nothing is written. Returns what happened to each block, in order; a block
    /// whose node did not answer is [`PutResult::Dropped`] (the call fails only when
    /// no node answered). Header and payload go out vectored, never copied.
    pub async fn put(
        &self,
        ns: &Namespace,
        blocks: &[(BlockHash, Bytes)],
    ) -> Result<Vec<PutResult>, Error> {
        ns.validate()?;
        check_payloads(ns, blocks)?;
        if blocks.is_empty() {
            return Ok(Vec::new());
        }
        let ttl = ttl_millis(self.ttl_of(ns)).to_string();
        let headers: Vec<Bytes> = blocks
            .iter()
            .map(|(hash, payload)| Bytes::from(Header::for_block(ns, hash, payload).encode()))
            .collect();
        let keys: Vec<String> = blocks
            .iter()
            .map(|(h, _)| block_key(&ns.label, h))
            .collect();
        let replies = self
            .keyed(&keys, true, Vec::new(), |i, key, req| {
                req.cmd(&[
                    Arg::Small(b"SET"),
                    Arg::Small(key.as_bytes()),
                    Arg::Parts(&[headers[i].clone(), blocks[i].1.clone()]),
                    Arg::Small(b"NX"),
                    Arg::Small(b"PX"),
                    Arg::Small(ttl.as_bytes()),
                ]);
            })
            .await?;
        replies
            .into_iter()
            .map(|r| match r {
                KeyReplies::Replies(r) => match r.first() {
                    Some(Reply::Nil) => Ok(PutResult::AlreadyPresent),
                    Some(Reply::Error(e)) => Err(BackendError::from_reply(e).into()),
                    _ => Ok(PutResult::Stored),
                },
                KeyReplies::Oversized(_) | KeyReplies::Failed(_) => Ok(PutResult::Dropped),
            })
            .collect()
    }

    /// Gets blocks of `ns` by hash; `None` where a block is missing, was found bad (and
    /// deleted) or its node did not answer ([`read`](Self::read) tells those apart). A hit
    /// refreshes the TTL when `sliding_ttl` is on, without unpinning pinned blocks, and
    /// reports the TTL the block has left.
    pub async fn get(
        &self,
        ns: &Namespace,
        hashes: &[BlockHash],
    ) -> Result<Vec<Option<Hit>>, Error> {
        Ok(self
            .read(ns, hashes)
            .await?
            .into_iter()
            .map(Read::hit)
            .collect())
    }

    /// Reads blocks of `ns` by hash, one pipeline per node (spread over
    /// `batch_connections`), and says for each whether it is a hit, a miss or unknown
    /// because its node did not answer. A value that is not a valid block of `ns` (another
    /// type, corrupt, too long) is a miss for that block alone: deleted and counted in
    /// `kvshelf_store_corrupt_blocks_total`. The call fails only when no node answered.
    pub async fn read(&self, ns: &Namespace, hashes: &[BlockHash]) -> Result<Vec<Read>, Error> {
        let found = self.read_raw(ns, hashes, Vec::new()).await?;
        let mut out = Vec::with_capacity(hashes.len());
        let mut bad = Vec::new();
        for (hash, (stored, pttl)) in hashes.iter().zip(found) {
            out.push(match stored {
                Stored::Missing => Read::Miss,
                Stored::Unavailable => Read::Unavailable,
                Stored::Bad(why) => {
                    bad.push((hash, why));
                    Read::Miss
                }
                Stored::Split(..) => unreachable!("no caller buffers were given"),
                Stored::Value(v) => match verify(ns, hash, v) {
                    Ok(block) => Read::Hit(Hit {
                        block,
                        ttl: ttl_of_pttl(pttl),
                    }),
                    Err(e) => {
                        bad.push((hash, Bad::Codec(e)));
                        Read::Miss
                    }
                },
            });
        }
        self.discard_bad(ns, &bad).await;
        Ok(out)
    }

    /// [`read`](Self::read) straight into the caller's memory: block `i`'s payload is read
    /// from the socket into `bufs[i]` (its header into memory of the library's) and
    /// verified there (checksum, namespace, hash): the kernel's copy is the only one. A
    /// buffer of `block_bytes` (for a foreign hash scheme: the chunk's size) holds any
    /// payload of the namespace. A payload longer than its buffer fails the call with
    /// [`Error::InvalidInput`] after the read (the buffers before it are filled).
    pub async fn read_into(
        &self,
        ns: &Namespace,
        hashes: &[BlockHash],
        bufs: &mut [&mut [u8]],
    ) -> Result<Vec<ReadInto>, Error> {
        if bufs.len() != hashes.len() {
            return Err(Error::InvalidInput(format!(
                "{} buffers for {} blocks",
                bufs.len(),
                hashes.len()
            )));
        }
        let sinks: Vec<Option<&mut [u8]>> = bufs.iter_mut().map(|b| Some(&mut **b)).collect();
        let found = self.read_raw(ns, hashes, sinks).await?;
        let mut out = Vec::with_capacity(hashes.len());
        let mut bad = Vec::new();
        for ((hash, (stored, pttl)), buf) in hashes.iter().zip(found).zip(bufs.iter_mut()) {
            let checked = match stored {
                Stored::Missing => {
                    out.push(ReadInto::Miss);
                    continue;
                }
                Stored::Unavailable => {
                    out.push(ReadInto::Unavailable);
                    continue;
                }
                Stored::Bad(why) => Err(why),
                // Read into the library's memory (a redirect, a payload longer than the
                // buffer, a value that is no block): verify, then copy what fits.
                Stored::Value(v) => match verify(ns, hash, v) {
                    Ok(block) if block.payload.len() <= buf.len() => {
                        buf[..block.payload.len()].copy_from_slice(&block.payload);
                        Ok((block.header, block.payload.len()))
                    }
                    Ok(block) => {
                        return Err(Error::InvalidInput(format!(
                            "block {hash} has {} bytes of payload; its buffer holds {}",
                            block.payload.len(),
                            buf.len()
                        )));
                    }
                    Err(e) => Err(Bad::Codec(e)),
                },
                Stored::Split(head, len) => {
                    verify_split(ns, hash, &head, &buf[..len]).map_err(Bad::Codec)
                }
            };
            out.push(match checked {
                Ok((header, len)) => ReadInto::Hit {
                    len,
                    header,
                    ttl: ttl_of_pttl(pttl),
                },
                Err(why) => {
                    bad.push((hash, why));
                    ReadInto::Miss
                }
            });
        }
        self.discard_bad(ns, &bad).await;
        Ok(out)
    }

    /// The `GET` and `PEXPIRE … XX` (sliding) or `PTTL` of each block: what its key holds
    /// and the PTTL it has after the read.
    async fn read_raw(
        &self,
        ns: &Namespace,
        hashes: &[BlockHash],
        sinks: Vec<Option<&mut [u8]>>,
    ) -> Result<Vec<(Stored, i64)>, Error> {
        ns.validate()?;
        if hashes.is_empty() {
            return Ok(Vec::new());
        }
        let ttl = ttl_millis(self.ttl_of(ns)).to_string();
        let sliding = self.cfg.sliding_ttl;
        // The longest value a block of `ns` can be; a longer one is refused from its
        // length prefix, before anything of it is read.
        let max_value = usize::try_from(ns.block_bytes())
            .unwrap_or(usize::MAX)
            .saturating_add(codec::MAX_HEADER_LEN);
        let keys: Vec<String> = hashes.iter().map(|h| block_key(&ns.label, h)).collect();
        let replies = self
            .keyed(&keys, true, sinks, |_, key, req| {
                req.cmd_bulk(max_value, &[Arg::Small(b"GET"), Arg::Small(key.as_bytes())]);
                if sliding {
                    // XX: only keys that already have an expiry, so a pinned block stays
                    // pinned. Its answer also says the TTL left: the full `ttl` when it
                    // slid (1), none when the block is pinned (0): no `PTTL` needed.
                    req.cmd(&[
                        Arg::Small(b"PEXPIRE"),
                        Arg::Small(key.as_bytes()),
                        Arg::Small(ttl.as_bytes()),
                        Arg::Small(b"XX"),
                    ]);
                } else {
                    req.cmd(&[Arg::Small(b"PTTL"), Arg::Small(key.as_bytes())]);
                }
            })
            .await?;
        let ttl_ms = ttl_millis(self.ttl_of(ns)) as i64;
        // The PTTL a read leaves: from `PTTL`, or from whether `PEXPIRE … XX` slid it. (A
        // block deleted between the `GET` and the `PEXPIRE` reads as pinned; its
        // invalidation drops it from any L1.)
        let pttl_of = |last: Option<&Reply>| match (sliding, last.and_then(Reply::int)) {
            (false, Some(pttl)) => pttl,
            (true, Some(1)) => ttl_ms,
            (true, Some(0)) => -1,
            _ => -2,
        };
        Ok(replies
            .into_iter()
            .map(|r| match r {
                KeyReplies::Failed(_) => (Stored::Unavailable, -2),
                KeyReplies::Oversized(len) => (
                    Stored::Bad(Bad::Codec(codec::CodecError::Oversized {
                        what: "value",
                        len,
                        max: max_value as u64,
                    })),
                    -2,
                ),
                KeyReplies::Replies(r) => {
                    let pttl = pttl_of(r.last());
                    let stored = match r.into_iter().next() {
                        Some(Reply::Bulk(v)) => Stored::Value(v),
                        Some(Reply::Split { head, body_len }) => Stored::Split(head, body_len),
                        Some(Reply::Error(e)) if is_wrong_type(&e) => Stored::Bad(Bad::WrongType),
                        Some(Reply::Error(_)) => Stored::Unavailable,
                        _ => Stored::Missing,
                    };
                    (stored, pttl)
                }
            })
            .collect())
    }

    /// Gets the longest run of leading blocks of `hashes` that Redis really returns: a
    /// block evicted since the lookup (or whose node did not answer) ends the run, and the
    /// caller recomputes the rest.
    pub async fn fetch_prefix(
        &self,
        ns: &Namespace,
        hashes: &[BlockHash],
    ) -> Result<Vec<Block>, Error> {
        let got = self.read(ns, hashes).await?;
        Ok(got
            .into_iter()
            .map_while(|r| r.hit().map(|h| h.block))
            .collect())
    }

    /// How many leading blocks of `hashes` are on the shelf, counted from the first with no
    /// gap, in one round trip per node whatever the length. Side-effect free: `EXISTS`
    /// neither refreshes TTLs nor touches Redis's LRU/LFU clock. A block whose node did not
    /// answer ends the run like a missing one.
    pub async fn lookup(&self, ns: &Namespace, hashes: &[BlockHash]) -> Result<usize, Error> {
        Ok(self
            .exists(&ns.label, hashes)
            .await?
            .iter()
            .take_while(|e| **e)
            .count())
    }

    /// Slides the TTL of blocks of `ns` that were read from somewhere else (a sidecar's L1)
    /// as a read from Redis would: `PEXPIRE key <ttl> XX` per block, in one round trip per
    /// node. `XX` sets only keys that already have an expiry, so a pinned block stays
    /// pinned and a deleted one is not created. Returns how many keys got the new TTL.
    pub async fn touch(&self, ns: &Namespace, hashes: &[BlockHash]) -> Result<u64, Error> {
        validate_label(&ns.label)?;
        let ttl = ttl_millis(self.ttl_of(ns)).to_string();
        let keys: Vec<String> = hashes.iter().map(|h| block_key(&ns.label, h)).collect();
        let replies = self
            .keyed(&keys, false, Vec::new(), |_, key, req| {
                req.cmd(&[
                    Arg::Small(b"PEXPIRE"),
                    Arg::Small(key.as_bytes()),
                    Arg::Small(ttl.as_bytes()),
                    Arg::Small(b"XX"),
                ]);
            })
            .await?;
        Ok(replies
            .iter()
            .filter(|r| matches!(r, KeyReplies::Replies(r) if r.first() == Some(&Reply::Int(1))))
            .count() as u64)
    }

    /// Whether each block of `hashes` is on the shelf, in one round trip per node:
    /// [`lookup`]'s per-key answer, for callers that own their chunking (LMCache asks about
    /// every chunk, not a prefix). Side-effect free, like `lookup`; a block whose node did
    /// not answer is `false`.
    ///
    /// [`lookup`]: Self::lookup
    pub async fn exists(&self, label: &str, hashes: &[BlockHash]) -> Result<Vec<bool>, Error> {
        validate_label(label)?;
        let keys: Vec<String> = hashes.iter().map(|h| block_key(label, h)).collect();
        let replies = self
            .keyed(&keys, false, Vec::new(), |_, key, req| {
                req.cmd(&[Arg::Small(b"EXISTS"), Arg::Small(key.as_bytes())]);
            })
            .await?;
        Ok(replies
            .iter()
            .map(|r| matches!(r, KeyReplies::Replies(r) if r.first() == Some(&Reply::Int(1))))
            .collect())
    }

    /// Deletes blocks (`UNLINK`: Redis frees the memory off its main thread). Returns how
    /// many existed.
    pub async fn delete(&self, label: &str, hashes: &[BlockHash]) -> Result<u64, Error> {
        validate_label(label)?;
        if hashes.is_empty() {
            return Ok(0);
        }
        let keys: Vec<String> = hashes.iter().map(|h| block_key(label, h)).collect();
        let deleted = self.unlink_keys(&keys).await?;
        // After the blocks: failing here leaves records that the next prune drops.
        let fields: Vec<String> = hashes.iter().map(ToString::to_string).collect();
        self.hdel(label, &fields).await?;
        Ok(deleted)
    }

    /// Keeps a block forever (`PERSIST`): the explicit way to keep a system prompt. Returns
    /// whether the block exists. The pin is recorded in [`pins_key`] like every other, but
    /// not capped: this is the operator's pin (the sidecar uses [`pin_within`](Self::pin_within)).
    pub async fn pin(&self, label: &str, hash: &BlockHash) -> Result<bool, Error> {
        validate_label(label)?;
        Ok(self.pin_recorded(label, hash, None).await? != PinOutcome::Missing)
    }

    /// Pins a block unless that would take the pinned payload bytes of `ns` over
    /// `max_bytes`, counted across every client of this Redis.
    ///
    /// The steps (record the pin in [`pins_key`], count, `PERSIST` the block) touch two keys
    /// that a cluster keeps on different slots, so they are not atomic. Each step that could
    /// leave the count wrong is ordered so that it errs towards over-counting, which
    /// [`prune_pins`](Self::prune_pins) repairs: the record is written before the block is
    /// pinned and removed after it is unpinned or deleted. Two pins racing for the last
    /// room may both be refused; the cap is never exceeded through this method. (One race
    /// escapes the count: a pin of a block that is being put at that very moment, while
    /// another pin prunes, may pin the block after its record was pruned as missing.)
    pub async fn pin_within(
        &self,
        ns: &Namespace,
        hash: &BlockHash,
        max_bytes: u64,
    ) -> Result<PinOutcome, Error> {
        validate_label(&ns.label)?;
        self.pin_recorded(&ns.label, hash, Some((ns.block_bytes(), max_bytes)))
            .await
    }

    /// `limit`: the namespace's block size and its pinned-bytes cap.
    async fn pin_recorded(
        &self,
        label: &str,
        hash: &BlockHash,
        limit: Option<(u64, u64)>,
    ) -> Result<PinOutcome, Error> {
        let (key, pins, field) = (block_key(label, hash), pins_key(label), hash.to_string());
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
            .to_string();
        // Record first: a pin racing this one counts this block before either is pinned.
        let r = self
            .on_key(&pins, |req| {
                req.cmd(&[
                    Arg::Small(b"HSETNX"),
                    Arg::Small(pins.as_bytes()),
                    Arg::Small(field.as_bytes()),
                    Arg::Small(now_ms.as_bytes()),
                ]);
                req.cmd(&[Arg::Small(b"HLEN"), Arg::Small(pins.as_bytes())]);
            })
            .await?;
        let (new, mut count) = (int(&r[0])? == 1, int(&r[1])? as u64);
        let block_bytes = limit.map_or(0, |(b, _)| b);
        if let Some((_, max_bytes)) = limit
            && new
            && count.saturating_mul(block_bytes) > max_bytes
        {
            // Records of blocks deleted behind kvshelf's back must not hold the room.
            count = self.prune_pins(label).await?;
            if count.saturating_mul(block_bytes) > max_bytes {
                self.hdel(label, std::slice::from_ref(&field)).await?;
                let left = self.hlen(&pins).await?;
                return Ok(PinOutcome::OverLimit {
                    pinned_bytes: left.saturating_mul(block_bytes),
                });
            }
        }
        // On an error the record stays: the PERSIST may have run with its reply lost, and a
        // record too many (pruned once its block is gone) is safer than a pin uncounted.
        let r = self
            .on_key(&key, |req| {
                req.cmd(&[Arg::Small(b"PERSIST"), Arg::Small(key.as_bytes())]);
                req.cmd(&[Arg::Small(b"EXISTS"), Arg::Small(key.as_bytes())]);
            })
            .await?;
        if int(&r[1])? == 0 {
            // Not there: no pin to record (this also drops a stale record of the block).
            self.hdel(label, std::slice::from_ref(&field)).await?;
            return Ok(PinOutcome::Missing);
        }
        Ok(PinOutcome::Pinned {
            pinned_bytes: count.saturating_mul(block_bytes),
        })
    }

    /// Gives a pinned block back the store's TTL. Returns whether the block exists.
    pub async fn unpin(&self, label: &str, hash: &BlockHash) -> Result<bool, Error> {
        self.unpin_with(label, hash, self.cfg.ttl).await
    }

    /// Gives a pinned block back a TTL of `ttl` and removes its pin record. Returns whether
    /// the block exists.
    pub async fn unpin_with(
        &self,
        label: &str,
        hash: &BlockHash,
        ttl: Duration,
    ) -> Result<bool, Error> {
        validate_label(label)?;
        let key = block_key(label, hash);
        let ttl = ttl_millis(ttl).to_string();
        let r = self
            .on_key(&key, |req| {
                req.cmd(&[
                    Arg::Small(b"PEXPIRE"),
                    Arg::Small(key.as_bytes()),
                    Arg::Small(ttl.as_bytes()),
                ]);
            })
            .await?;
        // After the TTL is back: failing here over-counts, never lets a pin go uncounted.
        self.hdel(label, &[hash.to_string()]).await?;
        Ok(int(&r[0])? == 1)
    }

    /// Pinned payload bytes of `ns`, as recorded (across every client of this Redis).
    pub async fn pinned_bytes(&self, ns: &Namespace) -> Result<u64, Error> {
        validate_label(&ns.label)?;
        Ok(self
            .hlen(&pins_key(&ns.label))
            .await?
            .saturating_mul(ns.block_bytes()))
    }

    /// Drops the pin records of one namespace whose blocks no longer exist (deleted or
    /// purged with `redis-cli`, or lost with a node), and returns how many records are left.
    /// A record whose block exists stays, even if it is no longer pinned: a pin in flight
    /// records its block before it pins it.
    pub async fn prune_pins(&self, label: &str) -> Result<u64, Error> {
        validate_label(label)?;
        let pins = pins_key(label);
        let mut cursor = "0".to_owned();
        loop {
            let r = self
                .on_key(&pins, |req| {
                    req.cmd_bulk(
                        KEY_REPLY,
                        &[
                            Arg::Small(b"HSCAN"),
                            Arg::Small(pins.as_bytes()),
                            Arg::Small(cursor.as_bytes()),
                            Arg::Small(b"COUNT"),
                            Arg::Small(b"1000"),
                        ],
                    );
                })
                .await?;
            let (next, flat) = scan_page(&r[0])?;
            // HSCAN answers field, value, field, value, …; a field that is not a block hash
            // is no pin of ours and goes too.
            let (mut stale, mut recorded) = (Vec::new(), Vec::new());
            for field in flat.iter().step_by(2) {
                match field.parse::<BlockHash>() {
                    Ok(h) => recorded.push((field.clone(), h)),
                    Err(_) => stale.push(field.clone()),
                }
            }
            if !recorded.is_empty() {
                let keys: Vec<String> = recorded.iter().map(|(_, h)| block_key(label, h)).collect();
                let replies = self
                    .keyed(&keys, false, Vec::new(), |_, key, req| {
                        req.cmd(&[Arg::Small(b"EXISTS"), Arg::Small(key.as_bytes())]);
                    })
                    .await?;
                // A block that is gone; a node that did not answer keeps its records.
                stale.extend(
                    recorded
                        .iter()
                        .zip(replies)
                        .filter(|(_, r)| {
                            matches!(r, KeyReplies::Replies(r) if r.first() == Some(&Reply::Int(0)))
                        })
                        .map(|((f, _), _)| f.clone()),
                );
            }
            self.hdel(label, &stale).await?;
            if next == "0" {
                break;
            }
            cursor = next;
        }
        self.hlen(&pins).await
    }

    /// Remaining time to live of a block: `Ok(None)` when it is missing, `Some(None)` when
    /// it is pinned.
    pub async fn ttl(
        &self,
        label: &str,
        hash: &BlockHash,
    ) -> Result<Option<Option<Duration>>, Error> {
        validate_label(label)?;
        let key = block_key(label, hash);
        let r = self
            .on_key(&key, |req| {
                req.cmd(&[Arg::Small(b"PTTL"), Arg::Small(key.as_bytes())]);
            })
            .await?;
        Ok(match int(&r[0])? {
            -2 => None,
            -1 => Some(None),
            ms => Some(Some(Duration::from_millis(ms.max(0) as u64))),
        })
    }

    /// Deletes every block of one namespace with `SCAN` + `UNLINK` (never `KEYS`, which
    /// blocks Redis). Blocks put while the purge runs may survive it.
    ///
    /// On a cluster every primary is purged at once, and a primary that fails (or that the
    /// cluster marks as failed) does not stop the others: it is listed in
    /// [`PurgeReport::skipped`] and its blocks stay. The call fails only when no node could
    /// delete anything (always the case when the one Redis is down).
    pub async fn purge(&self, label: &str) -> Result<PurgeReport, Error> {
        self.purge_nodes(label, None).await
    }

    /// [`purge`](Self::purge) with a deadline: a node that has not finished by then is
    /// skipped (its error is [`Error::Deadline`]), so the call answers within about
    /// `deadline` whatever the backend does.
    pub async fn purge_within(
        &self,
        label: &str,
        deadline: Duration,
    ) -> Result<PurgeReport, Error> {
        self.purge_nodes(label, Some(deadline)).await
    }

    async fn purge_nodes(
        &self,
        label: &str,
        deadline: Option<Duration>,
    ) -> Result<PurgeReport, Error> {
        validate_label(label)?;
        let deadline = deadline.map(|d| (tokio::time::Instant::now() + d, d));
        let primaries = within(deadline, self.topo.primaries()).await?;
        let pattern = namespace_pattern(label);
        let purges = primaries.into_iter().map(|primary| {
            let pattern = &pattern;
            async move {
                // Counted outside the scan, so that a node cut off by the deadline still
                // reports what it had deleted.
                let unlinked = AtomicU64::new(0);
                let result = match &primary.pool {
                    None => Err(Error::Backend(BackendError::new(
                        BackendErrorKind::Unavailable,
                        "the cluster marks this primary as failed",
                    ))),
                    Some(pool) => {
                        let run = self.scan_node(pool, pattern, |keys| {
                            let unlinked = &unlinked;
                            async move {
                                let n = self.unlink_on(pool, &keys).await?;
                                unlinked.fetch_add(n, Ordering::Relaxed);
                                Ok(())
                            }
                        });
                        within(deadline, run).await
                    }
                };
                (primary.name, unlinked.into_inner(), result)
            }
        });
        let mut report = PurgeReport::default();
        let mut nodes = 0;
        let mut first_error = None;
        for (node, deleted, result) in futures_util::future::join_all(purges).await {
            nodes += 1;
            report.deleted += deleted;
            if let Err(e) = result {
                report.skipped.push(SkippedNode {
                    node: if self.is_cluster() {
                        node
                    } else {
                        self.cfg.redacted_url()
                    },
                    deleted,
                    error: e.to_string(),
                });
                first_error.get_or_insert(e);
            }
        }
        if let Some(e) = first_error
            && report.skipped.len() == nodes
            && report.deleted == 0
        {
            return Err(e);
        }
        // The pin records of the blocks that are gone. Best effort: a record left behind
        // is pruned the next time a pin would pass the namespace's cap.
        if let Err(e) = within(deadline, self.prune_pins(label)).await {
            tracing::warn!(namespace = label, error = %e, "purge: pin records not pruned");
        }
        Ok(report)
    }

    /// Counts the blocks of one namespace with `SCAN` (approximate while puts run).
    pub async fn count(&self, label: &str) -> Result<u64, Error> {
        validate_label(label)?;
        let n = AtomicU64::new(0);
        self.scan(&namespace_pattern(label), |keys| {
            n.fetch_add(keys.len() as u64, Ordering::Relaxed);
        })
        .await?;
        Ok(n.into_inner())
    }

    /// Counts blocks per namespace label over every kvshelf key, with `SCAN`.
    pub async fn count_by_namespace(
        &self,
    ) -> Result<std::collections::BTreeMap<String, u64>, Error> {
        let counts = std::sync::Mutex::new(std::collections::BTreeMap::new());
        let pattern = format!("{KEY_PREFIX}*");
        self.scan(&pattern, |keys| {
            let mut counts = counts.lock().expect("counts lock");
            for k in keys {
                if let Some((label, _)) = k[KEY_PREFIX.len()..].split_once(':') {
                    *counts.entry(label.to_owned()).or_insert(0u64) += 1;
                }
            }
        })
        .await?;
        Ok(counts.into_inner().expect("counts lock"))
    }

    /// The text of `INFO <section>` (for example `memory` or `stats`), for operators.
    /// On a cluster, the `INFO` of the first primary that answers.
    pub async fn info(&self, section: &str) -> Result<String, Error> {
        let mut req = Request::default();
        req.cmd_bulk(
            TEXT_REPLY,
            &[Arg::Small(b"INFO"), Arg::Small(section.as_bytes())],
        );
        let mut last = None;
        for primary in self.topo.primaries().await? {
            let Some(pool) = primary.pool else { continue };
            match self.exec_on(&pool, &req).await.and_then(all) {
                Ok(r) => {
                    return r[0].text().map(str::to_owned).ok_or_else(|| {
                        BackendError::new(BackendErrorKind::Protocol, "INFO is not text").into()
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            BackendError::new(BackendErrorKind::Unavailable, "no primary answers").into()
        }))
    }

    /// Reads the header of the block stored under a raw key, as an operator would with
    /// `GETRANGE`: it neither refreshes the TTL nor reads the payload.
    pub async fn inspect(&self, key: &str) -> Result<Option<(Header, Option<Duration>)>, Error> {
        let end = (codec::MAX_HEADER_LEN - 1).to_string();
        let r = self
            .on_key(key, |req| {
                req.cmd_bulk(
                    codec::MAX_HEADER_LEN,
                    &[
                        Arg::Small(b"GETRANGE"),
                        Arg::Small(key.as_bytes()),
                        Arg::Small(b"0"),
                        Arg::Small(end.as_bytes()),
                    ],
                );
                req.cmd(&[Arg::Small(b"PTTL"), Arg::Small(key.as_bytes())]);
            })
            .await?;
        let pttl = int(&r[1])?;
        if pttl == -2 {
            return Ok(None);
        }
        let head = r[0].bytes().cloned().unwrap_or_default();
        let (header, _) = codec::decode_header(&head)?;
        Ok(Some((header, ttl_of_pttl(pttl))))
    }

    /// Runs `SCAN MATCH pattern` to the end on every live primary, handing each page of
    /// keys to `sink`.
    async fn scan(&self, pattern: &str, sink: impl Fn(Vec<String>)) -> Result<(), Error> {
        for primary in self.topo.primaries().await? {
            if let Some(pool) = primary.pool {
                self.scan_node(&pool, pattern, |keys| {
                    sink(keys);
                    async { Ok(()) }
                })
                .await?;
            }
        }
        Ok(())
    }

    /// [`scan`](Self::scan) on one node, awaiting `page` for each page.
    async fn scan_node<F, Fut>(&self, pool: &Arc<Pool>, pattern: &str, page: F) -> Result<(), Error>
    where
        F: Fn(Vec<String>) -> Fut,
        Fut: std::future::Future<Output = Result<(), Error>>,
    {
        let mut cursor = "0".to_owned();
        loop {
            let mut req = Request::default();
            req.cmd_bulk(
                KEY_REPLY,
                &[
                    Arg::Small(b"SCAN"),
                    Arg::Small(cursor.as_bytes()),
                    Arg::Small(b"MATCH"),
                    Arg::Small(pattern.as_bytes()),
                    Arg::Small(b"COUNT"),
                    Arg::Small(b"1000"),
                ],
            );
            let r = all(self.exec_on(pool, &req).await?)?;
            let (next, keys) = scan_page(&r[0])?;
            if !keys.is_empty() {
                page(keys).await?;
            }
            if next == "0" {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// Unlinks keys, each on its node.
    async fn unlink_keys(&self, keys: &[String]) -> Result<u64, Error> {
        let replies = self
            .keyed(keys, false, Vec::new(), |_, key, req| {
                req.cmd(&[Arg::Small(b"UNLINK"), Arg::Small(key.as_bytes())]);
            })
            .await?;
        let mut deleted = 0;
        for r in replies {
            match r {
                KeyReplies::Replies(r) => deleted += int(&r[0])? as u64,
                KeyReplies::Failed(e) => return Err(e.into()),
                KeyReplies::Oversized(_) => {}
            }
        }
        Ok(deleted)
    }

    /// Unlinks keys a `SCAN` of `pool`'s node found (they are that node's).
    async fn unlink_on(&self, pool: &Arc<Pool>, keys: &[String]) -> Result<u64, Error> {
        let mut req = Request::default();
        for key in keys {
            req.cmd(&[Arg::Small(b"UNLINK"), Arg::Small(key.as_bytes())]);
        }
        let mut n = 0;
        for r in all(self.exec_on(pool, &req).await?)? {
            // A key that moved since the scan is left to the next purge.
            n += r.int().unwrap_or(0) as u64;
        }
        Ok(n)
    }

    async fn hdel(&self, label: &str, fields: &[String]) -> Result<(), Error> {
        if fields.is_empty() {
            return Ok(());
        }
        let pins = pins_key(label);
        let r = self
            .on_key(&pins, |req| {
                let mut args = vec![Arg::Small(b"HDEL"), Arg::Small(pins.as_bytes())];
                args.extend(fields.iter().map(|f| Arg::Small(f.as_bytes())));
                req.cmd(&args);
            })
            .await?;
        int(&r[0]).map(|_| ())
    }

    async fn hlen(&self, pins: &str) -> Result<u64, Error> {
        let r = self
            .on_key(pins, |req| {
                req.cmd(&[Arg::Small(b"HLEN"), Arg::Small(pins.as_bytes())]);
            })
            .await?;
        Ok(int(&r[0])? as u64)
    }

    /// Deletes blocks that failed verification, and counts them. Best effort: a failure to
    /// delete leaves the block to be caught again on the next read.
    async fn discard_bad(&self, ns: &Namespace, bad: &[(&BlockHash, Bad)]) {
        if bad.is_empty() {
            return;
        }
        let keys: Vec<String> = bad.iter().map(|(h, _)| block_key(&ns.label, h)).collect();
        for (hash, why) in bad {
            count_corrupt(ns, hash, why.kind(), why);
        }
        if let Err(e) = self.unlink_keys(&keys).await {
            tracing::warn!(error = %e, "could not delete bad blocks");
        }
    }

    /// Commands on one key (each says the longest bulk reply it may get, as `build` adds
    /// it): their replies, or the first server error.
    async fn on_key(&self, key: &str, build: impl Fn(&mut Request)) -> Result<Vec<Reply>, Error> {
        let keys = [key.to_owned()];
        let mut r = self
            .keyed(&keys, false, Vec::new(), |_, _, req| build(req))
            .await?;
        match r.pop() {
            Some(KeyReplies::Replies(replies)) => {
                if let Some(e) = replies.iter().find_map(|r| match r {
                    Reply::Error(e) => Some(e),
                    _ => None,
                }) {
                    return Err(BackendError::from_reply(e).into());
                }
                Ok(replies)
            }
            Some(KeyReplies::Failed(e)) => Err(e.into()),
            Some(KeyReplies::Oversized(len)) => Err(BackendError::new(
                BackendErrorKind::Protocol,
                format!("reply of {len} bytes to a command on {key}"),
            )
            .into()),
            None => unreachable!("one key, one answer"),
        }
    }

    /// Sends `req` to one node; a failure tells the topology.
    async fn exec_on(&self, pool: &Arc<Pool>, req: &Request) -> Result<Replies, Error> {
        pool.exec(req, &mut []).await.map_err(|e| {
            self.topo.failed(pool, &e);
            e.into()
        })
    }

    /// The one way commands on keys reach Redis, for every operation and topology.
    ///
    /// `build(i, key, req)` appends the commands of key `i` (each only on that key, so all
    /// in its slot). Keys are grouped by node; with `spread` (block values: reads and
    /// puts), each node's group is cut into at most `batch_connections` pipelines; every
    /// pipeline of every node is sent at once, each on a connection of its own. A key's first bulk reply goes into `sinks[i]` when
    /// given (read straight into the caller's memory; the reply then reads `Int(len)`).
    ///
    /// Per key, the semantics are the same everywhere: its replies (server errors
    /// included, e.g. `WRONGTYPE`, for the operation to judge), or the error of its node
    /// when that node failed or timed out. A `MOVED` or `ASK` reply sends the key's
    /// commands again to the node named (`ASKING` first for `ASK`), at most twice; keys
    /// that came after a value too long for its command on the same connection are sent
    /// again too. The call fails only when every key's node failed.
    async fn keyed(
        &self,
        keys: &[String],
        spread: bool,
        mut sinks: Vec<Option<&mut [u8]>>,
        build: impl Fn(usize, &str, &mut Request),
    ) -> Result<Vec<KeyReplies>, Error> {
        let mut out: Vec<Option<KeyReplies>> = (0..keys.len()).map(|_| None).collect();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        sinks.resize_with(keys.len(), || None);
        let (groups, unserved) = self.topo.route(keys).await?;
        for (i, e) in unserved {
            out[i] = Some(KeyReplies::Failed(e));
        }
        // Cut each node's keys into pipelines.
        let parts = if spread {
            self.cfg.batch_connections.max(1)
        } else {
            1
        };
        let mut batches: Vec<(Arc<Pool>, Vec<usize>)> = Vec::new();
        for (pool, idx) in groups {
            let per = idx.len().div_ceil(parts).max(1);
            for chunk in idx.chunks(per) {
                batches.push((pool.clone(), chunk.to_vec()));
            }
        }
        let mut redo: Vec<(usize, Redirect)> = Vec::new();
        {
            let mut prepared = Vec::with_capacity(batches.len());
            for (pool, idx) in &batches {
                let mut req = Request::default();
                let mut counts = Vec::with_capacity(idx.len());
                let mut batch_sinks = Vec::new();
                for &i in idx {
                    let before = req.len();
                    build(i, &keys[i], &mut req);
                    counts.push(req.len() - before);
                    batch_sinks.push(match sinks[i].take() {
                        Some(buf) => Sink::Into(buf),
                        None => Sink::Own,
                    });
                    batch_sinks.extend((1..req.len() - before).map(|_| Sink::Own));
                }
                prepared.push((pool, idx, req, counts, batch_sinks));
            }
            let sent = prepared
                .iter_mut()
                .map(|(pool, _, req, _, sinks)| async move { pool.exec(req, sinks).await });
            let results = futures_util::future::join_all(sent).await;
            for ((pool, idx, _, counts, _), result) in prepared.iter().zip(results) {
                match result {
                    Err(e) => {
                        self.topo.failed(pool, &e);
                        for &i in idx.iter() {
                            out[i] = Some(KeyReplies::Failed(e.clone()));
                        }
                    }
                    Ok(replies) => {
                        let got = replies.replies.len();
                        let mut it = replies.replies.into_iter();
                        let mut at = 0;
                        for (&i, &n) in idx.iter().zip(counts) {
                            if at + n <= got {
                                let r: Vec<Reply> = it.by_ref().take(n).collect();
                                at += n;
                                match redirect(&r) {
                                    Some(to) => redo.push((i, to)),
                                    None => {
                                        if r.iter().any(is_readonly) {
                                            self.topo.failed(
                                                pool,
                                                &BackendError::from_reply("READONLY"),
                                            );
                                        }
                                        out[i] = Some(KeyReplies::Replies(r));
                                    }
                                }
                            } else if at <= got && replies.oversized.is_some() && out[i].is_none() {
                                // The reply that stopped the connection is this key's.
                                out[i] = Some(KeyReplies::Oversized(
                                    replies.oversized.expect("checked"),
                                ));
                                at = usize::MAX / 2;
                            } else {
                                redo.push((i, Redirect::Again));
                            }
                        }
                    }
                }
            }
        }
        // Redirected keys, and keys cut off by an oversized value: sent again, read into
        // memory of the library's (their callers copy).
        for _round in 0..2 {
            if redo.is_empty() {
                break;
            }
            let mut next = Vec::new();
            let mut by_target: Vec<(Arc<Pool>, bool, Vec<usize>)> = Vec::new();
            for (i, how) in redo.drain(..) {
                let (pool, asking) = match &how {
                    Redirect::Moved(slot, addr) => {
                        self.topo.moved(*slot, addr);
                        (self.topo.pool_at(addr), false)
                    }
                    Redirect::Ask(addr) => (self.topo.pool_at(addr), true),
                    Redirect::Again => {
                        let (groups, _) = self.topo.route(std::slice::from_ref(&keys[i])).await?;
                        (groups.into_iter().next().map(|(p, _)| p), false)
                    }
                };
                let Some(pool) = pool else {
                    out[i] = Some(KeyReplies::Failed(BackendError::new(
                        BackendErrorKind::Unavailable,
                        "redirected outside a cluster",
                    )));
                    continue;
                };
                match by_target
                    .iter_mut()
                    .find(|(p, a, _)| Arc::ptr_eq(p, &pool) && *a == asking)
                {
                    Some((_, _, idx)) => idx.push(i),
                    None => by_target.push((pool, asking, vec![i])),
                }
            }
            for (pool, asking, idx) in by_target {
                // ASKING holds for the next command only: one goes before each.
                let mut req = Request::asking(asking);
                let mut counts = Vec::new();
                for &i in &idx {
                    let before = req.len();
                    build(i, &keys[i], &mut req);
                    counts.push(req.len() - before);
                }
                let per = if asking { 2 } else { 1 };
                match pool.exec(&req, &mut []).await {
                    Err(e) => {
                        self.topo.failed(&pool, &e);
                        for &i in &idx {
                            out[i] = Some(KeyReplies::Failed(e.clone()));
                        }
                    }
                    Ok(replies) => {
                        let got = replies.replies.len();
                        let mut it = replies.replies.into_iter();
                        let mut at = 0;
                        for (&i, &n) in idx.iter().zip(&counts) {
                            if at + n > got {
                                out[i] = Some(match replies.oversized {
                                    Some(len) if at <= got => KeyReplies::Oversized(len),
                                    _ => KeyReplies::Failed(BackendError::new(
                                        BackendErrorKind::Protocol,
                                        "reply missing",
                                    )),
                                });
                                at = usize::MAX / 2;
                                continue;
                            }
                            at += n;
                            let r: Vec<Reply> =
                                it.by_ref().take(n).skip(per - 1).step_by(per).collect();
                            match redirect(&r) {
                                Some(to) => next.push((i, to)),
                                None => out[i] = Some(KeyReplies::Replies(r)),
                            }
                        }
                    }
                }
            }
            redo = next;
        }
        for (i, _) in redo {
            out[i] = Some(KeyReplies::Failed(BackendError::new(
                BackendErrorKind::Unavailable,
                format!("{} redirected too often", keys[i]),
            )));
        }
        let out: Vec<KeyReplies> = out
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    KeyReplies::Failed(BackendError::new(BackendErrorKind::Protocol, "no reply"))
                })
            })
            .collect();
        if out.iter().all(|r| matches!(r, KeyReplies::Failed(_))) {
            let Some(KeyReplies::Failed(e)) = out.into_iter().next() else {
                unreachable!("not empty, all failed")
            };
            return Err(e.into());
        }
        Ok(out)
    }
}

/// Where a key's commands must go again.
enum Redirect {
    /// `MOVED slot host:port`: the slot lives there now.
    Moved(u16, Addr),
    /// `ASK slot host:port`: this key is being migrated there; ask once with `ASKING`.
    Ask(Addr),
    /// The same node again (the connection stopped before this key's replies).
    Again,
}

/// The redirect in a key's replies, if any.
fn redirect(replies: &[Reply]) -> Option<Redirect> {
    replies.iter().find_map(|r| {
        let Reply::Error(e) = r else { return None };
        let mut words = e.split(' ');
        let kind = words.next()?;
        let slot: u16 = words.next()?.parse().ok()?;
        let addr = words.next()?;
        let (host, port) = addr.rsplit_once(':')?;
        let addr = Addr {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port: port.parse().ok()?,
        };
        match kind {
            "MOVED" => Some(Redirect::Moved(slot, addr)),
            "ASK" => Some(Redirect::Ask(addr)),
            _ => None,
        }
    })
}

fn is_readonly(r: &Reply) -> bool {
    matches!(r, Reply::Error(e) if e.starts_with("READONLY"))
}

/// Longest key a `SCAN` or `HSCAN` page may hold.
const KEY_REPLY: usize = 1024;

/// An integer reply, or the error it is.
fn int(r: &Reply) -> Result<i64, Error> {
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

/// A `SCAN`/`HSCAN` page: the next cursor and the elements.
fn scan_page(r: &Reply) -> Result<(String, Vec<String>), Error> {
    let bad = || -> Error {
        BackendError::new(
            BackendErrorKind::Protocol,
            format!("not a SCAN page: {r:?}"),
        )
        .into()
    };
    match r {
        Reply::Error(e) => Err(BackendError::from_reply(e).into()),
        Reply::Array(a) if a.len() == 2 => {
            let cursor = a[0].text().ok_or_else(bad)?.to_owned();
            let Reply::Array(items) = &a[1] else {
                return Err(bad());
            };
            Ok((
                cursor,
                items
                    .iter()
                    .map(|i| i.text().map(str::to_owned).ok_or_else(bad))
                    .collect::<Result<_, _>>()?,
            ))
        }
        _ => Err(bad()),
    }
}

fn ttl_of_pttl(pttl: i64) -> Option<Duration> {
    (pttl >= 0).then(|| Duration::from_millis(pttl as u64))
}

/// `call`, failing with [`Error::Deadline`] if it has not finished by `deadline`.
async fn within<T>(
    deadline: Option<(tokio::time::Instant, Duration)>,
    call: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match deadline {
        Some((at, d)) => tokio::time::timeout_at(at, call)
            .await
            .unwrap_or(Err(Error::Deadline(d))),
        None => call.await,
    }
}

/// Every payload must be exactly one block of the namespace's shape and dtype (for a
/// foreign hash scheme: 1 byte up to one full chunk).
pub(crate) fn check_payloads(ns: &Namespace, blocks: &[(BlockHash, Bytes)]) -> Result<(), Error> {
    match blocks
        .iter()
        .position(|(_, p)| !ns.accepts_payload_len(p.len() as u64))
    {
        None => Ok(()),
        Some(i) => Err(wrong_size(ns, i, blocks[i].1.len() as u64)),
    }
}

/// Block `i` of a request has `len` bytes of payload, which its namespace does not accept.
pub(crate) fn wrong_size(ns: &Namespace, i: usize, len: u64) -> Error {
    let want = ns.block_bytes();
    if !ns.hash_scheme.is_kvshelf() {
        return Error::InvalidInput(format!(
            "chunk {i} has {len} bytes of payload; namespace {:?} ({} hashes) stores chunks of \
             1 to {want} bytes",
            ns.label, ns.hash_scheme
        ));
    }
    Error::InvalidInput(format!(
        "block {i} has {len} bytes of payload; one block of namespace {:?} is {want} bytes \
         ({} x {:?})",
        ns.label,
        ns.kv_dtype,
        ns.block_shape()
    ))
}

/// Counts and logs a bad block found on the shelf.
#[cfg(feature = "server")]
pub(crate) fn count_bad(ns: &Namespace, hash: &BlockHash, err: &codec::CodecError) {
    count_corrupt(ns, hash, err.kind(), err);
}

fn count_corrupt(
    ns: &Namespace,
    hash: &BlockHash,
    reason: &'static str,
    err: &dyn std::fmt::Display,
) {
    metrics::counter!("kvshelf_store_corrupt_blocks_total", "reason" => reason).increment(1);
    tracing::warn!(namespace = %ns.label, block = %hash, error = %err,
        "bad block on the shelf: deleting it and answering a miss");
}

/// What a block's key held.
enum Stored {
    /// Nothing.
    Missing,
    /// Its node did not answer.
    Unavailable,
    /// A string, to verify.
    Value(Bytes),
    /// A block whose header is here and whose payload (this many bytes) was read into the
    /// caller's buffer, to verify there.
    Split(Bytes, usize),
    /// Something that cannot be a block of the namespace.
    Bad(Bad),
}

/// Why a key's value is not the block asked for.
#[derive(Debug)]
enum Bad {
    /// A string that does not decode or verify (or is longer than any block could be).
    Codec(codec::CodecError),
    /// A value of another type (a list, a hash, …): Redis answered `GET` with `WRONGTYPE`.
    WrongType,
}

impl Bad {
    /// The `reason` label of `kvshelf_store_corrupt_blocks_total`.
    fn kind(&self) -> &'static str {
        match self {
            Bad::Codec(e) => e.kind(),
            Bad::WrongType => "wrong_type",
        }
    }
}

impl std::fmt::Display for Bad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bad::Codec(e) => e.fmt(f),
            Bad::WrongType => f.write_str("the key holds a value that is not a string (WRONGTYPE)"),
        }
    }
}

/// A `WRONGTYPE` error reply (`-WRONGTYPE Operation against a key holding the wrong kind
/// of value`).
fn is_wrong_type(msg: &str) -> bool {
    msg.starts_with("WRONGTYPE")
}

/// Decodes a stored value and checks it is the block `ns` asked for under `hash`.
pub(crate) fn verify(
    ns: &Namespace,
    hash: &BlockHash,
    value: Bytes,
) -> Result<Block, codec::CodecError> {
    let block = codec::decode(value)?;
    block.header.check(ns, hash)?;
    Ok(block)
}

/// Checks a block read in two parts: its header (`head`) and its payload, in the
/// caller's buffer.
fn verify_split(
    ns: &Namespace,
    hash: &BlockHash,
    head: &[u8],
    payload: &[u8],
) -> Result<(Header, usize), codec::CodecError> {
    let (header, at) = codec::decode_header(head)?;
    header.check(ns, hash)?;
    header.check_payload(at, payload)?;
    Ok((header, payload.len()))
}

fn ttl_millis(ttl: Duration) -> u64 {
    (ttl.as_millis() as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redact_url("rediss://kv:s3cret@redis.internal:6380/0"),
            "rediss://kv:***@redis.internal:6380/0"
        );
        assert_eq!(redact_url("redis://:pw@h/1"), "redis://:***@h/1");
        assert_eq!(
            redact_url("redis+unix:///run/redis.sock?db=2&pass=hunter2&user=kv"),
            "redis+unix:///run/redis.sock?db=2&pass=***&user=kv"
        );
        assert_eq!(
            redact_url("unix:///run/redis.sock?pass=hunter2"),
            "unix:///run/redis.sock?pass=***"
        );
        let cfg = StoreConfig {
            url: "redis://u:hunter2@h".into(),
            ..Default::default()
        };
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }

    #[test]
    fn debug_shows_every_field_but_no_password() {
        let cfg = StoreConfig {
            url: "redis://u:hunter2@a:6379,redis://u:hunter2@b:6379".into(),
            tls_ca_file: Some("/etc/ca.pem".into()),
            ..Default::default()
        };
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redis://u:***@a:6379,redis://u:***@b:6379"));
        // Every field a serialized config has (serde sees all of them) is in the output.
        let fields = serde_json::to_value(&cfg).unwrap();
        for field in fields.as_object().unwrap().keys() {
            assert!(
                shown.contains(&format!("{field}: ")),
                "{field} missing: {shown}"
            );
        }
    }

    #[test]
    fn config_reads_humane_durations() {
        let cfg: StoreConfig =
            serde_json::from_str(r#"{"ttl":"10m","sliding_ttl":false}"#).unwrap();
        assert_eq!(cfg.ttl, Duration::from_secs(600));
        assert!(!cfg.sliding_ttl);
        assert_eq!(cfg.response_timeout, Duration::from_secs(5));
    }
}
