//! RESP2, the wire protocol of Redis: a socket-free reply parser and the builder of
//! pipelined commands. The connections that carry them live in `store::conn`.
//!
//! - [`Parser`]: bytes in, [`Reply`]s out; it never reads a socket and never allocates by a
//!   length it was sent. Every command says the longest bulk string its reply may carry (a
//!   block `GET`: the header limit plus the namespace's `block_bytes`; a `SCAN` page: a key;
//!   everything else: a few bytes) and a longer one is refused from its length prefix
//!   alone; arrays are capped in depth and in elements. Public so that the fuzz targets
//!   (`fuzz/`) reach it.
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
    /// Not a wire type, and never made by [`Parser`]: a bulk string that a connection
    /// read in two parts, `head` into memory of its own and the `body_len` bytes after it
    /// straight into its caller's buffer (a stored block: header, then payload).
    Split {
        /// The first bytes of the value (a block's header).
        head: Bytes,
        /// Bytes written to the caller's buffer.
        body_len: usize,
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
            // Its body is in someone else's buffer: there is nothing to encode it from.
            Reply::Split { .. } => {}
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
    /// An array with more elements in all than [`MAX_ELEMENTS`], or nested deeper than
    /// [`MAX_DEPTH`]. Refused from its header.
    #[error("array reply too large or too deep")]
    ArrayTooLarge,
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
/// [`Bytes`] slices of the buffer they arrived in. Arrays nest at most [`MAX_DEPTH`] deep
/// and hold at most [`MAX_ELEMENTS`] elements in all; their announced sizes never size an
/// allocation.
#[derive(Debug, Default)]
pub struct Parser {
    state: State,
    /// The arrays being filled, outermost first: elements still to come, elements so far.
    open: Vec<(usize, Vec<Reply>)>,
    /// Elements announced by the arrays of the reply being parsed.
    elements: usize,
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
    /// string this reply may hold; a longer one is an error, decided from its length prefix.
    pub fn parse(
        &mut self,
        buf: &mut BytesMut,
        max_bulk: usize,
    ) -> Result<Option<Reply>, ProtocolError> {
        loop {
            let Some(value) = self.next_value(buf, max_bulk)? else {
                return Ok(None);
            };
            if let Some(done) = self.complete(value) {
                self.elements = 0;
                return Ok(Some(done));
            }
        }
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
    fn next_value(
        &mut self,
        buf: &mut BytesMut,
        max_bulk: usize,
    ) -> Result<Option<Reply>, ProtocolError> {
        loop {
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
                    b'*' => match number(body)? {
                        -1 => return Ok(Some(Reply::Nil)),
                        n if n < 0 => return Err(ProtocolError::BadNumber(lossy(body))),
                        0 => return Ok(Some(Reply::Array(Vec::new()))),
                        n => {
                            let n = usize::try_from(n).map_err(|_| ProtocolError::ArrayTooLarge)?;
                            self.elements = self.elements.saturating_add(n);
                            if self.elements > MAX_ELEMENTS || self.open.len() >= MAX_DEPTH {
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
            return Ok(Some(Reply::Bulk(value.freeze())));
        }
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

    /// Inside a bulk string that is the whole reply (not an array element), with its
    /// header consumed and none of its bytes: its length. A connection may then read the
    /// value straight into memory of its caller's ([`Parser::skip_bulk`] after).
    pub fn bare_bulk(&self) -> Option<usize> {
        match self.state {
            State::Bulk { len } if self.open.is_empty() => Some(len),
            _ => None,
        }
    }

    /// Marks the bare bulk string of [`Parser::bare_bulk`] as read by the caller (its value
    /// and CRLF went elsewhere): the parser is back between replies.
    pub fn skip_bulk(&mut self) {
        debug_assert!(self.bare_bulk().is_some());
        self.state = State::default();
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
    pub(crate) max_bulk: Vec<usize>,
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

    /// Appends a command whose reply is not a bulk string (at most [`SMALL_BULK`] bytes).
    pub(crate) fn cmd(&mut self, args: &[Arg<'_>]) -> &mut Self {
        self.cmd_bulk(SMALL_BULK, args)
    }

    /// Appends a command whose reply may be a bulk string of up to `max_bulk` bytes.
    pub(crate) fn cmd_bulk(&mut self, max_bulk: usize, args: &[Arg<'_>]) -> &mut Self {
        if self.asking {
            self.head.put_slice(b"*1\r\n$6\r\nASKING\r\n");
            self.max_bulk.push(SMALL_BULK);
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
        self.max_bulk.push(max_bulk);
        self
    }

    /// Commands in the pipeline (= replies to read).
    pub(crate) fn len(&self) -> usize {
        self.max_bulk.len()
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
