//! The block format: a self-describing text header followed by the raw tensor bytes, in one
//! Redis value (`docs/format.md`).
//!
//! ```text
//! KVSHELF/1 000320\n{"namespace":"qwen2.5-0.5b","tokens":16,...}␠␠␠…␠\n<payload bytes>
//! └ magic/version, header length ┘└ JSON ─────────────────────────┘└ pad to 64 ┘
//! ```
//!
//! Why text: an operator with nothing but `redis-cli GETRANGE <key> 0 511` can read the
//! model, token count, dtype, shape, codec and checksum of any block. Why padded to a
//! multiple of 64 bytes: the payload then starts at the same offset modulo 64 as the value,
//! which keeps copies into 64-byte-aligned tensor buffers on memcpy's fast path.
//! Why one value: Redis evicts a block atomically, so metadata can never be orphaned.
//!
//! Decoding never copies the payload: it is a [`Bytes`] slice of the value read from Redis.

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use twox_hash::XxHash3_64;

use crate::hashing::BlockHash;
use crate::namespace::{Dtype, HashScheme, Namespace};

/// The `order` of a foreign-hash chunk: opaque bytes, `shape` is `[payload_len]`.
pub const BYTES_ORDER: &str = "bytes";

/// Magic that opens every block value; the format version follows it.
pub const MAGIC: &[u8; 8] = b"KVSHELF/";
/// The only format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Length of the first line: `KVSHELF/1 NNNNNN\n`.
pub const PREAMBLE_LEN: usize = 17;
/// Header lengths are padded to a multiple of this.
pub const HEADER_ALIGN: usize = 64;
/// Longest header accepted; a longer one is refused before it is parsed.
pub const MAX_HEADER_LEN: usize = 4096;
/// Largest payload accepted (1 GiB): a 256-token chunk of a 70B-class model is 80 MiB.
pub const MAX_PAYLOAD_LEN: u64 = 1 << 30;

/// How the payload bytes are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Codec {
    /// The tensor bytes as the worker gave them. The only codec: generic lossless
    /// compression of bf16/fp16 KV was measured and does not pay (`docs/format.md`).
    Raw,
}

/// The self-describing part of a stored block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Label of the namespace the block belongs to.
    pub namespace: String,
    /// Tokens covered by the block (the namespace's block size).
    pub tokens: u32,
    /// Element type of the tensor, by its canonical name only (no aliases): a header that
    /// decodes always re-encodes to the same length or shorter.
    #[serde(deserialize_with = "canonical_dtype")]
    pub dtype: Dtype,
    /// Memory order of the axes (a permutation of `lkthd`, see [`crate::Layout`]).
    pub order: String,
    /// Tensor shape, axes in `order`.
    pub shape: Vec<u64>,
    /// How the payload is stored.
    pub codec: Codec,
    /// Exact length of the payload in bytes.
    pub payload_len: u64,
    /// `xxh3-64:` and the 16 hex digits of the XXH3-64 (seed 0) of the payload.
    pub checksum: String,
    /// The block hash this value is stored under, so a value under the wrong key is caught.
    pub block: BlockHash,
    /// Whose hash `block` is. Absent for `kvshelf-v1`, so kvshelf's own headers are
    /// unchanged; a foreign scheme's chunk is opaque bytes (see [`Header::for_block`]).
    #[serde(default, skip_serializing_if = "HashScheme::is_kvshelf")]
    pub hash_scheme: HashScheme,
}

impl Header {
    /// The header of a full block of `ns` under `hash`, with the checksum of `payload`.
    ///
    /// In a foreign-hash namespace the engine owns chunking, so kvshelf does not know how
    /// many tokens a chunk holds or how its bytes are laid out: the header describes the
    /// payload as bytes (`tokens` 0, `dtype` `uint8`, `order` `bytes`, `shape`
    /// `[payload_len]`) and names the scheme.
    pub fn for_block(ns: &Namespace, hash: &BlockHash, payload: &[u8]) -> Header {
        if !ns.hash_scheme.is_kvshelf() {
            return Header {
                namespace: ns.label.clone(),
                tokens: 0,
                dtype: Dtype::Uint8,
                order: BYTES_ORDER.to_owned(),
                shape: vec![payload.len() as u64],
                codec: Codec::Raw,
                payload_len: payload.len() as u64,
                checksum: checksum(payload),
                block: *hash,
                hash_scheme: ns.hash_scheme,
            };
        }
        Header {
            namespace: ns.label.clone(),
            tokens: ns.block_size,
            dtype: ns.kv_dtype,
            order: ns.layout.order.clone(),
            shape: ns.block_shape(),
            codec: Codec::Raw,
            payload_len: payload.len() as u64,
            checksum: checksum(payload),
            block: *hash,
            hash_scheme: HashScheme::KvshelfV1,
        }
    }

