//! How commands on keys reach Redis: `keyed` groups keys per node, sends one pipeline per
//! group (into the caller's buffers where given), and follows `MOVED`/`ASK` redirects.

use std::sync::Arc;

use super::RedisStore;
use super::conn::{Addr, Got, Pool, Replies, Sink};
use crate::error::{BackendError, BackendErrorKind, Error};
use crate::resp::{Reply, Request};

/// Per key: its replies, or why there are none.
pub(super) enum KeyReplies {
    /// Its replies, and whether they came from a resent pipeline (see `Replies::resent`):
    /// an operation whose answer depends on the state before judges those with care.
    Replies(Vec<Got>, Resent),
    /// Its value was longer than the command allows (the announced length).
    Oversized(u64),
    Failed(BackendError),
}

/// Whether a key's commands were sent more than once because a connection broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Resent(pub(super) bool);

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
            Some(KeyReplies::Replies(replies, _)) => {
                if let Some(e) = replies.iter().find_map(|r| match r {
                    Got::Reply(Reply::Error(e)) => Some(e),
                    _ => None,
                }) {
                    return Err(BackendError::from_reply(e).into());
                }
                // No caller buffers were given: nothing is split.
                Ok(replies.into_iter().map(Got::unsplit).collect())
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
    /// in its slot). Three steps, each a function of its own:
    /// 1. [`plan`]: keys are grouped by node; with `spread` (block values: reads and puts),
    ///    each node's group is cut into at most `batch_connections` pipelines.
    /// 2. [`send`](Self::send): every pipeline of every node is sent at once, each on a
    ///    connection of its own. A key's first bulk reply goes into `sinks[i]` when given
    ///    (read straight into the caller's memory; the reply is then a split one).
    /// 3. [`resend`](Self::resend): a `MOVED` or `ASK` reply sends the key's commands again
    ///    to the node named (`ASKING` first for `ASK`), at most twice; keys that came after
    ///    a value too long for its command on the same connection are sent again too (into
    ///    memory of the library's: their callers copy).
    ///
    /// Per key, the semantics are the same everywhere: its replies (server errors
    /// included, e.g. `WRONGTYPE`, for the operation to judge), or the error of its node
    /// when that node failed or timed out. The call fails only when every key's node
    /// failed.
    pub(super) async fn keyed(
        &self,
        keys: &[String],
        spread: bool,
        mut sinks: Vec<Option<&mut [u8]>>,
        build: impl Fn(usize, &str, &mut Request),
    ) -> Result<Vec<KeyReplies>, Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut out: Vec<Option<KeyReplies>> = (0..keys.len()).map(|_| None).collect();
        sinks.resize_with(keys.len(), || None);
        let (groups, unserved) = self.topo.route(keys).await?;
        for (i, e) in unserved {
            out[i] = Some(KeyReplies::Failed(e));
        }
        let parts = if spread {
            self.cfg.batch_connections
        } else {
            1
        };
        let batches = plan(groups, parts);
        let mut redo = self.send(keys, &batches, sinks, &build, &mut out).await;
        for _round in 0..2 {
            if redo.is_empty() {
                break;
            }
            redo = self.resend(keys, redo, &build, &mut out).await?;
        }
        finish(keys, out, redo)
    }

    /// Step 2 of [`keyed`](Self::keyed): sends every batch at once, each on a connection of
    /// its own, with the caller's buffers as the sinks of its keys' first bulk replies.
    /// Fills `out` for every key that has an answer; returns the keys to send again.
    async fn send(
        &self,
        keys: &[String],
        batches: &[(Arc<Pool>, Vec<usize>)],
        mut sinks: Vec<Option<&mut [u8]>>,
        build: &impl Fn(usize, &str, &mut Request),
        out: &mut [Option<KeyReplies>],
    ) -> Vec<(usize, Redirect)> {
        let mut prepared: Vec<_> = batches
            .iter()
            .map(|(pool, idx)| {
                let (req, counts) = pipeline(keys, idx, false, build);
                let mut batch_sinks = Vec::with_capacity(req.len());
                for (&i, &n) in idx.iter().zip(&counts) {
                    batch_sinks.push(match sinks[i].take() {
                        Some(buf) => Sink::Into(buf),
                        None => Sink::Own,
                    });
                    batch_sinks.extend((1..n).map(|_| Sink::Own));
                }
                (pool, req, counts, batch_sinks)
            })
            .collect();
        let sent = prepared
            .iter_mut()
            .map(|(pool, req, _, sinks)| async move { pool.exec(req, sinks).await });
        let results = futures_util::future::join_all(sent).await;
        let mut redo = Vec::new();
        for ((pool, idx), ((_, _, counts, _), result)) in
            batches.iter().zip(prepared.iter().zip(results))
        {
            let replies = match result {
                Ok(replies) => replies,
                Err(e) => {
                    self.topo.failed(pool, &e);
                    for &i in idx {
                        out[i] = Some(KeyReplies::Failed(e.clone()));
                    }
                    continue;
                }
            };
            let resent = Resent(replies.resent);
            for (&i, answer) in idx.iter().zip(answers(counts, replies, false)) {
                match answer {
                    Answer::Replies(r) => {
                        if r.iter().any(is_readonly) {
                            self.topo
                                .failed(pool, &BackendError::from_reply("READONLY"));
                        }
                        out[i] = Some(KeyReplies::Replies(r, resent));
                    }
                    Answer::Redirect(to) => redo.push((i, to)),
                    Answer::Oversized(len) => out[i] = Some(KeyReplies::Oversized(len)),
                    Answer::CutOff => redo.push((i, Redirect::Again)),
                }
            }
        }
        redo
    }

    /// Step 3 of [`keyed`](Self::keyed), one round: sends redirected keys to the node named
    /// (and keys cut off by an oversized value to their node again), one pipeline per node,
    /// into memory of the library's. Fills `out`; returns the keys redirected again.
    async fn resend(
        &self,
        keys: &[String],
        redo: Vec<(usize, Redirect)>,
        build: &impl Fn(usize, &str, &mut Request),
        out: &mut [Option<KeyReplies>],
    ) -> Result<Vec<(usize, Redirect)>, Error> {
        let mut targets = Vec::with_capacity(redo.len());
        for (i, how) in redo {
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
            match pool {
                Some(pool) => targets.push((i, pool, asking)),
                None => {
                    out[i] = Some(KeyReplies::Failed(BackendError::new(
                        BackendErrorKind::Unavailable,
                        "redirected outside a cluster",
                    )))
                }
            }
        }
        let mut next = Vec::new();
        for (pool, asking, idx) in group_by_target(targets, Arc::ptr_eq) {
            let (req, counts) = pipeline(keys, &idx, asking, build);
            let replies = match pool.exec(&req, &mut []).await {
                Ok(replies) => replies,
                Err(e) => {
                    self.topo.failed(&pool, &e);
                    for &i in &idx {
                        out[i] = Some(KeyReplies::Failed(e.clone()));
                    }
                    continue;
                }
            };
            let resent = Resent(replies.resent);
            for (&i, answer) in idx.iter().zip(answers(&counts, replies, asking)) {
                match answer {
                    Answer::Replies(r) => out[i] = Some(KeyReplies::Replies(r, resent)),
                    Answer::Redirect(to) => next.push((i, to)),
                    Answer::Oversized(len) => out[i] = Some(KeyReplies::Oversized(len)),
                    Answer::CutOff => {
                        out[i] = Some(KeyReplies::Failed(BackendError::new(
                            BackendErrorKind::Protocol,
                            "reply missing",
                        )))
                    }
                }
            }
        }
        Ok(next)
    }
}

