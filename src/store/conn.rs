//! Connections to one Redis node and the pool that hands them out.
//!
//! A connection writes a whole pipeline vectored (command framing, block headers and
//! payloads as their own slices, never copied into a command buffer) and reads its replies
//! with the socket-free [`Parser`]: when a reply is a bulk string bigger than a read chunk,
//! the socket reads the rest straight into a buffer of exactly its size (or into the
//! caller's memory, [`Sink::Into`]), so the kernel's copy is the only one.
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
//! cost its connection when the connection is still in step: a connection knows what its
//! pipeline still owes ([`Conn::owes`]), and a background task reads those replies into
//! the connection's own memory (never the caller's: the caller's sinks went with the call),
//! discards them and gives the connection back to the pool, within `response_timeout`.
//! Only a connection cut off while writing its pipeline, or broken, is closed.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::codec;
use crate::error::{BackendError, BackendErrorKind, Error};
use crate::resp::{Arg, Caps, Parsed, Parser, ProtocolError, Reply, Request};

/// Read size for reply headers and small replies.
const READ_CHUNK: usize = 16 * 1024;

/// Alignment of the buffers big values are read into.
const ALIGN: usize = 64;

/// TCP keepalive on every Redis socket: first probe after this much silence...
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// ...then one per this interval (the kernel's probe count, 9 on Linux, before it is dead).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// A node's address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Addr {
    pub(crate) host: String,
    pub(crate) port: u16,
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// What every connection of a store says after it connects: its ACL user, password and
/// database. The same for every node of a topology.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct Login {
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    pub(crate) db: i64,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("db", &self.db)
            .finish()
    }
}

/// How a pool dials and how long it waits; shared by every pool of a store.
#[derive(Debug)]
pub(crate) struct Dialer {
    pub(crate) login: Login,
    pub(crate) tls: Option<Tls>,
    pub(crate) connect_timeout: Duration,
    pub(crate) response_timeout: Duration,
    pub(crate) command_retries: u32,
    pub(crate) max_connections: usize,
    pub(crate) connect_rate: u32,
}

/// TLS (`rediss://`): rustls with the CA file's certificates or the system's.
#[derive(Clone)]
pub(crate) struct Tls {
    #[cfg(feature = "tls")]
    pub(crate) connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

/// A TCP or TLS stream.
enum Stream {
    Tcp(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Where a reply's bulk string goes.
pub(crate) enum Sink<'a> {
    /// Into a buffer of the connection's, handed out as [`Bytes`].
    Own,
    /// A stored block: its header into memory of the connection's and its payload
    /// straight into the caller's memory (the reply is then [`Got::Split`]), when the
    /// value is a bulk string whose header says where the payload begins and whose payload
    /// fits. Anything else is read as with `Own`.
    Into(&'a mut [u8]),
}

/// One reply as a connection read it: parsed, or split around the parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Got {
    /// A reply the parser read whole.
    Reply(Reply),
    /// A bulk string the connection read itself ([`Parsed::Bulk`]) in two parts: `head`
    /// into memory of its own and the `body_len` bytes after it straight into its
    /// caller's buffer ([`Sink::Into`]; a stored block: header, then payload).
    Split {
        /// The first bytes of the value (a block's header).
        head: Bytes,
        /// Bytes written to the caller's buffer.
        body_len: usize,
    },
}

impl Got {
    /// The reply, when the parser read it whole.
    pub(crate) fn reply(&self) -> Option<&Reply> {
        match self {
            Got::Reply(r) => Some(r),
            Got::Split { .. } => None,
        }
    }

