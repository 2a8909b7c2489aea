//! The pool of connections to one node.
//!
//! A [`Pool`] holds at most `max_connections` connections to one node: a call takes an idle
//! one (or dials, or waits for one), sends its pipeline, reads every reply and gives the
//! connection back. A connection that failed or timed out mid-exchange is dropped, never
//! reused. One retry policy for every connection: a pipeline whose connection Redis closed
//! (a restart, its idle `timeout`, `CLIENT KILL`) is sent again on a newly dialled
//! connection up to `command_retries` times (every command kvshelf sends is idempotent),
//! and the idle connections are dropped with it (as old, likely as dead). New connections
//! are paced (`connect_rate`): in a brownout Redis is not also flooded with reconnects and
//! `AUTH`s.
//!
//! A call given up on mid-exchange (its deadline passed, its caller cancelled it) does not
//! cost its connection when the connection is still in step: [`Held`] hands a connection
//! that still owes replies ([`Conn::owes`]) to a background task that drains it (never
//! into the caller's memory: the caller's sinks went with the call) and gives it back to
//! the pool, within `response_timeout`. Only a connection cut off while writing its
//! pipeline, or broken, is closed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::{Addr, Conn, Dialer, Replies, Sink};
use crate::error::{BackendError, BackendErrorKind};
use crate::resp::Request;

/// Paces new connections (GCRA): a burst of `burst` at once, then one per `interval`.
///
/// A dial either goes now or not at all: booking one for later would let callers that give
/// up (a fail-open timeout) hold the future dials, and under load no dial would ever happen.
#[derive(Debug)]
struct Pacer {
    /// When the next dial would be due if dials were spread evenly ("theoretical arrival").
    due: Mutex<Instant>,
    interval: Duration,
    burst: u32,
}

impl Pacer {
    fn new(per_second: u32, burst: u32) -> Pacer {
        Pacer {
            due: Mutex::new(Instant::now()),
            interval: match per_second {
                0 => Duration::ZERO,
                n => Duration::from_secs(1) / n,
            },
            burst: burst.max(1),
        }
    }

    /// Takes a dial if one is allowed at `now`.
    fn try_take(&self, now: Instant) -> bool {
        if self.interval.is_zero() {
            return true;
        }
        let mut due = self.due.lock().expect("pacer lock");
        let next = (*due).max(now);
        let slack = self.interval * (self.burst - 1);
        if next.checked_sub(slack).is_some_and(|at| at > now) {
            return false;
        }
        *due = next + self.interval;
        true
    }
}

/// The connections to one node.
#[derive(Debug)]
pub(crate) struct Pool {
    addr: Addr,
    dialer: Arc<Dialer>,
    /// Connections in step, ready for a call; shared with the tasks that drain connections
    /// whose calls were dropped, which put them back here.
    idle: Arc<Mutex<Vec<Conn>>>,
    /// Connections being drained, and a wake-up for calls waiting for one to come back.
    drains: Arc<Drains>,
    /// One permit per connection that may exist (idle, in use or being drained).
    slots: Arc<tokio::sync::Semaphore>,
    dials: Pacer,
    /// Paces the connections dialled outside the pool ([`Pool::dedicated`]).
    dedicated_dials: Pacer,
}

/// The connections of a pool being drained. While any is, a call that finds no idle
/// connection waits for one to come back rather than dial: in a brownout every call that
/// times out leaves a connection draining, and dialling past them would open a new
/// connection (and `AUTH`) per timeout, just when Redis can least afford it.
#[derive(Debug, Default)]
struct Drains {
    running: std::sync::atomic::AtomicUsize,
    done: tokio::sync::Notify,
}

/// A connection a call holds, with its pool slot. Dropped with the call (a deadline, a
/// cancelled caller), it hands a connection that still owes replies to a task that reads
/// them back into step and returns it to the pool, holding the slot meanwhile.
struct Held {
    conn: Option<Conn>,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    idle: Arc<Mutex<Vec<Conn>>>,
    drains: Arc<Drains>,
    drain_within: Duration,
    addr: Addr,
}

