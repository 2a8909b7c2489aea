//! The framed binary stream that carries batches of blocks over HTTP (`docs/api.md`).
//!
//! ```text
//! stream := "KVFRAME1" frame* end
//! frame  := 0x01 u32le(index) hash[32] u64le(len) payload[len]
//! end    := 0x02 u32le(blocks) u8(reason)
//! ```
//!
//! Why not JSON or base64: tensor bytes travel as bytes. Why an explicit end frame: a
//! stream that stops early because a block was missing must be told apart from a connection
//! that broke, and the reason (miss or backend unavailable) tells a worker whether to retry.
//! Frames are encoded as a small head plus the payload `Bytes` as is, so the server writes
//! payloads to the socket without copying them into a frame buffer.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::hashing::BlockHash;

/// Opens every framed stream.
pub const STREAM_MAGIC: &[u8; 8] = b"KVFRAME1";
/// Media type of a framed stream.
pub const CONTENT_TYPE: &str = "application/x-kvshelf-frames";
const BLOCK: u8 = 0x01;
const END: u8 = 0x02;
/// Bytes of a block frame before its payload.
pub const BLOCK_HEAD_LEN: usize = 1 + 4 + 32 + 8;
/// Bytes of the end frame.
pub const END_LEN: usize = 1 + 4 + 1;

/// Why a fetch stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EndReason {
    /// Every requested block was sent.
    Complete = 1,
    /// A block was missing (never put, evicted, or corrupt): recompute from there.
    Miss = 2,
    /// The backend failed or timed out; treated as a miss.
    BackendUnavailable = 3,
}

impl EndReason {
    fn from_u8(b: u8) -> Option<EndReason> {
        match b {
            1 => Some(EndReason::Complete),
            2 => Some(EndReason::Miss),
            3 => Some(EndReason::BackendUnavailable),
            _ => None,
        }
    }
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A block and its position in the request.
    Block {
        /// Index of the block in the request (0-based).
        index: u32,
        /// The block's hash.
        hash: BlockHash,
        /// The tensor bytes.
        payload: Bytes,
    },
    /// The end of the stream.
    End {
        /// Blocks sent before it.
        blocks: u32,
        /// Why the stream ended.
        reason: EndReason,
    },
}

/// The head of a block frame; the payload follows it on the wire as a separate chunk.
pub fn block_head(index: u32, hash: &BlockHash, payload_len: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(BLOCK_HEAD_LEN);
    b.put_u8(BLOCK);
    b.put_u32_le(index);
    b.put_slice(&hash.0);
    b.put_u64_le(payload_len as u64);
    b.freeze()
}

/// An end frame.
pub fn end(blocks: u32, reason: EndReason) -> Bytes {
    let mut b = BytesMut::with_capacity(END_LEN);
    b.put_u8(END);
    b.put_u32_le(blocks);
    b.put_u8(reason as u8);
    b.freeze()
}

/// A whole stream in one buffer (for clients building small put bodies and for tests).
pub fn encode_stream<'a>(blocks: impl IntoIterator<Item = (&'a BlockHash, &'a [u8])>) -> Vec<u8> {
    let mut out = STREAM_MAGIC.to_vec();
    let mut n = 0u32;
    for (hash, payload) in blocks {
        out.extend_from_slice(&block_head(n, hash, payload.len()));
        out.extend_from_slice(payload);
        n += 1;
    }
    out.extend_from_slice(&end(n, EndReason::Complete));
    out
}

/// Why bytes are not a valid framed stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The stream does not start with `KVFRAME1`.
    #[error("not a kvshelf frame stream (it must start with \"KVFRAME1\")")]
    BadMagic,
    /// An unknown frame type byte.
    #[error("unknown frame type 0x{0:02x} at byte {1}")]
    UnknownFrame(u8, u64),
    /// A payload longer than allowed.
    #[error("block frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced payload length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// Bytes after the end frame, or an end frame whose count disagrees.
    #[error("malformed stream end: {0}")]
    BadEnd(String),
    /// The stream stopped in the middle of a frame or without an end frame.
    #[error("stream truncated: no end frame")]
    Truncated,
}

/// Incremental decoder: feed it chunks as they arrive, take frames out as they complete.
///
/// Each payload is copied exactly once: from the chunks fed, straight into a buffer of its
/// own, allocated at the frame's announced length once that length has been checked against
/// `max_payload`. A decoded payload never shares memory with the chunks it arrived in (nor
/// with other payloads), so whoever keeps it (an L1 cache) holds exactly what it counts.
/// Memory is the frames decoded and not yet taken out, plus the one being filled.
#[derive(Debug)]
pub struct Decoder {
    max_payload: u64,
    state: State,
    /// The magic, a block frame's head or an end frame, while it is being assembled.
    head: Vec<u8>,
    ready: std::collections::VecDeque<Frame>,
    error: Option<FrameError>,
    blocks: u32,
    consumed: u64,
}

