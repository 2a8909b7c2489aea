//! Fuzzes the data path's RESP reply parser (`kvshelf::resp::Parser`) with arbitrary bytes,
//! as a Redis (or anything listening on its port) might answer.
//!
//! Input: byte 0 picks the read size the bytes arrive in (1–256), byte 1 the command's
//! caps: the longest bulk string (0, 64, 255 or 4096 bytes), the bytes the whole reply may
//! keep (64, 1 KiB, 16 KiB or unbounded), its array elements (0, 8, 64 or `MAX_ELEMENTS`)
//! and whether long bulk strings in arrays are skipped; the rest is the reply stream.
//!
//! Properties checked on every input:
//! - parsing never panics, whatever the bytes and however they are split;
//! - the result does not depend on the split: fed all at once or in chunks, the same
//!   replies come out, then the same error (or the same bytes are left waiting);
//! - each reply is parsed from exactly its own bytes: its type byte, its CRLF (a bulk
//!   string's too), a bulk string's value between its length line and that CRLF;
//! - no reply holds more than its caps allow: no bulk string over the cap, no more bytes
//!   kept in all, no more array elements; a skipped string appears only inside an array;
//! - the replies (those with nothing skipped), encoded again, parse to the same replies;
//! - a caller that takes every whole-reply bulk string and reads it itself (as a
//!   connection reads a block into its caller's memory) gets the same replies and error.
#![no_main]

use bytes::{Bytes, BytesMut};
use kvshelf::resp::{Caps, MAX_ELEMENTS, Parsed, Parser, ProtocolError, Reply};
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

/// No bulk string over the cap and no array deeper than `MAX_DEPTH`, at any depth; adds
/// the bytes the reply keeps and its array elements to `kept` and `elements`.
fn check_caps(reply: &Reply, caps: Caps, depth: usize, kept: &mut usize, elements: &mut usize) {
    match reply {
        Reply::Bulk(b) => {
            assert!(
                b.len() <= caps.bulk,
                "a bulk of {} bytes passed a cap of {}",
                b.len(),
                caps.bulk
            );
            *kept += b.len();
        }
        Reply::Status(s) => *kept += s.len(),
        // An error's text is decoded lossily (it may grow): not counted here.
        Reply::Skipped { len } => {
            assert!(caps.skip_long && depth > 1, "{reply:?} at depth {depth}");
            assert!(
                *len > caps.bulk,
                "{reply:?} skipped under a cap of {}",
                caps.bulk
            );
        }
        Reply::Array(items) => {
            assert!(
                depth <= kvshelf::resp::MAX_DEPTH,
                "arrays nested {depth} deep"
            );
            *elements += items.len();
            for item in items {
                check_caps(item, caps, depth + 1, kept, elements);
            }
        }
        _ => {}
    }
}

fn has_skipped(reply: &Reply) -> bool {
    match reply {
        Reply::Skipped { .. } => true,
        Reply::Array(items) => items.iter().any(has_skipped),
        _ => false,
    }
}

/// Whether `reply` holds an error whose text was decoded lossily (it had bytes that are not
/// UTF-8, now U+FFFD).
fn has_lossy_error(reply: &Reply) -> bool {
    match reply {
        Reply::Error(text) => text.contains('\u{FFFD}'),
        Reply::Array(items) => items.iter().any(has_lossy_error),
        _ => false,
    }
}

