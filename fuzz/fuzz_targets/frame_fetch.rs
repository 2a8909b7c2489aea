//! Fuzzes the frame stream as the Rust client reads it: a fetch answer, decoded by
//! `kvshelf::frame::Decoder` capped at the namespace's `block_bytes` and checked against the
//! request by `kvshelf::frame::FetchReader` (what `Client::fetch` does over HTTP).
//!
//! Input: byte 0 picks the read size (1–256), byte 1 `block_bytes` (0–255), byte 2 how many
//! blocks were asked for (0–7; block `i`'s hash is 32 bytes of `i`); the rest is the answer.
//!
//! Properties checked on every input:
//! - reading never panics, and allocates by no length over `block_bytes`;
//! - an accepted answer is a prefix of the request, in order, every block exactly
//!   `block_bytes`, and says `complete` exactly when the whole request came;
//! - the result does not depend on how the answer was split.
#![no_main]

use bytes::Bytes;
use kvshelf::BlockHash;
use kvshelf::frame::{Decoder, EndReason, FetchReader, FrameError};
use libfuzzer_sys::fuzz_target;

type Answer = Result<(Vec<(BlockHash, Bytes)>, EndReason), FrameError>;

fn read(body: &[u8], chunk: usize, requested: &[BlockHash], block_bytes: u64) -> Answer {
    let mut d = Decoder::new(block_bytes);
    let mut r = FetchReader::new(requested, Some(block_bytes));
    for c in body.chunks(chunk) {
        d.feed(c);
        while let Some(f) = d.next_frame()? {
            r.frame(f)?;
        }
    }
    d.finish()?;
    r.finish()
}

fuzz_target!(|data: &[u8]| {
    let [chunk, block_bytes, n, body @ ..] = data else {
        return;
    };
    let chunk = *chunk as usize + 1;
    let block_bytes = *block_bytes as u64;
    let requested: Vec<BlockHash> = (0..*n % 8).map(|i| BlockHash([i; 32])).collect();

    let answer = read(body, chunk, &requested, block_bytes);
    let whole = read(body, body.len().max(1), &requested, block_bytes);
    assert_eq!(
        whole.as_ref().map(|a| a.0.len()).map_err(|e| e.to_string()),
        answer
            .as_ref()
            .map(|a| a.0.len())
            .map_err(|e| e.to_string()),
        "the result depends on the split"
    );
    match answer {
        Ok((blocks, reason)) => {
            assert!(blocks.len() <= requested.len());
            for (i, (hash, payload)) in blocks.iter().enumerate() {
                assert_eq!(*hash, requested[i], "block {i} is not the one asked for");
                assert_eq!(payload.len() as u64, block_bytes);
            }
            assert_eq!(
                reason == EndReason::Complete,
                blocks.len() == requested.len()
            );
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
