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
//! are paced (`connect_rate`): in a brownout, where each fail-open timeout costs a
//! connection, Redis is not also flooded with reconnects and `AUTH`s.

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
use crate::resp::{Arg, Parser, ProtocolError, Reply, Request};

/// Read size for reply headers and small replies.
const READ_CHUNK: usize = 16 * 1024;

/// Alignment of the buffers big values are read into.
const ALIGN: usize = 64;

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
#[derive(Clone, Default)]
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
    /// straight into the caller's memory (the reply is then [`Reply::Split`]), when the
    /// value is a bulk string whose header says where the payload begins and whose payload
    /// fits. Anything else is read as with `Own`.
    Into(&'a mut [u8]),
}

/// The replies to a pipeline, in command order.
#[derive(Debug)]
pub(crate) struct Replies {
    /// One per command, up to `oversized`.
    pub(crate) replies: Vec<Reply>,
    /// The reply after the last of `replies` was a bulk string longer than its command
    /// allows (its announced length): the connection was dropped there, without reading
    /// it, so the replies of the commands after it are unknown.
    pub(crate) oversized: Option<u64>,
}

/// One connection, its read buffer and its parser.
pub(crate) struct Conn {
    stream: Stream,
    buf: BytesMut,
    parser: Parser,
}

impl Conn {
    /// Dials `addr` (TLS when `dialer.tls`), then logs in and selects the database.
    pub(crate) async fn open(addr: &Addr, dialer: &Dialer) -> Result<Conn, BackendError> {
        let io = |e: std::io::Error| BackendError::io(&format!("redis {addr}"), &e);
        let tcp = TcpStream::connect((addr.host.as_str(), addr.port))
            .await
            .map_err(io)?;
        tcp.set_nodelay(true).map_err(io)?;
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
                Reply::Error(m) => Some(m),
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
        self.write_all(req.slices()).await?;
        self.read_replies(&req.max_bulk, sinks).await
    }

