//! The Redis store: the key schema, write-once puts with a TTL, batched gets with sliding
//! expiry, one-round-trip lookups, pin/unpin, delete and namespace purge.
//!
//! Redis is the system of record. Every key this module writes has a TTL (`SET … NX PX`),
//! so a `volatile-*` eviction policy can always evict kvshelf's blocks and never touches
//! other data in the same Redis; the only way to keep a block forever is [`RedisStore::pin`].
//! Every read verifies the block (checksum, namespace, layout, hash): a bad block is deleted,
//! counted in `kvshelf_store_corrupt_blocks_total` and reported as a miss.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use serde::{Deserialize, Serialize};

use crate::codec::{self, Block, Header};
use crate::error::Error;
use crate::hashing::BlockHash;
use crate::namespace::{Namespace, validate_label};
use crate::resp::{self, Arg, Reply};

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
/// `block_bytes`), so that [`RedisStore::pin_within`] can cap them. It lies outside the
/// block keys (`kvshelf:v1:*`), so no block `SCAN` pattern matches it; it has no TTL, like
/// the blocks it records, and Redis removes it with its last field.
pub fn pins_key(label: &str) -> String {
    format!("{PINS_PREFIX}{label}")
}

/// How to reach Redis and how long blocks live there.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `redis://[user[:password]@]host[:port][/db]`, or `rediss://` for TLS. With
    /// `cluster`, one or more seed nodes separated by commas. Default: `redis://127.0.0.1:6379`.
    pub url: String,
    /// Talk to a Redis Cluster: keys spread over every slot (no hash tags), commands are
    /// grouped per key and sent to each node concurrently. Default: false.
    pub cluster: bool,
    /// PEM file of the CA certificates to trust for `rediss://`, instead of the system's.
    /// Default: none (the system trust store).
    pub tls_ca_file: Option<PathBuf>,
    /// Time to live of a block after it is put (and after each hit, when `sliding_ttl`).
    /// Default: 1h.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Whether a hit pushes the block's expiry back to a full `ttl`. Pinned blocks stay
    /// pinned. Default: true.
    pub sliding_ttl: bool,
    /// How long to wait for a reply. A 32 MiB value takes tens of milliseconds on loopback,
    /// so redis-rs's 500 ms default would fail big batches on a busy host. Default: 5s.
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    /// How long to wait for a new connection. Default: 1s.
    #[serde(with = "humantime_serde")]
    pub connection_timeout: Duration,
    /// Reconnection attempts (exponential backoff from 100 ms) of the redis-rs connections
    /// (operator commands; on TLS, unix sockets and Cluster, everything) before a command
    /// fails; later commands start reconnecting again. The block data path does not retry a
    /// failed dial: the call fails open and a later call dials again (`connect_rate`).
    /// Default: 6.
    pub reconnect_retries: usize,
    /// How often a command is sent again when the connection dropped under it — on the
    /// block data path, each time on a newly dialled connection. redis-rs's connection
    /// manager reconnects but does not resend the in-flight command; every command kvshelf
    /// sends is idempotent, so resending is safe. Default: 1.
    pub command_retries: u32,
    /// Most connections the block data path (`GET`/`SET`/`EXISTS` of blocks on one Redis
    /// over TCP) opens at once; more concurrent calls wait for one. Bounds what a hung or
    /// slow Redis sees from one process. Default: 64.
    pub max_connections: usize,
    /// New connections per second the block data path may open once a burst of
    /// `max_connections` is spent; a call that needs one beyond that fails open at once.
    /// Every fail-open timeout drops the connection it was using, so without this bound a
    /// brownout would have every request reconnect (and `AUTH`) to the struggling Redis.
    /// 0: no bound. Default: 10.
    pub connect_rate: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: "redis://127.0.0.1:6379".into(),
            cluster: false,
            tls_ca_file: None,
            ttl: Duration::from_secs(3600),
            sliding_ttl: true,
            response_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(1),
            reconnect_retries: 6,
            command_retries: 1,
            max_connections: 64,
            connect_rate: 10,
        }
    }
}

impl StoreConfig {
    /// The URL with any password replaced by `***`, for logs.
    pub fn redacted_url(&self) -> String {
        self.url
            .split(',')
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Every field, with the password of the URL redacted (the config is logged at startup).
impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Destructured, so a new field cannot be left out of the output unnoticed.
        let StoreConfig {
            url: _,
            cluster,
            tls_ca_file,
            ttl,
            sliding_ttl,
            response_timeout,
            connection_timeout,
            reconnect_retries,
            command_retries,
            max_connections,
            connect_rate,
        } = self;
        f.debug_struct("StoreConfig")
            .field("url", &self.redacted_url())
            .field("cluster", cluster)
            .field("tls_ca_file", tls_ca_file)
            .field("ttl", ttl)
            .field("sliding_ttl", sliding_ttl)
            .field("response_timeout", response_timeout)
            .field("connection_timeout", connection_timeout)
            .field("reconnect_retries", reconnect_retries)
            .field("command_retries", command_retries)
            .field("max_connections", max_connections)
            .field("connect_rate", connect_rate)
            .finish()
    }
}

/// `scheme://user:secret@host` → `scheme://user:***@host`, and the `pass=` query parameter
/// of a Unix-socket URL (`redis+unix:///run/redis.sock?pass=secret`) → `pass=***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = redact_query(path);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                "***".to_owned()
            };
            format!("{scheme}://{masked}@{host}{path}")
        }
        None => format!("{scheme}://{authority}{path}"),
    }
}

/// `path?db=1&pass=secret` → `path?db=1&pass=***` (redis-rs reads `pass` for Unix sockets).
fn redact_query(path: &str) -> String {
    let Some((path, query)) = path.split_once('?') else {
        return path.to_owned();
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some(("pass", _)) => "pass=***".to_owned(),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{path}?{}", query.join("&"))
}

/// What a put did with one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PutOutcome {
    /// The block was written, with the namespace's TTL.
    Stored,
    /// The block was already on the shelf; the first writer's bytes stay (write-once).
    AlreadyPresent,
    /// Cluster only: the node that owns this block's slot did not answer; not stored.
    Unavailable,
}

/// What a sidecar did with one block of a put.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PutResult {
    /// Written.
    Stored,
    /// Already on the shelf: the first writer's bytes stay.
    AlreadyPresent,
    /// Accepted into the asynchronous queue.
    Queued,
    /// Not confirmed stored: the queue was full, or the backend failed or did not answer in
    /// time (counted). A put to a backend that was merely slow may still land later, which
    /// is harmless: puts are write-once and expire.
    Dropped,
}

impl From<PutOutcome> for PutResult {
    fn from(o: PutOutcome) -> PutResult {
        match o {
            PutOutcome::Stored => PutResult::Stored,
            PutOutcome::AlreadyPresent => PutResult::AlreadyPresent,
            PutOutcome::Unavailable => PutResult::Dropped,
        }
    }
}