impl Held {
    fn conn(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("a held connection")
    }

    /// Back to the pool: the exchange ended in step.
    fn give_back(&mut self) {
        if let Some(conn) = self.conn.take() {
            // At most `max_connections` exist, one per slot: every one given back is kept.
            self.idle.lock().expect("pool lock").push(conn);
        }
    }

    /// Closes the connection (broken, or out of step for good).
    fn close(&mut self) {
        self.conn = None;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if !conn.owes() {
            self.idle.lock().expect("pool lock").push(conn);
            return;
        }
        if conn.owed.lost {
            return; // cut off mid-write: closed
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let slot = self.slot.take();
        let idle = self.idle.clone();
        let drains = self.drains.clone();
        let within = self.drain_within;
        let addr = self.addr.clone();
        drains
            .running
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        rt.spawn(async move {
            let drained = tokio::time::timeout(within, conn.drain()).await;
            let result = match drained {
                Ok(Ok(())) => {
                    idle.lock().expect("pool lock").push(conn);
                    "kept"
                }
                Ok(Err(_)) => "closed",
                Err(_) => "timeout",
            };
            drains
                .running
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            drains.done.notify_waiters();
            tracing::debug!(node = %addr, result, "drained a connection whose call was dropped");
            metrics::counter!("kvshelf_store_connection_drains_total", "result" => result)
                .increment(1);
            drop(slot);
        });
    }
}

impl Pool {
    /// A pool for the node at `addr`; it dials on first use.
    pub(crate) fn new(addr: Addr, dialer: Arc<Dialer>) -> Pool {
        let max = dialer.max_connections.max(1);
        Pool {
            addr,
            dials: Pacer::new(dialer.connect_rate, u32::try_from(max).unwrap_or(u32::MAX)),
            dedicated_dials: Pacer::new(dialer.connect_rate, 1),
            slots: Arc::new(tokio::sync::Semaphore::new(max)),
            idle: Arc::new(Mutex::new(Vec::new())),
            drains: Arc::default(),
            dialer,
        }
    }

    /// The node's address.
    pub(crate) fn addr(&self) -> &Addr {
        &self.addr
    }

    /// How long an exchange with this node may take.
    pub(crate) fn response_timeout(&self) -> Duration {
        self.dialer.response_timeout
    }