/// Step 1 of [`RedisStore::keyed`]: cuts each node's keys (`groups`: a node and the
/// indices of its keys, as the topology routes them) into at most `parts` pipelines of
/// nearly equal length, keys in order.
fn plan<P: Clone>(groups: Vec<(P, Vec<usize>)>, parts: usize) -> Vec<(P, Vec<usize>)> {
    let parts = parts.max(1);
    let mut batches = Vec::new();
    for (node, idx) in groups {
        let per = idx.len().div_ceil(parts).max(1);
        for chunk in idx.chunks(per) {
            batches.push((node.clone(), chunk.to_vec()));
        }
    }
    batches
}

/// One pipeline: the commands of keys `idx` (with `asking`, each after an `ASKING`), and
/// how many commands each key has in it.
fn pipeline(
    keys: &[String],
    idx: &[usize],
    asking: bool,
    build: &impl Fn(usize, &str, &mut Request),
) -> (Request, Vec<usize>) {
    let mut req = Request::asking(asking);
    let counts = idx
        .iter()
        .map(|&i| {
            let before = req.len();
            build(i, &keys[i], &mut req);
            req.len() - before
        })
        .collect();
    (req, counts)
}

/// Groups keys by where they go next (a node, and whether with `ASKING`), in order of
/// first appearance.
fn group_by_target<P>(
    targets: Vec<(usize, P, bool)>,
    same: impl Fn(&P, &P) -> bool,
) -> Vec<(P, bool, Vec<usize>)> {
    let mut groups: Vec<(P, bool, Vec<usize>)> = Vec::new();
    for (i, node, asking) in targets {
        match groups
            .iter_mut()
            .find(|(n, a, _)| same(n, &node) && *a == asking)
        {
            Some((_, _, idx)) => idx.push(i),
            None => groups.push((node, asking, vec![i])),
        }
    }
    groups
}

