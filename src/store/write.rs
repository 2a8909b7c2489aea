//! Writes: write-once `put` with a TTL, `touch` (sliding expiry for blocks read from
//! elsewhere) and `delete`.

use bytes::Bytes;

use super::keys::block_key;
use super::route::KeyReplies;
use super::{RedisStore, int, ttl_millis};
use crate::codec::Header;
use crate::error::{BackendError, Error};
use crate::hashing::BlockHash;
use crate::namespace::{Namespace, validate_label};
use crate::outcome::PutResult;
use crate::resp::{Arg, Reply};

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
        for r in replies {
            match r {
                KeyReplies::Replies(r) => deleted += int(&r[0])? as u64,
                KeyReplies::Failed(e) => return Err(e.into()),
                KeyReplies::Oversized(_) => {}
            }
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
