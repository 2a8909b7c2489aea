//! Fuzzes the data path's RESP reply parser (`kvshelf::resp::Parser`) with arbitrary bytes,
//! as a Redis (or anything listening on its port) might answer.
//!
//! Input: byte 0 picks the read size the bytes arrive in (1–256), byte 1 the longest bulk
//! string the command allows (0, 64, 255 or 4096 bytes); the rest is the reply stream.
//!
//! Properties checked on every input:
//! - parsing never panics, whatever the bytes and however they are split;
//! - the result does not depend on the split: fed all at once or in chunks, the same
//!   replies come out, then the same error (or the same bytes are left waiting);
//! - each reply is parsed from exactly its own bytes: its type byte, its CRLF (a bulk
//!   string's too), a bulk string's value between its length line and that CRLF;
//! - no bulk string is longer than the command allows;
//! - the replies, encoded again, parse to the same replies.
#![no_main]

use bytes::BytesMut;
use kvshelf::resp::{Parser, ProtocolError, Reply};
use libfuzzer_sys::fuzz_target;

/// The bytes a reply was parsed from must be that reply: its type byte first, CRLF last,
/// and a bulk string's value right before that CRLF.
fn check_span(reply: &Reply, span: &[u8]) {
    assert!(
        span.ends_with(b"\r\n"),
        "{reply:?} parsed from {span:?}, which does not end in CRLF"
    );
    let kind = match reply {
        Reply::Nil => b"$*".as_slice(),
        Reply::Int(_) => b":",
        Reply::Bulk(_) => b"$",
        Reply::Status(_) => b"+",
        Reply::Error(_) => b"-",
        Reply::Array(_) => b"*",
        other => panic!("a reply type the parser never makes: {other:?}"),
    };
    assert!(kind.contains(&span[0]), "{reply:?} parsed from {span:?}");
    if let Reply::Bulk(value) = reply {
        let body = &span[..span.len() - 2];
        assert!(
            body.ends_with(value),
            "{reply:?} is not the end of {span:?}"
        );
        let header = &body[..body.len() - value.len()];
        let len = header
            .strip_prefix(b"$")
            .and_then(|h| h.strip_suffix(b"\r\n"))
            .and_then(|n| std::str::from_utf8(n).ok())
            .and_then(|n| n.parse::<i64>().ok());
        assert_eq!(
            len,
            Some(value.len() as i64),
            "{reply:?} parsed from {span:?}"
        );
    }
}

/// No bulk string over the cap and no array deeper than `MAX_DEPTH`, at any depth.
fn check_caps(reply: &Reply, max_bulk: usize, depth: usize) {
    match reply {
        Reply::Bulk(b) => assert!(
            b.len() <= max_bulk,
            "a bulk of {} bytes passed a cap of {max_bulk}",
            b.len()
        ),
        Reply::Array(items) => {
            assert!(depth <= kvshelf::resp::MAX_DEPTH, "arrays nested {depth} deep");
            for item in items {
                check_caps(item, max_bulk, depth + 1);
            }
        }
        _ => {}
    }
}

/// Parses `bytes` delivered `chunk` bytes at a time: the replies, then the error that
/// stopped it, if any, and how many bytes were left waiting for more.
fn parse(
    bytes: &[u8],
    chunk: usize,
    max_bulk: usize,
) -> (Vec<Reply>, Option<ProtocolError>, usize) {
    let mut parser = Parser::new();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let (mut fed, mut start) = (0, 0);
    for c in bytes.chunks(chunk) {
        buf.extend_from_slice(c);
        fed += c.len();
        loop {
            match parser.parse(&mut buf, max_bulk) {
                Ok(Some(r)) => {
                    let end = fed - buf.len();
                    check_span(&r, &bytes[start..end]);
                    start = end;
                    out.push(r);
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = e.to_string();
                    return (out, Some(e), buf.len());
                }
            }
        }
        // What the connection asks of the socket inside a big value: never more than the
        // value and its CRLF.
        if let Some(missing) = parser.bulk_missing(buf.len()) {
            assert!(
                missing <= max_bulk + 2,
                "{missing} bytes missing of a {max_bulk}-byte bulk"
            );
        }
    }
    (out, None, buf.len())
}

fuzz_target!(|data: &[u8]| {
    let [chunk, max, bytes @ ..] = data else {
        return;
    };
    let chunk = *chunk as usize + 1;
    let max_bulk = [0, 64, 255, 4096][*max as usize % 4];

    let (replies, err, left) = parse(bytes, chunk, max_bulk);
    let whole = parse(bytes, bytes.len().max(1), max_bulk);
    assert_eq!(
        whole.0, replies,
        "replies depend on how the bytes were split"
    );
    assert_eq!(
        whole.1, err,
        "the error depends on how the bytes were split"
    );
    if err.is_none() {
        assert_eq!(whole.2, left);
    }

    let mut again = Vec::new();
    for r in &replies {
        check_caps(r, max_bulk, 1);
        r.encode(&mut again);
    }
    let (reparsed, err2, left2) = parse(&again, chunk, max_bulk);
    assert_eq!(err2, None, "re-encoded replies do not parse");
    assert_eq!(left2, 0);
    assert_eq!(reparsed, replies, "re-encoded replies parse differently");
});
