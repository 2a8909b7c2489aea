//! Operators' commands: `purge` (`SCAN` + `UNLINK`, per primary, with a deadline),
//! `count`, `count_by_namespace`, `info`, `inspect` and `ttl`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::conn::{Pool, all};
use super::keys::{KEY_PREFIX, block_key, namespace_pattern};
use super::topology::TEXT_REPLY;
use super::{RedisStore, int, ttl_of_pttl};
use crate::codec::{self, Header};
use crate::error::{BackendError, BackendErrorKind, Error};
use crate::hashing::BlockHash;
use crate::namespace::validate_label;
use crate::outcome::{PurgeReport, SkippedNode};
use crate::resp::{Arg, Caps, Reply, Request};

impl RedisStore {
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

    pub(super) async fn purge_nodes(
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
    pub(super) async fn scan(
        &self,
        pattern: &str,
        sink: impl Fn(Vec<String>),
    ) -> Result<(), Error> {
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
    pub(super) async fn scan_node<F, Fut>(
        &self,
        pool: &Arc<Pool>,
        pattern: &str,
        page: F,
    ) -> Result<(), Error>
    where
        F: Fn(Vec<String>) -> Fut,
        Fut: std::future::Future<Output = Result<(), Error>>,
    {
        let mut cursor = "0".to_owned();
        let mut foreign = 0u64;
        loop {
            let mut req = Request::default();
            req.cmd_caps(
                SCAN_PAGE,
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
            let (next, items) = scan_page(&r[0])?;
            let keys: Vec<String> = items.into_iter().flatten().collect();
            foreign += (r_len(&r[0]) - keys.len()) as u64;
            if !keys.is_empty() {
                page(keys).await?;
            }
            if next == "0" {
                if foreign > 0 {
                    // Not kvshelf's: it never writes such keys. Left alone, and said.
                    tracing::warn!(
                        node = %pool.addr(),
                        pattern,
                        foreign,
                        "SCAN skipped keys that cannot be kvshelf blocks (longer than \
                         {KEY_REPLY} bytes, or not UTF-8); they are neither counted nor deleted"
                    );
                }
                return Ok(());
            }
            cursor = next;
        }
    }

    /// Unlinks keys a `SCAN` of `pool`'s node found (they are that node's).
    pub(super) async fn unlink_on(&self, pool: &Arc<Pool>, keys: &[String]) -> Result<u64, Error> {
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
}

/// Longest key a `SCAN` or `HSCAN` page hands over; a longer one is skipped (it cannot be a
/// kvshelf key: a label is at most 64 bytes, a hash 64 hex digits).
pub(super) const KEY_REPLY: usize = 1024;

/// What one `SCAN`/`HSCAN … COUNT 1000` page may hold. Redis stops a page once it has
/// about `COUNT` elements (a few more when a bucket holds several keys; a small hash in
/// listpack encoding answers whole, 128 fields by default): 65,536 elements and 8 MiB
/// leave room for all of that, where `MAX_ELEMENTS` keys of `KEY_REPLY` bytes would be
/// 1 GiB. Longer keys are skipped, never a failed page: any key matching the pattern
/// comes back, whoever wrote it.
pub(super) const SCAN_PAGE: Caps = Caps::bulk(KEY_REPLY)
    .total(8 << 20)
    .elements(1 << 16)
    .skip_long();

/// How many elements a `SCAN` page listed (skipped ones included).
fn r_len(r: &Reply) -> usize {
    match r {
        Reply::Array(a) => match a.get(1) {
            Some(Reply::Array(items)) => items.len(),
            _ => 0,
        },
        _ => 0,
    }
}

/// A `SCAN`/`HSCAN` page: the next cursor and the elements, `None` for one that was
/// skipped (longer than [`KEY_REPLY`]) or is not UTF-8: no key kvshelf writes.
pub(super) fn scan_page(r: &Reply) -> Result<(String, Vec<Option<String>>), Error> {
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
                    .map(|i| match i {
                        Reply::Skipped { .. } => Ok(None),
                        Reply::Bulk(_) => Ok(i.text().map(str::to_owned)),
                        _ => Err(bad()),
                    })
                    .collect::<Result<_, _>>()?,
            ))
        }
        _ => Err(bad()),
    }
}

/// `call`, failing with [`Error::Deadline`] if it has not finished by `deadline`.
pub(super) async fn within<T>(
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