/// What a pipeline's replies say about one of its keys.
#[derive(Debug, PartialEq)]
enum Answer {
    /// Its replies, none of them a redirect (without the `ASKING` replies).
    Replies(Vec<Got>),
    /// Its commands must go elsewhere.
    Redirect(Redirect),
    /// Its value was longer than its command allows (the announced length): the
    /// connection stopped there.
    Oversized(u64),
    /// The connection stopped before this key's replies.
    CutOff,
}

/// Deals a pipeline's replies out to its keys, `counts[k]` commands for the `k`-th
/// (with `asking`, every other one an `ASKING`, whose `+OK` is dropped).
fn answers(counts: &[usize], replies: Replies, asking: bool) -> Vec<Answer> {
    let per = if asking { 2 } else { 1 };
    let got = replies.replies.len();
    let mut it = replies.replies.into_iter();
    let (mut at, mut stopped) = (0, false);
    counts
        .iter()
        .map(|&n| {
            if stopped {
                return Answer::CutOff;
            }
            if at + n > got {
                // The reply that stopped the connection is this key's.
                stopped = true;
                return match replies.oversized {
                    Some(len) => Answer::Oversized(len),
                    None => Answer::CutOff,
                };
            }
            at += n;
            let r: Vec<Got> = it.by_ref().take(n).skip(per - 1).step_by(per).collect();
            match redirect(&r) {
                Some(to) => Answer::Redirect(to),
                None => Answer::Replies(r),
            }
        })
        .collect()
}

