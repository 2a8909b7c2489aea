//! Redis's invalidation messages for block keys (server-assisted client-side caching), the
//! stream a sidecar's L1 follows.
//!
//! One connection per primary (the one Redis, the sentinels' primary, every cluster
//! primary): `CLIENT TRACKING ON REDIRECT <its own id> BCAST PREFIX kvshelf:v1:`, then
//! `SUBSCRIBE __redis__:invalidate`. Plain RESP2, so the same connections and parser serve
//! it as every other command. In `BCAST` mode Redis reports every change to a block key on
//! that node — overwrite, delete, expiry, eviction — by any client, without having to
//! remember which keys each client read (why `BCAST`: BENCHMARKS.md, "Invalidation
//! traffic").
//!
//! Each primary's stream starts, fails and starts again on its own: one primary that is
//! down (a Cluster primary without a replica, with `cluster-require-full-coverage no`)
//! leaves the others' streams, and the L1 entries of their slots, alone. A [`Coverage`]
//! says which keys are covered right now: those whose primary (by the current slot map,
//! or the sentinels' current primary) has a stream that is up and whose L1 entries were
//! dropped when it came up. What changed on a primary while its stream was down was not
//! reported: the follower drops what L1 holds of that primary's keys when its stream ends
//! ([`Invalidation::Lost`]) and again when it is back ([`Invalidation::Tracking`]), and
//! serves from L1 only covered keys.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::RedisStore;
use super::conn::{Addr, Pool};
use super::keys::KEY_PREFIX;
use super::topology::Topology;
use crate::error::{BackendError, BackendErrorKind, Error};
use crate::resp::{Arg, Caps, Reply, Request};

/// The channel Redis publishes invalidations on.
const CHANNEL: &str = "__redis__:invalidate";

/// Longest key an invalidation message may name. Block keys are under 200 bytes, but `BCAST`
/// reports every key under the prefix, whoever wrote it; one longer than this is skipped
/// (it is no key L1 holds).
const MAX_KEY: usize = 64 * 1024;

/// What one message on the tracking connection may hold. Redis sends the keys under the
/// prefix changed in one event-loop iteration as one message (a purge's pipeline of
/// `UNLINK`s: a thousand keys): up to `MAX_ELEMENTS` keys, 64 MiB in all. A bigger
/// message ends the stream (a protocol error): the follower flushes L1 and tracks again,
/// which is what coherence needs anyway. Without the total, `MAX_ELEMENTS` keys of
/// `MAX_KEY` bytes would be 64 GiB.
const MESSAGE: Caps = Caps::bulk(MAX_KEY)
    .total(64 << 20)
    .elements(crate::resp::MAX_ELEMENTS)
    .skip_long();

/// How often the tracker checks whether the primaries changed (a failover, a new cluster
/// primary): a stream is started for each new one and stopped for each one gone.
const EPOCH_EVERY: Duration = Duration::from_millis(500);

/// A primary's stream that cannot be made is tried again after this, doubling up to
/// [`RETRY_AT_MOST`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_AT_MOST: Duration = Duration::from_secs(5);

/// After this long without a message, a tracking connection sends `PING`; without an answer
/// within the store's `response_timeout` the stream ends (the follower flushes L1 and tracks
/// again). A connection cut silently (a middlebox dropping the flow, a partition: no FIN,
/// no RST) otherwise looks exactly like a quiet Redis, and L1 would serve deleted blocks.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// Why a tracker ended when its follower fell behind: the invalidation channel was full, so
/// an invalidation could not be delivered and the follower must flush (as for a lost
/// connection).
pub const FELL_BEHIND: &str = "the follower fell behind: its invalidation channel is full";