/// What a capped pin did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinOutcome {
    /// The block is pinned (now, or already was). `pinned_bytes`: the namespace's pinned
    /// payload bytes as counted when this pin was recorded, this block included.
    Pinned {
        /// Pinned payload bytes of the namespace.
        pinned_bytes: u64,
    },
    /// No such block; nothing changed.
    Missing,
    /// Refused: pinning one more block would take the namespace's pinned bytes over the
    /// limit. Nothing changed.
    OverLimit {
        /// Pinned payload bytes of the namespace, without this block.
        pinned_bytes: u64,
    },
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

/// A block read from the store, and how long it has left there (`None`: pinned, no TTL).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hit {
    /// The verified block.
    pub block: Block,
    /// Time to live left in the store after this read.
    pub ttl: Option<Duration>,
}

/// A handle to the Redis store. Cheap to clone: clones share one multiplexed connection
/// (one per node on a cluster), which reconnects by itself after Redis restarts.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    /// The lean path for block values (one Redis over plain TCP; `None` otherwise).
    bulk: Option<Arc<resp::Pool>>,
    cfg: Arc<StoreConfig>,
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(Arc<LazyCluster>),
}

/// A cluster connection made on first use, so a store can be created while the cluster
/// is down (fail open at start-up too); once made, it follows slot moves and reconnects.
struct LazyCluster {
    client: ClusterClient,
    conn: tokio::sync::OnceCell<ClusterConnection>,
}

