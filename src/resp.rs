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
//! The path covers what the data path sends (`GET`, `SET … NX PX`, `PEXPIRE`, `PTTL`,
//! `EXISTS`) on one Redis over plain TCP. TLS (`rediss://`), unix sockets and Redis Cluster
//! use redis-rs for everything ([`Pool::for_url`] answers `None` there).
//!
//! Connections come from a pool of at most `max_connections`: a request takes an idle
//! connection (or opens one, or waits for one), sends its whole pipeline, reads every
//! reply, and gives the connection back. A connection
//! that failed or timed out mid-exchange is dropped, never reused; a pooled connection that
//! turns out dead (Redis restarted) is retried once on a fresh one.

use std::io::IoSlice;
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::Error;
use crate::store::StoreConfig;

/// Read size for reply headers and small replies.
const READ_CHUNK: usize = 16 * 1024;

/// One reply of a pipeline (the RESP2 types the data path's commands answer with).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// `$-1` (a missing key) or `*-1`.
    Nil,
    /// `:n`.
    Int(i64),
    /// `$n` and its bytes.
    Bulk(Bytes),
    /// `+OK` and other simple strings.
    Status,
}

/// A pipeline of commands, built once and sendable more than once (a retry resends it).
#[derive(Default, Clone)]
pub(crate) struct Request {
    parts: Vec<Bytes>,
    head: BytesMut,
    commands: usize,
}