    /// Reads one reply per entry of `max_bulk` (a pipeline sent earlier).
    pub(crate) async fn read_replies(
        &mut self,
        max_bulk: &[usize],
        sinks: &mut [Sink<'_>],
    ) -> std::io::Result<Replies> {
        let mut replies = Vec::with_capacity(max_bulk.len());
        for (i, &max) in max_bulk.iter().enumerate() {
            let sink = sinks.get_mut(i);
            match self.read_reply(max, sink).await {
                Ok(r) => replies.push(r),
                Err(ReadError::Io(e)) => return Err(e),
                Err(ReadError::Protocol(ProtocolError::BulkTooLong { len, .. })) => {
                    return Ok(Replies {
                        replies,
                        oversized: Some(len),
                    });
                }
                Err(ReadError::Protocol(e)) => return Err(protocol(e)),
            }
        }
        Ok(Replies {
            replies,
            oversized: None,
        })
    }

    /// Sends commands without reading anything (a pub/sub subscription's replies are read
    /// with [`Conn::next_reply`]).
    pub(crate) async fn send(&mut self, req: &Request) -> std::io::Result<()> {
        self.write_all(req.slices()).await
    }

    /// The next reply, of at most `max_bulk` bytes per bulk string.
    pub(crate) async fn next_reply(&mut self, max_bulk: usize) -> std::io::Result<Reply> {
        match self.read_reply(max_bulk, None).await {
            Ok(r) => Ok(r),
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
        max_bulk: usize,
        mut sink: Option<&mut Sink<'_>>,
    ) -> Result<Reply, ReadError> {
        loop {
            if let Some(reply) = self.parser.parse(&mut self.buf, max_bulk)? {
                return Ok(reply);
            }
            // A block the caller wants in its own memory.
            if let Some(Sink::Into(out)) = sink.as_deref_mut()
                && let Some(len) = self.parser.bare_bulk()
            {
                self.parser.skip_bulk();
                return self.read_split(len, out).await;
            }
            match self.parser.bulk_missing(self.buf.len()) {
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
                    let mut want = missing;
                    while want > 0 {
                        let n = self.stream.read_buf(&mut (&mut value).limit(want)).await?;
                        if n == 0 {
                            return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                        }
                        want -= n;
                    }
                    self.buf = value;
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
    async fn read_split(&mut self, len: usize, out: &mut [u8]) -> Result<Reply, ReadError> {
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
                let buffered = self.buf.len().min(body.len());
                body[..buffered].copy_from_slice(&self.buf[..buffered]);
                self.buf.advance(buffered);
                if buffered < body.len() {
                    self.stream.read_exact(&mut body[buffered..]).await?;
                }
                Reply::Split {
                    head: head.freeze(),
                    body_len: len - h,
                }
            }
            None => {
                let rest = len - head.len();
                self.take(&mut head, rest).await?;
                Reply::Bulk(head.freeze())
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
    /// from the socket.
    async fn take(&mut self, into: &mut BytesMut, n: usize) -> Result<(), ReadError> {
        let buffered = self.buf.len().min(n);
        into.extend_from_slice(&self.buf[..buffered]);
        self.buf.advance(buffered);
        let mut want = n - buffered;
        into.reserve(want);
        while want > 0 {
            let got = self.stream.read_buf(&mut (&mut *into).limit(want)).await?;
            if got == 0 {
                return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            want -= got;
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
    idle: Mutex<Vec<Conn>>,
    /// One permit per connection that may exist (idle or in use).
    slots: tokio::sync::Semaphore,
    dials: Pacer,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Conn")
    }
}

impl Pool {
    /// A pool for the node at `addr`; it dials on first use.
    pub(crate) fn new(addr: Addr, dialer: Arc<Dialer>) -> Pool {
        let max = dialer.max_connections.max(1);
        Pool {
            addr,
            dials: Pacer::new(dialer.connect_rate, u32::try_from(max).unwrap_or(u32::MAX)),
            slots: tokio::sync::Semaphore::new(max),
            idle: Mutex::new(Vec::new()),
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
    /// `response_timeout`, each dial (pacing included) `connection_timeout`.
    pub(crate) async fn exec(
        &self,
        req: &Request,
        sinks: &mut [Sink<'_>],
    ) -> Result<Replies, BackendError> {
        let timeout = self.dialer.response_timeout;
        let _slot = tokio::time::timeout(timeout, self.slots.acquire())
            .await
            .map_err(|_| self.timed_out("no connection free in time"))?
            .expect("the pool's semaphore is never closed");
        let mut conn = match self.take_idle() {
            Some(c) => c,
            None => self.dial().await?,
        };
        let mut retries = 0;
        loop {
            match tokio::time::timeout(timeout, conn.exchange(req, sinks)).await {
                Ok(Ok(replies)) => {
                    if replies.oversized.is_none() {
                        self.give_back(conn);
                    }
                    return Ok(replies);
                }
                Ok(Err(e)) if is_dropped(&e) => {
                    // Redis closed this connection: a restart, or its idle `timeout`. The
                    // idle ones are older still: drop them rather than find out one by one.
                    self.idle.lock().expect("pool lock").clear();
                    if retries >= self.dialer.command_retries {
                        return Err(BackendError::io(&format!("redis {}", self.addr), &e));
                    }
                    retries += 1;
                    tracing::debug!(node = %self.addr, error = %e, retries, "redis connection dropped; resending on a new one");
                    conn = self.dial().await?;
                }
                Ok(Err(e)) => return Err(BackendError::io(&format!("redis {}", self.addr), &e)),
                Err(_) => return Err(self.timed_out("response timed out")),
            }
        }
    }

    /// A connection of its own, outside the pool (a subscription), dialled now.
    pub(crate) async fn dedicated(&self) -> Result<Conn, BackendError> {
        self.dial().await
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

    fn give_back(&self, conn: Conn) {
        // At most `max_connections` exist, one per slot: every one given back is kept.
        self.idle.lock().expect("pool lock").push(conn);
    }

    /// Opens a new connection, if the pacer allows one now, within `connection_timeout`.
    async fn dial(&self) -> Result<Conn, BackendError> {
        if !self.dials.try_take(Instant::now()) {
            return Err(BackendError::new(
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
        Reply::Error(m) => Some(m),
        _ => None,
    }) {
        return Err(BackendError::from_reply(msg).into());
    }
    Ok(replies.replies)
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
        let max = [value.len(); 3];
        let mut mine = vec![0u8; payload.len()];
        let mut tiny = [0u8; 4];
        let mut sinks = [Sink::Own, Sink::Into(&mut mine), Sink::Into(&mut tiny)];
        let got = conn.read_replies(&max, &mut sinks).await.unwrap();
        let Reply::Bulk(own) = &got.replies[0] else {
            panic!("{:?}", got.replies[0])
        };
        assert_eq!(own, &value);
        assert_eq!(own.as_ptr() as usize % ALIGN, 0, "the value starts aligned");
        let Reply::Split { head, body_len } = &got.replies[1] else {
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
            Reply::Bulk(Bytes::from_static(b"not a block"))
        );
        assert_eq!(tiny, [0; 4]);
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
