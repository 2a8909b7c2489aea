//! Pins: `PERSIST` a block, record it in the namespace's pin hash, cap the pinned bytes,
//! and prune records of blocks that are gone.

use std::time::Duration;

use super::admin::{SCAN_PAGE, scan_page};
use super::conn::Got;
use super::keys::{block_key, pins_key};
use super::route::KeyReplies;
use super::{RedisStore, int, ttl_millis};
use crate::error::Error;
use crate::hashing::BlockHash;
use crate::namespace::{Namespace, validate_label};
use crate::resp::{Arg, Reply};

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

impl RedisStore {
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
    pub(super) async fn pin_recorded(
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
        // A record that was there already is a block pinned before, which costs no new
        // room — unless the block is not pinned: then the record is this pin's own, written
        // by a first sending whose reply was lost (a resent HSETNX answers 0), or left by a
        // pin whose PERSIST failed. Either way this pin must pass the cap.
        let counts_as_new = new || {
            let over = limit.is_some_and(|(_, max)| count.saturating_mul(block_bytes) > max);
            over && !self.is_persistent(&key).await?
        };
        if let Some((_, max_bytes)) = limit
            && counts_as_new
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

    /// Whether `key` exists without an expiry (pinned).
    async fn is_persistent(&self, key: &str) -> Result<bool, Error> {
        let r = self
            .on_key(key, |req| {
                req.cmd(&[Arg::Small(b"PTTL"), Arg::Small(key.as_bytes())]);
            })
            .await?;
        Ok(int(&r[0])? == -1)
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
                    req.cmd_caps(
                        SCAN_PAGE,
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
            // is no pin of ours and goes too (one too long to be read is left alone).
            let (mut stale, mut recorded) = (Vec::new(), Vec::new());
            for field in flat.iter().step_by(2).flatten() {
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
                            matches!(r, KeyReplies::Replies(r, _) if r.first().and_then(Got::reply) == Some(&Reply::Int(0)))
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

    pub(super) async fn hdel(&self, label: &str, fields: &[String]) -> Result<(), Error> {
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

    pub(super) async fn hlen(&self, pins: &str) -> Result<u64, Error> {
        let r = self
            .on_key(pins, |req| {
                req.cmd(&[Arg::Small(b"HLEN"), Arg::Small(pins.as_bytes())]);
            })
            .await?;
        Ok(int(&r[0])? as u64)
    }
}