    /// The reply of a read given no caller buffers, where nothing is split.
    pub(crate) fn unsplit(self) -> Reply {
        match self {
            Got::Reply(r) => r,
            Got::Split { .. } => unreachable!("a split reply without a caller buffer"),
        }
    }
}

/// The replies to a pipeline, in command order.
#[derive(Debug)]
pub(crate) struct Replies {
    /// One per command, up to `oversized`.
    pub(crate) replies: Vec<Got>,
    /// The reply after the last of `replies` was a bulk string longer than its command
    /// allows (its announced length): the connection was dropped there, without reading
    /// it, so the replies of the commands after it are unknown.
    pub(crate) oversized: Option<u64>,
    /// The pipeline was sent more than once: its connection broke and it was resent on a
    /// new one (`command_retries`). The first sending may have run with its replies lost,
    /// so a reply that depends on the state before (`SET NX`, `HSETNX`, `UNLINK`'s count)
    /// may describe the first sending's effect rather than the absence of one.
    pub(crate) resent: bool,
}

/// One connection, its read buffer and its parser.
pub(crate) struct Conn {
    stream: Stream,
    buf: BytesMut,
    parser: Parser,
    owed: Owed,
}

/// What the pipeline in flight on a connection still owes, kept up to date at every await
/// of an exchange so that a connection whose call was dropped mid-way can be read back into
/// step ([`Conn::drain`]).
#[derive(Debug, Default)]
struct Owed {
    /// The pipeline is being written (a command may be half sent), or the connection broke:
    /// it can never be brought back in step.
    lost: bool,
    /// The caps of the replies not yet read whole, in order: the front one is being read.
    replies: VecDeque<Caps>,
    /// Bytes of the front reply, past what the parser has seen, still to read: the rest of
    /// a bulk string read around the parser (into the caller's memory), with its CRLF.
    raw: usize,
}

impl Conn {
    /// Dials `addr` (TLS when `dialer.tls`), then logs in and selects the database.
    pub(crate) async fn open(addr: &Addr, dialer: &Dialer) -> Result<Conn, BackendError> {
        let io = |e: std::io::Error| BackendError::io(&format!("redis {addr}"), &e);
        let tcp = TcpStream::connect((addr.host.as_str(), addr.port))
            .await
            .map_err(io)?;
        tcp.set_nodelay(true).map_err(io)?;
        // Keepalive, so an idle connection whose peer vanished without a FIN (a middlebox
        // dropped the flow, a host died) is found dead by the kernel rather than on first
        // use. Calls in flight have their own deadlines; tracking has its own heartbeat.
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL);
        socket2::SockRef::from(&tcp)
            .set_tcp_keepalive(&keepalive)
            .map_err(io)?;
        let stream = match &dialer.tls {
            None => Stream::Tcp(tcp),
            #[cfg(feature = "tls")]
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(addr.host.clone())
                    .map_err(|e| BackendError::new(BackendErrorKind::Io, format!("{addr}: {e}")))?;
                Stream::Tls(Box::new(
                    tls.connector.connect(name, tcp).await.map_err(io)?,
                ))
            }
            #[cfg(not(feature = "tls"))]
            Some(_) => unreachable!("a Tls is only made with the tls feature"),
        };
        let mut conn = Conn {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            parser: Parser::new(),
            owed: Owed::default(),
        };
        let login = &dialer.login;
        let mut hello = Request::default();
        if let Some(password) = &login.password {
            match &login.username {
                Some(user) => hello.cmd(&[
                    Arg::Small(b"AUTH"),
                    Arg::Small(user.as_bytes()),
                    Arg::Small(password.as_bytes()),
                ]),
                None => hello.cmd(&[Arg::Small(b"AUTH"), Arg::Small(password.as_bytes())]),
            };
        }
        if login.db != 0 {
            hello.cmd(&[
                Arg::Small(b"SELECT"),
                Arg::Small(login.db.to_string().as_bytes()),
            ]);
        }
        if hello.len() > 0 {
            let replies = conn.exchange(&hello, &mut []).await.map_err(io)?;
            if let Some(msg) = replies.replies.iter().find_map(|r| match r {
                Got::Reply(Reply::Error(m)) => Some(m),
                _ => None,
            }) {
                return Err(BackendError::from_reply(msg));
            }
        }
        Ok(conn)
    }

