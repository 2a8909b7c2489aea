//! Connections to one Redis node, and (in `pool`) the pool that hands them out.
//!
//! A connection writes a whole pipeline vectored (command framing, block headers and
//! payloads as their own slices, never copied into a command buffer) and reads its replies
//! with the socket-free [`Parser`]: when a reply is a bulk string bigger than a read chunk,
//! the socket reads the rest straight into a buffer of exactly its size (or into the
//! caller's memory, [`Sink::Into`]: the parser hands such a value over after its header,
//! [`Parsed::Bulk`], and the connection reads it itself), so the kernel's copy is the only
//! one.
//!
//! A connection knows what its pipeline still owes ([`Conn::owes`]): a call given up on
//! mid-exchange leaves its connection to be read back into step ([`Conn::drain`]) into the
//! connection's own memory, never the caller's, and returned to the pool (`pool`).
//!
//! | File | Holds |
//! |---|---|
//! | `conn.rs` | `Conn`: the exchange, the read path, what a pipeline still owes |
//! | `conn/dial.rs` | `Addr`, `Login`, `Dialer`, `Tls`; the TCP or TLS stream and dialling it |
//! | `conn/pool.rs` | `Pool`: slots, idle connections, draining (`Held`, `Drains`), the dial pacer, the retry policy |

mod dial;
mod pool;

pub(crate) use self::dial::{Addr, Dialer, Login, Tls};
pub(crate) use self::pool::Pool;

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use self::dial::Stream;

use crate::codec;
use crate::error::{BackendError, BackendErrorKind, Error};
use crate::resp::{Arg, Caps, Parsed, Parser, ProtocolError, Reply, Request};

/// Read size for reply headers and small replies.
const READ_CHUNK: usize = 16 * 1024;

/// Alignment of the buffers big values are read into.
const ALIGN: usize = 64;

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
        /// The XXH3-64 of those bytes, computed read by read as they landed
        /// ([`codec::PayloadDigest`]): the checksum costs no second pass over the buffer
        /// and is done when the last byte is in.
        xxh3: u64,
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
    /// The socket's `SO_RCVLOWAT` (1: the kernel's default), raised while a large value is
    /// received ([`Conn::expect`]). A read cut off there leaves it raised: every other read
    /// puts it back first, or a short reply would never wake the connection.
    lowat: usize,
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
        let stream = dial::connect(addr, dialer).await?;
        let mut conn = Conn {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            parser: Parser::new(),
            owed: Owed::default(),
            lowat: 1,
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
            let io = |e: std::io::Error| BackendError::io(&format!("redis {addr}"), &e);
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
        self.lowat_normal();
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

    /// `coming` more bytes of a value are certain to arrive: a large value is received in
    /// a few large reads, the socket waking this task once up to `LOWAT_MAX` of it is
    /// queued rather than at every segment (CPU per GB loaded, and loads beside a busy core:
    /// BENCHMARKS.md, "Issue 19"). Never above what is still to come, or its last bytes
    /// would not wake the read; once raised for a value, lowered with it to the end.
    fn expect(&mut self, coming: usize) {
        if coming > LOWAT_FROM || self.lowat > 1 {
            self.set_lowat(coming.clamp(1, LOWAT_MAX));
        }
    }

    /// `SO_RCVLOWAT` back to 1 if a value's read raised it.
    fn lowat_normal(&mut self) {
        self.set_lowat(1);
    }

    fn set_lowat(&mut self, lowat: usize) {
        if self.lowat != lowat {
            self.stream.set_recv_lowat(lowat);
            self.lowat = lowat;
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
        self.lowat_normal();
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
                        self.expect(want);
                        let n = self
                            .stream
                            .read_buf(&mut (&mut self.buf).limit(want))
                            .await?;
                        if n == 0 {
                            return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                        }
                        want -= n;
                    }
                    self.lowat_normal();
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

/// Values longer than this are received with `SO_RCVLOWAT` raised ([`Conn::expect`]).
const LOWAT_FROM: usize = 256 << 10;
/// The most `SO_RCVLOWAT` is raised to.
const LOWAT_MAX: usize = 1 << 20;

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
                let mut digest = codec::PayloadDigest::new();
                let mut at = self.buf.len().min(body.len());
                body[..at].copy_from_slice(&self.buf[..at]);
                digest.update(&body[..at]);
                self.buf.advance(at);
                self.owed.raw -= at;
                while at < body.len() {
                    self.expect(body.len() - at);
                    let n = self.stream.read(&mut body[at..]).await?;
                    if n == 0 {
                        return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                    }
                    digest.update(&body[at..at + n]);
                    at += n;
                    self.owed.raw -= n;
                }
                self.lowat_normal();
                Got::Split {
                    head: head.freeze(),
                    body_len: len - h,
                    xxh3: digest.finish(),
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

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Conn")
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
    use std::time::Duration;

    use tokio::io::AsyncReadExt;

    use super::*;

    /// A server that answers every connection with `replies`, once.
    pub(super) async fn answering(replies: Vec<u8>) -> Addr {
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

    pub(super) fn dialer() -> Dialer {
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
        let Got::Split {
            head,
            body_len,
            xxh3,
        } = &got.replies[1]
        else {
            panic!("{:?}", got.replies[1])
        };
        assert_eq!(*body_len, payload.len());
        assert_eq!(
            format!("xxh3-64:{xxh3:016x}"),
            codec::checksum(&payload),
            "the digest computed as the payload landed is its checksum"
        );
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
    pub(super) async fn scripted(script: Vec<Vec<(Duration, Vec<u8>)>>) -> Addr {
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

    pub(super) fn get(max: usize) -> Request {
        let mut r = Request::default();
        r.cmd_bulk(max, &[Arg::Small(b"GET"), Arg::Small(b"k")]);
        r
    }
}