/// Parses `bytes` delivered `chunk` bytes at a time: the replies, then the error that
/// stopped it, if any, and how many bytes were left waiting for more. With `take`, a bulk
/// string that is a whole reply is read the way a connection reads a block into its
/// caller's memory: the parser hands it over after its header ([`Parsed::Bulk`]) and its
/// value and CRLF are read here, from the buffer and then from the chunks still to come.
fn parse(
    bytes: &[u8],
    chunk: usize,
    caps: Caps,
    take: bool,
) -> (Vec<Reply>, Option<ProtocolError>, usize) {
    let mut parser = Parser::new();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let (mut fed, mut start) = (0, 0);
    let mut chunks = bytes.chunks(chunk);
    loop {
        match parser.parse_taking(&mut buf, caps, take) {
            Ok(Parsed::Reply(r)) => {
                let end = fed - buf.len();
                check_span(&r, &bytes[start..end]);
                start = end;
                out.push(r);
            }
            Ok(Parsed::Bulk { len }) => {
                assert!(take, "a bulk string taken unasked");
                assert!(
                    len <= caps.bulk,
                    "a {len}-byte bulk over a cap of {}",
                    caps.bulk
                );
                while buf.len() < len + 2 {
                    let Some(c) = chunks.next() else {
                        return (out, None, buf.len());
                    };
                    buf.extend_from_slice(c);
                    fed += c.len();
                }
                let value = buf.split_to(len + 2);
                if &value[len..] != b"\r\n" {
                    return (out, Some(ProtocolError::MissingCrlf), buf.len());
                }
                let r = Reply::Bulk(Bytes::copy_from_slice(&value[..len]));
                let end = fed - buf.len();
                check_span(&r, &bytes[start..end]);
                start = end;
                out.push(r);
            }
            Ok(Parsed::Incomplete { bulk_missing }) => {
                // What the connection asks of the socket inside a big value: never more
                // than the value and its CRLF.
                if let Some(missing) = bulk_missing {
                    assert!(
                        missing <= caps.bulk + 2,
                        "{missing} bytes missing of a {}-byte bulk",
                        caps.bulk
                    );
                }
                match chunks.next() {
                    Some(c) => {
                        buf.extend_from_slice(c);
                        fed += c.len();
                    }
                    None => break,
                }
            }
            Ok(other) => panic!("an event this target does not know: {other:?}"),
            Err(e) => {
                let _ = e.to_string();
                return (out, Some(e), buf.len());
            }
        }
    }
    (out, None, buf.len())
}

fuzz_target!(|data: &[u8]| {
    let [chunk, max, bytes @ ..] = data else {
        return;
    };
    let chunk = *chunk as usize + 1;
    let max = *max as usize;
    let caps = Caps {
        bulk: [0, 64, 255, 4096][max % 4],
        total: [64, 1024, 16384, usize::MAX][(max >> 2) % 4],
        elements: [0, 8, 64, MAX_ELEMENTS][(max >> 4) % 4],
        skip_long: max & 0x40 != 0,
    };

    let (replies, err, left) = parse(bytes, chunk, caps, false);
    let whole = parse(bytes, bytes.len().max(1), caps, false);
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
    // A connection that reads whole-reply bulk strings itself sees the same replies and
    // the same error.
    let taken = parse(bytes, chunk, caps, true);
    assert_eq!(taken.0, replies, "taking bulk strings changes the replies");
    assert_eq!(taken.1, err, "taking bulk strings changes the error");

    let mut again = Vec::new();
    let mut whole_replies = Vec::new();
    for r in &replies {
        let (mut kept, mut elements) = (0, 0);
        check_caps(r, caps, 1, &mut kept, &mut elements);
        assert!(
            kept <= caps.total,
            "{kept} bytes kept under a budget of {}",
            caps.total
        );
        assert!(
            elements <= caps.elements,
            "{elements} elements under a cap of {}",
            caps.elements
        );
        // A skipped string's bytes are gone: such a reply cannot be encoded again. Nor can
        // one holding an error whose text was not UTF-8: decoded lossily, it grows, and may
        // no longer fit the caps it arrived under.
        if !has_skipped(r) && !has_lossy_error(r) {
            r.encode(&mut again);
            whole_replies.push(r.clone());
        }
    }
    let (reparsed, err2, left2) = parse(&again, chunk, caps, false);
    assert_eq!(err2, None, "re-encoded replies do not parse");
    assert_eq!(left2, 0);
    assert_eq!(
        reparsed, whole_replies,
        "re-encoded replies parse differently"
    );
});
