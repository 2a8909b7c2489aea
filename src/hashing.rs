//! Prefix hashing: the namespace root and the chained SHA-256 block hashes.
//!
//! This is a public, language-neutral contract: `docs/hashing.md` specifies every byte that
//! goes into each SHA-256 call, and `tests/vectors/hashing.json` pins it with golden vectors
//! that an independent Python implementation recomputes from the document alone. Changing
//! any byte here is a breaking change of the key schema (bump `v1` in the keys).
//!
//! Why chained: block *i*'s hash covers its parent's, so one 32-byte hash names the whole
//! prefix up to and including block *i*, and a lookup never needs the tokens themselves.
//! Why length-prefixed, domain-separated fields: untagged concatenation lets two different
//! inputs produce the same bytes (vLLM once had a LoRA-name/salt collision that way).

use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

use crate::error::Error;
use crate::namespace::Namespace;

/// Tag that opens every root message (16 bytes, including the final NUL).
pub const ROOT_TAG: &[u8; 16] = b"kvshelf.root.v1\0";
/// Tag that opens every block message. Four bytes keep a 16-token block's message at 108
/// bytes, which SHA-256 digests in two compressions instead of three.
pub const BLOCK_TAG: &[u8; 4] = b"KVB1";

/// A 32-byte SHA-256 digest naming a namespace root or a prefix of whole blocks.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub [u8; 32]);

impl BlockHash {
    /// Lower-case hex, 64 characters: the form used in Redis keys and in every API.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 64];
        hex::encode_to_slice(self.0, &mut buf).expect("64 bytes hold 32 in hex");
        f.write_str(std::str::from_utf8(&buf).expect("hex is ascii"))
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockHash({self})")
    }
}

impl FromStr for BlockHash {
    type Err = Error;

    /// Parses 64 hex digits (either case).
    fn from_str(s: &str) -> Result<Self, Error> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|_| Error::InvalidInput(format!("block hash {s:?} is not 64 hex digits")))?;
        Ok(BlockHash(out))
    }
}

impl serde::Serialize for BlockHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for BlockHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Hashes token prefixes of one namespace (and one tenant salt) into block hashes.
///
/// Cheap to clone; compute it once per namespace and tenant, not per request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefixHasher {
    root: BlockHash,
    block_size: u32,
}

impl PrefixHasher {
    /// The hasher of `ns` for a tenant `salt` (`None`: no tenant isolation).
    pub fn new(ns: &Namespace, salt: Option<&[u8]>) -> Self {
        PrefixHasher {
            root: namespace_root(ns, salt),
            block_size: ns.block_size,
        }
    }

    /// The namespace root: the parent of block 0.
    pub fn root(&self) -> BlockHash {
        self.root
    }

    /// Tokens per block.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Hashes of every full block of `tokens`; a partial last block is never hashed.
    pub fn hash_prefix(&self, tokens: &[u32]) -> Vec<BlockHash> {
        let mut buf = Vec::with_capacity(self.message_capacity());
        let mut parent = self.root;
        tokens
            .chunks_exact(self.block_size as usize)
            .map(|block| {
                parent = block_hash_into(&mut buf, &parent, block, &[]);
                parent
            })
            .collect()
    }

    /// Like [`hash_prefix`](Self::hash_prefix), with extra keys mixed into some blocks
    /// (for example the content hash of an image whose placeholder tokens fall in that
    /// block). `extras[i]` belongs to block `i`; blocks past `extras.len()` have none.
    pub fn hash_prefix_with_extras<E: AsRef<[u8]>>(
        &self,
        tokens: &[u32],
        extras: &[Vec<E>],
    ) -> Result<Vec<BlockHash>, Error> {
        let full_blocks = tokens.len() / self.block_size as usize;
        if extras.len() > full_blocks {
            return Err(Error::InvalidInput(format!(
                "extra keys given for {} blocks but the tokens fill only {full_blocks}",
                extras.len()
            )));
        }
        let mut buf = Vec::with_capacity(self.message_capacity());
        let mut parent = self.root;
        let mut parts: Vec<&[u8]> = Vec::new();
        Ok(tokens
            .chunks_exact(self.block_size as usize)
            .enumerate()
            .map(|(i, block)| {
                parts.clear();
                if let Some(e) = extras.get(i) {
                    parts.extend(e.iter().map(AsRef::as_ref));
                }
                parent = block_hash_into(&mut buf, &parent, block, &parts);
                parent
            })
            .collect())
    }