    /// Sends `req` and reads all its replies (bulk replies into `sinks` where given). Each
    /// step has its own bound: waiting for a connection slot and each exchange
    /// `response_timeout`, each dial (pacing included) `connection_timeout`. A call dropped
    /// or timed out mid-exchange leaves its connection to be drained back into the pool
    /// (module docs), and never touches `sinks` again.
    pub(crate) async fn exec(
        &self,
        req: &Request,
        sinks: &mut [Sink<'_>],
    ) -> Result<Replies, BackendError> {
        let timeout = self.dialer.response_timeout;
        let free_by = tokio::time::Instant::now() + timeout;
        let slot = tokio::time::timeout_at(free_by, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| self.client_timeout("no connection free in time"))?
            .expect("the pool's semaphore is never closed");
        let conn = loop {
            let back = self.drains.done.notified();
            tokio::pin!(back);
            back.as_mut().enable();
            if let Some(c) = self.take_idle() {
                break c;
            }
            if self
                .drains
                .running
                .load(std::sync::atomic::Ordering::SeqCst)
                == 0
            {
                break self.dial().await?;
            }
            tokio::time::timeout_at(free_by, back)
                .await
                .map_err(|_| self.client_timeout("no connection free in time (others draining)"))?;
        };
        let mut held = Held {
            conn: Some(conn),
            slot: Some(slot),
            idle: self.idle.clone(),
            drains: self.drains.clone(),
            drain_within: timeout,
            addr: self.addr.clone(),
        };
        let mut retries = 0;
        loop {
            match tokio::time::timeout(timeout, held.conn().exchange(req, sinks)).await {
                Ok(Ok(mut replies)) => {
                    replies.resent = retries > 0;
                    match replies.oversized {
                        None => held.give_back(),
                        Some(_) => held.close(),
                    }
                    return Ok(replies);
                }
                Ok(Err(e)) if is_dropped(&e) => {
                    held.close();
                    // Redis closed this connection: a restart, or its idle `timeout`. The
                    // idle ones are older still: drop them rather than find out one by one.
                    self.idle.lock().expect("pool lock").clear();
                    if retries >= self.dialer.command_retries {
                        return Err(BackendError::io(&format!("redis {}", self.addr), &e));
                    }
                    retries += 1;
                    tracing::debug!(node = %self.addr, error = %e, retries, "redis connection dropped; resending on a new one");
                    held.conn = Some(self.dial().await?);
                }
                Ok(Err(e)) => {
                    held.close();
                    return Err(BackendError::io(&format!("redis {}", self.addr), &e));
                }
                // `held` drains the connection in the background.
                Err(_) => return Err(self.timed_out("response timed out")),
            }
        }
    }

    /// A connection of its own, outside the pool (a subscription), dialled now. Paced
    /// apart from the pool's dials (at most `connect_rate` a second, no burst): tracking
    /// reconnects never spend the data path's dials.
    pub(crate) async fn dedicated(&self) -> Result<Conn, BackendError> {
        self.dial_with(&self.dedicated_dials).await
    }

    /// A wait of the client's own that ran out (a pool slot): not the server's doing.
    fn client_timeout(&self, what: &str) -> BackendError {
        BackendError::client_side(
            BackendErrorKind::Timeout,
            format!("redis {}: {what}", self.addr),
        )
    }

    fn timed_out(&self, what: &str) -> BackendError {
        BackendError::new(
            BackendErrorKind::Timeout,
            format!("redis {}: {what}", self.addr),
        )
    }

    fn take_idle(&self) -> Option<Conn> {
        self.idle.lock().expect("pool lock").pop()
    }

    /// Opens a new connection, if the pacer allows one now, within `connection_timeout`.
    async fn dial(&self) -> Result<Conn, BackendError> {
        self.dial_with(&self.dials).await
    }

    async fn dial_with(&self, pacer: &Pacer) -> Result<Conn, BackendError> {
        if !pacer.try_take(Instant::now()) {
            return Err(BackendError::client_side(
                BackendErrorKind::Io,
                format!(
                    "redis {}: reconnect rate limit (connect_rate): no new connection now",
                    self.addr
                ),
            ));
        }
        match tokio::time::timeout(
            self.dialer.connect_timeout,
            Conn::open(&self.addr, &self.dialer),
        )
        .await
        {
            Ok(conn) => conn,
            Err(_) => Err(self.timed_out("connection timed out")),
        }
    }
}

/// The connection broke under us (closed, reset): worth resending on a new connection.
fn is_dropped(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected
    )
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::Got;
    use super::super::tests::{dialer, get, scripted};
    use super::*;
    use crate::codec;
    use crate::resp::Reply;