impl LazyCluster {
    async fn get(&self) -> Result<ClusterConnection, Error> {
        Ok(self
            .conn
            .get_or_try_init(|| self.client.get_async_connection())
            .await?
            .clone())
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl RedisStore {
    /// A store for `cfg`. It connects lazily, so it can be created while Redis is down;
    /// the first command (or [`ping`](Self::ping)) connects.
    pub fn new(cfg: StoreConfig) -> Result<Self, Error> {
        let mut bulk = None;
        let conn = if cfg.cluster {
            Conn::Cluster(Arc::new(LazyCluster {
                client: cluster_client_for(&cfg)?,
                conn: tokio::sync::OnceCell::new(),
            }))
        } else {
            let client = client_for(&cfg)?;
            let manager_cfg = ConnectionManagerConfig::new()
                .set_response_timeout(Some(cfg.response_timeout))
                .set_connection_timeout(Some(cfg.connection_timeout))
                .set_number_of_retries(cfg.reconnect_retries)
                .set_max_delay(Duration::from_secs(2));
            if cfg.tls_ca_file.is_none() {
                bulk = resp::Pool::for_url(&cfg)?.map(Arc::new);
            }
            Conn::Single(ConnectionManager::new_lazy_with_config(
                client,
                manager_cfg,
            )?)
        };
        Ok(RedisStore {
            conn,
            bulk,
            cfg: Arc::new(cfg),
        })
    }

    /// Whether this store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }

    /// A store for `cfg` that has checked Redis answers.
    pub async fn connect(cfg: StoreConfig) -> Result<Self, Error> {
        let store = Self::new(cfg)?;
        store.ping().await?;
        Ok(store)
    }

    /// The configuration this store runs with.
    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    /// The TTL of blocks of `ns`: its own, else the store's.
    pub fn ttl_of(&self, ns: &Namespace) -> Duration {
        ns.ttl.unwrap_or(self.cfg.ttl)
    }

    /// Checks that Redis answers — on the data path's connections when the lean path is
    /// on, so that readiness says what fetches and puts will see.
    pub async fn ping(&self) -> Result<(), Error> {
        if let Some(pool) = &self.bulk {
            let mut req = resp::Request::default();
            req.cmd(&[Arg::Small(b"PING")]);
            pool.exec(&req).await?.all()?;
            return Ok(());
        }
        let _: String = self.run(redis::pipe().cmd("PING")).await.map(one)?;
        Ok(())
    }

    /// Puts full blocks of `ns` in one pipeline, write-once (`SET … NX PX ttl`).
    ///
    /// Every payload must be exactly one block of the namespace's shape and dtype; if any is
    /// not, nothing is written. Returns what happened to each block, in order.
    pub async fn put(
        &self,
        ns: &Namespace,
        blocks: &[(BlockHash, Bytes)],
    ) -> Result<Vec<PutOutcome>, Error> {
        ns.validate()?;
        check_payloads(ns, blocks)?;
        if blocks.is_empty() {
            return Ok(Vec::new());
        }
        let ttl_ms = ttl_millis(self.ttl_of(ns));
        if let Some(pool) = &self.bulk {
            let ttl = ttl_ms.to_string();
            let mut req = resp::Request::default();
            for (hash, payload) in blocks {
                let header = Bytes::from(Header::for_block(ns, hash, payload).encode());
                req.cmd(&[
                    Arg::Small(b"SET"),
                    Arg::Small(block_key(&ns.label, hash).as_bytes()),
                    Arg::Parts(&[header, payload.clone()]),
                    Arg::Small(b"NX"),
                    Arg::Small(b"PX"),
                    Arg::Small(ttl.as_bytes()),
                ]);
            }
            let replies = pool.exec(&req).await?.all()?;
            return Ok(replies
                .into_iter()
                .map(|r| match r {
                    Reply::Nil => PutOutcome::AlreadyPresent,
                    _ => PutOutcome::Stored,
                })
                .collect());
        }
        let replies = self
            .per_key(blocks.len(), |i, pipe| {
                let (hash, payload) = &blocks[i];
                let value = codec::encode(&Header::for_block(ns, hash, payload), payload);
                pipe.cmd("SET")
                    .arg(block_key(&ns.label, hash))
                    .arg(&value[..])
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms);
                1
            })
            .await?;
        Ok(replies
            .into_iter()
            .map(|r| match r.as_deref() {
                Ok([redis::Value::Nil]) => PutOutcome::AlreadyPresent,
                Ok(_) => PutOutcome::Stored,
                Err(_) => PutOutcome::Unavailable,
            })
            .collect())
    }

    /// Gets blocks of `ns` by hash in one pipeline; `None` where a block is missing or was
    /// found bad (and deleted). A hit refreshes the TTL when `sliding_ttl` is on, without
    /// unpinning pinned blocks, and reports the TTL the block has left.
    pub async fn get(
        &self,
        ns: &Namespace,
        hashes: &[BlockHash],
    ) -> Result<Vec<Option<Hit>>, Error> {
        ns.validate()?;
        if hashes.is_empty() {
            return Ok(Vec::new());
        }
        let ttl_ms = ttl_millis(self.ttl_of(ns));
        let sliding = self.cfg.sliding_ttl;
        // Per block: what its key holds and its PTTL, or the error of its cluster node.
        let replies: Vec<Result<(Stored, i64), Error>> = match &self.bulk {
            Some(pool) => {
                // The longest value a block of `ns` can be; a longer one is refused from its
                // length prefix, before anything of it is read.
                let max_value = usize::try_from(ns.block_bytes())
                    .unwrap_or(usize::MAX)
                    .saturating_add(codec::MAX_HEADER_LEN);
                let ttl = ttl_ms.to_string();
                let mut req = resp::Request::default();
                for hash in hashes {
                    let key = block_key(&ns.label, hash);
                    req.cmd_bulk(max_value, &[Arg::Small(b"GET"), Arg::Small(key.as_bytes())]);
                    if sliding {
                        // XX: only keys that already have an expiry, so a pinned block
                        // stays pinned.
                        req.cmd(&[
                            Arg::Small(b"PEXPIRE"),
                            Arg::Small(key.as_bytes()),
                            Arg::Small(ttl.as_bytes()),
                            Arg::Small(b"XX"),
                        ]);
                    }
                    req.cmd(&[Arg::Small(b"PTTL"), Arg::Small(key.as_bytes())]);
                }
                let per_block = if sliding { 3 } else { 2 };
                let resp::Replies { replies, oversized } = pool.exec(&req).await?;
                // A server error fails the call (NOPERM, OOM, …), except a key holding
                // another type, which is that block's problem alone.
                if let Some(e) = replies.iter().find_map(|r| match r {
                    Reply::Error(msg) if !is_wrong_type(msg) => Some(resp::server_error(msg)),
                    _ => None,
                }) {
                    return Err(e.into());
                }
                let got = replies.len();
                let mut replies = replies.into_iter();
                (0..hashes.len())
                    .map(|i| {
                        let mut r = replies.by_ref().take(per_block);
                        let stored = match r.next() {
                            Some(Reply::Bulk(v)) => Stored::Value(v),
                            Some(Reply::Error(_)) => Stored::Bad(Bad::WrongType),
                            Some(_) => Stored::Missing,
                            // The connection stopped at an oversized value: this block's,
                            // or (unknown, a miss) an earlier block's.
                            None => match oversized {
                                Some(len) if got == i * per_block => {
                                    Stored::Bad(Bad::Codec(codec::CodecError::Oversized {
                                        what: "value",
                                        len,
                                        max: max_value as u64,
                                    }))
                                }
                                _ => Stored::Missing,
                            },
                        };
                        let pttl = match r.last() {
                            Some(Reply::Int(t)) => t,
                            _ => -2,
                        };
                        Ok((stored, pttl))
                    })
                    .collect()
            }
            None => {
                let per_block = self
                    .per_key(hashes.len(), |i, pipe| {
                        let key = block_key(&ns.label, &hashes[i]);
                        // Errors as values, so that a key holding another type fails only
                        // its own block.
                        pipe.ignore_errors().get(&key);
                        if sliding {
                            // XX: only keys that already have an expiry, so a pinned block
                            // stays pinned.
                            pipe.cmd("PEXPIRE").arg(&key).arg(ttl_ms).arg("XX").ignore();
                        }
                        pipe.cmd("PTTL").arg(&key);
                        2
                    })
                    .await?
                    .into_iter()
                    .map(|reply| {
                        let mut reply = reply?;
                        let pttl: i64 =
                            redis::from_redis_value(reply.pop().unwrap_or(redis::Value::Nil))
                                .unwrap_or(-2);
                        let stored = match reply.pop().unwrap_or(redis::Value::Nil) {
                            redis::Value::ServerError(e) if e.code() == "WRONGTYPE" => {
                                Stored::Bad(Bad::WrongType)
                            }
                            redis::Value::ServerError(e) => {
                                return Err(redis::RedisError::from(e).into());
                            }
                            value => match redis::from_redis_value::<Option<Bytes>>(value)
                                .map_err(redis::RedisError::from)?
                            {
                                Some(v) => Stored::Value(v),
                                None => Stored::Missing,
                            },
                        };
                        Ok((stored, pttl))
                    });
                // On one Redis an error fails the whole call (on a cluster, only the
                // blocks of the node that failed).
                if self.is_cluster() {
                    per_block.collect()
                } else {
                    per_block
                        .collect::<Result<Vec<_>, Error>>()?
                        .into_iter()
                        .map(Ok)
                        .collect()
                }
            }
        };
        let mut out = Vec::with_capacity(hashes.len());
        let mut bad = Vec::new();
        for (hash, reply) in hashes.iter().zip(replies) {
            // On a cluster, a block whose node did not answer is a miss.
            let Ok((stored, pttl)) = reply else {
                out.push(None);
                continue;
            };
            let checked = match stored {
                Stored::Missing => None,
                Stored::Value(v) => Some(verify(ns, hash, v).map_err(Bad::Codec)),
                Stored::Bad(why) => Some(Err(why)),
            };
            out.push(match checked {
                Some(Ok(block)) => Some(Hit {
                    block,
                    ttl: (pttl >= 0).then(|| Duration::from_millis(pttl as u64)),
                }),
                Some(Err(e)) => {
                    bad.push((hash, e));
                    None
                }
                None => None,
            });
        }
        if !bad.is_empty() {
            self.discard_bad(ns, &bad).await;
        }
        Ok(out)
    }

    /// Gets the longest run of leading blocks of `hashes` that Redis really returns: a
    /// block evicted since the lookup ends the run, and the caller recomputes the rest.
    pub async fn fetch_prefix(
        &self,
        ns: &Namespace,
        hashes: &[BlockHash],
    ) -> Result<Vec<Block>, Error> {
        let got = self.get(ns, hashes).await?;
        Ok(got.into_iter().map_while(|h| h.map(|h| h.block)).collect())
    }

    /// How many leading blocks of `hashes` are on the shelf, counted from the first with no
    /// gap, in one round trip whatever the length. Side-effect free: `EXISTS` neither
    /// refreshes TTLs nor touches Redis's LRU/LFU clock.
    pub async fn lookup(&self, ns: &Namespace, hashes: &[BlockHash]) -> Result<usize, Error> {
        validate_label(&ns.label)?;
        if hashes.is_empty() {
            return Ok(0);
        }
        if let Some(pool) = &self.bulk {
            let mut req = resp::Request::default();
            for hash in hashes {
                let key = block_key(&ns.label, hash);
                req.cmd(&[Arg::Small(b"EXISTS"), Arg::Small(key.as_bytes())]);
            }
            let replies = pool.exec(&req).await?.all()?;
            return Ok(replies.iter().take_while(|r| **r == Reply::Int(1)).count());
        }
        let replies = self
            .per_key(hashes.len(), |i, pipe| {
                pipe.exists(block_key(&ns.label, &hashes[i]));
                1
            })
            .await?;
        // A block whose cluster node did not answer ends the run like a missing one.
        Ok(replies
            .iter()
            .take_while(|r| matches!(r.as_deref(), Ok([redis::Value::Int(1)])))
            .count())
    }

    /// Slides the TTL of blocks of `ns` that were read from somewhere else (a sidecar's L1)
    /// as a read from Redis would: `PEXPIRE key <ttl> XX` per block, in one round trip (per
    /// node on a cluster). `XX` sets only keys that already have an expiry, so a pinned
    /// block stays pinned and a deleted one is not created. Returns how many keys got the
    /// new TTL.
    pub async fn touch(&self, ns: &Namespace, hashes: &[BlockHash]) -> Result<u64, Error> {
        validate_label(&ns.label)?;
        if hashes.is_empty() {
            return Ok(0);
        }
        let ttl_ms = ttl_millis(self.ttl_of(ns));
        if let Some(pool) = &self.bulk {
            let ttl = ttl_ms.to_string();
            let mut req = resp::Request::default();
            for hash in hashes {
                let key = block_key(&ns.label, hash);
                req.cmd(&[
                    Arg::Small(b"PEXPIRE"),
                    Arg::Small(key.as_bytes()),
                    Arg::Small(ttl.as_bytes()),
                    Arg::Small(b"XX"),
                ]);
            }
            let replies = pool.exec(&req).await?.all()?;
            return Ok(replies.iter().filter(|r| **r == Reply::Int(1)).count() as u64);
        }
        let replies = self
            .per_key(hashes.len(), |i, pipe| {
                pipe.cmd("PEXPIRE")
                    .arg(block_key(&ns.label, &hashes[i]))
                    .arg(ttl_ms)
                    .arg("XX");
                1
            })
            .await?;
        Ok(replies
            .iter()
            .filter(|r| matches!(r.as_deref(), Ok([redis::Value::Int(1)])))
            .count() as u64)
    }

    /// A connection of its own that receives Redis's invalidation messages for every block
    /// key (`CLIENT TRACKING ON BCAST PREFIX kvshelf:v1:` over RESP3): on `pushes` come an
    /// `invalidate` push for each block that is overwritten, deleted, expired or evicted,
    /// by anyone, and a `disconnection` push when the connection is lost (its tracking is
    /// then gone with it). Standalone Redis only: a cluster would need one per primary.
    pub async fn tracking_connection(
        &self,
        pushes: tokio::sync::mpsc::UnboundedSender<redis::PushInfo>,
    ) -> Result<redis::aio::MultiplexedConnection, Error> {
        if self.is_cluster() {
            return Err(Error::Config(
                "invalidation tracking is implemented for a standalone Redis only".into(),
            ));
        }
        let mut cfg = StoreConfig::clone(&self.cfg);
        let sep = if cfg.url.contains('?') { '&' } else { '?' };
        cfg.url = format!("{}{sep}protocol=resp3", cfg.url);
        let client = client_for(&cfg)?;
        let conn_cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(cfg.connection_timeout))
            .set_response_timeout(Some(cfg.response_timeout))
            .set_push_sender(pushes);
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&conn_cfg)
            .await?;
        redis::cmd("CLIENT")
            .arg("TRACKING")
            .arg("ON")
            .arg("BCAST")
            .arg("PREFIX")
            .arg(KEY_PREFIX)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(conn)
    }

    /// Whether each block of `hashes` is on the shelf, in one round trip: [`lookup`]'s
    /// per-key answer, for callers that own their chunking (LMCache asks about every chunk,
    /// not a prefix). Side-effect free, like `lookup`; on a cluster, a block whose node did
    /// not answer is `false`.
    ///
    /// [`lookup`]: Self::lookup
    pub async fn exists(&self, label: &str, hashes: &[BlockHash]) -> Result<Vec<bool>, Error> {
        validate_label(label)?;
        if hashes.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(pool) = &self.bulk {
            let mut req = resp::Request::default();
            for hash in hashes {
                let key = block_key(label, hash);
                req.cmd(&[Arg::Small(b"EXISTS"), Arg::Small(key.as_bytes())]);
            }
            let replies = pool.exec(&req).await?.all()?;
            return Ok(replies.iter().map(|r| *r == Reply::Int(1)).collect());
        }
        let replies = self
            .per_key(hashes.len(), |i, pipe| {
                pipe.exists(block_key(label, &hashes[i]));
                1
            })
            .await?;
        Ok(replies
            .iter()
            .map(|r| matches!(r.as_deref(), Ok([redis::Value::Int(1)])))
            .collect())
    }

    /// Deletes blocks (`UNLINK`: Redis frees the memory off its main thread). Returns how
    /// many existed.
    pub async fn delete(&self, label: &str, hashes: &[BlockHash]) -> Result<u64, Error> {
        validate_label(label)?;
        if hashes.is_empty() {
            return Ok(0);
        }
        let keys: Vec<String> = hashes.iter().map(|h| block_key(label, h)).collect();
        let deleted = self.unlink_keys(&keys).await?;
        // After the blocks: failing here leaves records that the next prune drops.
        let fields: Vec<String> = hashes.iter().map(ToString::to_string).collect();
        let _: (u64,) = self
            .run(redis::pipe().hdel(pins_key(label), &fields))
            .await?;
        Ok(deleted)
    }

    /// Keeps a block forever (`PERSIST`): the explicit way to keep a system prompt. Returns
    /// whether the block exists. The pin is recorded in [`pins_key`] like every other, but
    /// not capped: this is the operator's pin (the sidecar uses [`pin_within`](Self::pin_within)).
    pub async fn pin(&self, label: &str, hash: &BlockHash) -> Result<bool, Error> {
        validate_label(label)?;
        Ok(self.pin_recorded(label, hash, None).await? != PinOutcome::Missing)
    }

    /// Pins a block unless that would take the pinned payload bytes of `ns` over
    /// `max_bytes`, counted across every client of this Redis.
    ///
    /// The steps (record the pin in [`pins_key`], count, `PERSIST` the block) touch two keys
    /// that a cluster keeps on different slots, so they are not atomic. Each step that could
    /// leave the count wrong is ordered so that it errs towards over-counting, which
    /// [`prune_pins`](Self::prune_pins) repairs: the record is written before the block is
    /// pinned and removed after it is unpinned or deleted. Two pins racing for the last
    /// room may both be refused; the cap is never exceeded through this method. (One race
    /// escapes the count: a pin of a block that is being put at that very moment, while
    /// another pin prunes, may pin the block after its record was pruned as missing.)
    pub async fn pin_within(
        &self,
        ns: &Namespace,
        hash: &BlockHash,
        max_bytes: u64,
    ) -> Result<PinOutcome, Error> {
        validate_label(&ns.label)?;
        self.pin_recorded(&ns.label, hash, Some((ns.block_bytes(), max_bytes)))
            .await
    }

    /// `limit`: the namespace's block size and its pinned-bytes cap.
    async fn pin_recorded(
        &self,
        label: &str,
        hash: &BlockHash,
        limit: Option<(u64, u64)>,
    ) -> Result<PinOutcome, Error> {
        let (key, pins, field) = (block_key(label, hash), pins_key(label), hash.to_string());
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // Record first: a pin racing this one counts this block before either is pinned.
        let (new, mut count): (bool, u64) = self
            .run(redis::pipe().hset_nx(&pins, &field, now_ms).hlen(&pins))
            .await?;
        let block_bytes = limit.map_or(0, |(b, _)| b);
        if let Some((_, max_bytes)) = limit
            && new
            && count.saturating_mul(block_bytes) > max_bytes
        {
            // Records of blocks deleted behind kvshelf's back must not hold the room.
            count = self.prune_pins(label).await?;
            if count.saturating_mul(block_bytes) > max_bytes {
                let (_, left): (u64, u64) = self
                    .run(redis::pipe().hdel(&pins, &field).hlen(&pins))
                    .await?;
                return Ok(PinOutcome::OverLimit {
                    pinned_bytes: left.saturating_mul(block_bytes),
                });
            }
        }
        // On an error the record stays: the PERSIST may have run with its reply lost, and a
        // record too many (pruned once its block is gone) is safer than a pin uncounted.
        let (_, exists): (bool, bool) = self.run(redis::pipe().persist(&key).exists(&key)).await?;
        if !exists {
            // Not there: no pin to record (this also drops a stale record of the block).
            let _: (u64,) = self.run(redis::pipe().hdel(&pins, &field)).await?;
            return Ok(PinOutcome::Missing);
        }
        Ok(PinOutcome::Pinned {
            pinned_bytes: count.saturating_mul(block_bytes),
        })
    }

    /// Gives a pinned block back the store's TTL. Returns whether the block exists.
    pub async fn unpin(&self, label: &str, hash: &BlockHash) -> Result<bool, Error> {
        self.unpin_with(label, hash, self.cfg.ttl).await
    }

    /// Gives a pinned block back a TTL of `ttl` and removes its pin record. Returns whether
    /// the block exists.
    pub async fn unpin_with(
        &self,
        label: &str,
        hash: &BlockHash,
        ttl: Duration,
    ) -> Result<bool, Error> {
        validate_label(label)?;
        let key = block_key(label, hash);
        let existed: bool = self
            .run(redis::pipe().cmd("PEXPIRE").arg(&key).arg(ttl_millis(ttl)))
            .await
            .map(one)?;
        // After the TTL is back: failing here over-counts, never lets a pin go uncounted.
        let _: (u64,) = self
            .run(redis::pipe().hdel(pins_key(label), hash.to_string()))
            .await?;
        Ok(existed)
    }

    /// Pinned payload bytes of `ns`, as recorded (across every client of this Redis).
    pub async fn pinned_bytes(&self, ns: &Namespace) -> Result<u64, Error> {
        validate_label(&ns.label)?;
        let count: u64 = self
            .run(redis::pipe().hlen(pins_key(&ns.label)))
            .await
            .map(one)?;
        Ok(count.saturating_mul(ns.block_bytes()))
    }

    /// Drops the pin records of one namespace whose blocks no longer exist (deleted or
    /// purged with `redis-cli`, or lost with a node), and returns how many records are left.
    /// A record whose block exists stays, even if it is no longer pinned: a pin in flight
    /// records its block before it pins it.
    pub async fn prune_pins(&self, label: &str) -> Result<u64, Error> {
        validate_label(label)?;
        let pins = pins_key(label);
        let mut cursor: u64 = 0;
        loop {
            let (next, flat): (u64, Vec<String>) = self
                .run(
                    redis::pipe()
                        .cmd("HSCAN")
                        .arg(&pins)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(1000),
                )
                .await
                .map(one)?;
            // HSCAN answers field, value, field, value, …; a field that is not a block hash
            // is no pin of ours and goes too.
            let (mut stale, mut recorded) = (Vec::new(), Vec::new());
            for field in flat.iter().step_by(2) {
                match field.parse::<BlockHash>() {
                    Ok(h) => recorded.push((field, h)),
                    Err(_) => stale.push(field),
                }
            }
            if !recorded.is_empty() {
                let replies = self
                    .per_key(recorded.len(), |i, pipe| {
                        pipe.exists(block_key(label, &recorded[i].1));
                        1
                    })
                    .await?;
                // A block that is gone; a node that did not answer keeps its records.
                stale.extend(
                    recorded
                        .iter()
                        .zip(replies)
                        .filter(|(_, r)| matches!(r.as_deref(), Ok([redis::Value::Int(0)])))
                        .map(|((f, _), _)| *f),
                );
            }
            if !stale.is_empty() {
                let _: (u64,) = self.run(redis::pipe().hdel(&pins, &stale)).await?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        self.run(redis::pipe().hlen(&pins)).await.map(one)
    }

    /// Remaining time to live of a block: `Ok(None)` when it is missing, `Some(None)` when
    /// it is pinned.
    pub async fn ttl(
        &self,
        label: &str,
        hash: &BlockHash,
    ) -> Result<Option<Option<Duration>>, Error> {
        validate_label(label)?;
        let pttl: i64 = self
            .run(redis::pipe().cmd("PTTL").arg(block_key(label, hash)))
            .await
            .map(one)?;
        Ok(match pttl {
            -2 => None,
            -1 => Some(None),
            ms => Some(Some(Duration::from_millis(ms.max(0) as u64))),
        })
    }

    /// Deletes every block of one namespace with `SCAN` + `UNLINK` (never `KEYS`, which
    /// blocks Redis). Blocks put while the purge runs may survive it.
    ///
    /// On a cluster every primary is purged at once, and a primary that fails (or that the
    /// cluster marks as failed) does not stop the others: it is listed in
    /// [`PurgeReport::skipped`] and its blocks stay. The call fails only when no node could
    /// delete anything (always the case when the one Redis is down).
    pub async fn purge(&self, label: &str) -> Result<PurgeReport, Error> {
        self.purge_nodes(label, None).await
    }

    /// [`purge`](Self::purge) with a deadline: a node that has not finished by then is
    /// skipped (its error is [`Error::Deadline`]), so the call answers within about
    /// `deadline` whatever the backend does.
    pub async fn purge_within(
        &self,
        label: &str,
        deadline: Duration,
    ) -> Result<PurgeReport, Error> {
        self.purge_nodes(label, Some(deadline)).await
    }

    async fn purge_nodes(
        &self,
        label: &str,
        deadline: Option<Duration>,
    ) -> Result<PurgeReport, Error> {
        validate_label(label)?;
        let deadline = deadline.map(|d| (tokio::time::Instant::now() + d, d));
        let targets = within(deadline, self.scan_targets()).await?;
        let pattern = namespace_pattern(label);
        let purges = targets.into_iter().map(|(node, failed)| {
            let pattern = &pattern;
            async move {
                // Counted outside the scan, so that a node cut off by the deadline still
                // reports what it had deleted.
                let unlinked = AtomicU64::new(0);
                let result = if failed {
                    Err(Error::Backend(redis::RedisError::from((
                        redis::ErrorKind::ClusterConnectionNotFound,
                        "the cluster marks this primary as failed",
                    ))))
                } else {
                    let run = self.scan_node(
                        &node,
                        pattern,
                        |store, keys| async move { store.unlink_keys(&keys).await },
                        |n| {
                            unlinked.fetch_add(n, Ordering::Relaxed);
                        },
                    );
                    within(deadline, run).await
                };
                (node, unlinked.into_inner(), result)
            }
        });
        let mut report = PurgeReport::default();
        let mut nodes = 0;
        let mut first_error = None;
        for (node, deleted, result) in futures_util::future::join_all(purges).await {
            nodes += 1;
            report.deleted += deleted;
            if let Err(e) = result {
                report.skipped.push(SkippedNode {
                    node: self.node_name(&node),
                    deleted,
                    error: e.to_string(),
                });
                first_error.get_or_insert(e);
            }
        }
        if let Some(e) = first_error
            && report.skipped.len() == nodes
            && report.deleted == 0
        {
            return Err(e);
        }
        // The pin records of the blocks that are gone. Best effort: a record left behind
        // is pruned the next time a pin would pass the namespace's cap.
        if let Err(e) = within(deadline, self.prune_pins(label)).await {
            tracing::warn!(namespace = label, error = %e, "purge: pin records not pruned");
        }
        Ok(report)
    }

    /// Counts the blocks of one namespace with `SCAN` (approximate while puts run).
    pub async fn count(&self, label: &str) -> Result<u64, Error> {
        validate_label(label)?;
        let mut n = 0;
        self.scan(
            &namespace_pattern(label),
            |_, keys| async move { Ok(keys.len() as u64) },
            |k| n += k,
        )
        .await?;
        Ok(n)
    }

    /// Counts blocks per namespace label over every kvshelf key, with `SCAN`.
    pub async fn count_by_namespace(
        &self,
    ) -> Result<std::collections::BTreeMap<String, u64>, Error> {
        let mut counts = std::collections::BTreeMap::new();
        let pattern = format!("{KEY_PREFIX}*");
        self.scan(
            &pattern,
            |_, keys| async move { Ok(keys) },
            |keys: Vec<String>| {
                for k in keys {
                    if let Some((label, _)) = k[KEY_PREFIX.len()..].split_once(':') {
                        *counts.entry(label.to_owned()).or_insert(0u64) += 1;
                    }
                }
            },
        )
        .await?;
        Ok(counts)
    }

    /// The text of `INFO <section>` (for example `memory` or `stats`), for operators.
    /// On a cluster, the `INFO` of one primary node.
    pub async fn info(&self, section: &str) -> Result<String, Error> {
        let mut cmd = redis::cmd("INFO");
        cmd.arg(section);
        let v = self.on_node(&Node::AnyPrimary, cmd).await?;
        Ok(redis::from_redis_value(v).map_err(redis::RedisError::from)?)
    }

    /// Reads the header of the block stored under a raw key, as an operator would with
    /// `GETRANGE`: it neither refreshes the TTL nor reads the payload.
    pub async fn inspect(&self, key: &str) -> Result<Option<(Header, Option<Duration>)>, Error> {
        let (head, pttl): (Bytes, i64) = self
            .run(
                redis::pipe()
                    .cmd("GETRANGE")
                    .arg(key)
                    .arg(0)
                    .arg(codec::MAX_HEADER_LEN - 1)
                    .cmd("PTTL")
                    .arg(key),
            )
            .await?;
        if pttl == -2 {
            return Ok(None);
        }
        let (header, _) = codec::decode_header(&head)?;
        let ttl = (pttl >= 0).then(|| Duration::from_millis(pttl as u64));
        Ok(Some((header, ttl)))
    }

    /// Runs `SCAN MATCH pattern` to the end (on every live primary of a cluster), handing
    /// each batch of keys to `batch` and its result to `sink`.
    async fn scan<T, F, Fut>(
        &self,
        pattern: &str,
        batch: F,
        mut sink: impl FnMut(T),
    ) -> Result<(), Error>
    where
        F: Fn(RedisStore, Vec<String>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        for (node, failed) in self.scan_targets().await? {
            if !failed {
                self.scan_node(&node, pattern, &batch, &mut sink).await?;
            }
        }
        Ok(())
    }

    /// [`scan`](Self::scan) on one node.
    async fn scan_node<T, F, Fut>(
        &self,
        node: &Node,
        pattern: &str,
        batch: F,
        mut sink: impl FnMut(T),
    ) -> Result<(), Error>
    where
        F: Fn(RedisStore, Vec<String>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let mut cursor: u64 = 0;
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, keys): (u64, Vec<String>) =
                redis::from_redis_value(self.on_node(node, cmd).await?)
                    .map_err(redis::RedisError::from)?;
            if !keys.is_empty() {
                sink(batch(self.clone(), keys).await?);
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// The nodes a full `SCAN` must visit: the one Redis, or every primary of the cluster,
    /// each with whether the cluster marks it as failed (then its slots are unreachable).
    async fn scan_targets(&self) -> Result<Vec<(Node, bool)>, Error> {
        match &self.conn {
            Conn::Single(_) => Ok(vec![(Node::AnyPrimary, false)]),
            Conn::Cluster(c) => {
                use redis::cluster_routing::{
                    MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo,
                };
                // Asked of every primary, the first answer wins: a primary that is down must
                // not make the whole cluster's node list unreadable.
                let routing = RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    Some(ResponsePolicy::OneSucceeded),
                ));
                let reply = c
                    .get()
                    .await?
                    .route_command(redis::cmd("CLUSTER").arg("NODES").clone(), routing)
                    .await?;
                let text: String =
                    redis::from_redis_value(reply).map_err(redis::RedisError::from)?;
                Ok(cluster_primaries(&text)
                    .into_iter()
                    .map(|(host, port, failed)| (Node::At(host, port), failed))
                    .collect())
            }
        }
    }

    /// How a report names a node.
    fn node_name(&self, node: &Node) -> String {
        match node {
            Node::AnyPrimary => self.cfg.redacted_url(),
            Node::At(host, port) => format!("{host}:{port}"),
        }
    }

    /// Sends one command to one node.
    async fn on_node(&self, node: &Node, cmd: redis::Cmd) -> Result<redis::Value, Error> {
        use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
        match &self.conn {
            Conn::Single(_) => {
                let mut pipe = redis::pipe();
                pipe.add_command(cmd);
                self.run(&pipe).await.map(one)
            }
            Conn::Cluster(c) => {
                let routing = match node {
                    Node::AnyPrimary => SingleNodeRoutingInfo::RandomPrimary,
                    Node::At(host, port) => SingleNodeRoutingInfo::ByAddress {
                        host: host.clone(),
                        port: *port,
                    },
                };
                let mut conn = c.get().await?;
                Ok(conn
                    .route_command(cmd, RoutingInfo::SingleNode(routing))
                    .await?)
            }
        }
    }

    /// Unlinks keys, grouped per key so that a cluster routes each to its node.
    async fn unlink_keys(&self, keys: &[String]) -> Result<u64, Error> {
        let replies = self
            .per_key(keys.len(), |i, pipe| {
                pipe.cmd("UNLINK").arg(&keys[i]);
                1
            })
            .await?;
        let mut deleted = 0;
        for r in replies {
            deleted += redis::from_redis_value::<u64>(r?.pop().unwrap_or(redis::Value::Nil))
                .map_err(redis::RedisError::from)?;
        }
        Ok(deleted)
    }

    /// Runs `n` small pipelines, the `i`-th built by `build(i, pipe)`, which returns how many
    /// replies it expects. All commands of one pipeline touch ONE key, hence one slot.
    ///
    /// On one Redis the pipelines travel together as ONE pipeline: one round trip, and an
    /// error fails the whole call. On a cluster, redis-rs refuses pipelines that cross
    /// slots, so each is sent on its own, all concurrently: each node still receives its
    /// share back to back on its multiplexed connection (one round trip per node), and a
    /// node that does not answer fails only its own keys (unless all fail).
    async fn per_key(
        &self,
        n: usize,
        mut build: impl FnMut(usize, &mut redis::Pipeline) -> usize,
    ) -> Result<Vec<Result<Vec<redis::Value>, Error>>, Error> {
        match &self.conn {
            Conn::Single(_) => {
                let mut pipe = redis::pipe();
                let counts: Vec<usize> = (0..n).map(|i| build(i, &mut pipe)).collect();
                let replies: Vec<redis::Value> = self.run(&pipe).await?;
                let mut replies = replies.into_iter();
                Ok(counts
                    .into_iter()
                    .map(|c| Ok(replies.by_ref().take(c).collect()))
                    .collect())
            }
            Conn::Cluster(c) => {
                let conn = c.get().await?;
                let calls = (0..n).map(|i| {
                    let mut pipe = redis::pipe();
                    build(i, &mut pipe);
                    let mut conn = conn.clone();
                    async move {
                        pipe.query_async::<Vec<redis::Value>>(&mut conn)
                            .await
                            .map_err(Error::from)
                    }
                });
                let results = futures_util::future::join_all(calls).await;
                if n > 0 && results.iter().all(Result::is_err) {
                    let first = results.into_iter().find_map(Result::err);
                    return Err(first.expect("n > 0 results, all errors"));
                }
                Ok(results)
            }
        }
    }

    /// Deletes blocks that failed verification, and counts them. Best effort: a failure to
    /// delete leaves the block to be caught again on the next read.
    async fn discard_bad(&self, ns: &Namespace, bad: &[(&BlockHash, Bad)]) {
        let keys: Vec<String> = bad.iter().map(|(h, _)| block_key(&ns.label, h)).collect();
        for (hash, why) in bad {
            count_corrupt(ns, hash, why.kind(), why);
        }
        if let Err(e) = self.unlink_keys(&keys).await {
            tracing::warn!(error = %e, "could not delete bad blocks");
        }
    }

    /// Sends a pipeline (on a cluster: one whose commands share a slot), resending it when
    /// the connection dropped under it.
    async fn run<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, Error> {
        let mut attempt = 0;
        loop {
            let sent = match &self.conn {
                Conn::Single(conn) => pipe.query_async::<T>(&mut conn.clone()).await,
                // The cluster client retries and reconnects on its own (`reconnect_retries`).
                Conn::Cluster(c) => return Ok(pipe.query_async::<T>(&mut c.get().await?).await?),
            };
            match sent {
                Ok(v) => return Ok(v),
                Err(e)
                    if attempt < self.cfg.command_retries
                        && (e.is_connection_dropped() || e.is_io_error()) =>
                {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "redis connection dropped; resending");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Where a command goes.
enum Node {
    /// The one Redis, or any primary of a cluster.
    AnyPrimary,
    /// One cluster node.
    At(String, u16),
}

/// `host:port` of every primary in a `CLUSTER NODES` reply, and whether the cluster has
/// marked it as failed (`fail`, not the mere suspicion `fail?`). A failed primary that
/// serves no slots any more (a replica took over) is left out: it holds nothing.
fn cluster_primaries(nodes: &str) -> Vec<(String, u16, bool)> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags: Vec<&str> = fields.get(2)?.split(',').collect();
            if !flags.contains(&"master") {
                return None;
            }
            let failed = flags.contains(&"fail");
            let has_slots = fields.len() > 8;
            if failed && !has_slots {
                return None;
            }
            // `ip:port@cport[,hostname]`
            let addr = fields.get(1)?.split('@').next()?;
            let (host, port) = addr.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?, failed))
        })
        .collect()
}