/// The end of [`RedisStore::keyed`]: every key's outcome (a key still redirected after
/// the last round, or left without an answer, failed), or the error of the first key
/// when every key failed.
fn finish(
    keys: &[String],
    mut out: Vec<Option<KeyReplies>>,
    redo: Vec<(usize, Redirect)>,
) -> Result<Vec<KeyReplies>, Error> {
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

/// Where a key's commands must go again.
#[derive(Debug, PartialEq)]
enum Redirect {
    /// `MOVED slot host:port`: the slot lives there now.
    Moved(u16, Addr),
    /// `ASK slot host:port`: this key is being migrated there; ask once with `ASKING`.
    Ask(Addr),
    /// The same node again (the connection stopped before this key's replies).
    Again,
}

/// The redirect in a key's replies, if any.
fn redirect(replies: &[Got]) -> Option<Redirect> {
    replies.iter().find_map(|r| {
        let Got::Reply(Reply::Error(e)) = r else {
            return None;
        };
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

fn is_readonly(r: &Got) -> bool {
    matches!(r, Got::Reply(Reply::Error(e)) if e.starts_with("READONLY"))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::resp::Arg;

    fn addr(host: &str, port: u16) -> Addr {
        Addr {
            host: host.into(),
            port,
        }
    }

    fn whole(replies: Vec<Reply>) -> Vec<Got> {
        replies.into_iter().map(Got::Reply).collect()
    }

    fn replies(replies: Vec<Reply>, oversized: Option<u64>) -> Replies {
        Replies {
            replies: whole(replies),
            oversized,
            resent: false,
        }
    }

    fn bulk(s: &str) -> Reply {
        Reply::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn plan_cuts_each_nodes_keys_into_at_most_parts_pipelines() {
        let groups = vec![("a", vec![0, 2, 4, 6, 8]), ("b", vec![1, 3])];
        assert_eq!(
            plan(groups.clone(), 2),
            vec![
                ("a", vec![0, 2, 4]),
                ("a", vec![6, 8]),
                ("b", vec![1]),
                ("b", vec![3])
            ]
        );
        assert_eq!(plan(groups.clone(), 1), groups);
        // Zero parts is one; more parts than keys is one key per pipeline.
        assert_eq!(plan(groups.clone(), 0), groups);
        assert_eq!(
            plan(vec![("a", vec![0, 1])], 8),
            vec![("a", vec![0]), ("a", vec![1])]
        );
        assert!(plan(Vec::<(&str, Vec<usize>)>::new(), 4).is_empty());
    }

    #[test]
    fn a_pipeline_counts_each_keys_commands() {
        let keys = vec!["k0".to_owned(), "k1".to_owned(), "k2".to_owned()];
        let build = |i: usize, key: &str, req: &mut Request| {
            for _ in 0..=i {
                req.cmd(&[Arg::Small(b"EXISTS"), Arg::Small(key.as_bytes())]);
            }
        };
        let (req, counts) = pipeline(&keys, &[2, 0], false, &build);
        assert_eq!((req.len(), counts), (4, vec![3, 1]));
        // With ASKING, each command goes after an ASKING of its own.
        let (req, counts) = pipeline(&keys, &[1], true, &build);
        assert_eq!((req.len(), counts), (4, vec![4]));
    }

    #[test]
    fn answers_deal_replies_out_per_key() {
        let got = answers(
            &[2, 1],
            replies(vec![bulk("v"), Reply::Int(1), Reply::Nil], None),
            false,
        );
        assert_eq!(
            got,
            vec![
                Answer::Replies(whole(vec![bulk("v"), Reply::Int(1)])),
                Answer::Replies(whole(vec![Reply::Nil]))
            ]
        );
    }

    #[test]
    fn answers_find_redirects() {
        let got = answers(
            &[1, 1, 1],
            replies(
                vec![
                    Reply::Error("MOVED 3999 127.0.0.1:7001".into()),
                    Reply::Error("ASK 12 [::1]:7002".into()),
                    Reply::Error("WRONGTYPE Operation against a key".into()),
                ],
                None,
            ),
            false,
        );
        assert_eq!(
            got,
            vec![
                Answer::Redirect(Redirect::Moved(3999, addr("127.0.0.1", 7001))),
                Answer::Redirect(Redirect::Ask(addr("::1", 7002))),
                Answer::Replies(whole(vec![Reply::Error(
                    "WRONGTYPE Operation against a key".into()
                )])),
            ]
        );
    }

    #[test]
    fn an_oversized_value_stops_its_key_and_cuts_off_the_rest() {
        // Key 1's GET was refused from its length: its PTTL and key 2 never arrived.
        let got = answers(
            &[2, 2, 2],
            replies(vec![bulk("a"), Reply::Int(5)], Some(1 << 30)),
            false,
        );
        assert_eq!(
            got,
            vec![
                Answer::Replies(whole(vec![bulk("a"), Reply::Int(5)])),
                Answer::Oversized(1 << 30),
                Answer::CutOff
            ]
        );
        // A connection that stopped without saying why cuts off every key after it.
        let got = answers(&[1, 1], replies(vec![Reply::Int(1)], None), false);
        assert_eq!(
            got,
            vec![Answer::Replies(whole(vec![Reply::Int(1)])), Answer::CutOff]
        );
    }

    #[test]
    fn answers_drop_the_asking_replies() {
        let ok = Reply::Status(Bytes::from_static(b"OK"));
        let got = answers(
            &[4],
            replies(vec![ok.clone(), bulk("v"), ok, Reply::Int(1)], None),
            true,
        );
        assert_eq!(
            got,
            vec![Answer::Replies(whole(vec![bulk("v"), Reply::Int(1)]))]
        );
    }

    #[test]
    fn redirected_keys_are_grouped_by_node_and_asking() {
        let targets = vec![
            (0, "a", false),
            (1, "b", true),
            (2, "a", false),
            (3, "a", true),
        ];
        assert_eq!(
            group_by_target(targets, |x, y| x == y),
            vec![
                ("a", false, vec![0, 2]),
                ("b", true, vec![1]),
                ("a", true, vec![3])
            ]
        );
    }

    #[test]
    fn finish_fails_keys_left_over_and_the_call_when_all_failed() {
        let keys = vec!["k0".to_owned(), "k1".to_owned(), "k2".to_owned()];
        let out = vec![
            Some(KeyReplies::Replies(
                whole(vec![Reply::Int(1)]),
                Resent(false),
            )),
            None,
            None,
        ];
        let got = finish(&keys, out, vec![(1, Redirect::Again)]).unwrap();
        assert!(matches!(&got[0], KeyReplies::Replies(r, _) if r == &[Got::Reply(Reply::Int(1))]));
        assert!(
            matches!(&got[1], KeyReplies::Failed(e) if e.to_string().contains("k1 redirected too often"))
        );
        assert!(matches!(&got[2], KeyReplies::Failed(e) if e.to_string().contains("no reply")));
        let failed = || {
            Some(KeyReplies::Failed(BackendError::new(
                BackendErrorKind::Unavailable,
                "node down",
            )))
        };
        let err = finish(&keys[..2], vec![failed(), failed()], Vec::new())
            .err()
            .expect("every key failed");
        assert!(err.to_string().contains("node down"), "{err}");
    }
}