    /// The header's bytes: preamble, JSON, space padding, a final `\n`; the length is a
    /// multiple of [`HEADER_ALIGN`].
    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("a header always serialises");
        let unpadded = PREAMBLE_LEN + json.len() + 1;
        let len = unpadded.div_ceil(HEADER_ALIGN) * HEADER_ALIGN;
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(format!("KVSHELF/{FORMAT_VERSION} {len:06}\n").as_bytes());
        debug_assert_eq!(out.len(), PREAMBLE_LEN);
        out.extend_from_slice(&json);
        out.resize(len - 1, b' ');
        out.push(b'\n');
        debug_assert!(
            len <= MAX_HEADER_LEN,
            "labels are at most 64 bytes, so headers fit"
        );
        out
    }

    /// Checks this header against what a reader asked for: namespace, token count, dtype,
    /// layout order, shape, payload length and block hash must all match.
    pub fn check(&self, ns: &Namespace, hash: &BlockHash) -> Result<(), CodecError> {
        let mismatch = |field: &'static str, expected: String, found: String| {
            Err(CodecError::Mismatch {
                field,
                expected,
                found,
            })
        };
        if self.namespace != ns.label {
            return mismatch("namespace", ns.label.clone(), self.namespace.clone());
        }
        if self.block != *hash {
            return mismatch("block", hash.to_string(), self.block.to_string());
        }
        if self.hash_scheme != ns.hash_scheme {
            let (e, f) = (ns.hash_scheme.to_string(), self.hash_scheme.to_string());
            return mismatch("hash_scheme", e, f);
        }
        if !ns.hash_scheme.is_kvshelf() {
            return self.check_bytes(ns);
        }
        if self.tokens != ns.block_size {
            return mismatch("tokens", ns.block_size.to_string(), self.tokens.to_string());
        }
        if self.dtype != ns.kv_dtype {
            return mismatch("dtype", ns.kv_dtype.to_string(), self.dtype.to_string());
        }
        if self.order != ns.layout.order {
            return mismatch("order", ns.layout.order.clone(), self.order.clone());
        }
        let shape = ns.block_shape();
        if self.shape != shape {
            return mismatch("shape", format!("{shape:?}"), format!("{:?}", self.shape));
        }
        if self.payload_len != ns.block_bytes() {
            let (e, f) = (ns.block_bytes().to_string(), self.payload_len.to_string());
            return mismatch("payload_len", e, f);
        }
        Ok(())
    }
}

impl Header {
    /// The rest of [`check`](Self::check) for a foreign-hash chunk: opaque bytes, at most
    /// one full chunk of the namespace.
    fn check_bytes(&self, ns: &Namespace) -> Result<(), CodecError> {
        let mismatch = |field: &'static str, expected: String, found: String| {
            Err(CodecError::Mismatch {
                field,
                expected,
                found,
            })
        };
        if self.tokens != 0 {
            return mismatch("tokens", "0".into(), self.tokens.to_string());
        }
        if self.dtype != Dtype::Uint8 {
            return mismatch("dtype", "uint8".into(), self.dtype.to_string());
        }
        if self.order != BYTES_ORDER {
            return mismatch("order", BYTES_ORDER.into(), self.order.clone());
        }
        if self.shape != [self.payload_len] {
            let e = format!("[{}]", self.payload_len);
            return mismatch("shape", e, format!("{:?}", self.shape));
        }
        if !ns.accepts_payload_len(self.payload_len) {
            let e = format!("1..={}", ns.block_bytes());
            return mismatch("payload_len", e, self.payload_len.to_string());
        }
        Ok(())
    }
}

