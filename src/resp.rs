//! RESP2, the wire protocol of Redis: a socket-free reply parser and the builder of
//! pipelined commands. The connections that carry them live in `store::conn`.
//!
//! - [`Parser`]: bytes in, [`Reply`]s out; it never reads a socket and never allocates by a
//!   length it was sent. Every command says, as [`Caps`], what its whole reply may hold:
//!   the longest bulk string (a block `GET`: the header limit plus the namespace's
//!   `block_bytes`; a `SCAN` page: a key; everything else: a few bytes), the bytes of all
//!   its strings together, and its array elements. Each is checked from a length prefix
//!   or an array header, before anything is allocated, so that no reply holds more than
//!   its command's budget: not `MAX_ELEMENTS` keys of the longest size (a `SCAN` page of
//!   1 GiB, an invalidation message of 64 GiB). Asked to ([`Parser::parse_taking`]), it
//!   hands a reply that is one bulk string over after its header ([`Parsed::Bulk`]), for
//!   the connection to read straight into its caller's memory. Public so that the fuzz
//!   targets (`fuzz/`) reach it.
//! - `Request` (crate-private): a pipeline of commands whose big arguments (block headers
//!   and payloads) are kept as their own [`Bytes`], so that a connection writes them
//!   vectored, never copied into a command buffer.

use bytes::{BufMut, Bytes, BytesMut};

/// Longest reply line (status, error, integer, length prefix), CRLF excluded. Redis's own
/// replies to the data path's commands are a few dozen bytes; an error names a command and
/// a key.
pub const MAX_LINE: usize = 4096;

/// Longest bulk string a command that is not a block `GET` may be answered with. `SET`,
/// `EXISTS`, `PEXPIRE`, `PTTL`, `PING`, `AUTH` and `SELECT` answer statuses, integers or
/// nil; nothing they answer is a bulk string.
pub const SMALL_BULK: usize = 64;

/// Most elements one reply may hold, counted over all its nested arrays. The longest arrays
/// kvshelf reads are `SCAN … COUNT 1000` pages and batched invalidation messages.
pub const MAX_ELEMENTS: usize = 1 << 20;

/// Deepest nesting of arrays in one reply (`CLUSTER SLOTS` nests three levels).
pub const MAX_DEPTH: usize = 4;

/// What one reply may hold, set by its command as the command is built and checked by the
/// [`Parser`] as it goes: a bulk string from its length prefix, the running total of
/// bytes before a string is kept, elements from each array header. Nothing is allocated
/// by a length before it passed these checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Longest bulk string.
    pub bulk: usize,
    /// Most bytes the whole reply may keep: its bulk strings, statuses and errors
    /// together (a skipped string is not kept and does not count).
    pub total: usize,
    /// Most array elements, counted over all its nested arrays; at most [`MAX_ELEMENTS`].
    pub elements: usize,
    /// A bulk string inside an array that is longer than `bulk` is skipped rather than
    /// refused: its bytes are read and dropped as they arrive (never buffered whole), and it
    /// stands in the array as [`Reply::Skipped`]. For replies that list names kvshelf did
    /// not write (a `SCAN` page may hold any key matching its pattern): one foreign key
    /// must not fail the page. A bulk string that is the whole reply is still refused.
    pub skip_long: bool,
}

impl Caps {
    /// The caps of a command whose reply is not a bulk string (`SET`, `EXISTS`,
    /// `PEXPIRE`, `PTTL`, `PING`, `AUTH`, `SELECT`…): [`SMALL_BULK`], one line.
    pub const SMALL: Caps = Caps::bulk(SMALL_BULK);

    /// A reply that is at most one bulk string of `bulk` bytes (or one line, or a few
    /// small elements).
    pub const fn bulk(bulk: usize) -> Caps {
        Caps {
            bulk,
            total: if bulk > MAX_LINE { bulk } else { MAX_LINE },
            elements: 8,
            skip_long: false,
        }
    }

    /// With a budget of `total` bytes for the whole reply.
    pub const fn total(self, total: usize) -> Caps {
        Caps { total, ..self }
    }

    /// With at most `elements` array elements (and never more than [`MAX_ELEMENTS`]).
    pub const fn elements(self, elements: usize) -> Caps {
        Caps {
            elements: if elements < MAX_ELEMENTS {
                elements
            } else {
                MAX_ELEMENTS
            },
            ..self
        }
    }