/// `call`, failing with [`Error::Deadline`] if it has not finished by `deadline`.
async fn within<T>(
    deadline: Option<(tokio::time::Instant, Duration)>,
    call: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match deadline {
        Some((at, d)) => tokio::time::timeout_at(at, call)
            .await
            .unwrap_or(Err(Error::Deadline(d))),
        None => call.await,
    }
}

/// The single reply of a one-command pipeline.
fn one<T>(v: (T,)) -> T {
    v.0
}

/// Every payload must be exactly one block of the namespace's shape and dtype (for a
/// foreign hash scheme: 1 byte up to one full chunk).
pub(crate) fn check_payloads(ns: &Namespace, blocks: &[(BlockHash, Bytes)]) -> Result<(), Error> {
    match blocks
        .iter()
        .position(|(_, p)| !ns.accepts_payload_len(p.len() as u64))
    {
        None => Ok(()),
        Some(i) => Err(wrong_size(ns, i, blocks[i].1.len() as u64)),
    }
}

/// Block `i` of a request has `len` bytes of payload, which its namespace does not accept.
pub(crate) fn wrong_size(ns: &Namespace, i: usize, len: u64) -> Error {
    let want = ns.block_bytes();
    if !ns.hash_scheme.is_kvshelf() {
        return Error::InvalidInput(format!(
            "chunk {i} has {len} bytes of payload; namespace {:?} ({} hashes) stores chunks of \
             1 to {want} bytes",
            ns.label, ns.hash_scheme
        ));
    }
    Error::InvalidInput(format!(
        "block {i} has {len} bytes of payload; one block of namespace {:?} is {want} bytes \
         ({} x {:?})",
        ns.label,
        ns.kv_dtype,
        ns.block_shape()
    ))
}

