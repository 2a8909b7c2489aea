//! What must match for KV to be reusable: the namespace identity, its readable label, the
//! KV dtype and the tensor layout of one block.
//!
//! Two workers share blocks only inside one namespace. The identity fields (everything but
//! the label) go into the hash root (see [`crate::hashing`]); the label goes into Redis keys
//! so that an operator can tell namespaces apart with `redis-cli`. The tenant salt is not part
//! of this struct on purpose: it is chosen server-side and must never travel with a request.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// Longest namespace label accepted, in bytes.
pub const MAX_LABEL_LEN: usize = 64;

/// Largest block size accepted, in tokens. LMCache uses 256-token chunks; 4096 leaves room.
pub const MAX_BLOCK_SIZE: u32 = 4096;
/// Largest block payload a namespace may have: a stored value (header + payload) must fit
/// Redis's default `proto-max-bulk-len` (512 MiB), which is also below the codec's 1 GiB
/// payload cap. A larger block would be refused by Redis on every put, or, with a raised
/// limit, stored and then answered as corrupt on every read.
pub const MAX_BLOCK_BYTES: u64 = (512 << 20) - crate::codec::MAX_HEADER_LEN as u64;

/// Element type of the stored K and V tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
#[non_exhaustive]
pub enum Dtype {
    /// IEEE 754 binary32.
    Float32,
    /// IEEE 754 binary16.
    Float16,
    /// bfloat16 (the upper half of a binary32).
    Bfloat16,
    /// 8-bit float, 4 exponent bits, 3 mantissa bits, finite-only (`float8_e4m3fn`).
    Float8E4m3,
    /// 8-bit float, 5 exponent bits, 2 mantissa bits.
    Float8E5m2,
    /// Signed 8-bit integer (quantised KV).
    Int8,
    /// Unsigned 8-bit integer (quantised KV).
    Uint8,
}

impl Dtype {
    /// Every dtype, in a stable order.
    pub const ALL: [Dtype; 7] = [
        Dtype::Float32,
        Dtype::Float16,
        Dtype::Bfloat16,
        Dtype::Float8E4m3,
        Dtype::Float8E5m2,
        Dtype::Int8,
        Dtype::Uint8,
    ];