fn canonical_dtype<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Dtype, D::Error> {
    let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
    Dtype::ALL
        .into_iter()
        .find(|t| t.name() == s)
        .ok_or_else(|| serde::de::Error::custom(format!("dtype {s:?} is not a canonical name")))
}

/// A decoded block: its header and its payload, a zero-copy slice of the stored value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// The parsed header.
    pub header: Header,
    /// The tensor bytes.
    pub payload: Bytes,
}

/// Why a stored value is not a valid block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The value does not start with `KVSHELF/`.
    #[error("not a kvshelf block (bad magic)")]
    BadMagic,
    /// A format version this build does not read.
    #[error("unsupported block format version {0} (this build reads {FORMAT_VERSION})")]
    UnsupportedVersion(String),
    /// Fewer bytes than the header says there are.
    #[error("truncated block: needs {needed} bytes, has {got}")]
    Truncated {
        /// Bytes the header announces.
        needed: u64,
        /// Bytes present.
        got: u64,
    },
    /// More bytes than the header says, or a header or payload past the limits.
    #[error("oversized block: {what} is {len} bytes, at most {max} allowed")]
    Oversized {
        /// Which part is too large.
        what: &'static str,
        /// Its length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The header is not the JSON this format specifies.
    #[error("malformed block header: {0}")]
    MalformedHeader(String),
    /// The payload does not hash to the header's checksum.
    #[error("checksum mismatch: header says {expected}, payload has {actual}")]
    ChecksumMismatch {
        /// The checksum in the header.
        expected: String,
        /// The checksum of the bytes present.
        actual: String,
    },
    /// A well-formed block that is not the one asked for.
    #[error("block {field} mismatch: expected {expected}, found {found}")]
    Mismatch {
        /// The header field that differs.
        field: &'static str,
        /// What the reader asked for.
        expected: String,
        /// What the block says.
        found: String,
    },
}

impl CodecError {
    /// A short stable name, used as a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            CodecError::BadMagic => "bad_magic",
            CodecError::UnsupportedVersion(_) => "unsupported_version",
            CodecError::Truncated { .. } => "truncated",
            CodecError::Oversized { .. } => "oversized",
            CodecError::MalformedHeader(_) => "malformed_header",
            CodecError::ChecksumMismatch { .. } => "checksum",
            CodecError::Mismatch { .. } => "mismatch",
        }
    }
}

/// `xxh3-64:` and 16 lower-case hex digits.
pub fn checksum(payload: &[u8]) -> String {
    checksum_text(XxHash3_64::oneshot(payload))
}

/// A payload's checksum as a header writes it.
fn checksum_text(xxh3: u64) -> String {
    format!("xxh3-64:{xxh3:016x}")
}

/// The payload checksum computed piece by piece, as the payload arrives: a connection
/// reading a block into its caller's buffer feeds each read to it, so the checksum is done
/// when the last byte has landed (in cache, not read again from memory afterwards) and is
/// the same value [`checksum`] gives for the whole payload.
pub struct PayloadDigest(XxHash3_64);

impl PayloadDigest {
    /// A digest of no bytes yet.
    pub fn new() -> Self {
        PayloadDigest(XxHash3_64::with_seed(0))
    }

    /// Adds the next bytes of the payload.
    pub fn update(&mut self, bytes: &[u8]) {
        std::hash::Hasher::write(&mut self.0, bytes);
    }

    /// The XXH3-64 of every byte added so far.
    pub fn finish(&self) -> u64 {
        std::hash::Hasher::finish(&self.0)
    }
}

impl Default for PayloadDigest {
    fn default() -> Self {
        Self::new()
    }
}

/// Header and payload in one buffer, ready to be stored.
pub fn encode(header: &Header, payload: &[u8]) -> Bytes {
    let head = header.encode();
    let mut out = BytesMut::with_capacity(head.len() + payload.len());
    out.extend_from_slice(&head);
    out.extend_from_slice(payload);
    out.freeze()
}

