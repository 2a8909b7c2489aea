//! A lean RESP2 path for the bulk data: the `GET`s and `SET`s of block values.
//!
//! redis-rs reads a reply by growing its read buffer until the whole value is in, then
//! copies the value out of it (`to_vec`): every payload byte is copied twice more after the
//! kernel's copy (profiled: ~13 % of the sidecar's CPU on 2 MiB fetches, BENCHMARKS.md).
//! Here a bulk reply's length prefix sizes a buffer of its own, the socket reads straight
//! into it, and the value is handed out as [`Bytes`] of that buffer: the kernel's copy is the
//! only one. Writes go out vectored — command framing, block header, payload `Bytes` — with
//! no copy into a command buffer.
//!
//! Two layers:
//!
//! - [`Parser`]: socket-free. Bytes in, [`Reply`]s out; it never reads a socket and never
//!   allocates by a length it was sent. Every command says the longest bulk string its
//!   reply may carry (a block `GET`: the header limit plus the namespace's `block_bytes`;
//!   everything else: a few bytes) and a longer one is refused from its length prefix
//!   alone. Public so that the fuzz targets (`fuzz/`) reach it.
//! - the pool (crate-private): connections, pipelines, timeouts, retries. It feeds the
//!   parser from the socket; when the parser is inside a bulk string that is not all
//!   buffered yet, it reads the rest straight into a buffer of exactly that size.
//!
//! The path covers what the data path sends (`GET`, `SET … NX PX`, `PEXPIRE`, `PTTL`,
//! `EXISTS`) on one Redis over plain TCP. TLS (`rediss://`), unix sockets and Redis Cluster
//! use redis-rs for everything (`Pool::for_url` answers `None` there).
//!
//! Connections come from a pool of at most `max_connections`: a request takes an idle
//! connection (or opens one, or waits for one), sends its whole pipeline, reads every
//! reply, and gives the connection back. A connection that failed or timed out
//! mid-exchange is dropped, never reused. A connection Redis closed (a restart, a
//! `timeout`, `CLIENT KILL`) makes the pool drop its idle connections too — they are as old
//! and most likely as dead — and the pipeline is sent again on a newly dialled connection,
//! up to `command_retries` times. New connections are paced (`connect_rate`), so that in a
//! brownout, where every fail-open timeout costs a connection, Redis is not also flooded
//! with reconnects and `AUTH`s.

use std::io::IoSlice;
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::error::Error;
use crate::store::StoreConfig;

/// Longest reply line (status, error, integer, length prefix), CRLF excluded. Redis's own
/// replies to the data path's commands are a few dozen bytes; an error names a command and
/// a key.
pub const MAX_LINE: usize = 4096;

/// Longest bulk string a command that is not a block `GET` may be answered with. `SET`,
/// `EXISTS`, `PEXPIRE`, `PTTL`, `PING`, `AUTH` and `SELECT` answer statuses, integers or
/// nil; nothing they answer is a bulk string.
pub const SMALL_BULK: usize = 64;

/// Read size for reply headers and small replies.
const READ_CHUNK: usize = 16 * 1024;

/// One reply (the RESP2 types the data path's commands answer with).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reply {
    /// `$-1` (a missing key) or `*-1`.
    Nil,
    /// `:n`.
    Int(i64),
    /// `$n` and its bytes.
    Bulk(Bytes),
    /// `+OK` and other simple strings.
    Status(Bytes),
    /// `-ERR …`: the server refused this command (the connection is still in step).
    Error(String),
}

