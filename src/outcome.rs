//! Outcomes shared by the store, the sidecar and the sidecar's client: what a put did to
//! each block, and what a purge did.
//!
//! These types depend on nothing else of kvshelf, so that the client (a worker's side of
//! the wire) does not import the store, and the store does not import the sidecar. They
//! are re-exported where they were first defined: `kvshelf::store`, `kvshelf::shelf`
//! and, for [`PutResult`], the crate root.

use serde::{Deserialize, Serialize};

/// What happened to one block of a put: the one put result of the library, the sidecar
/// and the client.
///
/// [`RedisStore::put`](crate::store::RedisStore::put) answers `Stored`, `AlreadyPresent`
/// or `Dropped`, never `Queued`: only the sidecar queues (a put it accepts into its
/// asynchronous queue is answered before it reaches Redis). The variant stays in the one
/// enum rather than a second "sidecar put result" because the sidecar's HTTP and gRPC
/// answers and the client's result carry the store's answers unchanged next to it: one
/// type, one serde form (`"stored"`, `"already_present"`, `"queued"`, `"dropped"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PutResult {
    /// Written, with the namespace's TTL.
    Stored,
    /// Already on the shelf: the first writer's bytes stay (write-once).
    AlreadyPresent,
    /// Accepted into the sidecar's asynchronous queue.
    Queued,
    /// Not confirmed stored: the node that owns the block did not answer, the sidecar's
    /// queue was full, or the backend failed or did not answer in time (counted). A put to
    /// a backend that was merely slow may still land later, which is harmless: puts are
    /// write-once and expire.
    Dropped,
}

/// What a purge did: the blocks it unlinked, and the nodes it could not finish.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeReport {
    /// Blocks unlinked, on every node together.
    pub deleted: u64,
    /// The nodes (Redis Cluster primaries) that failed or did not finish in time: their
    /// blocks of the namespace stay, or some of them do. Empty when the purge is complete.
    pub skipped: Vec<SkippedNode>,
}

/// A node a purge could not finish.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedNode {
    /// `host:port` of the cluster primary (the redacted URL for a single Redis).
    pub node: String,
    /// Blocks it had unlinked before it stopped (included in the report's `deleted`).
    pub deleted: u64,
    /// Why it stopped.
    pub error: String,
}