    /// Issue 17 §3: a call that timed out before its reply came does not cost the
    /// connection: the late reply is read and discarded in the background, and the next
    /// call is answered on the same connection (the node accepts only one).
    #[tokio::test]
    async fn a_timed_out_exchange_is_drained_and_its_connection_kept() {
        let mut late = Vec::new();
        Reply::Bulk(Bytes::from(vec![1u8; 300_000])).encode(&mut late);
        let mut next = Vec::new();
        Reply::Bulk(Bytes::from_static(b"second")).encode(&mut next);
        let ms = Duration::from_millis;
        let addr = scripted(vec![vec![(ms(600), late)], vec![(ms(0), next)]]).await;
        let pool = Pool::new(
            addr,
            Arc::new(Dialer {
                response_timeout: ms(500),
                ..dialer()
            }),
        );
        let first = pool.exec(&get(1 << 20), &mut []).await.unwrap_err();
        assert_eq!(first.kind(), BackendErrorKind::Timeout, "{first}");
        let again = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                // The slot frees once the drain has given the connection back.
                match pool.exec(&get(1 << 20), &mut []).await {
                    Ok(r) => return r,
                    Err(e) => assert_eq!(e.kind(), BackendErrorKind::Timeout, "{e}"),
                }
            }
        })
        .await
        .expect("the drained connection answers again");
        assert_eq!(
            again.replies,
            vec![Got::Reply(Reply::Bulk(Bytes::from_static(b"second")))]
        );
    }

    /// A call dropped while a block's payload was going straight into the caller's memory
    /// never writes there again: the rest of the value is read into the connection's own
    /// memory, and the connection serves the next call. The payload (300,000 bytes) is read
    /// with `SO_RCVLOWAT` raised: the next call's short reply wakes the connection only
    /// because the drain put it back (without that, this test waits out its 10 s).
    #[tokio::test]
    async fn a_call_dropped_mid_payload_never_writes_the_callers_buffer_again() {
        dropped_mid_value_then_next_call(true).await;
    }

    /// The same for a value read into the library's own memory (a `get`, the sidecar's
    /// fetch): raised `SO_RCVLOWAT` there too, put back by the drain.
    #[tokio::test]
    async fn a_call_dropped_mid_value_leaves_the_connection_serving_short_replies() {
        dropped_mid_value_then_next_call(false).await;
    }

    async fn dropped_mid_value_then_next_call(into_caller_buffer: bool) {
        let ns = crate::namespace::tests::qwen();
        let hash = crate::hashing::BlockHash([7; 32]);
        let payload = vec![0xab; 300_000];
        let value = codec::encode(&codec::Header::for_block(&ns, &hash, &payload), &payload);
        let mut wire = Vec::new();
        Reply::Bulk(value.clone()).encode(&mut wire);
        let half = wire.len() - payload.len() / 2;
        let mut next = Vec::new();
        Reply::Bulk(Bytes::from_static(b"second")).encode(&mut next);
        let ms = Duration::from_millis;
        let addr = scripted(vec![
            vec![
                (ms(0), wire[..half].to_vec()),
                (ms(400), wire[half..].to_vec()),
            ],
            vec![(ms(0), next)],
        ])
        .await;
        let pool = Pool::new(addr, Arc::new(dialer()));
        let mut mine = vec![0u8; payload.len()];
        {
            let mut sinks = [Sink::Into(&mut mine)];
            let sinks: &mut [Sink<'_>] = if into_caller_buffer {
                &mut sinks
            } else {
                &mut []
            };
            let req = get(value.len());
            let call = pool.exec(&req, sinks);
            assert!(
                tokio::time::timeout(ms(200), call).await.is_err(),
                "the caller gives up mid-payload"
            );
        }
        if into_caller_buffer {
            assert!(mine.contains(&0xab), "half the payload had landed");
        }
        // The caller reuses its buffer at once.
        mine.fill(0x11);
        let again = tokio::time::timeout(Duration::from_secs(10), pool.exec(&get(64), &mut []))
            .await
            .expect("the connection was drained back")
            .unwrap();
        assert_eq!(
            again.replies,
            vec![Got::Reply(Reply::Bulk(Bytes::from_static(b"second")))]
        );
        assert!(
            mine.iter().all(|&b| b == 0x11),
            "the caller's buffer was written after the call was dropped"
        );
    }

    #[test]
    fn the_pacer_allows_a_burst_then_one_per_interval() {
        let p = Pacer::new(10, 3);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert!((0..3).all(|_| p.try_take(t0)), "the burst goes at once");
        assert!(!p.try_take(t0));
        assert!(!p.try_take(t0 + ms(99)));
        assert!(p.try_take(t0 + ms(100)));
        assert!(!p.try_take(t0 + ms(150)));
        assert!(p.try_take(t0 + ms(200)));
        // Refusals book nothing: after a quiet while the whole burst is back.
        let t1 = t0 + Duration::from_secs(2);
        assert!((0..3).all(|_| p.try_take(t1)));
        assert!(!p.try_take(t1));
        // 0: no pacing.
        let free = Pacer::new(0, 1);
        assert!((0..100).all(|_| free.try_take(t0)));
    }
}
