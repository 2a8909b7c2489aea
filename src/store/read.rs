//! Reads: `get`, `read`, `read_into`, `fetch_prefix`, `lookup`, `exists`, and the
//! verification every read does (checksum, namespace, layout, hash): a bad block is
//! deleted, counted in `kvshelf_store_corrupt_blocks_total` and reported as a miss.
//!
//! # One result type per layer
//!
//! A block's answer changes type once per layer it crosses, and each layer has one:
//! - the store (this file): [`Read`], the block in memory of the library's, or
//!   [`ReadInto`], its payload in the caller's buffer (two, because the caller chooses
//!   where the bytes land). `Stored` is what a key held before verification, private here;
//! - the L1 tier: `l1::Served`, which also says where a block came from (L1, this call's
//!   load, a concurrent load), for metrics;
//! - the sidecar's fetch stream: `shelf::FetchItem` (`frame::Frame`): a block, or the end
//!   of the stream and why, what HTTP and gRPC carry.
//!
//! Puts have one result type in every layer, [`PutResult`](crate::outcome::PutResult)
//! (its documentation says why it has `Queued`, which only the sidecar answers).

use std::time::Duration;

use bytes::Bytes;

use super::conn::Got;
use super::keys::block_key;
use super::route::KeyReplies;
use super::{RedisStore, ttl_millis, ttl_of_pttl};
use crate::codec::{self, Block, Header};
use crate::error::Error;
use crate::hashing::BlockHash;
use crate::namespace::{Namespace, validate_label};
use crate::resp::{Arg, Reply};

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

impl RedisStore {
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
                Stored::Split(head, len, xxh3) => {
                    verify_split(ns, hash, &head, len, xxh3).map_err(Bad::Codec)
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
    pub(super) async fn read_raw(
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
                KeyReplies::Replies(r, _) => {
                    let pttl = pttl_of(r.last().and_then(Got::reply));
                    let stored = match r.into_iter().next() {
                        Some(Got::Reply(Reply::Bulk(v))) => Stored::Value(v),
                        Some(Got::Split {
                            head,
                            body_len,
                            xxh3,
                        }) => Stored::Split(head, body_len, xxh3),
                        Some(Got::Reply(Reply::Error(e))) if is_wrong_type(&e) => {
                            Stored::Bad(Bad::WrongType)
                        }
                        Some(Got::Reply(Reply::Error(_))) => Stored::Unavailable,
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
            .map(|r| matches!(r, KeyReplies::Replies(r, _) if r.first().and_then(Got::reply) == Some(&Reply::Int(1))))
            .collect())
    }

    /// Deletes blocks that failed verification, and counts them. Best effort: a failure to
    /// delete leaves the block to be caught again on the next read.
    pub(super) async fn discard_bad(&self, ns: &Namespace, bad: &[(&BlockHash, Bad)]) {
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
}

/// Counts and logs a bad block found on the shelf.
#[cfg(feature = "server")]
pub(crate) fn count_bad(ns: &Namespace, hash: &BlockHash, err: &codec::CodecError) {
    count_corrupt(ns, hash, err.kind(), err);
}

pub(super) fn count_corrupt(
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
pub(super) enum Stored {
    /// Nothing.
    Missing,
    /// Its node did not answer.
    Unavailable,
    /// A string, to verify.
    Value(Bytes),
    /// A block whose header is here and whose payload (this many bytes, of this XXH3-64)
    /// was read into the caller's buffer, to verify against the header.
    Split(Bytes, usize, u64),
    /// Something that cannot be a block of the namespace.
    Bad(Bad),
}

/// Why a key's value is not the block asked for.
#[derive(Debug)]
pub(super) enum Bad {
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
pub(super) fn is_wrong_type(msg: &str) -> bool {
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

/// Checks a block read in two parts: its header (`head`) and its payload of `len` bytes,
/// in the caller's buffer, whose XXH3-64 the connection computed as it landed.
pub(super) fn verify_split(
    ns: &Namespace,
    hash: &BlockHash,
    head: &[u8],
    len: usize,
    xxh3: u64,
) -> Result<(Header, usize), codec::CodecError> {
    let (header, at) = codec::decode_header(head)?;
    header.check(ns, hash)?;
    header.check_payload_digest(at, len, xxh3)?;
    Ok((header, len))
}