    /// The hash of one block that follows `parent`, for workers that hash incrementally as
    /// their sequence grows. `block` must hold exactly `block_size` tokens.
    pub fn next(&self, parent: &BlockHash, block: &[u32], extras: &[&[u8]]) -> BlockHash {
        assert_eq!(
            block.len(),
            self.block_size as usize,
            "a block is block_size tokens"
        );
        block_hash_into(&mut Vec::new(), parent, block, extras)
    }

    fn message_capacity(&self) -> usize {
        BLOCK_TAG.len() + 32 + 4 + 4 * self.block_size as usize + 4
    }
}

/// The namespace root of `ns` with an optional tenant `salt` (see `docs/hashing.md` §2).
pub fn namespace_root(ns: &Namespace, salt: Option<&[u8]>) -> BlockHash {
    let mut m = Vec::with_capacity(512);
    m.extend_from_slice(ROOT_TAG);
    let l = &ns.layout;
    field(&mut m, "model_id", ns.model_id.as_bytes());
    field(&mut m, "model_revision", ns.model_revision.as_bytes());
    field(&mut m, "kv_dtype", ns.kv_dtype.name().as_bytes());
    field(&mut m, "num_layers", &l.num_layers.to_le_bytes());
    field(&mut m, "num_kv_heads", &l.num_kv_heads.to_le_bytes());
    field(&mut m, "head_dim", &l.head_dim.to_le_bytes());
    field(&mut m, "tp_size", &l.tp_size.to_le_bytes());
    field(&mut m, "tp_rank", &l.tp_rank.to_le_bytes());
    field(&mut m, "layout_order", l.order.as_bytes());
    field(&mut m, "block_size", &ns.block_size.to_le_bytes());
    field(
        &mut m,
        "lora_adapter",
        &optional(ns.lora_adapter.as_deref().map(str::as_bytes)),
    );
    field(&mut m, "salt", &optional(salt));
    BlockHash(Sha256::digest(&m).into())
}

/// `u32le(len(name)) || name || u32le(len(value)) || value`.
fn field(m: &mut Vec<u8>, name: &str, value: &[u8]) {
    put_bytes(m, name.as_bytes());
    put_bytes(m, value);
}

/// Absent: no bytes. Present: `0x01` then the content, so "absent" and "empty" differ.
fn optional(v: Option<&[u8]>) -> Vec<u8> {
    match v {
        None => Vec::new(),
        Some(b) => [&[1u8][..], b].concat(),
    }
}

/// Tag that opens the message hashing an LMCache key (16 bytes, including the final NUL).
pub const LMCACHE_TAG: &[u8; 16] = b"kvshelf.lmcache\0";

/// Longest LMCache key accepted, in bytes (LMCache caps its salt at 128 bytes; model ids
/// are short).
pub const MAX_FOREIGN_KEY_LEN: usize = 1024;

