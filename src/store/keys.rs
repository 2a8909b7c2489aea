//! The Redis key schema (docs/format.md): block keys, their `SCAN` pattern, and the pin
//! records.

use crate::hashing::BlockHash;
#[allow(unused_imports)] // the docs link it
use crate::namespace::validate_label;

/// Prefix of every key kvshelf writes; `v1` is the version of the key schema and hash.
pub const KEY_PREFIX: &str = "kvshelf:v1:";

/// The Redis key of a block: `kvshelf:v1:<namespace-label>:<block-hash-hex>`.
pub fn block_key(label: &str, hash: &BlockHash) -> String {
    format!("{KEY_PREFIX}{label}:{hash}")
}

/// The namespace label and block hash of a block's key; `None` for any other key.
pub fn parse_block_key(key: &str) -> Option<(&str, BlockHash)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (label, hash) = rest.rsplit_once(':')?;
    Some((label, hash.parse().ok()?))
}

/// The `SCAN MATCH` pattern of every block of one namespace. Safe because labels cannot
/// hold glob characters (see [`validate_label`]).
pub fn namespace_pattern(label: &str) -> String {
    format!("{KEY_PREFIX}{label}:*")
}

/// Prefix of the keys that record which blocks are pinned, one per namespace.
pub const PINS_PREFIX: &str = "kvshelf:pins:v1:";

/// The Redis key that records the pinned blocks of one namespace,
/// `kvshelf:pins:v1:<namespace-label>`: a hash from block hash (hex) to the Unix time in
/// milliseconds when it was pinned. It counts pinned bytes across every sidecar (count ×
/// `block_bytes`), so that [`RedisStore::pin_within`](super::RedisStore::pin_within) can cap them. It lies outside the
/// block keys (`kvshelf:v1:*`), so no block `SCAN` pattern matches it; it has no TTL, like
/// the blocks it records, and Redis removes it with its last field.
pub fn pins_key(label: &str) -> String {
    format!("{PINS_PREFIX}{label}")
}