    /// Writes the pipeline and reads one reply per command, the `i`-th bulk reply into
    /// `sinks[i]` where there is one. An error is the connection's (I/O, protocol): it is
    /// out of step and must be dropped. Server error replies are replies; the connection
    /// stays in step.
    pub(crate) async fn exchange(
        &mut self,
        req: &Request,
        sinks: &mut [Sink<'_>],
    ) -> std::io::Result<Replies> {
        debug_assert!(!self.owes(), "a connection in the pool owes nothing");
        // Until the whole pipeline is out, a connection dropped mid-write is lost.
        self.owed.lost = true;
        self.write_all(req.slices()).await?;
        self.owed.lost = false;
        self.owed.replies.extend(req.caps.iter().copied());
        self.read_replies(&req.caps, sinks).await
    }

    /// Reads one reply per entry of `caps` (a pipeline sent earlier).
    pub(crate) async fn read_replies(
        &mut self,
        caps: &[Caps],
        sinks: &mut [Sink<'_>],
    ) -> std::io::Result<Replies> {
        let mut replies = Vec::with_capacity(caps.len());
        for (i, &caps) in caps.iter().enumerate() {
            let sink = sinks.get_mut(i);
            match self.read_reply(caps, sink).await {
                Ok(r) => {
                    self.owed.replies.pop_front();
                    replies.push(r);
                }
                Err(e) => {
                    // Out of step (or an oversized value left unread): never reused.
                    self.owed.lost = true;
                    match e {
                        ReadError::Io(e) => return Err(e),
                        ReadError::Protocol(ProtocolError::BulkTooLong { len, .. }) => {
                            return Ok(Replies {
                                replies,
                                oversized: Some(len),
                                resent: false,
                            });
                        }
                        ReadError::Protocol(e) => return Err(protocol(e)),
                    }
                }
            }
        }
        Ok(Replies {
            replies,
            oversized: None,
            resent: false,
        })
    }

    /// Whether a pipeline sent on this connection has replies not yet read (its call was
    /// dropped mid-exchange), or the connection is out of step for good.
    pub(crate) fn owes(&self) -> bool {
        self.owed.lost || !self.owed.replies.is_empty()
    }

    /// Reads what the pipeline in flight still owes into the connection's own memory and
    /// discards it, so the connection is in step again. Fails for a connection that can
    /// never be (cut off mid-write, or broken): close it.
    async fn drain(&mut self) -> std::io::Result<()> {
        if self.owed.lost {
            return Err(std::io::Error::other("cut off mid-write or broken"));
        }
        if self.owed.raw > 0 {
            // The rest of a value that was going into the caller's memory: skip it here.
            let mut rest = BytesMut::new();
            let n = self.owed.raw;
            if let Err(e) = self.take(&mut rest, n).await {
                self.owed.lost = true;
                return Err(match e {
                    ReadError::Io(e) => e,
                    ReadError::Protocol(e) => protocol(e),
                });
            }
            self.owed.replies.pop_front();
        }
        let caps: Vec<Caps> = self.owed.replies.iter().copied().collect();
        let replies = self.read_replies(&caps, &mut []).await?;
        if replies.oversized.is_some() {
            return Err(std::io::Error::other("an oversized reply"));
        }
        Ok(())
    }

    /// Sends commands without reading anything (a pub/sub subscription's replies are read
    /// with [`Conn::next_reply`]).
    pub(crate) async fn send(&mut self, req: &Request) -> std::io::Result<()> {
        self.write_all(req.slices()).await
    }

    /// The next reply, holding at most what `caps` allow.
    pub(crate) async fn next_reply(&mut self, caps: Caps) -> std::io::Result<Reply> {
        match self.read_reply(caps, None).await {
            Ok(r) => Ok(r.unsplit()),
            Err(ReadError::Io(e)) => Err(e),
            Err(ReadError::Protocol(e)) => Err(protocol(e)),
        }
    }

    async fn write_all(&mut self, mut parts: Vec<Bytes>) -> std::io::Result<()> {
        let mut first = 0;
        while first < parts.len() {
            let slices: Vec<IoSlice<'_>> = parts[first..]
                .iter()
                .take(64)
                .map(|p| IoSlice::new(p))
                .collect();
            let mut n = self.stream.write_vectored(&slices).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            while n > 0 {
                let p = &mut parts[first];
                let k = n.min(p.len());
                p.advance(k);
                n -= k;
                if p.is_empty() {
                    first += 1;
                }
            }
        }
        self.stream.flush().await
    }

    /// Feeds the parser until it has the next reply.
    async fn read_reply(
        &mut self,
        caps: Caps,
        mut sink: Option<&mut Sink<'_>>,
    ) -> Result<Got, ReadError> {
        loop {
            // A block the caller wants in its own memory is read around the parser.
            let take = matches!(sink, Some(Sink::Into(_)));
            let missing = match self.parser.parse_taking(&mut self.buf, caps, take)? {
                Parsed::Reply(reply) => return Ok(Got::Reply(reply)),
                Parsed::Bulk { len } => {
                    let Some(Sink::Into(out)) = sink.as_deref_mut() else {
                        unreachable!("a bulk string is taken only for a caller buffer")
                    };
                    // The value and its CRLF are now owed outside the parser.
                    self.owed.raw = len + 2;
                    return self.read_split(len, out).await;
                }
                Parsed::Incomplete { bulk_missing } => bulk_missing,
            };
            match missing {
                // A big value: into a buffer of its own, of exactly its size (the parser
                // has checked that size against what the command may receive).
                Some(missing) if missing > READ_CHUNK => {
                    // 64-byte aligned, so that a block's payload (after a header whose
                    // length is a multiple of 64) is too: copies out of a buffer a few
                    // bytes off a 4 KiB boundary run at a fraction of memcpy speed.
                    let mut value = BytesMut::with_capacity(self.buf.len() + missing + ALIGN);
                    let pad = value.as_ptr().align_offset(ALIGN);
                    value.put_bytes(0, pad);
                    value.advance(pad);
                    value.put(self.buf.split());
                    // Read into `self.buf` itself (it has room for the whole value), so
                    // that a call dropped mid-value leaves every byte read where a drain
                    // finds it.
                    self.buf = value;
                    let mut want = missing;
                    while want > 0 {
                        let n = self
                            .stream
                            .read_buf(&mut (&mut self.buf).limit(want))
                            .await?;
                        if n == 0 {
                            return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                        }
                        want -= n;
                    }
                }
                _ => {
                    self.buf.reserve(READ_CHUNK);
                    if self.stream.read_buf(&mut self.buf).await? == 0 {
                        return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                    }
                }
            }
        }
    }
}

impl Conn {
    /// Reads a bulk string of `len` bytes (its header consumed) that is a stored block:
    /// the preamble and header into a buffer of their own, the payload into `out` when it
    /// fits; otherwise the whole value into a buffer of its own. Then its CRLF.
    async fn read_split(&mut self, len: usize, out: &mut [u8]) -> Result<Got, ReadError> {
        let mut head = BytesMut::new();
        self.take(&mut head, len.min(codec::PREAMBLE_LEN)).await?;
        let split = codec::header_len(&head)
            .ok()
            .filter(|&h| h <= len && len - h <= out.len());
        let reply = match split {
            Some(h) => {
                let rest = h - head.len();
                self.take(&mut head, rest).await?;
                let body = &mut out[..len - h];
                let mut at = self.buf.len().min(body.len());
                body[..at].copy_from_slice(&self.buf[..at]);
                self.buf.advance(at);
                self.owed.raw -= at;
                while at < body.len() {
                    let n = self.stream.read(&mut body[at..]).await?;
                    if n == 0 {
                        return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                    }
                    at += n;
                    self.owed.raw -= n;
                }
                Got::Split {
                    head: head.freeze(),
                    body_len: len - h,
                }
            }
            None => {
                let rest = len - head.len();
                self.take(&mut head, rest).await?;
                Got::Reply(Reply::Bulk(head.freeze()))
            }
        };
        let mut crlf = BytesMut::new();
        self.take(&mut crlf, 2).await?;
        if &crlf[..] != b"\r\n" {
            return Err(ReadError::Protocol(ProtocolError::MissingCrlf));
        }
        Ok(reply)
    }

    /// Appends the next `n` bytes of the stream to `into`: what is buffered, then straight
    /// from the socket. They are bytes read around the parser: each counts off `owed.raw`.
    async fn take(&mut self, into: &mut BytesMut, n: usize) -> Result<(), ReadError> {
        let buffered = self.buf.len().min(n);
        into.extend_from_slice(&self.buf[..buffered]);
        self.buf.advance(buffered);
        self.owed.raw -= buffered;
        let mut want = n - buffered;
        into.reserve(want);
        while want > 0 {
            let got = self.stream.read_buf(&mut (&mut *into).limit(want)).await?;
            if got == 0 {
                return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            want -= got;
            self.owed.raw -= got;
        }
        Ok(())
    }
}

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

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Conn")
    }
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

#[derive(Debug)]
enum ReadError {
    Io(std::io::Error),
    Protocol(ProtocolError),
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> Self {
        ReadError::Io(e)
    }
}

impl From<ProtocolError> for ReadError {
    fn from(e: ProtocolError) -> Self {
        ReadError::Protocol(e)
    }
}

fn protocol(e: ProtocolError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

/// The connection broke under us (closed, reset): worth resending on a new connection.
fn is_dropped(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected
    )
}

/// A [`Replies`] as a plain list: every reply, or the error of the first server error or
/// of an oversized reply.
pub(crate) fn all(replies: Replies) -> Result<Vec<Reply>, Error> {
    if let Some(len) = replies.oversized {
        return Err(BackendError::new(
            BackendErrorKind::Protocol,
            format!("reply of {len} bytes, longer than the command allows"),
        )
        .into());
    }
    if let Some(msg) = replies.replies.iter().find_map(|r| match r {
        Got::Reply(Reply::Error(m)) => Some(m),
        _ => None,
    }) {
        return Err(BackendError::from_reply(msg).into());
    }
    Ok(replies.replies.into_iter().map(Got::unsplit).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_debug_hides_the_password() {
        let l = Login {
            username: Some("kv".into()),
            password: Some("hunter2".into()),
            db: 0,
        };
        let shown = format!("{l:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("***"), "{shown}");
    }

    /// A server that answers every connection with `replies`, once.
    async fn answering(replies: Vec<u8>) -> Addr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            sock.write_all(&replies).await.unwrap();
            // Hold the connection until the client is done.
            let mut sink = Vec::new();
            let _ = sock.read_to_end(&mut sink).await;
        });
        Addr {
            host: "127.0.0.1".into(),
            port,
        }
    }

    fn dialer() -> Dialer {
        Dialer {
            login: Login::default(),
            tls: None,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(5),
            command_retries: 0,
            max_connections: 1,
            connect_rate: 0,
        }
    }

    #[tokio::test]
    async fn big_values_land_64_byte_aligned_and_blocks_split_into_caller_memory() {
        let ns = crate::namespace::tests::qwen();
        let hash = crate::hashing::BlockHash([7; 32]);
        let payload = vec![0x5a; 300_000];
        let value = codec::encode(&codec::Header::for_block(&ns, &hash, &payload), &payload);
        let mut wire = Vec::new();
        for _ in 0..2 {
            Reply::Bulk(value.clone()).encode(&mut wire);
        }
        Reply::Bulk(Bytes::from_static(b"not a block")).encode(&mut wire);
        let addr = answering(wire).await;
        let mut conn = Conn::open(&addr, &dialer()).await.unwrap();
        let max = [Caps::bulk(value.len()); 3];
        let mut mine = vec![0u8; payload.len()];
        let mut tiny = [0u8; 4];
        let mut sinks = [Sink::Own, Sink::Into(&mut mine), Sink::Into(&mut tiny)];
        let got = conn.read_replies(&max, &mut sinks).await.unwrap();
        let Got::Reply(Reply::Bulk(own)) = &got.replies[0] else {
            panic!("{:?}", got.replies[0])
        };
        assert_eq!(own, &value);
        assert_eq!(own.as_ptr() as usize % ALIGN, 0, "the value starts aligned");
        let Got::Split { head, body_len } = &got.replies[1] else {
            panic!("{:?}", got.replies[1])
        };
        assert_eq!(*body_len, payload.len());
        assert_eq!(&head[..], &value[..value.len() - payload.len()]);
        assert_eq!(
            mine, payload,
            "the payload went straight into the caller's buffer"
        );
        // Not a block (no header to split at): read whole, the caller's buffer untouched.
        assert_eq!(
            got.replies[2],
            Got::Reply(Reply::Bulk(Bytes::from_static(b"not a block")))
        );
        assert_eq!(tiny, [0; 4]);
    }

    /// A node that accepts ONE connection and answers each request it reads with the
    /// next script entry: a list of (pause before, bytes) writes. A client that dialled a
    /// second connection would never be answered.
    async fn scripted(script: Vec<Vec<(Duration, Vec<u8>)>>) -> Addr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            for writes in script {
                let mut req = [0u8; 4096];
                if sock.read(&mut req).await.unwrap_or(0) == 0 {
                    return;
                }
                for (pause, bytes) in writes {
                    tokio::time::sleep(pause).await;
                    if sock.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            }
            let mut sink = Vec::new();
            let _ = sock.read_to_end(&mut sink).await;
        });
        Addr {
            host: "127.0.0.1".into(),
            port,
        }
    }

    fn get(max: usize) -> Request {
        let mut r = Request::default();
        r.cmd_bulk(max, &[Arg::Small(b"GET"), Arg::Small(b"k")]);
        r
    }

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
    /// memory, and the connection serves the next call.
    #[tokio::test]
    async fn a_call_dropped_mid_payload_never_writes_the_callers_buffer_again() {
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
            let req = get(value.len());
            let call = pool.exec(&req, &mut sinks);
            assert!(
                tokio::time::timeout(ms(200), call).await.is_err(),
                "the caller gives up mid-payload"
            );
        }
        assert!(mine.contains(&0xab), "half the payload had landed");
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