/// The block hash under which kvshelf stores the LMCache chunk whose key is `key`
/// (`docs/hashing.md` §8): `SHA256("kvshelf.lmcache\0" || str(key))`.
///
/// LMCache owns chunking and hashing; its key names everything that distinguishes a chunk's
/// KV — model, rank (or world size and worker id), object group, chunk hash, dtype, salt —
/// so hashing the whole key keeps all of it in the Redis key while no salt appears there.
/// Both of LMCache's key forms are accepted as they are: the distributed one
/// (`model@{kv_rank:08x}@{group:x}@{chunk_hash_hex}[@salt]`) and the in-process
/// `CacheEngineKey` string (`model@world_size@worker_id@chunk_hash_hex@dtype[@tags]`).
/// A key must have at least four `@`-separated fields, none empty, no NUL, and at most
/// [`MAX_FOREIGN_KEY_LEN`] bytes.
pub fn lmcache_key_hash(key: &str) -> Result<BlockHash, Error> {
    let fields = key.split('@').count();
    if key.len() > MAX_FOREIGN_KEY_LEN
        || fields < 4
        || key.split('@').any(str::is_empty)
        || key.contains('\0')
    {
        return Err(Error::InvalidInput(format!(
            "LMCache key {:?} is not 4 or more non-empty '@'-separated fields of at most \
             {MAX_FOREIGN_KEY_LEN} bytes",
            key.chars().take(80).collect::<String>()
        )));
    }
    let mut m = Vec::with_capacity(LMCACHE_TAG.len() + 4 + key.len());
    m.extend_from_slice(LMCACHE_TAG);
    put_bytes(&mut m, key.as_bytes());
    Ok(BlockHash(Sha256::digest(&m).into()))
}

/// Tag that opens the message of a vLLM instance's identity (16 bytes, with the final NUL).
pub const VLLM_IDENTITY_TAG: &[u8; 16] = b"kvshelf.vllm.id\0";

/// Tag that opens the message hashing a vLLM offload key (16 bytes, with the final NUL).
pub const VLLM_TAG: &[u8; 16] = b"kvshelf.vllm.v1\0";

/// What must match for two vLLM instances to share offloaded KV (`docs/hashing.md` §9):
/// the fields of vLLM's offloading configuration that decide what a chunk's bytes are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VllmIdentity {
    /// The served model (`--model`, vLLM's `model_config.model`).
    pub model: String,
    /// The KV cache dtype as vLLM names it, without a `torch.` prefix (`bfloat16`).
    pub kv_dtype: String,
    /// Tokens per vLLM block hash.
    pub tokens_per_hash: u32,
    /// vLLM blocks coalesced into one offloaded chunk.
    pub blocks_per_chunk: u32,
    /// Bytes of one chunk in the CPU tier (all of the instance's workers' KV for it).
    pub chunk_bytes: u64,
    /// Tensor parallel size.
    pub tp_size: u32,
    /// Pipeline parallel size.
    pub pp_size: u32,
    /// Prefill context parallel size.
    pub pcp_size: u32,
    /// Decode context parallel size.
    pub dcp_size: u32,
    /// The rank whose chunks these are (vLLM's offloading `rank`; 0 on the scheduler).
    pub rank: u32,
    /// Anything else that changes a chunk's bytes (the KV cache groups and their layers,
    /// a canonical layout), as the caller serialises it; empty when none.
    pub extra: String,
}

impl VllmIdentity {
    /// `SHA256("kvshelf.vllm.id\0" || field(...) × 11)`, in the order of `docs/hashing.md`
    /// §9. Refuses an empty model or dtype and zero sizes.
    pub fn digest(&self) -> Result<[u8; 32], Error> {
        if self.model.is_empty() || self.kv_dtype.is_empty() {
            return Err(Error::InvalidInput(
                "a vLLM identity needs its model and kv_dtype".into(),
            ));
        }
        let sizes = [
            self.tokens_per_hash,
            self.blocks_per_chunk,
            self.tp_size,
            self.pp_size,
            self.pcp_size,
            self.dcp_size,
        ];
        if sizes.contains(&0) || self.chunk_bytes == 0 {
            return Err(Error::InvalidInput(
                "a vLLM identity's sizes (tokens_per_hash, blocks_per_chunk, chunk_bytes, \
                 tp/pp/pcp/dcp) are at least 1"
                    .into(),
            ));
        }
        let mut m = Vec::with_capacity(256 + self.model.len() + self.extra.len());
        m.extend_from_slice(VLLM_IDENTITY_TAG);
        field(&mut m, "model", self.model.as_bytes());
        field(&mut m, "kv_dtype", self.kv_dtype.as_bytes());
        field(
            &mut m,
            "tokens_per_hash",
            &self.tokens_per_hash.to_le_bytes(),
        );
        field(
            &mut m,
            "blocks_per_chunk",
            &self.blocks_per_chunk.to_le_bytes(),
        );
        field(&mut m, "chunk_bytes", &self.chunk_bytes.to_le_bytes());
        field(&mut m, "tp_size", &self.tp_size.to_le_bytes());
        field(&mut m, "pp_size", &self.pp_size.to_le_bytes());
        field(&mut m, "pcp_size", &self.pcp_size.to_le_bytes());
        field(&mut m, "dcp_size", &self.dcp_size.to_le_bytes());
        field(&mut m, "rank", &self.rank.to_le_bytes());
        field(&mut m, "extra", self.extra.as_bytes());
        Ok(Sha256::digest(&m).into())
    }
}