#[derive(Debug)]
enum State {
    Magic,
    /// Between frames: the next byte is a frame type.
    Type,
    BlockHead,
    Payload {
        index: u32,
        hash: BlockHash,
        buf: BytesMut,
        len: usize,
    },
    End,
    Ended,
}

impl Decoder {
    /// A decoder refusing payloads over `max_payload` bytes.
    pub fn new(max_payload: u64) -> Decoder {
        Decoder {
            max_payload,
            state: State::Magic,
            head: Vec::with_capacity(BLOCK_HEAD_LEN),
            ready: Default::default(),
            error: None,
            blocks: 0,
            consumed: 0,
        }
    }

    /// Decodes received bytes. Frames completed by them wait for [`Decoder::next_frame`];
    /// an error stops decoding and is reported there, after the frames before it.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() && self.error.is_none() {
            match self.step(chunk) {
                Ok(used) => {
                    chunk = &chunk[used..];
                    self.consumed += used as u64;
                }
                Err(e) => self.error = Some(e),
            }
        }
    }

    /// Takes what it can of `chunk` in the current state; returns how many bytes it used.
    fn step(&mut self, chunk: &[u8]) -> Result<usize, FrameError> {
        match &mut self.state {
            State::Magic => {
                let used = self.fill_head(STREAM_MAGIC.len(), chunk);
                if !STREAM_MAGIC.starts_with(&self.head) {
                    return Err(FrameError::BadMagic);
                }
                if self.head.len() == STREAM_MAGIC.len() {
                    self.head.clear();
                    self.state = State::Type;
                }
                Ok(used)
            }
            State::Type => {
                // The type byte stays in `chunk`: it is the first byte of the frame's head.
                self.state = match chunk[0] {
                    BLOCK => State::BlockHead,
                    END => State::End,
                    other => return Err(FrameError::UnknownFrame(other, self.consumed)),
                };
                Ok(0)
            }
            State::BlockHead => {
                let used = self.fill_head(BLOCK_HEAD_LEN, chunk);
                if self.head.len() < BLOCK_HEAD_LEN {
                    return Ok(used);
                }
                let mut head = &self.head[1..];
                let index = head.get_u32_le();
                let mut hash = [0u8; 32];
                head.copy_to_slice(&mut hash);
                let len = head.get_u64_le();
                let too_large = FrameError::TooLarge {
                    len,
                    max: self.max_payload,
                };
                if len > self.max_payload {
                    return Err(too_large);
                }
                let len = usize::try_from(len).map_err(|_| too_large)?;
                self.head.clear();
                self.state = State::Payload {
                    index,
                    hash: BlockHash(hash),
                    buf: BytesMut::with_capacity(len),
                    len,
                };
                if len == 0 {
                    self.complete_block();
                }
                Ok(used)
            }
            State::Payload { buf, len, .. } => {
                let used = (*len - buf.len()).min(chunk.len());
                buf.extend_from_slice(&chunk[..used]);
                if buf.len() == *len {
                    self.complete_block();
                }
                Ok(used)
            }
            State::End => {
                let used = self.fill_head(END_LEN, chunk);
                if self.head.len() < END_LEN {
                    return Ok(used);
                }
                let mut frame = &self.head[1..];
                let blocks = frame.get_u32_le();
                let reason = EndReason::from_u8(frame.get_u8())
                    .ok_or_else(|| FrameError::BadEnd("unknown end reason".into()))?;
                if blocks != self.blocks {
                    return Err(FrameError::BadEnd(format!(
                        "end frame counts {blocks} blocks, the stream carried {}",
                        self.blocks
                    )));
                }
                self.head.clear();
                self.state = State::Ended;
                self.ready.push_back(Frame::End { blocks, reason });
                Ok(used)
            }
            State::Ended => Err(FrameError::BadEnd("bytes after the end frame".into())),
        }
    }

    /// Appends to `head` up to `want` bytes in all; returns how many it took.
    fn fill_head(&mut self, want: usize, chunk: &[u8]) -> usize {
        let used = (want - self.head.len()).min(chunk.len());
        self.head.extend_from_slice(&chunk[..used]);
        used
    }

    fn complete_block(&mut self) {
        if let State::Payload {
            index, hash, buf, ..
        } = std::mem::replace(&mut self.state, State::Type)
        {
            self.blocks += 1;
            self.ready.push_back(Frame::Block {
                index,
                hash,
                payload: buf.freeze(),
            });
        }
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        match (self.ready.pop_front(), &self.error) {
            (Some(frame), _) => Ok(Some(frame)),
            (None, Some(e)) => Err(e.clone()),
            (None, None) => Ok(None),
        }
    }

    /// Call when the input is exhausted: an error unless the end frame was seen.
    pub fn finish(&self) -> Result<(), FrameError> {
        match (&self.error, &self.state) {
            (Some(e), _) => Err(e.clone()),
            (None, State::Ended) => Ok(()),
            (None, _) => Err(FrameError::Truncated),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(bytes: &[u8], chunk: usize) -> Result<Vec<Frame>, FrameError> {
        let mut d = Decoder::new(1 << 20);
        let mut out = Vec::new();
        for c in bytes.chunks(chunk.max(1)) {
            d.feed(c);
            while let Some(f) = d.next_frame()? {
                out.push(f);
            }
        }
        d.finish()?;
        Ok(out)
    }

    #[test]
    fn round_trip_in_any_chunking() {
        let blocks: Vec<(BlockHash, Vec<u8>)> = (0..5u8)
            .map(|i| (BlockHash([i; 32]), vec![i; 100 * i as usize]))
            .collect();
        let stream = encode_stream(blocks.iter().map(|(h, p)| (h, &p[..])));
        for chunk in [1, 7, 45, 1000, stream.len()] {
            let frames = decode_all(&stream, chunk).unwrap();
            assert_eq!(frames.len(), 6);
            for (i, f) in frames[..5].iter().enumerate() {
                assert_eq!(
                    f,
                    &Frame::Block {
                        index: i as u32,
                        hash: blocks[i].0,
                        payload: blocks[i].1.clone().into()
                    }
                );
            }
            assert_eq!(
                frames[5],
                Frame::End {
                    blocks: 5,
                    reason: EndReason::Complete
                }
            );
        }
    }

    #[test]
    fn errors() {
        assert_eq!(decode_all(b"KVFRAME2", 8), Err(FrameError::BadMagic));
        assert_eq!(decode_all(b"KVFRAME1", 8), Err(FrameError::Truncated));
        let mut s = encode_stream([(&BlockHash([1; 32]), &[1u8, 2, 3][..])]);
        s.push(0);
        assert!(matches!(decode_all(&s, 3), Err(FrameError::BadEnd(_))));
        let mut s = STREAM_MAGIC.to_vec();
        s.push(9);
        assert!(matches!(
            decode_all(&s, 3),
            Err(FrameError::UnknownFrame(9, 8))
        ));
        let mut s = STREAM_MAGIC.to_vec();
        s.extend_from_slice(&end(3, EndReason::Complete));
        assert!(matches!(decode_all(&s, 3), Err(FrameError::BadEnd(_))));
        let mut s = STREAM_MAGIC.to_vec();
        s.extend_from_slice(&block_head(0, &BlockHash([0; 32]), 1 << 40));
        assert!(matches!(
            decode_all(&s, 64),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_long_frame_is_refused_from_its_head_after_the_frames_before_it() {
        let mut d = Decoder::new(4);
        let mut s = STREAM_MAGIC.to_vec();
        s.extend_from_slice(&block_head(0, &BlockHash([1; 32]), 4));
        s.extend_from_slice(b"abcd");
        s.extend_from_slice(&block_head(1, &BlockHash([2; 32]), 5));
        d.feed(&s); // the long frame's payload never arrives
        assert!(matches!(
            d.next_frame(),
            Ok(Some(Frame::Block { index: 0, .. }))
        ));
        assert_eq!(d.next_frame(), Err(FrameError::TooLarge { len: 5, max: 4 }));
        assert_eq!(d.finish(), Err(FrameError::TooLarge { len: 5, max: 4 }));
    }

    proptest! {
        #[test]
        fn prop_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), chunk in 1usize..64) {
            let mut with_magic = STREAM_MAGIC.to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = decode_all(&bytes, chunk);
            let _ = decode_all(&with_magic, chunk);
        }

        #[test]
        fn prop_round_trip(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..8), chunk in 1usize..97) {
            let hashes: Vec<BlockHash> = (0..payloads.len()).map(|i| BlockHash([i as u8; 32])).collect();
            let stream = encode_stream(hashes.iter().zip(payloads.iter().map(|p| &p[..])));
            let frames = decode_all(&stream, chunk).unwrap();
            prop_assert_eq!(frames.len(), payloads.len() + 1);
            for (f, p) in frames.iter().zip(&payloads) {
                let is_same = matches!(f, Frame::Block { payload, .. } if payload[..] == p[..]);
                prop_assert!(is_same);
            }
        }
    }
}