/// What Redis reported changed, and which primaries' streams came up or were lost.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Invalidation {
    /// These block keys were overwritten, deleted, expired or evicted.
    Keys(Vec<String>),
    /// Every key (of one node) may be gone (`FLUSHALL`, `FLUSHDB`).
    All,
    /// A primary's stream is up: from now on every change to its keys is reported, but
    /// nothing before was. Drop what L1 holds of its keys ([`Coverage::owned_by`]), then
    /// [`Coverage::cover`] it.
    Tracking(TrackedNode),
    /// A primary's stream ended (its connection broke or went silent, the follower fell
    /// behind ([`FELL_BEHIND`]), or the node is no longer a primary). Its keys are no
    /// longer covered (already, when this is received): drop what L1 holds that is not
    /// covered ([`Coverage::covers`]).
    Lost {
        /// The primary.
        node: TrackedNode,
        /// Why.
        why: String,
    },
}

/// One stream of one primary, as [`Invalidation::Tracking`] and [`Invalidation::Lost`]
/// name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackedNode {
    addr: Addr,
    /// Which of that primary's streams: a `cover` meant for a stream that has since ended
    /// does nothing.
    stream: u64,
}

impl std::fmt::Display for TrackedNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr.fmt(f)
    }
}

/// Which keys L1 may serve: those whose primary's stream is up and covered. Made by
/// [`RedisStore::coverage`], kept up to date by the [`Tracker`] it is given to (and by the
/// follower's [`Coverage::cover`]).
#[derive(Debug)]
pub struct Coverage {
    topo: Arc<Topology>,
    /// The primaries whose stream is up: that stream, and whether the follower has
    /// covered it.
    up: RwLock<HashMap<Addr, (u64, bool)>>,
    /// How many primaries the tracker follows (up or not).
    known: AtomicUsize,
    streams: AtomicU64,
}

impl Coverage {
    /// Whether L1 may serve `key`: its primary's stream is up and covered.
    pub fn covers(&self, key: &str) -> bool {
        let up = self.up.read().expect("coverage lock");
        self.topo
            .owner_of(key.as_bytes(), |addr| up.get(addr).is_some_and(|(_, c)| *c))
            .unwrap_or(false)
    }

    /// Whether `key` is one of `node`'s now.
    pub fn owned_by(&self, key: &str, node: &TrackedNode) -> bool {
        self.topo
            .owner_of(key.as_bytes(), |addr| *addr == node.addr)
            .unwrap_or(false)
    }

    /// Marks `node`'s keys covered (after L1 dropped what it held of them), unless that
    /// stream has ended since.
    pub fn cover(&self, node: &TrackedNode) {
        if let Some((stream, covered)) = self.up.write().expect("coverage lock").get_mut(&node.addr)
            && *stream == node.stream
        {
            *covered = true;
        }
    }

    /// Primaries covered, and primaries followed.
    pub fn primaries(&self) -> (usize, usize) {
        let covered = self
            .up
            .read()
            .expect("coverage lock")
            .values()
            .filter(|(_, c)| *c)
            .count();
        (covered, self.known.load(Ordering::Acquire))
    }

    fn up(&self, addr: &Addr) -> TrackedNode {
        let stream = self.streams.fetch_add(1, Ordering::AcqRel);
        self.up
            .write()
            .expect("coverage lock")
            .insert(addr.clone(), (stream, false));
        TrackedNode {
            addr: addr.clone(),
            stream,
        }
    }

    fn down(&self, node: &TrackedNode) {
        let mut up = self.up.write().expect("coverage lock");
        if up.get(&node.addr).is_some_and(|(s, _)| *s == node.stream) {
            up.remove(&node.addr);
        }
    }
}

/// The tracking streams of every primary; dropping it closes them.
#[derive(Debug)]
pub struct Tracker {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RedisStore {
    /// A new [`Coverage`] of this store's keys, nothing covered yet.
    pub fn coverage(&self) -> Arc<Coverage> {
        Arc::new(Coverage {
            topo: self.topo.clone(),
            up: RwLock::new(HashMap::new()),
            known: AtomicUsize::new(0),
            streams: AtomicU64::new(0),
        })
    }