/// Shortest and longest vLLM offload key accepted: a block hash of at least one byte and
/// vLLM's 4-byte group index, at most [`MAX_FOREIGN_KEY_LEN`] bytes in all.
const VLLM_KEY_LEN: std::ops::RangeInclusive<usize> = 5..=MAX_FOREIGN_KEY_LEN;

/// The block hash under which kvshelf stores the vLLM chunk whose offload key is `key`, for
/// the instance whose [`VllmIdentity::digest`] is `identity` (`docs/hashing.md` §9):
/// `SHA256("kvshelf.vllm.v1\0" || identity || bytes(key))`.
///
/// vLLM's offload key is its block hash followed by the KV cache group index (4 bytes, big
/// endian); it says which tokens, not whose KV: the identity adds the model, dtype, block
/// geometry, parallelism and rank, so instances that differ in any of them never share a
/// chunk, and instances that agree on all of them do.
pub fn vllm_key_hash(identity: &[u8; 32], key: &[u8]) -> Result<BlockHash, Error> {
    if !VLLM_KEY_LEN.contains(&key.len()) {
        return Err(Error::InvalidInput(format!(
            "a vLLM offload key is 5 to {MAX_FOREIGN_KEY_LEN} bytes (block hash and 4-byte \
             group index), got {}",
            key.len()
        )));
    }
    let mut m = Vec::with_capacity(VLLM_TAG.len() + 32 + 4 + key.len());
    m.extend_from_slice(VLLM_TAG);
    m.extend_from_slice(identity);
    put_bytes(&mut m, key);
    Ok(BlockHash(Sha256::digest(&m).into()))
}

/// Tag that opens the message hashing an SGLang HiCache page key (16 bytes: the 14 ASCII
/// characters `kvshelf.sglang` and two NUL bytes).
pub const SGLANG_TAG: &[u8; 16] = b"kvshelf.sglang\0\0";

/// The block hash under which kvshelf stores part `part` of the SGLang HiCache page whose
/// key is `key`, for the instance whose storage identity is `identity` (`docs/hashing.md`
/// §10): `SHA256("kvshelf.sglang\0\0" || str(identity) || str(key) || u32(part))`.
///
/// SGLang owns paging and its page keys (a chained hash of the page's tokens); the key
/// names no model, dtype, layout or rank, so `identity` — a text the caller builds as §10
/// specifies (model, page size, KV dtype, host layout, MLA, ranks) — is hashed with it.
/// A page that SGLang's host pool lays out as several memory regions is stored as one value
/// per region, `part` 0, 1, … in the pool's own order. `identity` and `key` must be
/// non-empty, free of NUL and at most [`MAX_FOREIGN_KEY_LEN`] bytes each.
pub fn sglang_key_hash(identity: &str, key: &str, part: u32) -> Result<BlockHash, Error> {
    SglangKeyHasher::new(identity)?.hash(key, part)
}