    /// With bulk strings longer than `bulk` inside arrays skipped, not refused.
    pub const fn skip_long(self) -> Caps {
        Caps {
            skip_long: true,
            ..self
        }
    }
}

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
    /// `*n` and its `n` elements (`SCAN`, `ROLE`, pub/sub messages).
    Array(Vec<Reply>),
    /// An array element that was a bulk string longer than its command's cap, read and
    /// dropped ([`Caps::skip_long`]): only its length is known.
    Skipped {
        /// Its announced length.
        len: usize,
    },
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
            Reply::Array(items) => {
                out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                for item in items {
                    item.encode(out);
                }
            }
            // Its body was dropped: there is nothing to encode it from.
            Reply::Skipped { .. } => {}
        }
    }

    /// The bytes of a bulk string or status reply.
    pub fn bytes(&self) -> Option<&Bytes> {
        match self {
            Reply::Bulk(b) | Reply::Status(b) => Some(b),
            _ => None,
        }
    }

    /// The text of a bulk string or status reply, when it is UTF-8.
    pub fn text(&self) -> Option<&str> {
        self.bytes().and_then(|b| std::str::from_utf8(b).ok())
    }

    /// The integer of an integer reply, or of a bulk string holding one (`SCAN` cursors).
    pub fn int(&self) -> Option<i64> {
        match self {
            Reply::Int(n) => Some(*n),
            other => other.text().and_then(|t| t.parse().ok()),
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
    /// A type byte kvshelf's commands are never answered with (RESP3 types).
    #[error("unexpected reply type {0:?}")]
    UnexpectedType(char),
    /// An array with more elements in all than its command allows ([`Caps::elements`]),
    /// or nested deeper than [`MAX_DEPTH`]. Refused from its header.
    #[error("array reply too large or too deep")]
    ArrayTooLarge,
    /// A reply whose strings together would pass its command's budget ([`Caps::total`]).
    /// Refused from the length prefix of the string that would pass it.
    #[error("reply of at least {len} bytes; this command's reply is at most {max} bytes")]
    ReplyTooLarge {
        /// Bytes kept so far plus the announced string.
        len: u64,
        /// What the command allows.
        max: usize,
    },
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

/// What [`Parser::parse_taking`] found at the front of its buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Parsed {
    /// A whole reply.
    Reply(Reply),
    /// A bulk string that is the whole reply (not an array element), asked to be taken by
    /// the caller: its header is consumed and its `len` bytes and CRLF are the caller's to
    /// read, from the buffer first, then the socket. The parser is already back between
    /// replies. A connection reads a stored block this way, straight into its caller's
    /// memory.
    Bulk {
        /// The announced length, within the reply's caps.
        len: usize,
    },
    /// More bytes are needed.
    Incomplete {
        /// Inside a bulk string being kept: how many more bytes it needs (its value and
        /// CRLF) past those buffered, so that a connection may read them straight into a
        /// buffer of exactly its size. `None` between bulk strings, or inside a skipped one
        /// (read in ordinary chunks and dropped as they come).
        bulk_missing: Option<usize>,
    },
}

/// A socket-free, incremental RESP2 reply parser.
///
/// Feed it by appending what the socket returned to a `BytesMut` and calling
/// [`parse`](Parser::parse) until it answers `Ok(None)` (more bytes needed). A reply split
/// anywhere, even inside its length prefix, parses the same. Bulk values are zero-copy
/// [`Bytes`] slices of the buffer they arrived in. Arrays nest at most [`MAX_DEPTH`] deep;
/// what one reply holds in all is bounded by its [`Caps`]; announced sizes never size an
/// allocation.
#[derive(Debug, Default)]
pub struct Parser {
    state: State,
    /// The arrays being filled, outermost first: elements still to come, elements so far.
    open: Vec<(usize, Vec<Reply>)>,
    /// Elements announced by the arrays of the reply being parsed.
    elements: usize,
    /// Bytes of strings kept by the reply being parsed (announced lengths).
    kept: usize,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Looking for the end of a reply line; the first `scanned` bytes hold no CRLF.
    Line { scanned: usize },
    /// Inside a bulk string whose header was consumed: `len` bytes and CRLF to come.
    Bulk { len: usize },
    /// Inside a bulk string being skipped ([`Caps::skip_long`]) of `len` bytes: `left` of
    /// them, then CRLF, to drop.
    Skip { len: usize, left: usize },
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
    /// (what it consumed of a partial reply is remembered). `caps` is what this reply may
    /// hold; more is an error, decided from a length prefix or an array header before
    /// anything of it is kept. Pass the same caps until the reply is complete.
    pub fn parse(
        &mut self,
        buf: &mut BytesMut,
        caps: Caps,
    ) -> Result<Option<Reply>, ProtocolError> {
        match self.parse_taking(buf, caps, false)? {
            Parsed::Reply(reply) => Ok(Some(reply)),
            Parsed::Incomplete { .. } => Ok(None),
            Parsed::Bulk { .. } => unreachable!("no bulk string is taken unless asked"),
        }
    }

    /// As [`parse`](Parser::parse), saying what is missing when the reply is incomplete;
    /// with `take_bulk`, a reply that is one bulk string is not read but handed to the
    /// caller as soon as its header is: [`Parsed::Bulk`]. Pass the same `take_bulk` until
    /// the reply is complete.
    pub fn parse_taking(
        &mut self,
        buf: &mut BytesMut,
        caps: Caps,
        take_bulk: bool,
    ) -> Result<Parsed, ProtocolError> {
        loop {
            if take_bulk
                && let State::Bulk { len } = self.state
                && self.open.is_empty()
            {
                // The value and its CRLF are the caller's: the next reply starts afresh.
                self.state = State::default();
                self.elements = 0;
                self.kept = 0;
                return Ok(Parsed::Bulk { len });
            }
            let Some(value) = self.next_value(buf, caps, take_bulk)? else {
                if take_bulk && matches!(self.state, State::Bulk { .. }) && self.open.is_empty() {
                    continue;
                }
                return Ok(Parsed::Incomplete {
                    bulk_missing: self.bulk_missing(buf.len()),
                });
            };
            if let Some(done) = self.complete(value) {
                self.elements = 0;
                self.kept = 0;
                return Ok(Parsed::Reply(done));
            }
        }
    }

    /// Counts `len` more bytes kept by this reply, or refuses them.
    fn keep(&mut self, len: usize, caps: Caps) -> Result<(), ProtocolError> {
        let kept = self.kept.saturating_add(len);
        if kept > caps.total {
            return Err(ProtocolError::ReplyTooLarge {
                len: kept as u64,
                max: caps.total,
            });
        }
        self.kept = kept;
        Ok(())
    }

    /// Adds a finished value to the innermost open array, closing every array it fills;
    /// the reply when the outermost one is closed (or the value was not in an array).
    fn complete(&mut self, mut value: Reply) -> Option<Reply> {
        while let Some((left, items)) = self.open.last_mut() {
            items.push(value);
            *left -= 1;
            if *left > 0 {
                return None;
            }
            let (_, items) = self.open.pop().expect("an open array");
            value = Reply::Array(items);
        }
        Some(value)
    }

    /// The next scalar, or an empty or nil array; a non-empty array header opens an array
    /// and asks for its first element.
    /// With `take_bulk`, stops after the header of a bulk string that is the whole reply.
    fn next_value(
        &mut self,
        buf: &mut BytesMut,
        caps: Caps,
        take_bulk: bool,
    ) -> Result<Option<Reply>, ProtocolError> {
        loop {
            if let State::Skip { len, left } = self.state {
                // Drop what has arrived of the value; its CRLF is checked like a kept one's.
                let n = left.min(buf.len());
                bytes::Buf::advance(buf, n);
                let left = left - n;
                self.state = State::Skip { len, left };
                if left > 0 || buf.len() < 2 {
                    return Ok(None);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(ProtocolError::MissingCrlf);
                }
                bytes::Buf::advance(buf, 2);
                self.state = State::default();
                return Ok(Some(Reply::Skipped { len }));
            }
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
                if matches!(kind, b'+' | b'-') {
                    self.keep(body.len(), caps)?;
                }
                match kind {
                    b'+' => return Ok(Some(Reply::Status(line.freeze().slice(1..end)))),
                    b'-' => {
                        return Ok(Some(Reply::Error(
                            String::from_utf8_lossy(body).into_owned(),
                        )));
                    }
                    b':' => return Ok(Some(Reply::Int(number(body)?))),
                    b'*' => match number(body)? {
                        -1 => return Ok(Some(Reply::Nil)),
                        n if n < 0 => return Err(ProtocolError::BadNumber(lossy(body))),
                        // An empty array nests like any other: refused past MAX_DEPTH.
                        0 if self.open.len() >= MAX_DEPTH => {
                            return Err(ProtocolError::ArrayTooLarge);
                        }
                        0 => return Ok(Some(Reply::Array(Vec::new()))),
                        n => {
                            let n = usize::try_from(n).map_err(|_| ProtocolError::ArrayTooLarge)?;
                            self.elements = self.elements.saturating_add(n);
                            if self.elements > caps.elements.min(MAX_ELEMENTS)
                                || self.open.len() >= MAX_DEPTH
                            {
                                return Err(ProtocolError::ArrayTooLarge);
                            }
                            // Sized by what arrives, never by what was announced.
                            self.open.push((n, Vec::with_capacity(n.min(64))));
                            continue;
                        }
                    },
                    b'$' => match number(body)? {
                        -1 => return Ok(Some(Reply::Nil)),
                        n if n < 0 => return Err(ProtocolError::BadNumber(lossy(body))),
                        n if n as u64 > caps.bulk as u64 => match usize::try_from(n) {
                            Ok(len) if caps.skip_long && !self.open.is_empty() => {
                                self.state = State::Skip { len, left: len };
                                continue;
                            }
                            _ => {
                                return Err(ProtocolError::BulkTooLong {
                                    len: n as u64,
                                    max: caps.bulk,
                                });
                            }
                        },
                        n => {
                            self.keep(n as usize, caps)?;
                            self.state = State::Bulk { len: n as usize };
                            if take_bulk && self.open.is_empty() {
                                return Ok(None);
                            }
                        }
                    },
                    other => return Err(ProtocolError::UnexpectedType(other as char)),
                }
            }
            let State::Bulk { len } = self.state else {
                unreachable!("a line either returned or started a bulk string")
            };
            // `len <= caps.bulk`, so `len + 2` cannot overflow.
            if buf.len() < len + 2 {
                return Ok(None);
            }
            self.state = State::default();
            let mut value = buf.split_to(len + 2);
            if &value[len..] != b"\r\n" {
                return Err(ProtocolError::MissingCrlf);
            }
            value.truncate(len);
            return Ok(Some(Reply::Bulk(value.freeze())));
        }
    }

    /// Inside a bulk string whose bytes are not all in a buffer holding `buffered` bytes:
    /// how many more it needs (its value and CRLF). `None` between bulk strings.
    fn bulk_missing(&self, buffered: usize) -> Option<usize> {
        match self.state {
            State::Bulk { len } => Some((len + 2).saturating_sub(buffered)),
            // A skipped string is read in ordinary chunks and dropped as they come.
            State::Line { .. } | State::Skip { .. } => None,
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
    /// Per command: what its reply may hold.
    pub(crate) caps: Vec<Caps>,
    /// Send `ASKING` before every command (a Redis Cluster `ASK` redirect).
    asking: bool,
}

/// One argument of a command.
pub(crate) enum Arg<'a> {
    /// Copied into the command framing (keys, options, numbers).
    Small(&'a [u8]),
    /// Sent as its own slices, never copied: a value made of, e.g., header and payload.
    Parts(&'a [Bytes]),
}

impl Request {
    /// An empty pipeline; with `asking`, every command is sent after an `ASKING` (each
    /// then has two replies, `+OK` first).
    pub(crate) fn asking(asking: bool) -> Request {
        Request {
            asking,
            ..Request::default()
        }
    }

    /// Appends a command whose reply is not a bulk string ([`Caps::SMALL`]).
    pub(crate) fn cmd(&mut self, args: &[Arg<'_>]) -> &mut Self {
        self.cmd_caps(Caps::SMALL, args)
    }

    /// Appends a command whose reply may be a bulk string of up to `max_bulk` bytes
    /// ([`Caps::bulk`]).
    pub(crate) fn cmd_bulk(&mut self, max_bulk: usize, args: &[Arg<'_>]) -> &mut Self {
        self.cmd_caps(Caps::bulk(max_bulk), args)
    }

    /// Appends a command whose reply may hold what `caps` allows.
    pub(crate) fn cmd_caps(&mut self, caps: Caps, args: &[Arg<'_>]) -> &mut Self {
        if self.asking {
            self.head.put_slice(b"*1\r\n$6\r\nASKING\r\n");
            self.caps.push(Caps::SMALL);
        }
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
        self.caps.push(caps);
        self
    }

    /// Commands in the pipeline (= replies to read).
    pub(crate) fn len(&self) -> usize {
        self.caps.len()
    }

    /// The pipeline's wire form, as slices to write vectored.
    pub(crate) fn slices(&self) -> Vec<Bytes> {
        let mut out = self.parts.clone();
        if !self.head.is_empty() {
            out.push(Bytes::copy_from_slice(&self.head));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Caps of `bulk` per string and nothing else: what the tests of strings use.
    fn wide(bulk: usize) -> Caps {
        Caps {
            bulk,
            total: usize::MAX,
            elements: MAX_ELEMENTS,
            skip_long: false,
        }
    }

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
            while let Some(r) = parser.parse(&mut buf, wide(max_bulk))? {
                out.push(r);
            }
        }
        Ok((out, buf.len()))
    }

    fn one(bytes: &[u8]) -> Result<Option<Reply>, ProtocolError> {
        Parser::new().parse(&mut BytesMut::from(bytes), wide(1 << 20))
    }

    /// Found by the fuzzer: an empty array four arrays deep got past the depth cap.
    #[test]
    fn arrays_nest_at_most_max_depth_deep_empty_ones_too() {
        let nested = |depth: usize, inner: &[u8]| {
            let mut v = b"*1\r\n".repeat(depth);
            v.extend_from_slice(inner);
            v
        };
        assert!(one(&nested(MAX_DEPTH - 1, b"*0\r\n")).unwrap().is_some());
        assert_eq!(
            one(&nested(MAX_DEPTH, b"*0\r\n")),
            Err(ProtocolError::ArrayTooLarge)
        );
        assert_eq!(
            one(&nested(MAX_DEPTH, b"*1\r\n:1\r\n")),
            Err(ProtocolError::ArrayTooLarge)
        );
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
        assert_eq!(one(b"*0\r\n"), Ok(Some(Reply::Array(vec![]))));
        assert_eq!(
            one(b"*2\r\n$1\r\n0\r\n*2\r\n$1\r\na\r\n$-1\r\n"),
            Ok(Some(Reply::Array(vec![
                Reply::Bulk("0".into()),
                Reply::Array(vec![Reply::Bulk("a".into()), Reply::Nil]),
            ])))
        );
        assert_eq!(one(b":12"), Ok(None));
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        // A bare CRLF used to slice `line[1..0]` and panic.
        assert_eq!(one(b"\r\n"), Err(ProtocolError::EmptyLine));
        assert_eq!(one(b"?x\r\n"), Err(ProtocolError::UnexpectedType('?')));
        assert_eq!(one(b"*2\r\n"), Ok(None), "an array waits for its elements");
        assert_eq!(
            one(b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n"),
            Err(ProtocolError::ArrayTooLarge)
        );
        assert_eq!(
            one(format!("*{}\r\n", MAX_ELEMENTS + 1).as_bytes()),
            Err(ProtocolError::ArrayTooLarge)
        );
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
            Parser::new().parse(&mut BytesMut::from(huge.as_bytes()), wide(1 << 20)),
            Err(ProtocolError::BulkTooLong {
                len: i64::MAX as u64,
                max: 1 << 20
            })
        );
        let mut buf = BytesMut::from(&b"$11\r\n"[..]);
        assert_eq!(
            Parser::new().parse(&mut buf, wide(10)),
            Err(ProtocolError::BulkTooLong { len: 11, max: 10 })
        );
        let mut buf = BytesMut::from(&b"$10\r\n0123456789\r\n"[..]);
        assert!(matches!(
            Parser::new().parse(&mut buf, wide(10)),
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
        assert_eq!(
            p.parse_taking(&mut buf, wide(100), false),
            Ok(Parsed::Incomplete {
                bulk_missing: Some(98)
            })
        );
        buf.extend_from_slice(&[b'x'; 96]);
        buf.extend_from_slice(b"\r\n:1");
        assert!(
            matches!(p.parse_taking(&mut buf, wide(100), false), Ok(Parsed::Reply(Reply::Bulk(b))) if b.len() == 100)
        );
        assert_eq!(
            p.parse_taking(&mut buf, wide(0), false),
            Ok(Parsed::Incomplete { bulk_missing: None })
        );
        buf.extend_from_slice(b"\r\n");
        assert_eq!(p.parse(&mut buf, wide(0)), Ok(Some(Reply::Int(1))));
        assert!(buf.is_empty());
    }

    /// A bulk string that is the whole reply is handed to a caller that takes it as soon
    /// as its header is read (buffered or not), leaving its bytes in the buffer and the
    /// parser between replies; one inside an array, or any other reply, is parsed as usual.
    #[test]
    fn a_taken_bulk_is_announced_after_its_header() {
        let mut p = Parser::new();
        let mut buf = BytesMut::from(&b"$1"[..]);
        assert_eq!(
            p.parse_taking(&mut buf, wide(100), true),
            Ok(Parsed::Incomplete { bulk_missing: None })
        );
        buf.extend_from_slice(b"0\r\n0123");
        assert_eq!(
            p.parse_taking(&mut buf, wide(100), true),
            Ok(Parsed::Bulk { len: 10 })
        );
        assert_eq!(&buf[..], b"0123", "the value is the caller's to read");
        buf.clear();
        // Whole in the buffer, it is still taken, its bytes untouched.
        buf.extend_from_slice(b"$3\r\nabc\r\n:7\r\n*1\r\n$2\r\nhi\r\n$-1\r\n");
        assert_eq!(
            p.parse_taking(&mut buf, wide(100), true),
            Ok(Parsed::Bulk { len: 3 })
        );
        bytes::Buf::advance(&mut buf, 5);
        assert_eq!(
            p.parse_taking(&mut buf, wide(100), true),
            Ok(Parsed::Reply(Reply::Int(7)))
        );
        assert_eq!(
            p.parse_taking(&mut buf, wide(100), true),
            Ok(Parsed::Reply(Reply::Array(vec![Reply::Bulk(
                Bytes::from_static(b"hi")
            )])))
        );
        assert_eq!(
            p.parse_taking(&mut buf, wide(100), true),
            Ok(Parsed::Reply(Reply::Nil))
        );
        // Its caps still hold.
        let mut buf = BytesMut::from(&b"$101\r\n"[..]);
        assert!(matches!(
            p.parse_taking(&mut buf, wide(100), true),
            Err(ProtocolError::BulkTooLong { len: 101, .. })
        ));
    }

    /// Issue 18 §2: a reply of many strings, each within its cap, is refused once their
    /// sum passes the command's budget, from the length prefix that passes it (the value
    /// is not there yet).
    #[test]
    fn a_reply_is_refused_once_its_strings_pass_the_budget() {
        let caps = Caps::bulk(100).total(500).elements(1000);
        let mut bytes = b"*10\r\n".to_vec();
        for _ in 0..5 {
            Reply::Bulk(vec![b'k'; 100].into()).encode(&mut bytes);
        }
        bytes.extend_from_slice(b"$1\r\n");
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(
            Parser::new().parse(&mut buf, caps),
            Err(ProtocolError::ReplyTooLarge { len: 501, max: 500 })
        );
        // Statuses count too (a line is at most MAX_LINE, but many lines are not).
        let mut bytes = b"*3\r\n".to_vec();
        for _ in 0..3 {
            Reply::Status(vec![b's'; 200].into()).encode(&mut bytes);
        }
        assert_eq!(
            Parser::new().parse(&mut BytesMut::from(&bytes[..]), caps),
            Err(ProtocolError::ReplyTooLarge { len: 600, max: 500 })
        );
        // The budget is per reply: the next one starts from zero.
        let mut bytes = Vec::new();
        for _ in 0..3 {
            Reply::Array(vec![Reply::Bulk(vec![b'k'; 100].into()); 4]).encode(&mut bytes);
        }
        assert_eq!(parse_caps(&bytes, 7, caps).unwrap().0.len(), 3);
    }

    /// Elements are capped per command, from the array header alone.
    #[test]
    fn arrays_are_capped_per_command() {
        assert_eq!(
            Parser::new().parse(&mut BytesMut::from(&b"*9\r\n"[..]), Caps::SMALL),
            Err(ProtocolError::ArrayTooLarge)
        );
        assert_eq!(
            Parser::new().parse(
                &mut BytesMut::from(&b"*2\r\n*3\r\n"[..]),
                Caps::bulk(8).elements(4)
            ),
            Err(ProtocolError::ArrayTooLarge)
        );
        // No caps above MAX_ELEMENTS.
        assert_eq!(Caps::SMALL.elements(usize::MAX).elements, MAX_ELEMENTS);
    }

    /// A foreign key longer than a `SCAN` page allows is skipped, in any chunking; its
    /// bytes are dropped as they arrive, counted nowhere, and its CRLF still checked.
    #[test]
    fn long_strings_in_arrays_are_skipped_when_the_command_says_so() {
        let caps = Caps::bulk(10).total(30).elements(100).skip_long();
        let long = Reply::Bulk(vec![b'x'; 5000].into());
        let mut bytes = Vec::new();
        Reply::Array(vec![
            Reply::Bulk("0".into()),
            Reply::Array(vec![
                Reply::Bulk("abc".into()),
                long.clone(),
                Reply::Bulk("z".into()),
            ]),
        ])
        .encode(&mut bytes);
        Reply::Int(7).encode(&mut bytes);
        for chunk in [1, 2, 3, 100, 6000] {
            let (got, left) = parse_caps(&bytes, chunk, caps).unwrap();
            assert_eq!(
                got,
                vec![
                    Reply::Array(vec![
                        Reply::Bulk("0".into()),
                        Reply::Array(vec![
                            Reply::Bulk("abc".into()),
                            Reply::Skipped { len: 5000 },
                            Reply::Bulk("z".into()),
                        ]),
                    ]),
                    Reply::Int(7),
                ],
                "chunk {chunk}"
            );
            assert_eq!(left, 0);
        }
        // Its CRLF is checked like a kept string's.
        let mut bad = b"*1\r\n$12\r\n0123456789abXY".to_vec();
        bad.extend_from_slice(b"+OK\r\n");
        for chunk in [1, 5, 100] {
            assert_eq!(
                parse_caps(&bad, chunk, caps),
                Err(ProtocolError::MissingCrlf),
                "chunk {chunk}"
            );
        }
        // A whole reply that is too long is still refused; so is one without skip_long.
        let mut whole = Vec::new();
        long.encode(&mut whole);
        assert!(matches!(
            parse_caps(&whole, 100, caps),
            Err(ProtocolError::BulkTooLong { len: 5000, max: 10 })
        ));
        let mut listed = Vec::new();
        Reply::Array(vec![long]).encode(&mut listed);
        assert!(matches!(
            parse_caps(&listed, 100, Caps::bulk(10)),
            Err(ProtocolError::BulkTooLong { len: 5000, max: 10 })
        ));
    }

    /// Parses `bytes` fed in chunks of `chunk`, every reply under `caps`.
    fn parse_caps(
        bytes: &[u8],
        chunk: usize,
        caps: Caps,
    ) -> Result<(Vec<Reply>, usize), ProtocolError> {
        let mut parser = Parser::new();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for c in bytes.chunks(chunk.max(1)) {
            buf.extend_from_slice(c);
            loop {
                match parser.parse_taking(&mut buf, caps, false)? {
                    Parsed::Reply(r) => out.push(r),
                    Parsed::Incomplete { bulk_missing } => {
                        if let Some(missing) = bulk_missing {
                            assert!(missing <= caps.bulk + 2, "{missing}");
                        }
                        break;
                    }
                    Parsed::Bulk { .. } => unreachable!("not taking"),
                }
            }
        }
        Ok((out, buf.len()))
    }

    /// What parsing `reply` under `caps` must give: the reply with its long strings in
    /// arrays skipped, or `None` when it holds more than `caps` allow.
    fn under_caps(reply: &Reply, caps: Caps) -> Option<Reply> {
        fn walk(
            r: &Reply,
            caps: Caps,
            in_array: bool,
            kept: &mut usize,
            elements: &mut usize,
        ) -> Option<Reply> {
            Some(match r {
                Reply::Bulk(b) if b.len() > caps.bulk => {
                    if caps.skip_long && in_array {
                        Reply::Skipped { len: b.len() }
                    } else {
                        return None;
                    }
                }
                Reply::Bulk(b) | Reply::Status(b) => {
                    *kept += b.len();
                    r.clone()
                }
                Reply::Error(e) => {
                    *kept += e.len();
                    r.clone()
                }
                Reply::Array(items) => {
                    *elements += items.len();
                    Reply::Array(
                        items
                            .iter()
                            .map(|i| walk(i, caps, true, kept, elements))
                            .collect::<Option<Vec<_>>>()?,
                    )
                }
                other => other.clone(),
            })
        }
        let (mut kept, mut elements) = (0, 0);
        let out = walk(reply, caps, false, &mut kept, &mut elements)?;
        (kept <= caps.total && elements <= caps.elements).then_some(out)
    }

    fn arb_caps() -> impl Strategy<Value = Caps> {
        (0usize..400, 0usize..3000, 0usize..40, any::<bool>()).prop_map(
            |(bulk, total, elements, skip_long)| Caps {
                bulk,
                total,
                elements,
                skip_long,
            },
        )
    }

    fn arb_reply() -> impl Strategy<Value = Reply> {
        arb_scalar().prop_recursive(3, 24, 6, |inner| {
            proptest::collection::vec(inner, 0..6).prop_map(Reply::Array)
        })
    }

    fn arb_scalar() -> impl Strategy<Value = Reply> {
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

        /// A caller that takes every bulk string that is a whole reply, and reads its value
        /// and CRLF itself from wherever they are (buffered or still to come), gets those
        /// values, and the parser stays in step for the replies around them, in any
        /// chunking.
        #[test]
        fn prop_taken_bulks_leave_the_parser_in_step(replies in proptest::collection::vec(arb_reply(), 0..12), chunk in 1usize..97) {
            let mut bytes = Vec::new();
            for r in &replies {
                r.encode(&mut bytes);
            }
            let mut parser = Parser::new();
            let mut chunks = bytes.chunks(chunk);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut taken = 0;
            loop {
                match parser.parse_taking(&mut buf, wide(300), true).unwrap() {
                    Parsed::Reply(r) => got.push(r),
                    Parsed::Bulk { len } => {
                        taken += 1;
                        // The caller's read: the buffer first, then the "socket".
                        while buf.len() < len + 2 {
                            buf.extend_from_slice(chunks.next().expect("the value arrives"));
                        }
                        let value = buf.split_to(len + 2);
                        prop_assert_eq!(&value[len..], b"\r\n");
                        got.push(Reply::Bulk(value.freeze().slice(..len)));
                    }
                    Parsed::Incomplete { .. } => match chunks.next() {
                        Some(c) => buf.extend_from_slice(c),
                        None => break,
                    },
                }
            }
            prop_assert_eq!(taken, replies.iter().filter(|r| matches!(r, Reply::Bulk(_))).count());
            prop_assert_eq!(got, replies);
            prop_assert!(buf.is_empty());
        }

        /// Issue 18 §2: a reply is accepted exactly when it holds no more than its
        /// command's caps (each string, all of them together, the array elements), with
        /// long strings in arrays skipped where the command says so, in any chunking.
        #[test]
        fn prop_caps_hold_exactly(replies in proptest::collection::vec(arb_reply(), 1..6), caps in arb_caps(), chunk in 1usize..97) {
            let mut bytes = Vec::new();
            for r in &replies {
                r.encode(&mut bytes);
            }
            let mut parser = Parser::new();
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut err = None;
            'feed: for c in bytes.chunks(chunk) {
                buf.extend_from_slice(c);
                loop {
                    match parser.parse(&mut buf, caps) {
                        Ok(Some(r)) => got.push(r),
                        Ok(None) => break,
                        Err(e) => {
                            err = Some(e);
                            break 'feed;
                        }
                    }
                }
            }
            let want: Vec<Option<Reply>> = replies.iter().map(|r| under_caps(r, caps)).collect();
            let fits = want.iter().take_while(|w| w.is_some()).count();
            prop_assert_eq!(got.len(), fits);
            for (g, w) in got.iter().zip(&want) {
                prop_assert_eq!(Some(g), w.as_ref());
            }
            prop_assert_eq!(err.is_some(), fits < replies.len(), "{:?}", err);
            if let Some(e) = err {
                prop_assert!(matches!(e, ProtocolError::BulkTooLong { .. } | ProtocolError::ReplyTooLarge { .. } | ProtocolError::ArrayTooLarge), "{:?}", e);
            }
        }

        /// The parser agrees with redis-rs's on every reply it accepts.
        #[test]
        fn prop_agrees_with_redis_rs(reply in arb_scalar()) {
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
