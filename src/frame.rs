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
    /// A well-formed fetch answer that does not answer the request (see [`FetchReader`]).
    #[error("the fetch answer does not match the request: {0}")]
    Unexpected(String),
}

/// Incremental decoder: feed it chunks as they arrive, take frames out as they complete.
///
/// Each payload is copied exactly once: from the chunks fed, straight into a buffer of its
/// own, allocated at the frame's announced length once that length has been checked against
/// `max_payload`. A decoded payload never shares memory with the chunks it arrived in (nor
/// with other payloads), so whoever keeps it (an L1 cache) holds exactly what it counts.
/// Memory is the frames decoded and not yet taken out, plus the one being filled.
///
/// Socket-free: bytes in, frames out. A payload length over `max_payload` is refused from
/// the frame head, before anything is allocated for it. Give it the most the stream may
/// legitimately carry (the namespace's `block_bytes`), never an unbounded limit.
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
    /// A decoder refusing payloads over `max_payload` bytes, and in any case over
    /// [`MAX_PAYLOAD_LEN`](crate::codec::MAX_PAYLOAD_LEN), the most a block can be.
    pub fn new(max_payload: u64) -> Decoder {
        Decoder {
            state: State::Magic,
            head: Vec::with_capacity(BLOCK_HEAD_LEN),
            ready: Default::default(),
            error: None,
            blocks: 0,
            consumed: 0,
            max_payload: max_payload.min(crate::codec::MAX_PAYLOAD_LEN),
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
            // Saturating: a stream of 2^32 frames then fails the end frame's count.
            self.blocks = self.blocks.saturating_add(1);
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

/// Reads a fetch answer against its request: whichever transport carried it, the blocks
/// must come in request order (`index` 0, 1, …, each with the hash asked for at that
/// position), each exactly `block_bytes` long when the caller knows it, no more blocks than
/// asked for, and one end that agrees (`complete` exactly when every block came).
/// Socket-free: the caller feeds it frames as it decodes them.
#[derive(Debug)]
pub struct FetchReader<'a> {
    requested: &'a [BlockHash],
    block_bytes: Option<u64>,
    blocks: Vec<(BlockHash, Bytes)>,
    end: Option<EndReason>,
}

impl<'a> FetchReader<'a> {
    /// A reader for the answer to a fetch of `requested`, blocks of `block_bytes` each
    /// (`None`: not checked).
    pub fn new(requested: &'a [BlockHash], block_bytes: Option<u64>) -> FetchReader<'a> {
        FetchReader {
            requested,
            block_bytes,
            blocks: Vec::new(),
            end: None,
        }
    }

    /// A decoded frame of the answer.
    pub fn frame(&mut self, frame: Frame) -> Result<(), FrameError> {
        match frame {
            Frame::Block {
                index,
                hash,
                payload,
            } => self.block(index, hash, payload),
            Frame::End { blocks, reason } => self.end(blocks, reason),
        }
    }

    /// A block of the answer.
    pub fn block(&mut self, index: u32, hash: BlockHash, payload: Bytes) -> Result<(), FrameError> {
        let at = self.blocks.len();
        let unexpected = |what: String| Err(FrameError::Unexpected(what));
        if self.end.is_some() {
            return unexpected("a block after the end".into());
        }
        if index as usize != at {
            return unexpected(format!("block {index} where block {at} was due"));
        }
        match self.requested.get(at) {
            None => return unexpected(format!("{} blocks asked for, more sent", at)),
            Some(want) if *want != hash => {
                return unexpected(format!("block {at} is {hash}, {want} was asked for"));
            }
            Some(_) => {}
        }
        if let Some(want) = self.block_bytes
            && payload.len() as u64 != want
        {
            return unexpected(format!(
                "block {at} has {} bytes, a block of this namespace {want}",
                payload.len()
            ));
        }
        self.blocks.push((hash, payload));
        Ok(())
    }

    /// The end of the answer (`blocks`: how many block frames it says came before it).
    pub fn end(&mut self, blocks: u32, reason: EndReason) -> Result<(), FrameError> {
        let sent = self.blocks.len();
        let complete = sent == self.requested.len();
        if self.end.is_some() {
            return Err(FrameError::BadEnd("a second end".into()));
        }
        if blocks as usize != sent {
            return Err(FrameError::BadEnd(format!(
                "end frame counts {blocks} blocks, the stream carried {sent}"
            )));
        }
        if complete != (reason == EndReason::Complete) {
            return Err(FrameError::Unexpected(format!(
                "{sent} of {} blocks sent, and the end says {reason:?}",
                self.requested.len()
            )));
        }
        self.end = Some(reason);
        Ok(())
    }

    /// The blocks, in request order, and why the run ended; an error if no end came.
    pub fn finish(self) -> Result<(Vec<(BlockHash, Bytes)>, EndReason), FrameError> {
        let reason = self.end.ok_or(FrameError::Truncated)?;
        Ok((self.blocks, reason))
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

    /// A length near `u64::MAX` used to overflow `BLOCK_HEAD_LEN + len` (a panic, or in
    /// release a wrapped, tiny frame) when the limit was `u64::MAX`, and any length up to
    /// the limit sized an allocation.
    #[test]
    fn an_announced_length_is_checked_before_any_arithmetic_or_allocation() {
        let max = crate::codec::MAX_PAYLOAD_LEN;
        for len in [
            u64::MAX,
            u64::MAX - BLOCK_HEAD_LEN as u64 + 1,
            1 << 63,
            usize::MAX as u64,
            max + 1,
        ] {
            let mut d = Decoder::new(u64::MAX);
            d.feed(STREAM_MAGIC);
            d.feed(&block_head(0, &BlockHash([0; 32]), 0)[..37]);
            d.feed(&len.to_le_bytes());
            assert_eq!(
                d.next_frame(),
                Err(FrameError::TooLarge { len, max }),
                "{len}"
            );
        }
    }

    fn fetch_answer(
        frames: &[Frame],
        requested: &[BlockHash],
        block_bytes: Option<u64>,
    ) -> Result<(Vec<(BlockHash, Bytes)>, EndReason), FrameError> {
        let mut r = FetchReader::new(requested, block_bytes);
        for f in frames {
            r.frame(f.clone())?;
        }
        r.finish()
    }

    #[test]
    fn a_fetch_answer_must_answer_the_request() {
        let hs: Vec<BlockHash> = (0..3u8).map(|i| BlockHash([i; 32])).collect();
        let block = |index: u32, h: u8, len: usize| Frame::Block {
            index,
            hash: BlockHash([h; 32]),
            payload: vec![h; len].into(),
        };
        let end = |blocks, reason| Frame::End { blocks, reason };
        let ok = [block(0, 0, 4), block(1, 1, 4), end(2, EndReason::Miss)];
        assert_eq!(fetch_answer(&ok, &hs, Some(4)).unwrap().1, EndReason::Miss);
        let all = [
            block(0, 0, 4),
            block(1, 1, 4),
            block(2, 2, 4),
            end(3, EndReason::Complete),
        ];
        assert_eq!(fetch_answer(&all, &hs, Some(4)).unwrap().0.len(), 3);
        for bad in [
            vec![block(1, 1, 4), end(1, EndReason::Miss)], // skipped block 0
            vec![block(0, 1, 4), end(1, EndReason::Miss)], // wrong hash
            vec![block(0, 0, 5), end(1, EndReason::Miss)], // wrong size
            vec![block(0, 0, 4), end(1, EndReason::Complete)], // complete too early
            vec![
                block(0, 0, 4),
                block(1, 1, 4),
                block(2, 2, 4),
                end(3, EndReason::Miss),
            ],
            vec![block(0, 0, 4), end(2, EndReason::Miss)], // miscounted
            vec![block(0, 0, 4)],                          // no end
            vec![end(0, EndReason::Miss), block(0, 0, 4)], // block after end
            vec![end(0, EndReason::Miss), end(0, EndReason::Miss)],
        ] {
            assert!(fetch_answer(&bad, &hs, Some(4)).is_err(), "{bad:?}");
        }
        let extra = [
            block(0, 0, 4),
            block(1, 1, 4),
            block(2, 2, 4),
            block(3, 3, 4),
        ];
        assert!(
            fetch_answer(&extra, &hs, None).is_err(),
            "more blocks than asked for"
        );
        // Size unknown: not checked.
        assert!(
            fetch_answer(
                &[block(0, 0, 9), end(1, EndReason::BackendUnavailable)],
                &hs,
                None
            )
            .is_ok()
        );
    }

    proptest! {
        #[test]
        fn prop_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), chunk in 1usize..64) {
            let mut with_magic = STREAM_MAGIC.to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = decode_all(&bytes, chunk);
            let _ = decode_all(&with_magic, chunk);
        }

        /// The client's path: a decoder capped at the namespace's block size feeding a
        /// fetch reader, on arbitrary bytes in arbitrary chunks.
        #[test]
        fn prop_fetch_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400), chunk in 1usize..64) {
            let requested: Vec<BlockHash> = (0..3u8).map(|i| BlockHash([i; 32])).collect();
            for body in [bytes.clone(), [&STREAM_MAGIC[..], &bytes].concat()] {
                let mut d = Decoder::new(16);
                let mut r = FetchReader::new(&requested, Some(16));
                let _ = (|| {
                    for c in body.chunks(chunk) {
                        d.feed(c);
                        while let Some(f) = d.next_frame()? {
                            r.frame(f)?;
                        }
                    }
                    d.finish()
                })();
                let _ = r.finish();
            }
        }

        /// Whatever prefix of a request a server answers, with the matching end, reads back.
        #[test]
        fn prop_fetch_answer_round_trip(n in 0usize..6, sent in 0usize..6, miss in any::<bool>(), chunk in 1usize..97) {
            let requested: Vec<BlockHash> = (0..n).map(|i| BlockHash([i as u8; 32])).collect();
            let sent = sent.min(n);
            let payloads: Vec<Vec<u8>> = (0..sent).map(|i| vec![i as u8; 24]).collect();
            let reason = match (sent == n, miss) {
                (true, _) => EndReason::Complete,
                (false, true) => EndReason::Miss,
                (false, false) => EndReason::BackendUnavailable,
            };
            let mut stream = STREAM_MAGIC.to_vec();
            for (i, p) in payloads.iter().enumerate() {
                stream.extend_from_slice(&block_head(i as u32, &requested[i], p.len()));
                stream.extend_from_slice(p);
            }
            stream.extend_from_slice(&end(sent as u32, reason));
            let mut d = Decoder::new(24);
            let mut r = FetchReader::new(&requested, Some(24));
            for c in stream.chunks(chunk) {
                d.feed(c);
                while let Some(f) = d.next_frame().unwrap() {
                    r.frame(f).unwrap();
                }
            }
            d.finish().unwrap();
            let (blocks, got) = r.finish().unwrap();
            prop_assert_eq!(got, reason);
            prop_assert_eq!(blocks.len(), sent);
            for (i, (h, p)) in blocks.iter().enumerate() {
                prop_assert_eq!(h, &requested[i]);
                prop_assert_eq!(&p[..], &payloads[i][..]);
            }
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