    /// Follows every primary, each with a tracking connection of its own that is made
    /// again (100 ms to 5 s apart) whenever it fails, and sends on `tx` every change to a
    /// block key and every stream that comes up or is lost (see [`Invalidation`]);
    /// `coverage` follows which are up. Runs until the returned [`Tracker`] is dropped or
    /// `tx` is closed. `tx` is bounded: when it is full, the stream that could not deliver
    /// a report ends ([`Invalidation::Lost`] with [`FELL_BEHIND`]) rather than wait (Redis
    /// would buffer for us) or drop a report silently.
    pub fn track(&self, tx: mpsc::Sender<Invalidation>, coverage: Arc<Coverage>) -> Tracker {
        Tracker {
            task: tokio::spawn(supervise(self.topo.clone(), tx, coverage)),
        }
    }
}

/// Starts a stream for every primary, stops the stream of each one that is no longer one.
async fn supervise(topo: Arc<Topology>, tx: mpsc::Sender<Invalidation>, coverage: Arc<Coverage>) {
    // Dropping a primary's sender stops its stream.
    let mut streams: HashMap<Addr, oneshot::Sender<()>> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut warned = false;
    while !tx.is_closed() {
        match topo.tracked_primaries().await {
            Ok(pools) => {
                warned = false;
                let now: HashSet<&Addr> = pools.iter().map(|p| p.addr()).collect();
                streams.retain(|addr, _| now.contains(addr));
                for pool in pools {
                    if streams.contains_key(pool.addr()) {
                        continue;
                    }
                    let (stop, stopped) = oneshot::channel();
                    streams.insert(pool.addr().clone(), stop);
                    tasks.spawn(primary_stream(
                        topo.clone(),
                        pool,
                        tx.clone(),
                        coverage.clone(),
                        stopped,
                    ));
                }
                coverage.known.store(streams.len(), Ordering::Release);
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "cannot list the primaries to track; retrying");
                    warned = true;
                }
            }
        }
        while tasks.try_join_next().is_some() {}
        tokio::time::sleep(EPOCH_EVERY).await;
    }
}

/// One primary's stream, made again whenever it ends, until `stopped`.
async fn primary_stream(
    topo: Arc<Topology>,
    pool: Arc<Pool>,
    tx: mpsc::Sender<Invalidation>,
    coverage: Arc<Coverage>,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut backoff = RETRY_FIRST;
    let mut warned = false;
    loop {
        let conn = tokio::select! {
            c = subscribe(&pool) => c,
            _ = &mut stopped => return,
        };
        let conn = match conn {
            Ok(conn) => conn,
            Err(e) => {
                if !warned {
                    tracing::warn!(primary = %pool.addr(), error = %e, "cannot track invalidations of this primary; retrying (L1 does not serve its keys meanwhile)");
                    warned = true;
                }
                // A primary that is gone: the cluster's slot map is read again, or the
                // sentinels asked (see `Topology::failed`).
                if let Error::Backend(b) = &e {
                    topo.failed(&pool, b);
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = &mut stopped => return,
                }
                backoff = (backoff * 2).min(RETRY_AT_MOST);
                continue;
            }
        };
        backoff = RETRY_FIRST;
        warned = false;
        let node = coverage.up(pool.addr());
        if tx.send(Invalidation::Tracking(node.clone())).await.is_err() {
            return;
        }
        let name = pool.addr().to_string();
        let mut stop = false;
        let why = tokio::select! {
            why = follow(conn, tx.clone(), name, pool.response_timeout()) => why,
            _ = &mut stopped => {
                stop = true;
                "no longer a primary".to_owned()
            }
        };
        coverage.down(&node);
        if tx.send(Invalidation::Lost { node, why }).await.is_err() || stop {
            return;
        }
    }
}