/// The length of the header a stored value starts with, read from its first
/// [`PREAMBLE_LEN`] bytes (magic, version, length): where the payload begins. A reader
/// that has only the preamble can send the payload elsewhere (into its caller's buffer).
pub fn header_len(value: &[u8]) -> Result<usize, CodecError> {
    if value.len() < MAGIC.len() || &value[..MAGIC.len()] != MAGIC {
        return Err(CodecError::BadMagic);
    }
    let truncated = |needed: usize| CodecError::Truncated {
        needed: needed as u64,
        got: value.len() as u64,
    };
    if value.len() < PREAMBLE_LEN {
        return Err(truncated(PREAMBLE_LEN));
    }
    let preamble = std::str::from_utf8(&value[MAGIC.len()..PREAMBLE_LEN])
        .map_err(|_| CodecError::MalformedHeader("preamble is not text".into()))?;
    let (version, len) = preamble
        .strip_suffix('\n')
        .and_then(|p| p.split_once(' '))
        .ok_or_else(|| CodecError::MalformedHeader(format!("preamble {preamble:?}")))?;
    if version != FORMAT_VERSION.to_string() {
        return Err(CodecError::UnsupportedVersion(version.to_owned()));
    }
    let len: usize = (len.len() == 6 && len.bytes().all(|b| b.is_ascii_digit()))
        .then(|| len.parse().ok())
        .flatten()
        .ok_or_else(|| CodecError::MalformedHeader(format!("header length {len:?}")))?;
    if len > MAX_HEADER_LEN {
        return Err(CodecError::Oversized {
            what: "header",
            len: len as u64,
            max: MAX_HEADER_LEN as u64,
        });
    }
    if len <= PREAMBLE_LEN || !len.is_multiple_of(HEADER_ALIGN) {
        return Err(CodecError::MalformedHeader(format!(
            "header length {len} is not a multiple of {HEADER_ALIGN}"
        )));
    }
    Ok(len)
}

/// Parses only the header of `value`, which may be just its first bytes (as from
/// `GETRANGE key 0 4095`). Returns the header and its length.
pub fn decode_header(value: &[u8]) -> Result<(Header, usize), CodecError> {
    let len = header_len(value)?;
    if value.len() < len {
        return Err(CodecError::Truncated {
            needed: len as u64,
            got: value.len() as u64,
        });
    }
    let header: Header = serde_json::from_slice(value[PREAMBLE_LEN..len].trim_ascii_end())
        .map_err(|e| CodecError::MalformedHeader(e.to_string()))?;
    Ok((header, len))
}

/// Decodes a whole stored value: parses the header, checks the payload's length and
/// checksum, and hands out the payload without copying it.
pub fn decode(value: Bytes) -> Result<Block, CodecError> {
    let (header, head_len) = decode_header(&value)?;
    header.check_payload(head_len, &value[head_len..])?;
    let payload = value.slice(head_len..);
    Ok(Block { header, payload })
}

impl Header {
    /// Checks the payload that followed this header (of `head_len` bytes) in a stored
    /// value: its length and checksum.
    pub fn check_payload(&self, head_len: usize, payload: &[u8]) -> Result<(), CodecError> {
        self.check_payload_len(head_len, payload.len())?;
        self.check_digest(XxHash3_64::oneshot(payload))
    }

    /// [`check_payload`](Self::check_payload) of a payload of `len` bytes whose XXH3-64 was
    /// computed as it arrived ([`PayloadDigest`]).
    pub fn check_payload_digest(
        &self,
        head_len: usize,
        len: usize,
        xxh3: u64,
    ) -> Result<(), CodecError> {
        self.check_payload_len(head_len, len)?;
        self.check_digest(xxh3)
    }

    fn check_digest(&self, xxh3: u64) -> Result<(), CodecError> {
        let actual = checksum_text(xxh3);
        if actual != self.checksum {
            return Err(CodecError::ChecksumMismatch {
                expected: self.checksum.clone(),
                actual,
            });
        }
        Ok(())
    }