    /// The canonical name: the one hashed, stored in block headers and shown to operators.
    /// It follows PyTorch's spelling (`torch.bfloat16` → `bfloat16`).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Float32 => "float32",
            Dtype::Float16 => "float16",
            Dtype::Bfloat16 => "bfloat16",
            Dtype::Float8E4m3 => "float8_e4m3fn",
            Dtype::Float8E5m2 => "float8_e5m2",
            Dtype::Int8 => "int8",
            Dtype::Uint8 => "uint8",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::Float32 => 4,
            Dtype::Float16 | Dtype::Bfloat16 => 2,
            Dtype::Float8E4m3 | Dtype::Float8E5m2 | Dtype::Int8 | Dtype::Uint8 => 1,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Dtype {
    type Err = Error;

    /// Accepts the canonical names and the aliases of [`DTYPE_ALIASES`], case-insensitively.
    fn from_str(s: &str) -> Result<Self, Error> {
        let lower = s.to_ascii_lowercase();
        Dtype::ALL
            .into_iter()
            .find(|d| d.name() == lower)
            .or_else(|| {
                DTYPE_ALIASES
                    .iter()
                    .find(|(alias, _)| *alias == lower)
                    .map(|(_, d)| *d)
            })
            .ok_or_else(|| Error::UnknownDtype(s.to_owned()))
    }
}

/// The other names a config file may give a dtype (matched case-insensitively). Only the
/// canonical [`Dtype::name`] is hashed, stored and shown. Listed in `docs/hashing.md` §2.
pub const DTYPE_ALIASES: &[(&str, Dtype)] = &[
    ("f32", Dtype::Float32),
    ("fp32", Dtype::Float32),
    ("f16", Dtype::Float16),
    ("fp16", Dtype::Float16),
    ("half", Dtype::Float16),
    ("bf16", Dtype::Bfloat16),
    ("float8_e4m3", Dtype::Float8E4m3),
    ("fp8_e4m3", Dtype::Float8E4m3),
    ("e4m3", Dtype::Float8E4m3),
    ("fp8", Dtype::Float8E4m3),
    ("fp8_e5m2", Dtype::Float8E5m2),
    ("e5m2", Dtype::Float8E5m2),
    ("i8", Dtype::Int8),
    ("u8", Dtype::Uint8),
];

impl TryFrom<String> for Dtype {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

impl From<Dtype> for String {
    fn from(d: Dtype) -> String {
        d.name().to_owned()
    }
}

/// Whose hashes a namespace's keys carry, and so who owns its chunking.
///
/// `kvshelf-v1`: kvshelf computes the block hashes (`docs/hashing.md`) over full blocks of
/// `block_size` tokens, and every payload is exactly one block of the namespace's shape.
/// A foreign scheme (`lmcache`, `vllm`, `sglang`): the engine owns chunking and hashing; kvshelf derives the
/// key hash from the engine's own key (`docs/hashing.md`, "Foreign hashes") and stores its
/// chunks as opaque bytes of any length up to one full chunk of the namespace's layout
/// (`docs/format.md`, "Foreign-hash chunks").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum HashScheme {
    /// kvshelf's chained SHA-256 over token blocks.
    #[default]
    #[serde(rename = "kvshelf-v1")]
    KvshelfV1,
    /// LMCache's chunk keys (`model@kv_rank@group@chunk_hash[@salt]`).
    #[serde(rename = "lmcache")]
    Lmcache,
    /// vLLM's offload keys (block hash and KV cache group), hashed with the identity of
    /// the vLLM instance (`docs/hashing.md` §9).
    #[serde(rename = "vllm")]
    Vllm,
    /// SGLang HiCache page keys, with the instance's storage identity
    /// (`docs/hashing.md` §10, `docs/sglang.md`).
    #[serde(rename = "sglang")]
    Sglang,
}

impl HashScheme {
    /// The name used in configuration and block headers.
    pub fn name(self) -> &'static str {
        match self {
            HashScheme::KvshelfV1 => "kvshelf-v1",
            HashScheme::Lmcache => "lmcache",
            HashScheme::Vllm => "vllm",
            HashScheme::Sglang => "sglang",
        }
    }

    /// Whether kvshelf computes this scheme's hashes itself.
    pub fn is_kvshelf(&self) -> bool {
        *self == HashScheme::KvshelfV1
    }
}

impl fmt::Display for HashScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Shape of the KV cache of one rank: what a block's tensor bytes must look like.
///
/// A block holds, for every layer, the keys and the values of `block_size` tokens for the
/// KV heads this tensor-parallel rank owns. `order` says in which order those five axes are
/// laid out in memory, one letter each: `l` layer, `k` key-or-value (2), `t` token,
/// `h` KV head, `d` head dimension. kvshelf never reorders bytes; it only checks that a
/// block's header carries the same order and shape as the namespace asks for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layout {
    /// Number of transformer layers whose KV is in a block.
    pub num_layers: u32,
    /// Number of KV heads of the whole model (before tensor-parallel sharding).
    pub num_kv_heads: u32,
    /// Dimension of one attention head.
    pub head_dim: u32,
    /// Tensor-parallel world size. Default: 1.
    #[serde(default = "one")]
    pub tp_size: u32,
    /// Tensor-parallel rank whose shard this namespace stores. Default: 0.
    #[serde(default)]
    pub tp_rank: u32,
    /// Memory order of the block tensor, a permutation of `lkthd`. Default: `lkthd`.
    #[serde(default = "default_order")]
    pub order: String,
}

fn one() -> u32 {
    1
}

fn default_order() -> String {
    "lkthd".to_owned()
}

impl Layout {
    /// KV heads held by one rank: heads are split evenly across ranks, or replicated when
    /// there are fewer heads than ranks (as vLLM does for GQA models with large TP).
    pub fn kv_heads_per_rank(&self) -> u32 {
        (self.num_kv_heads / self.tp_size).max(1)
    }

    /// The block tensor's shape for `tokens` tokens, axes in `order`.
    pub fn shape(&self, tokens: u32) -> Vec<u64> {
        self.order
            .bytes()
            .map(|axis| match axis {
                b'l' => u64::from(self.num_layers),
                b'k' => 2,
                b't' => u64::from(tokens),
                b'h' => u64::from(self.kv_heads_per_rank()),
                _ => u64::from(self.head_dim),
            })
            .collect()
    }

    fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::InvalidNamespace(m));
        if self.num_layers == 0 || self.num_kv_heads == 0 || self.head_dim == 0 {
            return bad("num_layers, num_kv_heads and head_dim must be at least 1".into());
        }
        if self.tp_size == 0 || self.tp_rank >= self.tp_size {
            return bad(format!(
                "tp_rank {} must be below tp_size {} (and tp_size at least 1)",
                self.tp_rank, self.tp_size
            ));
        }
        let heads_split = self.num_kv_heads.is_multiple_of(self.tp_size);
        let heads_replicated = self.tp_size.is_multiple_of(self.num_kv_heads);
        if !heads_split && !heads_replicated {
            return bad(format!(
                "{} KV heads cannot be sharded over {} ranks",
                self.num_kv_heads, self.tp_size
            ));
        }
        let mut letters: Vec<u8> = self.order.bytes().collect();
        letters.sort_unstable();
        if letters != b"dhklt" {
            return bad(format!(
                "layout order {:?} must be a permutation of \"lkthd\"",
                self.order
            ));
        }
        Ok(())
    }
}

/// A namespace: the identity that decides whether two workers can share KV, plus the
/// readable label that names it in Redis keys.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    /// Readable name used in keys (`kvshelf:v1:<label>:<hash>`): 1–64 characters from
    /// `A-Z a-z 0-9 . _ -`, starting with a letter or digit. Not hashed.
    pub label: String,
    /// Model id, for example `Qwen/Qwen2.5-0.5B-Instruct`.
    pub model_id: String,
    /// Model revision (a commit hash or tag). Default: empty.
    #[serde(default)]
    pub model_revision: String,
    /// Element type of the KV tensors.
    pub kv_dtype: Dtype,
    /// Shape of one rank's KV cache.
    pub layout: Layout,
    /// Tokens per block. Default: 16 (vLLM's block size).
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// LoRA adapter id whose KV this is; `None` for the base model. Default: none.
    #[serde(default)]
    pub lora_adapter: Option<String>,
    /// Time to live of this namespace's blocks, overriding the store's. Not hashed: it says
    /// how long blocks are kept, not what they are. Default: none (the store's TTL).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl: Option<std::time::Duration>,
    /// Most payload bytes of this namespace that may be pinned at once (counted in Redis,
    /// across every sidecar), overriding `[server] max_pinned_bytes`. Not hashed. Default:
    /// none (the server's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pinned_bytes: Option<u64>,
    /// Whose hashes this namespace's keys carry (see [`HashScheme`]). Not hashed: a foreign
    /// scheme's hashes are the engine's. Default: `kvshelf-v1`.
    #[serde(default, skip_serializing_if = "HashScheme::is_kvshelf")]
    pub hash_scheme: HashScheme,
}

fn default_block_size() -> u32 {
    16
}

impl Namespace {
    /// Checks every field: label charset and length, a block size in `1..=4096`, a
    /// consistent layout. Everything that takes a namespace from outside calls this first.
    pub fn validate(&self) -> Result<(), Error> {
        validate_label(&self.label)?;
        if self.model_id.is_empty() {
            return Err(Error::InvalidNamespace("model_id must not be empty".into()));
        }
        if self.block_size == 0 || self.block_size > MAX_BLOCK_SIZE {
            return Err(Error::InvalidNamespace(format!(
                "block_size {} must be in 1..={MAX_BLOCK_SIZE}",
                self.block_size
            )));
        }
        self.layout.validate()?;
        let bytes = self
            .block_shape()
            .iter()
            .try_fold(self.kv_dtype.size() as u64, |n, d| n.checked_mul(*d));
        match bytes {
            Some(b) if b <= MAX_BLOCK_BYTES => Ok(()),
            _ => Err(Error::InvalidNamespace(format!(
                "a block of {} would be {} bytes; the most is {MAX_BLOCK_BYTES} (a stored \
                 value must fit Redis's default proto-max-bulk-len of 512 MiB): use a \
                 smaller block_size",
                self.label,
                bytes.map_or("more than 2^64".to_string(), |b| b.to_string()),
            ))),
        }
    }

    /// The shape of one full block's tensor, axes in the layout's order.
    pub fn block_shape(&self) -> Vec<u64> {
        self.layout.shape(self.block_size)
    }

