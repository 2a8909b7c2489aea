//! How commands on keys reach Redis: `keyed` groups keys per node, sends one pipeline per
//! group (into the caller's buffers where given), and follows `MOVED`/`ASK` redirects.

use std::sync::Arc;

use super::RedisStore;
use super::conn::{Addr, Pool, Replies, Sink};
use crate::error::{BackendError, BackendErrorKind, Error};
use crate::resp::{Reply, Request};

/// Per key: its replies, or why there are none.
pub(super) enum KeyReplies {
    Replies(Vec<Reply>),
    /// Its value was longer than the command allows (the announced length).
    Oversized(u64),
    Failed(BackendError),
}

impl RedisStore {
    /// Commands on one key (each says the longest bulk reply it may get, as `build` adds
    /// it): their replies, or the first server error.
    pub(super) async fn on_key(
        &self,
        key: &str,
        build: impl Fn(&mut Request),
    ) -> Result<Vec<Reply>, Error> {
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
    pub(super) async fn exec_on(&self, pool: &Arc<Pool>, req: &Request) -> Result<Replies, Error> {
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
    pub(super) async fn keyed(
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
pub(super) enum Redirect {
    /// `MOVED slot host:port`: the slot lives there now.
    Moved(u16, Addr),
    /// `ASK slot host:port`: this key is being migrated there; ask once with `ASKING`.
    Ask(Addr),
    /// The same node again (the connection stopped before this key's replies).
    Again,
}

/// The redirect in a key's replies, if any.
pub(super) fn redirect(replies: &[Reply]) -> Option<Redirect> {
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

pub(super) fn is_readonly(r: &Reply) -> bool {
    matches!(r, Reply::Error(e) if e.starts_with("READONLY"))
}
