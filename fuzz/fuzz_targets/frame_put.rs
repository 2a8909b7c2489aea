//! Fuzzes the frame stream as the sidecar reads it: a put body (`POST /v1/put`), decoded
//! by `kvshelf::frame::Decoder` capped at the namespace's `block_bytes`.
//!
//! Input: byte 0 picks the read size (1–256), byte 1 the cap (`block_bytes`, 0–255); the
//! rest is the body.
//!
//! Properties checked on every input:
//! - decoding never panics, and allocates by no length over the cap;
//! - the result does not depend on how the body was split;
//! - no payload is longer than the cap; block frames are counted by the end frame;
//! - a body that decodes whole re-encodes (`frame::encode_stream`) to a body that decodes
//!   to the same blocks.
#![no_main]

use kvshelf::BlockHash;
use kvshelf::frame::{self, Decoder, EndReason, Frame, FrameError};
use libfuzzer_sys::fuzz_target;

/// The frames of `body` read `chunk` bytes at a time, and how the stream ended.
fn decode(body: &[u8], chunk: usize, cap: u64) -> (Vec<Frame>, Result<(), FrameError>) {
    let mut d = Decoder::new(cap);
    let mut frames = Vec::new();
    for c in body.chunks(chunk) {
        d.feed(c);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    let _ = e.to_string();
                    return (frames, Err(e));
                }
            }
        }
    }
    let end = d.finish();
    (frames, end)
}

fuzz_target!(|data: &[u8]| {
    let [chunk, cap, body @ ..] = data else {
        return;
    };
    let chunk = *chunk as usize + 1;
    let cap = *cap as u64;

    let (frames, end) = decode(body, chunk, cap);
    let whole = decode(body, body.len().max(1), cap);
    assert_eq!(
        whole,
        (frames.clone(), end.clone()),
        "the result depends on the split"
    );

    let mut blocks = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        match f {
            Frame::Block { hash, payload, .. } => {
                assert!(
                    payload.len() as u64 <= cap,
                    "a payload of {} passed a cap of {cap}",
                    payload.len()
                );
                blocks.push((*hash, payload.clone()));
            }
            Frame::End { blocks: n, reason } => {
                assert_eq!(i, frames.len() - 1, "a frame after the end");
                assert_eq!(*n as usize, blocks.len(), "the end miscounts");
                let _ = format!("{reason:?}");
            }
        }
    }

    if end.is_ok() {
        let again = frame::encode_stream(blocks.iter().map(|(h, p)| (h, &p[..])));
        let (frames2, end2) = decode(&again, chunk, cap);
        assert_eq!(end2, Ok(()), "a re-encoded body does not decode");
        let blocks2: Vec<(BlockHash, _)> = frames2
            .into_iter()
            .filter_map(|f| match f {
                Frame::Block { hash, payload, .. } => Some((hash, payload)),
                Frame::End { reason, .. } => {
                    assert_eq!(reason, EndReason::Complete);
                    None
                }
            })
            .collect();
        assert_eq!(blocks2, blocks, "a re-encoded body decodes differently");
    }
});