    fn check_payload_len(&self, head_len: usize, len: usize) -> Result<(), CodecError> {
        if self.payload_len > MAX_PAYLOAD_LEN {
            return Err(CodecError::Oversized {
                what: "payload",
                len: self.payload_len,
                max: MAX_PAYLOAD_LEN,
            });
        }
        let got = len as u64;
        let value_len = head_len as u64 + got;
        if got < self.payload_len {
            return Err(CodecError::Truncated {
                needed: head_len as u64 + self.payload_len,
                got: value_len,
            });
        }
        if got > self.payload_len {
            return Err(CodecError::Oversized {
                what: "value",
                len: value_len,
                max: head_len as u64 + self.payload_len,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hashing::PrefixHasher;
    use crate::namespace::tests::qwen;
    use proptest::prelude::*;

    fn sample() -> (Namespace, BlockHash, Vec<u8>) {
        let ns = qwen();
        let hash = PrefixHasher::new(&ns, None).hash_prefix(&[7; 16])[0];
        let payload: Vec<u8> = (0..ns.block_bytes())
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        (ns, hash, payload)
    }

    #[test]
    fn round_trip_is_zero_copy_and_checked() {
        let (ns, hash, payload) = sample();
        let header = Header::for_block(&ns, &hash, &payload);
        let value = encode(&header, &payload);
        let block = decode(value.clone()).unwrap();
        assert_eq!(block.header, header);
        assert_eq!(&block.payload[..], &payload[..]);
        // Zero copy: the payload points into the stored value.
        let head_len = header.encode().len();
        assert_eq!(block.payload.as_ptr(), value[head_len..].as_ptr());
        block.header.check(&ns, &hash).unwrap();
        assert_eq!(head_len % HEADER_ALIGN, 0);
    }

    #[test]
    fn the_header_is_preamble_then_json_spaces_and_one_newline_as_docs_format_md_draws() {
        let (ns, hash, payload) = sample();
        let head = Header::for_block(&ns, &hash, &payload).encode();
        let text = std::str::from_utf8(&head).unwrap();
        let (preamble, line) = text.split_once('\n').unwrap();
        assert_eq!(preamble.len() + 1, PREAMBLE_LEN);
        let padded = line
            .strip_suffix('\n')
            .expect("the header ends with its one newline");
        assert!(
            !padded.contains('\n'),
            "JSON and padding share one line: {padded:?}"
        );
        let json = padded.trim_end_matches(' ');
        let _: serde_json::Value = serde_json::from_str(json).unwrap();
        assert!(json.ends_with('}'));
    }

    #[test]
    fn header_is_readable_in_the_first_512_bytes() {
        let (ns, hash, payload) = sample();
        let value = encode(&Header::for_block(&ns, &hash, &payload), &payload);
        let text = String::from_utf8_lossy(&value[..512]);
        assert!(text.starts_with("KVSHELF/1 000"), "{text}");
        for needle in [
            "\"namespace\":\"qwen2.5-0.5b\"",
            "\"tokens\":16",
            "\"dtype\":\"bfloat16\"",
            "\"shape\":[24,2,16,2,64]",
            "\"codec\":\"raw\"",
            "\"checksum\":\"xxh3-64:",
        ] {
            assert!(text.contains(needle), "{needle} missing from {text}");
        }
    }

    #[test]
    fn typed_errors() {
        let (ns, hash, payload) = sample();
        let header = Header::for_block(&ns, &hash, &payload);
        let value = encode(&header, &payload);
        let head_len = header.encode().len();

        let mut flipped = value.to_vec();
        flipped[head_len + 1000] ^= 1;
        assert!(matches!(
            decode(flipped.into()),
            Err(CodecError::ChecksumMismatch { .. })
        ));
        assert!(matches!(
            decode(value.slice(..value.len() - 1)),
            Err(CodecError::Truncated { .. })
        ));
        assert!(matches!(
            decode(value.slice(..100)),
            Err(CodecError::Truncated { .. })
        ));
        let mut longer = value.to_vec();
        longer.push(0);
        assert!(matches!(
            decode(longer.into()),
            Err(CodecError::Oversized { what: "value", .. })
        ));
        let mut v2 = value.to_vec();
        v2[8] = b'2';
        assert!(matches!(
            decode(v2.into()),
            Err(CodecError::UnsupportedVersion(v)) if v == "2"
        ));
        assert_eq!(
            decode(Bytes::from_static(b"hello world, not a block")),
            Err(CodecError::BadMagic)
        );
        let huge = b"KVSHELF/1 999936\n".to_vec();
        assert!(matches!(
            decode(huge.into()),
            Err(CodecError::Oversized { what: "header", .. })
        ));
        let mut bad_json = value.to_vec();
        bad_json[PREAMBLE_LEN] = b'[';
        assert!(matches!(
            decode(bad_json.into()),
            Err(CodecError::MalformedHeader(_))
        ));
    }

    #[test]
    fn dtype_aliases_are_refused_in_headers() {
        // Found by the fuzzer: a 4096-byte header with the alias "fp8" decoded, but
        // re-encoded with the canonical name it was 4160 bytes, which decode refuses.
        let (ns, hash, payload) = sample();
        let value = encode(&Header::for_block(&ns, &hash, &payload), &payload).to_vec();
        let text = String::from_utf8(value[..PREAMBLE_LEN + 300].to_vec()).unwrap_or_default();
        assert!(text.contains("\"dtype\":\"bfloat16\""));
        let mut aliased = value.clone();
        let at = value
            .windows(10)
            .position(|w| w == b"\"bfloat16\"")
            .unwrap();
        aliased[at..at + 10].copy_from_slice(b"\"bf16\"    ");
        assert!(matches!(
            decode(aliased.into()),
            Err(CodecError::MalformedHeader(_))
        ));
    }

    #[test]
    fn check_catches_every_mismatch() {
        let (ns, hash, payload) = sample();
        let header = Header::for_block(&ns, &hash, &payload);
        let field_of = |ns: &Namespace, hash: &BlockHash| match header.check(ns, hash) {
            Err(CodecError::Mismatch { field, .. }) => field,
            other => panic!("expected a mismatch, got {other:?}"),
        };
        let other_hash = PrefixHasher::new(&ns, None).hash_prefix(&[8; 16])[0];
        assert_eq!(field_of(&ns, &other_hash), "block");
        let mut n = ns.clone();
        n.label = "other".into();
        assert_eq!(field_of(&n, &hash), "namespace");
        let mut n = ns.clone();
        n.kv_dtype = Dtype::Float16;
        assert_eq!(field_of(&n, &hash), "dtype");
        let mut n = ns.clone();
        n.layout.num_layers = 12;
        assert_eq!(field_of(&n, &hash), "shape");
        let mut n = ns.clone();
        n.layout.order = "tlkhd".into();
        assert_eq!(field_of(&n, &hash), "order");
        let mut n = ns.clone();
        n.block_size = 32;
        assert_eq!(field_of(&n, &hash), "tokens");
        let mut n = ns.clone();
        n.kv_dtype = Dtype::Float32;
        assert_eq!(field_of(&n, &hash), "dtype");
    }

    #[test]
    fn foreign_chunks_are_bytes_up_to_one_full_chunk() {
        let (mut ns, hash, payload) = sample();
        // kvshelf's own headers do not mention the scheme: they are unchanged.
        let own = Header::for_block(&ns, &hash, &payload).encode();
        assert!(!String::from_utf8_lossy(&own).contains("hash_scheme"));
        ns.hash_scheme = HashScheme::Lmcache;
        let partial = &payload[..1000];
        let value = encode(&Header::for_block(&ns, &hash, partial), partial);
        let text = String::from_utf8_lossy(&value[..512]).into_owned();
        assert!(text.contains(r#""tokens":0,"dtype":"uint8","order":"bytes","shape":[1000]"#));
        assert!(text.contains(r#""hash_scheme":"lmcache""#));
        let block = decode(value).unwrap();
        block.header.check(&ns, &hash).unwrap();
        assert_eq!(block.payload, partial);
        // The same bytes read through a kvshelf-v1 namespace of the same label: a mismatch.
        let mut own_ns = ns.clone();
        own_ns.hash_scheme = HashScheme::KvshelfV1;
        assert!(matches!(
            block.header.check(&own_ns, &hash),
            Err(CodecError::Mismatch {
                field: "hash_scheme",
                ..
            })
        ));
        // Larger than one full chunk of the namespace: refused on read as on write.
        let mut small = ns.clone();
        small.layout.num_layers = 1;
        let big = Header::for_block(&ns, &hash, &payload);
        assert!(matches!(
            big.check(&small, &hash),
            Err(CodecError::Mismatch {
                field: "payload_len",
                ..
            })
        ));
    }

    fn arb_header() -> impl Strategy<Value = (Header, Vec<u8>)> {
        (
            "[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}",
            1u32..4096,
            proptest::sample::select(Dtype::ALL.to_vec()),
            proptest::collection::vec(1u64..64, 5),
            proptest::collection::vec(any::<u8>(), 0..2048),
            any::<[u8; 32]>(),
            any::<bool>(),
        )
            .prop_map(|(label, tokens, dtype, shape, payload, hash, foreign)| {
                let header = Header {
                    namespace: label,
                    tokens,
                    dtype,
                    order: "lkthd".into(),
                    shape,
                    codec: Codec::Raw,
                    payload_len: payload.len() as u64,
                    checksum: checksum(&payload),
                    block: BlockHash(hash),
                    hash_scheme: if foreign {
                        HashScheme::Lmcache
                    } else {
                        HashScheme::KvshelfV1
                    },
                };
                (header, payload)
            })
    }

    /// XXH3-64 (seed 0) reference values (the xxHash project's sanity vectors, also what
    /// `xxhsum -H3` prints), so a change of implementation cannot change stored checksums.
    #[test]
    fn checksums_are_xxh3_64_with_seed_0() {
        assert_eq!(checksum(b""), "xxh3-64:2d06800538d394c2");
        assert_eq!(checksum(b"a"), "xxh3-64:e6c632b61e964e1f");
        assert_eq!(checksum(b"abc"), "xxh3-64:78af5f94892f3950");
    }

    proptest! {
        /// A payload fed to [`PayloadDigest`] in any pieces has the checksum of the whole,
        /// across the sizes where XXH3 changes method (16, 128, 240 bytes, a stripe of 1 KiB).
        #[test]
        fn prop_digest_in_pieces_is_the_checksum(
            payload in prop::collection::vec(any::<u8>(), 0..5000),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(payload.len() + 1)).collect();
            at.sort_unstable();
            let mut d = PayloadDigest::new();
            let mut from = 0;
            for to in at.into_iter().chain([payload.len()]) {
                d.update(&payload[from..to]);
                from = to;
            }
            prop_assert_eq!(checksum_text(d.finish()), checksum(&payload));
        }

        #[test]
        fn prop_round_trip((header, payload) in arb_header()) {
            let value = encode(&header, &payload);
            let block = decode(value).unwrap();
            prop_assert_eq!(block.header, header);
            prop_assert_eq!(&block.payload[..], &payload[..]);
        }

        #[test]
        fn prop_any_single_byte_change_is_caught(
            (header, payload) in arb_header(),
            pos in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let value = encode(&header, &payload).to_vec();
            let head_len = header.encode().len();
            let i = pos.index(value.len());
            let mut bad = value.clone();
            bad[i] ^= 1 << bit;
            if let Ok(block) = decode(bad.into()) {
                // Payload flips are always caught by the checksum. A flip in the header can
                // still parse (a digit of `tokens` changes, say): then the header differs and
                // `Header::check` against the namespace rejects it. The one benign flip is
                // the case of a hex letter in the block hash, which names the same hash.
                prop_assert!(i < head_len);
                let case_flip = value[i].is_ascii_alphabetic() && bit == 5;
                prop_assert!(block.header != header || case_flip);
            }
        }

        #[test]
        fn prop_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode(bytes.into());
        }

        #[test]
        fn prop_decode_never_panics_after_valid_preamble(
            tail in proptest::collection::vec(any::<u8>(), 0..600),
            len in 0usize..1000,
        ) {
            let mut v = format!("KVSHELF/1 {len:06}\n").into_bytes();
            v.extend_from_slice(&tail);
            let _ = decode(v.into());
        }
    }
}