/// One argument of a command.
pub(crate) enum Arg<'a> {
    /// Copied into the command framing (keys, options, numbers).
    Small(&'a [u8]),
    /// Sent as its own slices, never copied: a value made of, e.g., header and payload.
    Parts(&'a [Bytes]),
}

impl Request {
    /// Appends one command.
    pub(crate) fn cmd(&mut self, args: &[Arg<'_>]) -> &mut Self {
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
        self.commands += 1;
        self
    }

    /// Commands in the pipeline (= replies to read).
    pub(crate) fn len(&self) -> usize {
        self.commands
    }

    fn slices(&self) -> Vec<Bytes> {
        let mut out = self.parts.clone();
        if !self.head.is_empty() {
            out.push(Bytes::copy_from_slice(&self.head));
        }
        out
    }
}

/// Where and how to connect.
#[derive(Debug)]
struct Target {
    host: String,
    port: u16,
    username: Option<String>,
    password: Option<String>,
    db: i64,
}

/// A pool of lean connections to one Redis.
#[derive(Debug)]
pub(crate) struct Pool {
    target: Target,
    idle: Mutex<Vec<Conn>>,
    /// One permit per connection that may exist (idle or in use).
    slots: tokio::sync::Semaphore,
    connect_timeout: Duration,
    response_timeout: Duration,
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
        Ok(Some(Pool {
            target: Target {
                host: host.clone(),
                port: *port,
                username: settings.username().map(str::to_owned),
                password: settings.password().map(str::to_owned),
                db: settings.db(),
            },
            idle: Mutex::new(Vec::new()),
            slots: tokio::sync::Semaphore::new(cfg.max_connections.max(1)),
            connect_timeout: cfg.connection_timeout,
            response_timeout: cfg.response_timeout,
        }))
    }

    /// Sends `req` and reads all its replies, within the response timeout. A server error
    /// in any reply fails the whole call (as a redis-rs pipeline does).
    pub(crate) async fn exec(&self, req: &Request) -> Result<Vec<Reply>, Error> {
        // A connection slot; waiting for one counts against the response timeout.
        let _slot = tokio::time::timeout(self.response_timeout, self.slots.acquire())
            .await
            .map_err(|_| timed_out("no redis connection free in time"))?
            .expect("the pool's semaphore is never closed");
        let mut retried = false;
        loop {
            let (mut conn, pooled) = match self.take_idle() {
                Some(c) => (c, true),
                None => (self.connect().await?, false),
            };
            let exchange = tokio::time::timeout(self.response_timeout, conn.exchange(req));
            match exchange.await {
                Ok(Ok(replies)) => {
                    self.give_back(conn);
                    return replies.map_err(Error::from);
                }
                // A pooled connection Redis closed while it sat idle: once more, fresh.
                Ok(Err(e)) if pooled && !retried && is_dropped(&e) => retried = true,
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

    async fn connect(&self) -> Result<Conn, Error> {
        let t = &self.target;
        let connect = async {
            let stream = TcpStream::connect((t.host.as_str(), t.port)).await?;
            stream.set_nodelay(true)?;
            let mut conn = Conn {
                stream,
                buf: BytesMut::with_capacity(READ_CHUNK),
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
                conn.exchange(&hello).await??;
            }
            Ok::<_, redis::RedisError>(conn)
        };
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(conn) => Ok(conn?),
            Err(_) => Err(timed_out("redis connection timed out").into()),
        }
    }
}

/// One connection and its read buffer.
#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    /// Writes the pipeline and reads one reply per command. The outer `Result` is the
    /// connection's (I/O, protocol); the inner one a server error reply, after which the
    /// connection is still in step and reusable.
    async fn exchange(
        &mut self,
        req: &Request,
    ) -> std::io::Result<Result<Vec<Reply>, redis::RedisError>> {
        self.write_all(req.slices()).await?;
        let mut replies = Vec::with_capacity(req.len());
        let mut server_error = None;
        for _ in 0..req.len() {
            match self.read_reply().await? {
                Ok(r) => replies.push(r),
                Err(e) => server_error = server_error.or(Some(e)),
            }
        }
        Ok(match server_error {
            Some(e) => Err(e),
            None => Ok(replies),
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

    /// Reads one reply; a server error reply is `Ok(Err(..))`.
    async fn read_reply(&mut self) -> std::io::Result<Result<Reply, redis::RedisError>> {
        let line = loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                break self.buf.split_to(end + 2);
            }
            if self.buf.len() > 64 * 1024 {
                return Err(protocol("reply line longer than 64 KiB"));
            }
            self.fill().await?;
        };
        let body = std::str::from_utf8(&line[1..line.len() - 2])
            .map_err(|_| protocol("reply line is not UTF-8"))?;
        let number = || {
            body.parse::<i64>()
                .map_err(|_| protocol("bad number in reply"))
        };
        Ok(Ok(match line[0] {
            b'+' => Reply::Status,
            b':' => Reply::Int(number()?),
            b'$' | b'*' if number()? < 0 => Reply::Nil,
            b'$' => Reply::Bulk(self.read_bulk(number()? as usize).await?),
            b'-' => {
                // Let redis-rs classify the error (NOPERM, OOM, …) as it would its own.
                let err = match redis::parse_redis_value(&line).and_then(|v| v.extract_error()) {
                    Err(e) => e,
                    Ok(_) => {
                        redis::RedisError::from((redis::ErrorKind::Parse, "unparsable error reply"))
                    }
                };
                return Ok(Err(err));
            }
            _ => return Err(protocol("unexpected reply type")),
        }))
    }

    /// Reads a bulk string of `len` bytes (and its CRLF) into a buffer of its own.
    async fn read_bulk(&mut self, len: usize) -> std::io::Result<Bytes> {
        if self.buf.len() >= len + 2 {
            let mut value = self.buf.split_to(len + 2);
            value.truncate(len);
            return Ok(value.freeze());
        }
        let mut value = BytesMut::with_capacity(len + 2);
        value.put(self.buf.split());
        while value.len() < len + 2 {
            let want = len + 2 - value.len();
            if self.stream.read_buf(&mut (&mut value).limit(want)).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        if &value[len..] != b"\r\n" {
            return Err(protocol("bulk reply without CRLF"));
        }
        value.truncate(len);
        Ok(value.freeze())
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        self.buf.reserve(READ_CHUNK);
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }
}

fn protocol(what: &'static str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

fn timed_out(what: &'static str) -> redis::RedisError {
    std::io::Error::new(std::io::ErrorKind::TimedOut, what).into()
}

/// The connection broke under us (closed, reset): worth one retry on a fresh connection.
fn is_dropped(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected
    )
}