impl Reply {
    /// Appends the reply's wire form to `out` (for tests, fuzzing and fake servers).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Reply::Nil => out.extend_from_slice(b"$-1\r\n"),
            Reply::Int(n) => out.extend_from_slice(format!(":{n}\r\n").as_bytes()),
            Reply::Bulk(b) => {
                out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Reply::Status(s) => {
                out.push(b'+');
                out.extend_from_slice(s);
                out.extend_from_slice(b"\r\n");
            }
            Reply::Error(e) => {
                out.push(b'-');
                out.extend_from_slice(e.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
    }
}

/// Why bytes from Redis are not the reply expected. After any of these the connection is
/// out of step and must be dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// No CRLF within [`MAX_LINE`] bytes.
    #[error("reply line longer than {MAX_LINE} bytes")]
    LineTooLong,
    /// A line with no type byte (a bare CRLF).
    #[error("empty reply line")]
    EmptyLine,
    /// A type byte the data path's commands are never answered with (arrays, RESP3 types).
    #[error("unexpected reply type {0:?}")]
    UnexpectedType(char),
    /// An integer or length that does not parse, or a negative length other than -1.
    #[error("bad number in reply: {0:?}")]
    BadNumber(String),
    /// A bulk string longer than the command may be answered with. Refused from its length
    /// prefix: nothing of it is read or allocated.
    #[error("bulk reply of {len} bytes; this command's reply is at most {max} bytes")]
    BulkTooLong {
        /// Announced length.
        len: u64,
        /// What the command allows.
        max: usize,
    },
    /// The bytes after a bulk string are not CRLF.
    #[error("bulk reply not followed by CRLF")]
    MissingCrlf,
}

/// A socket-free, incremental RESP2 reply parser.
///
/// Feed it by appending what the socket returned to a `BytesMut` and calling
/// [`parse`](Parser::parse) until it answers `Ok(None)` (more bytes needed). A reply split
/// anywhere, even inside its length prefix, parses the same. Bulk values are zero-copy
/// [`Bytes`] slices of the buffer they arrived in.
#[derive(Debug, Default)]
pub struct Parser {
    state: State,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Looking for the end of a reply line; the first `scanned` bytes hold no CRLF.
    Line { scanned: usize },
    /// Inside a bulk string whose header was consumed: `len` bytes and CRLF to come.
    Bulk { len: usize },
}

impl Default for State {
    fn default() -> Self {
        State::Line { scanned: 0 }
    }
}

impl Parser {
    /// A parser at the start of a reply.
    pub fn new() -> Parser {
        Parser::default()
    }

    /// Takes the next reply off the front of `buf`, or `Ok(None)` when it needs more bytes
    /// (what it consumed of a partial reply is remembered). `max_bulk` is the longest bulk
    /// string this reply may be; a longer one is an error, decided from its length prefix.
    pub fn parse(
        &mut self,
        buf: &mut BytesMut,
        max_bulk: usize,
    ) -> Result<Option<Reply>, ProtocolError> {
        if let State::Line { scanned } = self.state {
            let window = &buf[..buf.len().min(MAX_LINE + 2)];
            // Resume one byte early: a CR may have ended the previous chunk.
            let from = scanned.saturating_sub(1).min(window.len());
            let Some(end) = window[from..]
                .windows(2)
                .position(|w| w == b"\r\n")
                .map(|p| from + p)
            else {
                if buf.len() > MAX_LINE + 1 {
                    return Err(ProtocolError::LineTooLong);
                }
                self.state = State::Line { scanned: buf.len() };
                return Ok(None);
            };
            self.state = State::Line { scanned: 0 };
            let line = buf.split_to(end + 2);
            let (&kind, body) = line[..end].split_first().ok_or(ProtocolError::EmptyLine)?;
            match kind {
                b'+' => return Ok(Some(Reply::Status(line.freeze().slice(1..end)))),
                b'-' => {
                    return Ok(Some(Reply::Error(
                        String::from_utf8_lossy(body).into_owned(),
                    )));
                }
                b':' => return Ok(Some(Reply::Int(number(body)?))),
                b'*' if number(body)? == -1 => return Ok(Some(Reply::Nil)),
                b'$' => match number(body)? {
                    -1 => return Ok(Some(Reply::Nil)),
                    n if n < 0 => return Err(ProtocolError::BadNumber(lossy(body))),
                    n if n as u64 > max_bulk as u64 => {
                        return Err(ProtocolError::BulkTooLong {
                            len: n as u64,
                            max: max_bulk,
                        });
                    }
                    n => self.state = State::Bulk { len: n as usize },
                },
                other => return Err(ProtocolError::UnexpectedType(other as char)),
            }
        }
        let State::Bulk { len } = self.state else {
            unreachable!("a line either returned or started a bulk string")
        };
        // `len <= max_bulk`, so `len + 2` cannot overflow.
        if buf.len() < len + 2 {
            return Ok(None);
        }
        self.state = State::default();
        let mut value = buf.split_to(len + 2);
        if &value[len..] != b"\r\n" {
            return Err(ProtocolError::MissingCrlf);
        }
        value.truncate(len);
        Ok(Some(Reply::Bulk(value.freeze())))
    }