/// Counts and logs a bad block found on the shelf.
#[cfg(feature = "server")]
pub(crate) fn count_bad(ns: &Namespace, hash: &BlockHash, err: &codec::CodecError) {
    count_corrupt(ns, hash, err.kind(), err);
}

fn count_corrupt(
    ns: &Namespace,
    hash: &BlockHash,
    reason: &'static str,
    err: &dyn std::fmt::Display,
) {
    metrics::counter!("kvshelf_store_corrupt_blocks_total", "reason" => reason).increment(1);
    tracing::warn!(namespace = %ns.label, block = %hash, error = %err,
        "bad block on the shelf: deleting it and answering a miss");
}

/// What a block's key held.
enum Stored {
    /// Nothing.
    Missing,
    /// A string, to verify.
    Value(Bytes),
    /// Something that cannot be a block of the namespace.
    Bad(Bad),
}

/// Why a key's value is not the block asked for.
#[derive(Debug)]
enum Bad {
    /// A string that does not decode or verify (or is longer than any block could be).
    Codec(codec::CodecError),
    /// A value of another type (a list, a hash, …): Redis answered `GET` with `WRONGTYPE`.
    WrongType,
}

impl Bad {
    /// The `reason` label of `kvshelf_store_corrupt_blocks_total`.
    fn kind(&self) -> &'static str {
        match self {
            Bad::Codec(e) => e.kind(),
            Bad::WrongType => "wrong_type",
        }
    }
}

