//! Writes: write-once `put` with a TTL, `touch` (sliding expiry for blocks read from
//! elsewhere) and `delete`.

use bytes::Bytes;

use super::conn::Got;
use super::keys::block_key;
use super::route::KeyReplies;
use super::{RedisStore, int, ttl_millis};
use crate::codec::Header;
use crate::error::{BackendError, Error};
use crate::hashing::BlockHash;
use crate::namespace::{Namespace, validate_label};
use crate::outcome::PutResult;
use crate::resp::{Arg, Reply};

/// One block's put, before resent `SET NX`es are read back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Put {
    Done(PutResult),
    /// "Not set", from a pipeline that was resent: ours, or another writer's?
    Ambiguous,
}

impl RedisStore {
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
        let mut results = replies
            .into_iter()
            .map(|r| match r {
                KeyReplies::Replies(r, resent) => match r.first().and_then(Got::reply) {
                    Some(Reply::Nil) if resent.0 => Ok(Put::Ambiguous),
                    Some(Reply::Nil) => Ok(Put::Done(PutResult::AlreadyPresent)),
                    Some(Reply::Error(e)) => Err(BackendError::from_reply(e).into()),
                    _ => Ok(Put::Done(PutResult::Stored)),
                },
                KeyReplies::Oversized(_) | KeyReplies::Failed(_) => {
                    Ok(Put::Done(PutResult::Dropped))
                }
            })
            .collect::<Result<Vec<Put>, Error>>()?;
        // A `SET NX` resent after its connection broke answers "not set" when its first
        // sending ran and only the reply was lost. Which it was is read back: the stored
        // header is ours byte for byte (namespace, hash, shape, checksum) exactly when the
        // stored block is the one we put.
        let unsure: Vec<usize> = (0..results.len())
            .filter(|&i| results[i] == Put::Ambiguous)
            .collect();
        if !unsure.is_empty() {
            let unsure_keys: Vec<String> = unsure.iter().map(|&i| keys[i].clone()).collect();
            let heads = self
                .keyed(&unsure_keys, false, Vec::new(), |j, key, req| {
                    let end = (headers[unsure[j]].len() - 1).to_string();
                    req.cmd_bulk(
                        headers[unsure[j]].len(),
                        &[
                            Arg::Small(b"GETRANGE"),
                            Arg::Small(key.as_bytes()),
                            Arg::Small(b"0"),
                            Arg::Small(end.as_bytes()),
                        ],
                    );
                })
                .await?;
            for (&i, head) in unsure.iter().zip(heads) {
                results[i] = Put::Done(match head {
                    KeyReplies::Replies(r, _) => match r.first().and_then(Got::reply) {
                        Some(Reply::Bulk(b)) if b[..] == headers[i][..] => PutResult::Stored,
                        _ => PutResult::AlreadyPresent,
                    },
                    // Stored or not, we cannot tell: not confirmed stored.
                    KeyReplies::Oversized(_) | KeyReplies::Failed(_) => PutResult::Dropped,
                });
            }
        }
        Ok(results
            .into_iter()
            .map(|p| match p {
                Put::Done(r) => r,
                Put::Ambiguous => unreachable!("every ambiguous put was read back"),
            })
            .collect())
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
            .filter(|r| matches!(r, KeyReplies::Replies(r, _) if r.first().and_then(Got::reply) == Some(&Reply::Int(1))))
            .count() as u64)
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

    /// Unlinks keys, each on its node.
    pub(super) async fn unlink_keys(&self, keys: &[String]) -> Result<u64, Error> {
        let replies = self
            .keyed(keys, false, Vec::new(), |_, key, req| {
                req.cmd(&[Arg::Small(b"UNLINK"), Arg::Small(key.as_bytes())]);
            })
            .await?;
        let mut deleted = 0;
        let mut unsure = 0;
        for r in replies {
            match r {
                // A resent `UNLINK` answers 0 for a key its first sending deleted (its reply
                // lost): gone either way, but whether it existed cannot be known. Counted as
                // not existing, and said in the log.
                KeyReplies::Replies(r, resent) => {
                    let n = int(r[0].reply().expect("no caller buffer, no split"))? as u64;
                    if resent.0 && n == 0 {
                        unsure += 1;
                    }
                    deleted += n;
                }
                KeyReplies::Failed(e) => return Err(e.into()),
                KeyReplies::Oversized(_) => {}
            }
        }
        if unsure > 0 {
            metrics::counter!("kvshelf_store_unlink_unsure_total").increment(unsure);
            tracing::warn!(
                deleted,
                unsure,
                "UNLINK was resent after a connection broke: {unsure} keys are gone but may \
                 have been deleted by the first sending, so the count may be short by that many"
            );
        }
        Ok(deleted)
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