    /// Inside a bulk string whose bytes are not all in a buffer holding `buffered` bytes:
    /// how many more it needs (its value and CRLF). The connection may read them straight
    /// into a buffer of exactly the bulk string's size. `None` between bulk strings.
    pub fn bulk_missing(&self, buffered: usize) -> Option<usize> {
        match self.state {
            State::Bulk { len } => Some((len + 2).saturating_sub(buffered)),
            State::Line { .. } => None,
        }
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(32)]).into_owned()
}

/// A RESP integer: optional `-`, then ASCII digits, fitting an `i64`.
fn number(body: &[u8]) -> Result<i64, ProtocolError> {
    std::str::from_utf8(body)
        .ok()
        .filter(|s| !s.starts_with('+'))
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| ProtocolError::BadNumber(lossy(body)))
}

/// A pipeline of commands, built once and sendable more than once (a retry resends it).
#[derive(Default, Clone)]
pub(crate) struct Request {
    parts: Vec<Bytes>,
    head: BytesMut,
    /// Per command: the longest bulk string its reply may be.
    max_bulk: Vec<usize>,
}

/// One argument of a command.
pub(crate) enum Arg<'a> {
    /// Copied into the command framing (keys, options, numbers).
    Small(&'a [u8]),
    /// Sent as its own slices, never copied: a value made of, e.g., header and payload.
    Parts(&'a [Bytes]),
}

impl Request {
    /// Appends a command whose reply is not a bulk string (at most [`SMALL_BULK`] bytes).
    pub(crate) fn cmd(&mut self, args: &[Arg<'_>]) -> &mut Self {
        self.cmd_bulk(SMALL_BULK, args)
    }

    /// Appends a command whose reply may be a bulk string of up to `max_bulk` bytes.
    pub(crate) fn cmd_bulk(&mut self, max_bulk: usize, args: &[Arg<'_>]) -> &mut Self {
        self.head
            .put_slice(format!("*{}\r\n", args.len()).as_bytes());
        for arg in args {
            match arg {
                Arg::Small(a) => {
                    self.head.put_slice(format!("${}\r\n", a.len()).as_bytes());
                    self.head.put_slice(a);
                }
                Arg::Parts(parts) => {
                    let len: usize = parts.iter().map(Bytes::len).sum();
                    self.head.put_slice(format!("${len}\r\n").as_bytes());
                    self.parts.push(self.head.split().freeze());
                    self.parts
                        .extend(parts.iter().filter(|p| !p.is_empty()).cloned());
                }
            }
            self.head.put_slice(b"\r\n");
        }
        self.max_bulk.push(max_bulk);
        self
    }

    /// Commands in the pipeline (= replies to read).
    pub(crate) fn len(&self) -> usize {
        self.max_bulk.len()
    }

    fn slices(&self) -> Vec<Bytes> {
        let mut out = self.parts.clone();
        if !self.head.is_empty() {
            out.push(Bytes::copy_from_slice(&self.head));
        }
        out
    }
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

impl Replies {
    /// Every reply, or an error if any is missing or a server error (the first one, as a
    /// redis-rs pipeline reports it).
    pub(crate) fn all(self) -> Result<Vec<Reply>, Error> {
        if let Some(len) = self.oversized {
            return Err(protocol_error(ProtocolError::BulkTooLong {
                len,
                max: SMALL_BULK,
            }));
        }
        if let Some(msg) = self.replies.iter().find_map(|r| match r {
            Reply::Error(m) => Some(m),
            _ => None,
        }) {
            return Err(server_error(msg).into());
        }
        Ok(self.replies)
    }
}

/// The redis-rs error for a server error reply, classified as redis-rs would classify its
/// own (`NOPERM`, `OOM`, `WRONGTYPE`, …).
pub(crate) fn server_error(msg: &str) -> redis::RedisError {
    let line = format!("-{msg}\r\n");
    match redis::parse_redis_value(line.as_bytes()).and_then(|v| v.extract_error()) {
        Err(e) => e,
        Ok(_) => redis::RedisError::from((redis::ErrorKind::Parse, "unparsable error reply")),
    }
}

/// Where and how to connect.
struct Target {
    host: String,
    port: u16,
    username: Option<String>,
    password: Option<String>,
    db: i64,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("db", &self.db)
            .finish()
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

/// A pool of lean connections to one Redis.
#[derive(Debug)]
pub(crate) struct Pool {
    target: Target,
    idle: Mutex<Vec<Conn>>,
    /// One permit per connection that may exist (idle or in use).
    slots: tokio::sync::Semaphore,
    dials: Pacer,
    connect_timeout: Duration,
    response_timeout: Duration,
    command_retries: u32,
}

impl Pool {
    /// A pool for the store's URL, or `None` when the lean path does not cover it (TLS,
    /// unix socket, RESP3).
    pub(crate) fn for_url(cfg: &StoreConfig) -> Result<Option<Pool>, Error> {
        let info = redis::IntoConnectionInfo::into_connection_info(cfg.url.as_str())?;
        let redis::ConnectionAddr::Tcp(host, port) = info.addr() else {
            return Ok(None);
        };
        let settings = info.redis_settings();
        if settings.protocol() != redis::ProtocolVersion::RESP2 {
            return Ok(None);
        }
        let max_connections = cfg.max_connections.max(1);
        Ok(Some(Pool {
            target: Target {
                host: host.clone(),
                port: *port,
                username: settings.username().map(str::to_owned),
                password: settings.password().map(str::to_owned),
                db: settings.db(),
            },
            idle: Mutex::new(Vec::new()),
            slots: tokio::sync::Semaphore::new(max_connections),
            dials: Pacer::new(
                cfg.connect_rate,
                u32::try_from(max_connections).unwrap_or(u32::MAX),
            ),
            connect_timeout: cfg.connection_timeout,
            response_timeout: cfg.response_timeout,
            command_retries: cfg.command_retries,
        }))
    }

    /// Sends `req` and reads all its replies. Each step has its own bound: waiting for a
    /// connection slot and each exchange `response_timeout`, each dial (pacing included)
    /// `connection_timeout`.
    pub(crate) async fn exec(&self, req: &Request) -> Result<Replies, Error> {
        let _slot = tokio::time::timeout(self.response_timeout, self.slots.acquire())
            .await
            .map_err(|_| timed_out("no redis connection free in time"))?
            .expect("the pool's semaphore is never closed");
        let mut conn = match self.take_idle() {
            Some(c) => c,
            None => self.dial().await?,
        };
        let mut retries = 0;
        loop {
            let exchange = tokio::time::timeout(self.response_timeout, conn.exchange(req));
            match exchange.await {
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
                    if retries >= self.command_retries {
                        return Err(redis::RedisError::from(e).into());
                    }
                    retries += 1;
                    tracing::debug!(error = %e, retries, "redis connection dropped; resending on a new one");
                    conn = self.dial().await?;
                }
                Ok(Err(e)) => return Err(redis::RedisError::from(e).into()),
                Err(_) => return Err(timed_out("redis response timed out").into()),
            }
        }
    }

    fn take_idle(&self) -> Option<Conn> {
        self.idle.lock().expect("pool lock").pop()
    }

    fn give_back(&self, conn: Conn) {
        // At most `max_connections` exist, one per slot: every one given back is kept.
        self.idle.lock().expect("pool lock").push(conn);
    }

    /// Opens a new connection, if the pacer allows one now, within `connection_timeout`.
    async fn dial(&self) -> Result<Conn, Error> {
        if !self.dials.try_take(Instant::now()) {
            return Err(redis::RedisError::from(std::io::Error::other(
                "redis reconnect rate limit (connect_rate): no new connection now",
            ))
            .into());
        }
        match tokio::time::timeout(self.connect_timeout, self.connect()).await {
            Ok(conn) => Ok(conn?),
            Err(_) => Err(timed_out("redis connection timed out").into()),
        }
    }

    async fn connect(&self) -> Result<Conn, redis::RedisError> {
        let t = &self.target;
        let stream = TcpStream::connect((t.host.as_str(), t.port)).await?;
        stream.set_nodelay(true)?;
        let mut conn = Conn {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            parser: Parser::new(),
        };
        let mut hello = Request::default();
        if let Some(password) = &t.password {
            match &t.username {
                Some(user) => hello.cmd(&[
                    Arg::Small(b"AUTH"),
                    Arg::Small(user.as_bytes()),
                    Arg::Small(password.as_bytes()),
                ]),
                None => hello.cmd(&[Arg::Small(b"AUTH"), Arg::Small(password.as_bytes())]),
            };
        }
        if t.db != 0 {
            hello.cmd(&[
                Arg::Small(b"SELECT"),
                Arg::Small(t.db.to_string().as_bytes()),
            ]);
        }
        if hello.len() > 0 {
            conn.exchange(&hello).await?.all().map_err(|e| match e {
                Error::Backend(e) => e,
                other => redis::RedisError::from((
                    redis::ErrorKind::Parse,
                    "bad reply to AUTH/SELECT",
                    other.to_string(),
                )),
            })?;
        }
        Ok(conn)
    }
}

/// One connection, its read buffer and its parser.
#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    parser: Parser,
}

impl Conn {
    /// Writes the pipeline and reads one reply per command. An error is the connection's
    /// (I/O, protocol): it is out of step and must be dropped. Server error replies are
    /// replies; the connection stays in step.
    async fn exchange(&mut self, req: &Request) -> std::io::Result<Replies> {
        self.write_all(req.slices()).await?;
        let mut replies = Vec::with_capacity(req.len());
        for &max_bulk in &req.max_bulk {
            match self.read_reply(max_bulk).await {
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
        Ok(())
    }

    /// Feeds the parser until it has the next reply.
    async fn read_reply(&mut self, max_bulk: usize) -> Result<Reply, ReadError> {
        loop {
            if let Some(reply) = self.parser.parse(&mut self.buf, max_bulk)? {
                return Ok(reply);
            }
            match self.parser.bulk_missing(self.buf.len()) {
                // A big value: into a buffer of its own, of exactly its size (the parser
                // has checked that size against what the command may receive).
                Some(missing) if missing > READ_CHUNK => {
                    let mut value = BytesMut::with_capacity(self.buf.len() + missing);
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

fn protocol_error(e: ProtocolError) -> Error {
    redis::RedisError::from(protocol(e)).into()
}

fn timed_out(what: &'static str) -> redis::RedisError {
    std::io::Error::new(std::io::ErrorKind::TimedOut, what).into()
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
    use super::*;
    use proptest::prelude::*;

    /// Parses `bytes` fed in chunks of `chunk`, every reply allowed up to `max_bulk`.
    fn parse_all(
        bytes: &[u8],
        chunk: usize,
        max_bulk: usize,
    ) -> Result<(Vec<Reply>, usize), ProtocolError> {
        let mut parser = Parser::new();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for c in bytes.chunks(chunk.max(1)) {
            buf.extend_from_slice(c);
            while let Some(r) = parser.parse(&mut buf, max_bulk)? {
                out.push(r);
            }
        }
        Ok((out, buf.len()))
    }

    fn one(bytes: &[u8]) -> Result<Option<Reply>, ProtocolError> {
        Parser::new().parse(&mut BytesMut::from(bytes), 1 << 20)
    }

    #[test]
    fn every_reply_type_parses() {
        assert_eq!(one(b"+OK\r\n"), Ok(Some(Reply::Status("OK".into()))));
        assert_eq!(one(b"+\r\n"), Ok(Some(Reply::Status(Bytes::new()))));
        assert_eq!(one(b":-42\r\n"), Ok(Some(Reply::Int(-42))));
        assert_eq!(one(b"$-1\r\n"), Ok(Some(Reply::Nil)));
        assert_eq!(one(b"*-1\r\n"), Ok(Some(Reply::Nil)));
        assert_eq!(one(b"$0\r\n\r\n"), Ok(Some(Reply::Bulk(Bytes::new()))));
        assert_eq!(
            one(b"$5\r\nab\r\nc\r\n"),
            Ok(Some(Reply::Bulk("ab\r\nc".into())))
        );
        assert_eq!(
            one(b"-WRONGTYPE Operation against a key\r\n"),
            Ok(Some(Reply::Error(
                "WRONGTYPE Operation against a key".into()
            )))
        );
        assert_eq!(one(b"$5\r\nab"), Ok(None));
        assert_eq!(one(b":12"), Ok(None));
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        // A bare CRLF used to slice `line[1..0]` and panic.
        assert_eq!(one(b"\r\n"), Err(ProtocolError::EmptyLine));
        assert_eq!(one(b"?x\r\n"), Err(ProtocolError::UnexpectedType('?')));
        assert_eq!(one(b"*2\r\n"), Err(ProtocolError::UnexpectedType('*')));
        assert_eq!(one(b"%1\r\n"), Err(ProtocolError::UnexpectedType('%')));
        for bad in [&b":\r\n"[..], b":1x\r\n", b":+1\r\n", b"$-2\r\n", b"$\r\n"] {
            assert!(
                matches!(one(bad), Err(ProtocolError::BadNumber(_))),
                "{bad:?}"
            );
        }
        let too_big = u64::MAX.to_string();
        assert!(matches!(
            one(format!(":{too_big}\r\n").as_bytes()),
            Err(ProtocolError::BadNumber(_))
        ));
    }

    #[test]
    fn a_bulk_string_is_refused_from_its_length_alone() {
        // Nothing of the value is there: the length prefix is enough to refuse it.
        let huge = format!("${}\r\n", i64::MAX);
        assert_eq!(
            Parser::new().parse(&mut BytesMut::from(huge.as_bytes()), 1 << 20),
            Err(ProtocolError::BulkTooLong {
                len: i64::MAX as u64,
                max: 1 << 20
            })
        );
        let mut buf = BytesMut::from(&b"$11\r\n"[..]);
        assert_eq!(
            Parser::new().parse(&mut buf, 10),
            Err(ProtocolError::BulkTooLong { len: 11, max: 10 })
        );
        let mut buf = BytesMut::from(&b"$10\r\n0123456789\r\n"[..]);
        assert!(matches!(
            Parser::new().parse(&mut buf, 10),
            Ok(Some(Reply::Bulk(_)))
        ));
    }

    #[test]
    fn a_bulk_string_must_end_in_crlf_whether_buffered_or_not() {
        // All in one buffer (what used to be the fast path) and byte by byte.
        for chunk in [1, 3, 100] {
            assert_eq!(
                parse_all(b"$3\r\nabcXY+OK\r\n", chunk, 10),
                Err(ProtocolError::MissingCrlf),
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn lines_are_capped() {
        let mut long = vec![b'+'; MAX_LINE];
        assert_eq!(parse_all(&long, 7, 0), Ok((vec![], MAX_LINE)));
        long.extend_from_slice(b"\r\n");
        assert_eq!(parse_all(&long, 7, 0).unwrap().0.len(), 1);
        let mut longer = vec![b'+'; MAX_LINE + 2];
        assert_eq!(parse_all(&longer, 5, 0), Err(ProtocolError::LineTooLong));
        longer.extend_from_slice(b"\r\n");
        assert_eq!(parse_all(&longer, 4096, 0), Err(ProtocolError::LineTooLong));
    }

    #[test]
    fn bulk_missing_counts_what_is_still_to_come() {
        let mut p = Parser::new();
        let mut buf = BytesMut::from(&b"$100\r\n0123"[..]);
        assert_eq!(p.bulk_missing(buf.len()), None);
        assert_eq!(p.parse(&mut buf, 100), Ok(None));
        assert_eq!(p.bulk_missing(buf.len()), Some(98));
        buf.extend_from_slice(&[b'x'; 96]);
        buf.extend_from_slice(b"\r\n:1\r\n");
        assert!(matches!(p.parse(&mut buf, 100), Ok(Some(Reply::Bulk(b))) if b.len() == 100));
        assert_eq!(p.bulk_missing(buf.len()), None);
        assert_eq!(p.parse(&mut buf, 0), Ok(Some(Reply::Int(1))));
        assert!(buf.is_empty());
    }

    #[test]
    fn target_debug_hides_the_password() {
        let t = Target {
            host: "h".into(),
            port: 1,
            username: Some("kv".into()),
            password: Some("hunter2".into()),
            db: 0,
        };
        let shown = format!("{t:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("***"), "{shown}");
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

    fn arb_reply() -> impl Strategy<Value = Reply> {
        let text = proptest::collection::vec(
            any::<u8>().prop_filter("no CR or LF", |b| *b != b'\r' && *b != b'\n'),
            0..40,
        );
        prop_oneof![
            Just(Reply::Nil),
            any::<i64>().prop_map(Reply::Int),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(|v| Reply::Bulk(v.into())),
            text.clone().prop_map(|v| Reply::Status(v.into())),
            text.prop_map(|v| Reply::Error(String::from_utf8_lossy(&v).into_owned())),
        ]
    }

    proptest! {
        #[test]
        fn prop_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600), chunk in 1usize..64, max in 0usize..512) {
            let _ = parse_all(&bytes, chunk, max);
        }

        #[test]
        fn prop_never_panics_on_near_valid_input(replies in proptest::collection::vec(arb_reply(), 0..8), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4), chunk in 1usize..64) {
            let mut bytes = Vec::new();
            for r in &replies {
                r.encode(&mut bytes);
            }
            for (at, b) in flips {
                if !bytes.is_empty() {
                    let i = at % bytes.len();
                    bytes[i] = b;
                }
            }
            let _ = parse_all(&bytes, chunk, 300);
        }

        #[test]
        fn prop_round_trip_in_any_chunking(replies in proptest::collection::vec(arb_reply(), 0..12), chunk in 1usize..97) {
            let mut bytes = Vec::new();
            for r in &replies {
                r.encode(&mut bytes);
            }
            let (got, left) = parse_all(&bytes, chunk, 300).unwrap();
            prop_assert_eq!(got, replies);
            prop_assert_eq!(left, 0);
        }

        /// The parser agrees with redis-rs's on every reply it accepts.
        #[test]
        fn prop_agrees_with_redis_rs(reply in arb_reply()) {
            let mut bytes = Vec::new();
            reply.encode(&mut bytes);
            let theirs = redis::parse_redis_value(&bytes);
            match (&reply, theirs) {
                (Reply::Nil, Ok(redis::Value::Nil)) => {}
                (Reply::Int(a), Ok(redis::Value::Int(b))) => prop_assert_eq!(*a, b),
                (Reply::Bulk(a), Ok(redis::Value::BulkString(b))) => prop_assert_eq!(&a[..], &b[..]),
                (Reply::Status(a), Ok(redis::Value::SimpleString(b))) => prop_assert_eq!(&a[..], b.as_bytes()),
                (Reply::Status(_), Err(_)) => {} // redis-rs wants UTF-8 statuses
                (Reply::Error(_), Ok(redis::Value::ServerError(_)) | Err(_)) => {}
                (ours, theirs) => prop_assert!(false, "{ours:?} vs {theirs:?}"),
            }
        }
    }
}