impl std::fmt::Display for Bad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bad::Codec(e) => e.fmt(f),
            Bad::WrongType => f.write_str("the key holds a value that is not a string (WRONGTYPE)"),
        }
    }
}

/// A `WRONGTYPE` error reply (`-WRONGTYPE Operation against a key holding the wrong kind
/// of value`).
fn is_wrong_type(msg: &str) -> bool {
    msg.starts_with("WRONGTYPE")
}

/// Decodes a stored value and checks it is the block `ns` asked for under `hash`.
pub(crate) fn verify(
    ns: &Namespace,
    hash: &BlockHash,
    value: Bytes,
) -> Result<Block, codec::CodecError> {
    let block = codec::decode(value)?;
    block.header.check(ns, hash)?;
    Ok(block)
}

fn ttl_millis(ttl: Duration) -> u64 {
    (ttl.as_millis() as u64).max(1)
}

fn cluster_client_for(cfg: &StoreConfig) -> Result<ClusterClient, Error> {
    let seeds: Vec<&str> = cfg
        .url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    #[cfg_attr(not(feature = "tls"), allow(unused_mut))]
    let mut builder = redis::cluster::ClusterClientBuilder::new(seeds)
        .connection_timeout(cfg.connection_timeout)
        .response_timeout(cfg.response_timeout)
        .retries(cfg.reconnect_retries as u32);
    if let Some(path) = &cfg.tls_ca_file {
        #[cfg(feature = "tls")]
        {
            builder = builder.certs(tls_certs(path)?);
        }
        #[cfg(not(feature = "tls"))]
        return tls_client(cfg, path).map(|_| unreachable!("always an error without tls"));
    }
    builder
        .build()
        .map_err(|e| Error::Config(format!("redis cluster urls {}: {e}", cfg.redacted_url())))
}

