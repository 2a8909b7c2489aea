//! Redis's invalidation messages for block keys (server-assisted client-side caching), the
//! stream a sidecar's L1 follows.
//!
//! One connection per primary (the one Redis, the sentinels' primary, every cluster
//! primary): `CLIENT TRACKING ON REDIRECT <its own id> BCAST PREFIX kvshelf:v1:`, then
//! `SUBSCRIBE __redis__:invalidate`. Plain RESP2, so the same connections and parser serve
//! it as every other command. In `BCAST` mode Redis reports every change to a block key on
//! that node — overwrite, delete, expiry, eviction — by any client, without having to
//! remember which keys each client read (why `BCAST`: BENCHMARKS.md, "Invalidation
//! traffic"). A lost connection, or a change of primaries (failover, resharding), ends the
//! stream: what changed meanwhile was not reported, and the follower must flush.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::RedisStore;
use super::conn::Pool;
use super::keys::KEY_PREFIX;
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

/// How often a tracker checks whether the primaries changed.
const EPOCH_EVERY: Duration = Duration::from_millis(500);

/// After this long without a message, a tracking connection sends `PING`; without an answer
/// within the store's `response_timeout` the stream ends (the follower flushes L1 and tracks
/// again). A connection cut silently (a middlebox dropping the flow, a partition: no FIN,
/// no RST) otherwise looks exactly like a quiet Redis, and L1 would serve deleted blocks.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// Why a tracker ended when its follower fell behind: the invalidation channel was full, so
/// an invalidation could not be delivered and the follower must flush (as for a lost
/// connection).
pub const FELL_BEHIND: &str = "the follower fell behind: its invalidation channel is full";

/// What Redis reported changed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Invalidation {
    /// These block keys were overwritten, deleted, expired or evicted.
    Keys(Vec<String>),
    /// Every key may be gone (`FLUSHALL`, `FLUSHDB`).
    All,
}

/// Live tracking connections; dropping it closes them.
#[derive(Debug)]
pub struct Tracker {
    tasks: JoinSet<String>,
}

impl Tracker {
    /// Waits until tracking is lost (a connection broke, or the primaries changed), and
    /// says why. Every invalidation received before was sent on the channel.
    pub async fn lost(&mut self) -> String {
        match self.tasks.join_next().await {
            Some(Ok(why)) => why,
            Some(Err(e)) => format!("tracking task: {e}"),
            None => "no tracking connections".into(),
        }
    }
}

impl RedisStore {
    /// Opens a tracking connection on every primary and returns once all are subscribed;
    /// from then on every change to a block key is sent on `tx`. `tx` is bounded: when it
    /// is full, the stream ends ([`Tracker::lost`] says [`FELL_BEHIND`]) rather than wait
    /// (Redis would buffer for us) or drop a report silently.
    pub async fn track(&self, tx: mpsc::Sender<Invalidation>) -> Result<Tracker, Error> {
        let epoch = self.topo.epoch();
        let mut tasks = JoinSet::new();
        for primary in self.topo.primaries().await? {
            let Some(pool) = primary.pool else {
                return Err(BackendError::new(
                    BackendErrorKind::Unavailable,
                    format!("primary {} is marked failed", primary.name),
                )
                .into());
            };
            let conn = match subscribe(&pool).await {
                Ok(conn) => conn,
                Err(e) => {
                    // A primary that is gone: the next lookup asks the sentinels (or the
                    // cluster) again.
                    if let Error::Backend(b) = &e {
                        self.topo.failed(&pool, b);
                    }
                    return Err(e);
                }
            };
            let tx = tx.clone();
            let name = primary.name;
            let answer_within = pool.response_timeout();
            tasks.spawn(async move { follow(conn, tx, name, answer_within).await });
        }
        let topo = self.topo.clone();
        tasks.spawn(async move {
            loop {
                tokio::time::sleep(EPOCH_EVERY).await;
                if topo.epoch() != epoch {
                    return "the primaries changed".to_owned();
                }
            }
        });
        Ok(Tracker { tasks })
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