    /// Exact byte length of one full block's tensor payload; for a foreign hash scheme,
    /// the largest chunk accepted.
    pub fn block_bytes(&self) -> u64 {
        self.block_shape().iter().product::<u64>() * self.kv_dtype.size() as u64
    }

    /// Whether `len` bytes is a payload this namespace stores: exactly one block for
    /// `kvshelf-v1`; 1 to [`block_bytes`](Self::block_bytes) bytes for a foreign scheme,
    /// whose engine owns chunking (partial chunks included).
    pub fn accepts_payload_len(&self, len: u64) -> bool {
        if self.hash_scheme.is_kvshelf() {
            len == self.block_bytes()
        } else {
            len >= 1 && len <= self.block_bytes()
        }
    }
}

/// Checks a namespace label: 1–64 bytes of `[A-Za-z0-9._-]`, the first a letter or digit.
///
/// The charset keeps labels safe inside a Redis key (no `:` separator) and inside a `SCAN
/// MATCH` pattern (no `*`, `?`, `[` or `\`), so purging one namespace can never match another.
pub fn validate_label(label: &str) -> Result<(), Error> {
    let ok_len = !label.is_empty() && label.len() <= MAX_LABEL_LEN;
    let ok_first = label
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric());
    let ok_chars = label
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok_len && ok_first && ok_chars {
        Ok(())
    } else {
        Err(Error::InvalidNamespace(format!(
            "label {label:?} must be 1-{MAX_LABEL_LEN} characters of A-Z a-z 0-9 . _ - \
             starting with a letter or digit"
        )))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn qwen() -> Namespace {
        Namespace {
            label: "qwen2.5-0.5b".into(),
            model_id: "Qwen/Qwen2.5-0.5B-Instruct".into(),
            model_revision: "7ae557604adf67be50417f59c2c2f167def9a775".into(),
            kv_dtype: Dtype::Bfloat16,
            layout: Layout {
                num_layers: 24,
                num_kv_heads: 2,
                head_dim: 64,
                tp_size: 1,
                tp_rank: 0,
                order: "lkthd".into(),
            },
            block_size: 16,
            lora_adapter: None,
            ttl: None,
            max_pinned_bytes: None,
            hash_scheme: HashScheme::KvshelfV1,
        }
    }

    #[test]
    fn a_block_redis_cannot_hold_is_refused() {
        // Llama-3-70B-like: 80 layers, 8 KV heads, 128 dims, bf16: 320 KiB per token.
        let mut ns = qwen();
        ns.layout.num_layers = 80;
        ns.layout.num_kv_heads = 8;
        ns.layout.head_dim = 128;
        ns.block_size = 1024; // 320 MiB: fits
        ns.validate().unwrap();
        ns.block_size = 2048; // 640 MiB: over Redis's 512 MiB bulk limit
        let e = ns.validate().unwrap_err().to_string();
        assert!(e.contains("proto-max-bulk-len"), "{e}");
        // Dimensions whose product overflows are refused, not a panic.
        ns.layout.num_layers = u32::MAX;
        ns.layout.head_dim = u32::MAX;
        ns.block_size = MAX_BLOCK_SIZE;
        assert!(ns.validate().is_err());
    }

    #[test]
    fn qwen_block_is_192_kib() {
        let ns = qwen();
        ns.validate().unwrap();
        assert_eq!(ns.block_shape(), vec![24, 2, 16, 2, 64]);
        assert_eq!(ns.block_bytes(), 192 * 1024);
    }

    #[test]
    fn labels() {
        for ok in ["a", "llama-3.1-8b_bf16", "Q", &"x".repeat(64)] {
            validate_label(ok).unwrap();
        }
        for bad in [
            "",
            "-a",
            ".a",
            "a:b",
            "a*",
            "a?",
            "a[b]",
            "a b",
            "ä",
            &"x".repeat(65),
        ] {
            assert!(matches!(
                validate_label(bad),
                Err(Error::InvalidNamespace(_))
            ));
        }
    }

    #[test]
    fn layout_checks() {
        let mut ns = qwen();
        ns.layout.order = "lkthh".into();
        assert!(ns.validate().is_err());
        ns.layout.order = "tlhkd".into();
        ns.validate().unwrap();
        assert_eq!(ns.block_shape(), vec![16, 24, 2, 2, 64]);
        ns.layout.tp_size = 4; // 2 heads over 4 ranks: replicated, 1 head per rank
        ns.layout.tp_rank = 3;
        ns.validate().unwrap();
        assert_eq!(ns.layout.kv_heads_per_rank(), 1);
        ns.layout.tp_size = 3;
        ns.layout.tp_rank = 0;
        assert!(ns.validate().is_err());
        ns.layout.tp_size = 2;
        ns.layout.tp_rank = 2;
        assert!(ns.validate().is_err());
        ns.layout.tp_rank = 0;
        ns.block_size = 0;
        assert!(ns.validate().is_err());
    }

    #[test]
    fn docs_hashing_md_lists_every_dtype_alias() {
        let doc = include_str!("../docs/hashing.md");
        for d in Dtype::ALL {
            let row = doc
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with(&format!("| `{}` |", d.name())))
                .unwrap_or_else(|| panic!("docs/hashing.md has no row for {d}"));
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            assert_eq!(cells[2], d.size().to_string(), "{row}");
            let documented: Vec<&str> = cells[3]
                .split(',')
                .map(|a| a.trim().trim_matches('`'))
                .filter(|a| !a.is_empty())
                .collect();
            let accepted: Vec<&str> = DTYPE_ALIASES
                .iter()
                .filter(|(_, of)| *of == d)
                .map(|(alias, _)| *alias)
                .collect();
            assert_eq!(documented, accepted, "aliases of {d}");
            for alias in documented {
                assert_eq!(alias.to_uppercase().parse::<Dtype>().unwrap(), d);
            }
        }
    }

    #[test]
    fn hash_scheme_defaults_and_payload_rule() {
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "label": "l", "model_id": "m", "kv_dtype": "bf16",
            "layout": {"num_layers": 2, "num_kv_heads": 1, "head_dim": 4}, "block_size": 4,
        }))
        .unwrap();
        assert_eq!(ns.hash_scheme, HashScheme::KvshelfV1);
        // The default is not written out, so existing namespace JSON stays byte-identical.
        assert!(!serde_json::to_string(&ns).unwrap().contains("hash_scheme"));
        let full = ns.block_bytes();
        assert_eq!(full, 2 * 2 * 4 * 4 * 2);
        assert!(ns.accepts_payload_len(full));
        assert!(!ns.accepts_payload_len(full - 2));
        let lm = Namespace {
            hash_scheme: HashScheme::Lmcache,
            ..ns
        };
        let json = serde_json::to_value(&lm).unwrap();
        assert_eq!(json["hash_scheme"], "lmcache");
        assert_eq!(serde_json::from_value::<Namespace>(json).unwrap(), lm);
        assert!(lm.accepts_payload_len(1));
        assert!(lm.accepts_payload_len(full - 2));
        assert!(lm.accepts_payload_len(full));
        assert!(!lm.accepts_payload_len(0));
        assert!(!lm.accepts_payload_len(full + 1));
        let vllm = Namespace {
            hash_scheme: HashScheme::Vllm,
            ..lm.clone()
        };
        let json = serde_json::to_value(&vllm).unwrap();
        assert_eq!(json["hash_scheme"], "vllm");
        assert_eq!(serde_json::from_value::<Namespace>(json).unwrap(), vllm);
        assert!(vllm.accepts_payload_len(full - 2));
        let sg = Namespace {
            hash_scheme: HashScheme::Sglang,
            ..lm
        };
        let json = serde_json::to_value(&sg).unwrap();
        assert_eq!(json["hash_scheme"], "sglang");
        assert_eq!(serde_json::from_value::<Namespace>(json).unwrap(), sg);
        assert!(sg.accepts_payload_len(full - 2));
        assert!(!sg.accepts_payload_len(full + 1));
    }

    #[test]
    fn dtype_names_round_trip() {
        for d in Dtype::ALL {
            assert_eq!(d.name().parse::<Dtype>().unwrap(), d);
        }
        assert_eq!("BF16".parse::<Dtype>().unwrap(), Dtype::Bfloat16);
        assert!(matches!(
            "int4".parse::<Dtype>(),
            Err(Error::UnknownDtype(_))
        ));
    }
}