fn client_for(cfg: &StoreConfig) -> Result<redis::Client, Error> {
    let bad_url =
        |e: redis::RedisError| Error::Config(format!("redis url {}: {e}", cfg.redacted_url()));
    match &cfg.tls_ca_file {
        None => redis::Client::open(cfg.url.as_str()).map_err(bad_url),
        Some(path) => tls_client(cfg, path).and_then(|c| c.map_err(bad_url)),
    }
}

#[cfg(feature = "tls")]
fn tls_client(
    cfg: &StoreConfig,
    ca_file: &std::path::Path,
) -> Result<redis::RedisResult<redis::Client>, Error> {
    Ok(redis::Client::build_with_tls(
        cfg.url.as_str(),
        tls_certs(ca_file)?,
    ))
}

/// The CA certificates to trust for `rediss://`.
#[cfg(feature = "tls")]
fn tls_certs(ca_file: &std::path::Path) -> Result<redis::TlsCertificates, Error> {
    // One process-wide crypto provider; ignore the error that says one is installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pem = std::fs::read(ca_file)
        .map_err(|e| Error::Config(format!("tls_ca_file {}: {e}", ca_file.display())))?;
    Ok(redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    })
}

#[cfg(not(feature = "tls"))]
fn tls_client(
    _cfg: &StoreConfig,
    _ca_file: &std::path::Path,
) -> Result<redis::RedisResult<redis::Client>, Error> {
    Err(Error::Config(
        "tls_ca_file needs kvshelf built with the `tls` feature".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redact_url("rediss://kv:s3cret@redis.internal:6380/0"),
            "rediss://kv:***@redis.internal:6380/0"
        );
        assert_eq!(redact_url("redis://:pw@h/1"), "redis://:***@h/1");
        assert_eq!(
            redact_url("redis+unix:///run/redis.sock?db=2&pass=hunter2&user=kv"),
            "redis+unix:///run/redis.sock?db=2&pass=***&user=kv"
        );
        assert_eq!(
            redact_url("unix:///run/redis.sock?pass=hunter2"),
            "unix:///run/redis.sock?pass=***"
        );
        let cfg = StoreConfig {
            url: "redis://u:hunter2@h".into(),
            ..Default::default()
        };
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }

    #[test]
    fn debug_shows_every_field_but_no_password() {
        let cfg = StoreConfig {
            url: "redis://u:hunter2@a:6379,redis://u:hunter2@b:6379".into(),
            tls_ca_file: Some("/etc/ca.pem".into()),
            ..Default::default()
        };
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redis://u:***@a:6379,redis://u:***@b:6379"));
        // Every field a serialized config has (serde sees all of them) is in the output.
        let fields = serde_json::to_value(&cfg).unwrap();
        for field in fields.as_object().unwrap().keys() {
            assert!(
                shown.contains(&format!("{field}: ")),
                "{field} missing: {shown}"
            );
        }
    }

    #[test]
    fn config_reads_humane_durations() {
        let cfg: StoreConfig =
            serde_json::from_str(r#"{"ttl":"10m","sliding_ttl":false}"#).unwrap();
        assert_eq!(cfg.ttl, Duration::from_secs(600));
        assert!(!cfg.sliding_ttl);
        assert_eq!(cfg.response_timeout, Duration::from_secs(5));
    }

    #[test]
    fn cluster_primaries_say_which_failed() {
        let nodes = "\
a1 10.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 10.0.0.2:7001@17001 master,fail - 0 0 2 connected 5461-10922
c3 10.0.0.3:7002@17002 master,fail? - 0 0 3 connected 10923-16383
d4 10.0.0.4:7003@17003 master,fail - 0 0 4 disconnected
e5 10.0.0.5:7004@17004 slave a1 0 0 1 connected
";
        assert_eq!(
            cluster_primaries(nodes),
            vec![
                ("10.0.0.1".to_owned(), 7000, false),
                ("10.0.0.2".to_owned(), 7001, true),
                ("10.0.0.3".to_owned(), 7002, false),
            ],
            "a failed primary with slots is reported; one without slots holds nothing"
        );
    }
}