/// A connection of its own to `pool`'s node, tracking block keys and subscribed to their
/// invalidations.
async fn subscribe(pool: &Pool) -> Result<super::conn::Conn, Error> {
    let timeout = pool.response_timeout();
    let mut conn = pool.dedicated().await?;
    let io =
        |e: std::io::Error| Error::from(BackendError::io(&format!("tracking {}", pool.addr()), &e));
    let setup = async {
        let mut id = Request::default();
        id.cmd(&[Arg::Small(b"CLIENT"), Arg::Small(b"ID")]);
        let r = super::conn::all(conn.exchange(&id, &mut []).await.map_err(io)?)?;
        let id = r[0].int().unwrap_or_default().to_string();
        let mut req = Request::default();
        req.cmd(&[
            Arg::Small(b"CLIENT"),
            Arg::Small(b"TRACKING"),
            Arg::Small(b"ON"),
            Arg::Small(b"REDIRECT"),
            Arg::Small(id.as_bytes()),
            Arg::Small(b"BCAST"),
            Arg::Small(b"PREFIX"),
            Arg::Small(KEY_PREFIX.as_bytes()),
        ]);
        super::conn::all(conn.exchange(&req, &mut []).await.map_err(io)?)?;
        let mut sub = Request::default();
        sub.cmd_caps(
            MESSAGE,
            &[Arg::Small(b"SUBSCRIBE"), Arg::Small(CHANNEL.as_bytes())],
        );
        conn.send(&sub).await.map_err(io)?;
        match conn.next_reply(MESSAGE).await.map_err(io)? {
            Reply::Array(a) if a.first().and_then(Reply::text) == Some("subscribe") => Ok(()),
            Reply::Error(e) => Err(BackendError::from_reply(&e).into()),
            other => Err(Error::from(BackendError::new(
                BackendErrorKind::Protocol,
                format!("SUBSCRIBE answered {other:?}"),
            ))),
        }
    };
    match tokio::time::timeout(timeout, setup).await {
        Ok(r) => r.map(|()| conn),
        Err(_) => Err(BackendError::new(
            BackendErrorKind::Timeout,
            format!("tracking {}: no answer", pool.addr()),
        )
        .into()),
    }
}

/// Reads invalidation messages until the connection fails or stops answering its
/// heartbeat (see [`HEARTBEAT_EVERY`]); why it stopped.
async fn follow(
    mut conn: super::conn::Conn,
    tx: mpsc::Sender<Invalidation>,
    node: String,
    answer_within: Duration,
) -> String {
    let mut ping = Request::default();
    ping.cmd(&[Arg::Small(b"PING")]);
    // When the unanswered PING was sent, if one is out.
    let mut pinged: Option<tokio::time::Instant> = None;
    let mut heard = tokio::time::Instant::now();
    loop {
        let until = match pinged {
            Some(at) => at + answer_within,
            None => heard + HEARTBEAT_EVERY,
        };
        // Reading a reply is cancel-safe: what a dropped read got stays in the
        // connection's buffer and parser.
        let reply = match tokio::time::timeout_at(until, conn.next_reply(MESSAGE)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return format!("tracking connection to {node}: {e}"),
            Err(_) if pinged.is_some() => {
                return format!(
                    "tracking connection to {node}: no answer to PING within {answer_within:?}"
                );
            }
            Err(_) => {
                let sent = tokio::time::timeout(answer_within, conn.send(&ping)).await;
                if !matches!(sent, Ok(Ok(()))) {
                    return format!("tracking connection to {node}: cannot send PING");
                }
                pinged = Some(tokio::time::Instant::now());
                continue;
            }
        };
        // Any message proves the connection alive (a PING's answer is `["pong", ""]`).
        heard = tokio::time::Instant::now();
        pinged = None;
        let Reply::Array(msg) = reply else { continue };
        if msg.first().and_then(Reply::text) != Some("message") {
            continue;
        }
        let event = match msg.get(2) {
            Some(Reply::Array(keys)) => Invalidation::Keys(
                keys.iter()
                    .filter_map(|k| k.text().map(str::to_owned))
                    .collect(),
            ),
            // A nil list: the whole database was flushed.
            _ => Invalidation::All,
        };
        match tx.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => return FELL_BEHIND.into(),
            Err(mpsc::error::TrySendError::Closed(_)) => return "the follower stopped".into(),
        }
    }
}