/// [`sglang_key_hash`] for many keys of one identity: the identity's part of the message
/// is hashed once, and each key continues from that state (the same digests).
#[derive(Clone)]
pub struct SglangKeyHasher {
    after_identity: Sha256,
}

impl SglangKeyHasher {
    /// The hasher of `identity` (1 to [`MAX_FOREIGN_KEY_LEN`] bytes without NUL).
    pub fn new(identity: &str) -> Result<Self, Error> {
        check_sglang_text("identity", identity)?;
        let mut h = Sha256::new();
        h.update(SGLANG_TAG);
        h.update(len_u32(identity.len()).to_le_bytes());
        h.update(identity.as_bytes());
        Ok(SglangKeyHasher { after_identity: h })
    }

    /// The block hash of part `part` of the page whose SGLang key is `key`.
    pub fn hash(&self, key: &str, part: u32) -> Result<BlockHash, Error> {
        check_sglang_text("page key", key)?;
        let mut h = self.after_identity.clone();
        h.update(len_u32(key.len()).to_le_bytes());
        h.update(key.as_bytes());
        h.update(part.to_le_bytes());
        Ok(BlockHash(h.finalize().into()))
    }
}

fn check_sglang_text(what: &str, s: &str) -> Result<(), Error> {
    if s.is_empty() || s.len() > MAX_FOREIGN_KEY_LEN || s.contains('\0') {
        return Err(Error::InvalidInput(format!(
            "SGLang {what} {:?} is not 1 to {MAX_FOREIGN_KEY_LEN} bytes without NUL",
            s.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}

fn put_bytes(m: &mut Vec<u8>, b: &[u8]) {
    m.extend_from_slice(&len_u32(b.len()).to_le_bytes());
    m.extend_from_slice(b);
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).expect("a hashed field is shorter than 4 GiB")
}

/// `BLOCK_TAG || parent || u32le(n) || tokens as u32le || u32le(k) || k × (u32le(len) || extra)`.
fn block_hash_into(
    buf: &mut Vec<u8>,
    parent: &BlockHash,
    block: &[u32],
    extras: &[&[u8]],
) -> BlockHash {
    buf.clear();
    buf.extend_from_slice(BLOCK_TAG);
    buf.extend_from_slice(&parent.0);
    buf.extend_from_slice(&len_u32(block.len()).to_le_bytes());
    // Size once, then fill: per-token pushes would check capacity 4 bytes at a time.
    let start = buf.len();
    buf.resize(start + 4 * block.len(), 0);
    for (dst, t) in buf[start..].chunks_exact_mut(4).zip(block) {
        dst.copy_from_slice(&t.to_le_bytes());
    }
    buf.extend_from_slice(&len_u32(extras.len()).to_le_bytes());
    for e in extras {
        put_bytes(buf, e);
    }
    BlockHash(sha256_padded_in_place(buf))
}

/// SHA-256 of `buf`, computed by padding `buf` in place and running the compression
/// function over it in one call. Same digest as `Sha256::digest`; it skips the streaming
/// hasher's block buffering, which is a measurable share of the cost for 108-byte messages
/// (`cargo bench --bench hashing`). `buf` holds the padding afterwards.
fn sha256_padded_in_place(buf: &mut Vec<u8>) -> [u8; 32] {
    const IV: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let bit_len = (buf.len() as u64) * 8;
    buf.push(0x80);
    let padded = (buf.len() + 8).div_ceil(64) * 64;
    buf.resize(padded - 8, 0);
    buf.extend_from_slice(&bit_len.to_be_bytes());
    let (blocks, rest) = buf.as_chunks::<64>();
    debug_assert!(rest.is_empty());
    let mut state = IV;
    sha2::block_api::compress256(&mut state, blocks);
    let mut out = [0u8; 32];
    for (dst, word) in out.chunks_exact_mut(4).zip(state) {
        dst.copy_from_slice(&word.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::namespace::tests::qwen;

    /// Pinned here and in `docs/hashing.md` §10 (and from Python by `python/tests`).
    #[test]
    fn sglang_keys_hash_as_documented() {
        let identity = "model=meta-llama/Meta-Llama-3-8B\npage_size=64\nkv_dtype=bfloat16\n\
                        layout=page_first\nmla=0\ntp=0/1\npp=0/1\ncp=0/1\ndcp=0/1\nparts=2\n\
                        format=";
        let key = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let mut m = b"kvshelf.sglang\0\0".to_vec();
        for s in [identity, key] {
            m.extend_from_slice(&(s.len() as u32).to_le_bytes());
            m.extend_from_slice(s.as_bytes());
        }
        m.extend_from_slice(&1u32.to_le_bytes());
        let want = BlockHash(Sha256::digest(&m).into());
        assert_eq!(sglang_key_hash(identity, key, 1).unwrap(), want);
        assert_eq!(want.to_hex(), SGLANG_GOLDEN);
        // Identity, key and part are each in the hash.
        let hashes = [
            sglang_key_hash(identity, key, 0).unwrap(),
            want,
            sglang_key_hash(&identity.replace("tp=0/1", "tp=1/2"), key, 1).unwrap(),
            sglang_key_hash(identity, &key.replace('0', "1"), 1).unwrap(),
            // Moving a byte between identity and key changes the hash (both length-prefixed).
            sglang_key_hash(&identity[..identity.len() - 1], &format!("={key}"), 1).unwrap(),
        ];
        for (i, a) in hashes.iter().enumerate() {
            for b in &hashes[i + 1..] {
                assert_ne!(a, b);
            }
        }
        let long = "k".repeat(MAX_FOREIGN_KEY_LEN + 1);
        for (id, k) in [
            ("", key),
            (identity, ""),
            ("a\0b", key),
            (identity, &long[..]),
        ] {
            assert!(
                matches!(sglang_key_hash(id, k, 0), Err(Error::InvalidInput(_))),
                "{id:?} {k:?}"
            );
        }
    }

    const SGLANG_GOLDEN: &str = "6d3afb600c17c0bf7779b065ba6121d4316c13bcb49fa779462c7329d7300c78";

    /// Pinned here and in `docs/hashing.md` §8 (and from Python by `python/tests`).
    #[test]
    fn lmcache_keys_hash_as_documented() {
        let key = "Qwen/Qwen3-8B@00000000@0@\
                   0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let mut m = b"kvshelf.lmcache\0".to_vec();
        m.extend_from_slice(&(key.len() as u32).to_le_bytes());
        m.extend_from_slice(key.as_bytes());
        let want = BlockHash(Sha256::digest(&m).into());
        assert_eq!(lmcache_key_hash(key).unwrap(), want);
        assert_eq!(
            want.to_hex(),
            "35ab7b8c4c367b84f173de2259b439afcf7318d9c57963b2eee6988a9ab69725"
        );
        // Everything in the key is in the hash: rank, group and salt each change it.
        let other_rank = key.replacen("@00000000@", "@00000001@", 1);
        let other_group = key.replacen("@0@", "@1@", 1);
        let salted = format!("{key}@tenant-a");
        let hashes = [
            key,
            &other_rank,
            &other_group,
            &salted,
            &format!("{key}@tenant-b"),
        ]
        .map(|k| lmcache_key_hash(k).unwrap());
        for (i, a) in hashes.iter().enumerate() {
            for b in &hashes[i + 1..] {
                assert_ne!(a, b);
            }
        }
        // The in-process CacheEngineKey form is accepted as it is.
        lmcache_key_hash("m@1@0@abcd@bfloat16").unwrap();
        for bad in [
            "",
            "a@b@c",
            "a@@b@c",
            "a@b@c@",
            "a@b\0@c@d",
            &"x@".repeat(600),
        ] {
            assert!(
                matches!(lmcache_key_hash(bad), Err(Error::InvalidInput(_))),
                "{bad:?}"
            );
        }
    }

    /// The identity of the golden value of `docs/hashing.md` §9.
    fn qwen3_identity() -> VllmIdentity {
        VllmIdentity {
            model: "Qwen/Qwen3-8B".into(),
            kv_dtype: "bfloat16".into(),
            tokens_per_hash: 16,
            blocks_per_chunk: 1,
            chunk_bytes: 2_359_296,
            tp_size: 1,
            pp_size: 1,
            pcp_size: 1,
            dcp_size: 1,
            rank: 0,
            extra: String::new(),
        }
    }

    /// Pinned here and in `docs/hashing.md` §9 (and from Python by `python/tests`).
    #[test]
    fn vllm_keys_hash_as_documented() {
        let id = qwen3_identity();
        let root = id.digest().unwrap();
        assert_eq!(
            BlockHash(root).to_hex(),
            "86869979874a406e845ef079205a22f7bd2680c52cc3deb4d4bcca84103c8247"
        );
        let key: Vec<u8> = (0u8..32).chain([0, 0, 0, 0]).collect();
        assert_eq!(
            vllm_key_hash(&root, &key).unwrap().to_hex(),
            "e3d29e2ca62d7a9ad29af0184612c2373107c6f81d9a92b02f8daecc52adfb64"
        );
        // Every identity field is in the hash: instances that differ never share a chunk.
        let variants = [
            VllmIdentity {
                model: "Qwen/Qwen3-4B".into(),
                ..qwen3_identity()
            },
            VllmIdentity {
                kv_dtype: "float8_e4m3fn".into(),
                ..qwen3_identity()
            },
            VllmIdentity {
                tokens_per_hash: 32,
                ..qwen3_identity()
            },
            VllmIdentity {
                blocks_per_chunk: 2,
                ..qwen3_identity()
            },
            VllmIdentity {
                chunk_bytes: 1_179_648,
                ..qwen3_identity()
            },
            VllmIdentity {
                tp_size: 2,
                ..qwen3_identity()
            },
            VllmIdentity {
                pp_size: 2,
                ..qwen3_identity()
            },
            VllmIdentity {
                pcp_size: 2,
                ..qwen3_identity()
            },
            VllmIdentity {
                dcp_size: 2,
                ..qwen3_identity()
            },
            VllmIdentity {
                rank: 1,
                ..qwen3_identity()
            },
            VllmIdentity {
                extra: "groups".into(),
                ..qwen3_identity()
            },
        ];
        let mut seen = std::collections::HashSet::from([vllm_key_hash(&root, &key).unwrap()]);
        for v in &variants {
            assert!(
                seen.insert(vllm_key_hash(&v.digest().unwrap(), &key).unwrap()),
                "{v:?}"
            );
        }
        // The group index is part of the key.
        let mut group1 = key.clone();
        group1[35] = 1;
        assert!(seen.insert(vllm_key_hash(&root, &group1).unwrap()));
        for bad in [
            &[][..],
            &[1, 2, 3, 4][..],
            &[0; MAX_FOREIGN_KEY_LEN + 1][..],
        ] {
            assert!(matches!(
                vllm_key_hash(&root, bad),
                Err(Error::InvalidInput(_))
            ));
        }
        for bad in [
            VllmIdentity {
                model: String::new(),
                ..qwen3_identity()
            },
            VllmIdentity {
                tp_size: 0,
                ..qwen3_identity()
            },
            VllmIdentity {
                chunk_bytes: 0,
                ..qwen3_identity()
            },
        ] {
            assert!(
                matches!(bad.digest(), Err(Error::InvalidInput(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn partial_block_is_not_hashed() {
        let h = PrefixHasher::new(&qwen(), None);
        let tokens: Vec<u32> = (0..47).collect();
        assert_eq!(h.hash_prefix(&tokens).len(), 2);
        assert!(h.hash_prefix(&tokens[..15]).is_empty());
    }

    #[test]
    fn chain_is_prefix_stable_and_incremental() {
        let h = PrefixHasher::new(&qwen(), None);
        let tokens: Vec<u32> = (0..64).map(|i| i * 7919).collect();
        let all = h.hash_prefix(&tokens);
        assert_eq!(h.hash_prefix(&tokens[..32]), all[..2]);
        let mut parent = h.root();
        for (i, block) in tokens.chunks(16).enumerate() {
            parent = h.next(&parent, block, &[]);
            assert_eq!(parent, all[i]);
        }
    }

    #[test]
    fn every_identity_field_and_the_salt_change_the_root() {
        let base = qwen();
        let r = |ns: &Namespace, salt: Option<&[u8]>| namespace_root(ns, salt);
        let root = r(&base, None);
        let mut variants: Vec<Namespace> = Vec::new();
        let mut v = base.clone();
        v.model_id.push('x');
        variants.push(v);
        let mut v = base.clone();
        v.model_revision.push('x');
        variants.push(v);
        let mut v = base.clone();
        v.kv_dtype = crate::Dtype::Float16;
        variants.push(v);
        let mut v = base.clone();
        v.layout.num_layers += 1;
        variants.push(v);
        let mut v = base.clone();
        v.layout.num_kv_heads += 1;
        variants.push(v);
        let mut v = base.clone();
        v.layout.head_dim += 1;
        variants.push(v);
        let mut v = base.clone();
        v.layout.tp_size = 2;
        variants.push(v);
        let mut v = base.clone();
        v.layout.tp_rank = 1;
        variants.push(v);
        let mut v = base.clone();
        v.layout.order = "tlkhd".into();
        variants.push(v);
        let mut v = base.clone();
        v.block_size = 32;
        variants.push(v);
        let mut v = base.clone();
        v.lora_adapter = Some(String::new());
        variants.push(v);
        for v in &variants {
            assert_ne!(r(v, None), root, "{v:?}");
        }
        assert_ne!(r(&base, Some(b"")), root, "empty salt differs from no salt");
        // The label names keys; it is not part of the identity.
        let mut v = base.clone();
        v.label = "other".into();
        assert_eq!(r(&v, None), root);
    }

    #[test]
    fn lora_and_salt_do_not_collide() {
        // The vLLM bug: untagged "lora" + "salt" concatenations that meet in the middle.
        let mut a = qwen();
        a.lora_adapter = Some("ab".into());
        let mut b = qwen();
        b.lora_adapter = Some("a".into());
        assert_ne!(
            namespace_root(&a, Some(b"c")),
            namespace_root(&b, Some(b"bc"))
        );
    }

    #[test]
    fn extras_are_length_prefixed() {
        let h = PrefixHasher::new(&qwen(), None);
        let tokens: Vec<u32> = (0..16).collect();
        let a = h
            .hash_prefix_with_extras(&tokens, &[vec!["ab", "c"]])
            .unwrap();
        let b = h
            .hash_prefix_with_extras(&tokens, &[vec!["a", "bc"]])
            .unwrap();
        let none = h.hash_prefix(&tokens);
        let empty = h
            .hash_prefix_with_extras::<&str>(&tokens, &[vec![]])
            .unwrap();
        assert_ne!(a, b);
        assert_eq!(none, empty);
        assert!(
            h.hash_prefix_with_extras(&tokens, &[vec!["x"], vec!["y"]])
                .is_err()
        );
    }

    #[test]
    fn in_place_sha256_matches_the_streaming_hasher() {
        for len in 0..300 {
            let msg: Vec<u8> = (0..len).map(|i| (i * 37 % 256) as u8).collect();
            let mut buf = msg.clone();
            let want: [u8; 32] = Sha256::digest(&msg).into();
            assert_eq!(sha256_padded_in_place(&mut buf), want, "length {len}");
        }
    }

    #[test]
    fn hex_round_trip() {
        let h = PrefixHasher::new(&qwen(), None).root();
        assert_eq!(h.to_string().parse::<BlockHash>().unwrap(), h);
        assert_eq!(h.to_hex(), h.to_string());
        assert!("zz".parse::<BlockHash>().is_err());
    }
}
