//! The service's configuration as plain data: one TOML file, every field defaulted.
//!
//! ```toml
//! [store]
//! url = "redis://127.0.0.1:6379"
//! ttl = "1h"
//!
//! [server]
//! listen = "0.0.0.0:7070"
//! l1_bytes = 1073741824
//!
//! [[tenants]]
//! name = "team-a"
//! token = "a-secret-token"
//! salt = "team-a-salt"
//!
//! [[namespaces]]
//! label = "qwen2.5-0.5b"
//! model_id = "Qwen/Qwen2.5-0.5B-Instruct"
//! kv_dtype = "bfloat16"
//! block_size = 16
//! layout = { num_layers = 24, num_kv_heads = 2, head_dim = 64 }
//! ```
//!
//! Flags and environment variables override the file (see `kvshelf --help`).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::namespace::Namespace;
use crate::store::StoreConfig;

/// Everything `kvshelf` reads from its config file.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Redis. Default: none, and `kvshelf serve` then runs on the embedded in-process store
    /// (not shared across hosts, not kept across restarts).
    pub store: Option<StoreConfig>,
    /// The sidecar's listener, timeouts, limits and tiers. Default: see [`ServerConfig`].
    pub server: ServerConfig,
    /// The namespaces this deployment serves. Default: none (`kvshelf serve` then serves a
    /// small `demo` namespace, and says so).
    pub namespaces: Vec<Namespace>,
    /// API tokens. Default: none, and the API is open with no tenant salt: one trusted
    /// tenant. With any token configured, every `/v1` request and RPC needs one, and only
    /// admin tokens may delete, pin, unpin or purge.
    pub tenants: Vec<TenantConfig>,
}

/// One API token and the tenant it stands for.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// A name for logs and metrics.
    pub name: String,
    /// The bearer token (`Authorization: Bearer <token>`). Never logged.
    pub token: String,
    /// Salt mixed into this tenant's hash root, so its blocks are invisible to others.
    /// Default: none (shares blocks with every unsalted tenant). With more than one
    /// non-admin tenant, each needs one unless `[server] share_unsalted_blocks` is set.
    #[serde(default)]
    pub salt: Option<String>,
    /// May delete, pin and unpin blocks and purge namespaces. Default: false.
    #[serde(default)]
    pub admin: bool,
}

impl std::fmt::Debug for TenantConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantConfig")
            .field("name", &self.name)
            .field("token", &"***")
            .field("salt", &self.salt.as_ref().map(|_| "***"))
            .field("admin", &self.admin)
            .finish()
    }
}

/// The sidecar's own settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address for HTTP and gRPC (one port). Default: `127.0.0.1:7070`.
    pub listen: SocketAddr,
    /// Also serve HTTP and gRPC on this Unix socket, for workers on the same host (a
    /// shared volume in a pod): the same API without the TCP stack. A stale socket file is
    /// replaced. Clients use the URL `unix:<path>`. Default: none.
    pub listen_unix: Option<std::path::PathBuf>,
    /// Longest a lookup waits for the backend before answering "miss". Default: 100ms.
    #[serde(with = "humantime_serde")]
    pub lookup_timeout: Duration,
    /// Longest a fetch waits for the backend for one chunk of blocks before ending the
    /// stream as `backend_unavailable`, on top of the chunk's transfer allowance (its bytes
    /// at `fetch_min_bytes_per_second`). Default: 100ms.
    #[serde(with = "humantime_serde")]
    pub fetch_timeout: Duration,
    /// The slowest transfer a fetch still counts as Redis answering: each wait of a chunk
    /// (for room in the fetch budget, for its read, for another request's read of the same
    /// blocks) may last `fetch_timeout` + the chunk's bytes at this rate, so a 32 MiB block
    /// gets 100 ms + 320 ms, a 2 MiB one 100 ms + 20 ms. 0: no allowance (`fetch_timeout`
    /// alone, whatever the size). Default: 100 MiB/s (104857600).
    pub fetch_min_bytes_per_second: u64,
    /// Longest a synchronous put waits for the backend before the blocks count as
    /// dropped. Default: 2s.
    #[serde(with = "humantime_serde")]
    pub put_timeout: Duration,
    /// Deadline of an operator action (delete, pin, unpin, purge): past it the action
    /// answers `backend_unavailable` instead of waiting for the Redis client's own retries.
    /// A purge works on every cluster primary at once; a primary that has not finished by
    /// then is reported as skipped (its blocks stay; run the purge again). Below the store's
    /// `response_timeout`, so that a Redis that does not answer is reported as this deadline.
    /// Default: 3s.
    #[serde(with = "humantime_serde")]
    pub operator_timeout: Duration,
    /// Longest a request body may go without a byte arriving while the request reads it (it
    /// holds a concurrency slot and its room in `body_memory_bytes` meanwhile). Past it the
    /// request is cut off: `408 request_timeout` (gRPC `DEADLINE_EXCEEDED`), its slot and
    /// room given back, and an HTTP/1.1 connection closed. Default: 10s.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Longest a response may wait for its client to take more of it: a fetch block not
    /// taken, or a socket that accepts no byte, for this long. Past it the connection is
    /// closed (over HTTP/2, with every stream on it), and the fetch's slot and its share of
    /// `fetch_memory_bytes` are given back. Default: 10s.
    #[serde(with = "humantime_serde")]
    pub response_write_timeout: Duration,
    /// Blocks are read from the backend in chunks of about this many bytes, so a fetch's
    /// memory stays bounded whatever its length. Default: 8 MiB.
    pub fetch_chunk_bytes: u64,
    /// Payload bytes all fetches together may hold at once: read from the backend and not
    /// yet written to their clients. A fetch waits for room before reading its next chunk,
    /// so sidecar memory stays near `l1_bytes` + this, however many clients fetch how much.
    /// Default: 1 GiB.
    pub fetch_memory_bytes: u64,
    /// Largest request body, whatever it carries. Each request's own cap follows from what
    /// it may carry (`docs/api.md` §9) and is never above this. Default: 256 MiB.
    pub max_body_bytes: u64,
    /// Request body bytes all requests together may hold at once. A request reserves its
    /// body's room (its `Content-Length`, or step by step as a body of unknown length
    /// arrives) before reading it; with no room it waits up to `put_timeout`, then is
    /// refused as overloaded. Default: 1 GiB.
    pub body_memory_bytes: u64,
    /// Most blocks one request may name. Default: 4096.
    pub max_blocks_per_request: usize,
    /// Requests served at once; more get 429 / RESOURCE_EXHAUSTED. Default: 256.
    pub max_concurrent_requests: usize,
    /// Byte bound of the L1 tier (0 turns it off). Default: 1 GiB.
    pub l1_bytes: u64,
    /// Longest an L1 entry lives (never longer than the block's TTL in Redis). Default: 30s.
    #[serde(with = "humantime_serde")]
    pub l1_max_ttl: Duration,
    /// An L1 hit slides the block's TTL in Redis as a Redis read does (`PEXPIRE … XX`,
    /// batched, off the request path), at most once per block per this interval.
    /// Default: 1s.
    #[serde(with = "humantime_serde")]
    pub l1_touch_interval: Duration,
    /// Byte bound of the asynchronous put queue; puts beyond it are dropped. Default: 256 MiB.
    pub put_queue_bytes: u64,
    /// Byte bound of the embedded store, when no Redis is configured. Default: 1 GiB.
    pub memory_store_bytes: u64,
    /// On SIGTERM, how long in-flight requests and queued puts get to finish. Default: 30s.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Most payload bytes of one namespace that may be pinned at once, counted in Redis
    /// across every sidecar; a namespace's own `max_pinned_bytes` overrides it. Pinned
    /// blocks are never evicted by `volatile-*` policies, so without a cap one caller could
    /// fill Redis until every put is dropped. Default: 1 GiB.
    pub max_pinned_bytes: u64,
    /// Lets several non-admin tenants run without a salt, sharing one hash space: each can
    /// then compute, find and fetch the blocks of the others' prompts. Default: false (with
    /// more than one non-admin tenant, every one needs a salt).
    pub share_unsalted_blocks: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            listen_unix: None,
            lookup_timeout: Duration::from_millis(100),
            fetch_timeout: Duration::from_millis(100),
            fetch_min_bytes_per_second: 100 << 20,
            put_timeout: Duration::from_secs(2),
            operator_timeout: Duration::from_secs(3),
            body_read_timeout: Duration::from_secs(10),
            response_write_timeout: Duration::from_secs(10),
            fetch_chunk_bytes: 8 << 20,
            fetch_memory_bytes: 1 << 30,
            max_body_bytes: 256 << 20,
            body_memory_bytes: 1 << 30,
            max_blocks_per_request: 4096,
            max_concurrent_requests: 256,
            l1_bytes: 1 << 30,
            l1_max_ttl: Duration::from_secs(30),
            l1_touch_interval: Duration::from_secs(1),
            put_queue_bytes: 256 << 20,
            memory_store_bytes: 1 << 30,
            shutdown_grace: Duration::from_secs(30),
            max_pinned_bytes: 1 << 30,
            share_unsalted_blocks: false,
        }
    }
}

impl Config {
    /// Parses and validates a TOML document.
    pub fn from_toml(text: &str) -> Result<Config, Error> {
        let cfg: Config = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads, parses and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Checks every namespace, that no label or token is used twice, and that tenants
    /// share blocks only by choice.
    pub fn validate(&self) -> Result<(), Error> {
        let mut tokens = std::collections::HashSet::new();
        for t in &self.tenants {
            if t.token.is_empty() || !tokens.insert(&t.token) {
                return Err(Error::Config(format!(
                    "tenant {:?}: tokens must be non-empty and unique",
                    t.name
                )));
            }
        }
        self.check_salts()?;
        for (name, d) in [
            ("body_read_timeout", self.server.body_read_timeout),
            ("response_write_timeout", self.server.response_write_timeout),
        ] {
            if d.is_zero() {
                return Err(Error::Config(format!(
                    "[server] {name} must be longer than 0: it cuts off clients that stall"
                )));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for ns in &self.namespaces {
            ns.validate()?;
            // The sidecar hashes tokens with kvshelf's scheme and checks payloads against a
            // layout; chunks under an engine's own hashes go through the library or the
            // Python package (docs/lmcache.md, docs/vllm.md), not through the sidecar.
            if !ns.hash_scheme.is_kvshelf() {
                return Err(Error::InvalidNamespace(format!(
                    "namespace {:?}: hash_scheme {} is served by the library and the Python \
                     package (docs/lmcache.md, docs/vllm.md), not by the sidecar",
                    ns.label, ns.hash_scheme
                )));
            }
            if !seen.insert(&ns.label) {
                return Err(Error::InvalidNamespace(format!(
                    "label {:?} is configured twice",
                    ns.label
                )));
            }
        }
        Ok(())
    }

    /// Unsalted tenants hash into one space: any of them can compute the others' block
    /// hashes from their prompts (docs/hashing.md) and probe or fetch those blocks. With
    /// one non-admin tenant there is no one to share with (admins are trusted anyway); with
    /// more, sharing must be asked for.
    fn check_salts(&self) -> Result<(), Error> {
        let users = self.tenants.iter().filter(|t| !t.admin);
        if users.clone().count() < 2 || self.server.share_unsalted_blocks {
            return Ok(());
        }
        let unsalted: Vec<String> = users
            .filter(|t| t.salt.as_deref().is_none_or(str::is_empty))
            .map(|t| format!("{:?}", t.name))
            .collect();
        if unsalted.is_empty() {
            return Ok(());
        }
        Err(Error::Config(format!(
            "tenants {} have no salt: with more than one non-admin tenant, unsalted tenants \
             share one hash space and each can compute, find and fetch the others' blocks. \
             Give each tenant its own `salt`, or set `[server] share_unsalted_blocks = true` \
             to share blocks between them on purpose",
            unsalted.join(", ")
        )))
    }

    /// The namespace with this label.
    pub fn namespace(&self, label: &str) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.label == label)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_doc_example_parses() {
        let doc = include_str!("config.rs");
        let example: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| l.trim_start_matches("//!").trim_start())
            .collect::<Vec<_>>()
            .join("\n");
        let cfg = Config::from_toml(&example).unwrap();
        assert_eq!(cfg.store.as_ref().unwrap().ttl, Duration::from_secs(3600));
        assert_eq!(cfg.server.listen.port(), 7070);
        assert_eq!(cfg.server.lookup_timeout, Duration::from_millis(100));
        assert_eq!(cfg.tenants[0].salt.as_deref(), Some("team-a-salt"));
        assert!(!format!("{:?}", cfg.tenants).contains("a-secret-token"));
        let ns = cfg.namespace("qwen2.5-0.5b").unwrap();
        assert_eq!(ns.block_bytes(), 192 * 1024);
        assert_eq!(ns.layout.order, "lkthd");
    }

    #[test]
    fn the_shipped_example_parses_with_its_documented_defaults() {
        let cfg = Config::from_toml(include_str!("../examples/kvshelf.toml")).unwrap();
        let defaults = Config::default();
        assert_eq!(
            cfg.server, defaults.server,
            "the example shows the defaults"
        );
        let store = cfg.store.clone().unwrap();
        assert_eq!(
            store,
            crate::store::StoreConfig::default(),
            "the example shows the defaults"
        );
        // Every key that has a default is written out, not just left to default.
        let example: toml::Table =
            toml::from_str(include_str!("../examples/kvshelf.toml")).unwrap();
        for (section, defaults) in [
            ("server", toml::Table::try_from(&defaults.server).unwrap()),
            ("store", toml::Table::try_from(&store).unwrap()),
        ] {
            let shown = example[section].as_table().unwrap();
            for (key, value) in defaults {
                assert!(
                    shown.contains_key(&key),
                    "examples/kvshelf.toml lacks [{section}] {key} = {value:?}"
                );
            }
        }
        assert_eq!(cfg.namespaces.len(), 2);
        assert_eq!(cfg.namespaces[1].layout.kv_heads_per_rank(), 4);
        assert_eq!(cfg.namespaces[1].ttl, Some(Duration::from_secs(6 * 3600)));
    }

    #[test]
    fn the_sidecar_refuses_foreign_hash_namespaces() {
        let mut cfg: Config = toml::from_str(include_str!("../examples/kvshelf.toml")).unwrap();
        cfg.namespaces[0].hash_scheme = crate::namespace::HashScheme::Lmcache;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("docs/lmcache.md"), "{err}");
    }

    #[test]
    fn unsalted_tenants_share_blocks_only_when_told_to() {
        let tenants = |list: &[(&str, Option<&str>, bool)]| -> String {
            list.iter()
                .map(|(name, salt, admin)| {
                    let salt = salt.map_or(String::new(), |s| format!("salt = {s:?}\n"));
                    format!(
                        "[[tenants]]\nname = {name:?}\ntoken = \"tok-{name}\"\n{salt}admin = {admin}\n"
                    )
                })
                .collect()
        };
        // Two non-admin tenants without salts: refused, naming them and the fix.
        let two = tenants(&[
            ("a", None, false),
            ("b", Some(""), false),
            ("c", Some("s"), false),
        ]);
        let err = Config::from_toml(&two).unwrap_err().to_string();
        assert!(err.contains("\"a\", \"b\""), "{err}");
        assert!(!err.contains("\"c\""), "{err}");
        assert!(err.contains("share_unsalted_blocks = true"), "{err}");
        assert!(err.contains("salt"), "{err}");
        // Sharing on purpose.
        let shared = format!("[server]\nshare_unsalted_blocks = true\n{two}");
        assert!(
            Config::from_toml(&shared)
                .unwrap()
                .server
                .share_unsalted_blocks
        );
        // Salted users; admins (operators) may go unsalted.
        Config::from_toml(&tenants(&[
            ("a", Some("sa"), false),
            ("b", Some("sb"), false),
            ("ops", None, true),
        ]))
        .unwrap();
        // One user and an admin: nobody to share with.
        Config::from_toml(&tenants(&[("a", None, false), ("ops", None, true)])).unwrap();
    }

    #[test]
    fn the_tenants_example_of_docs_api_md_is_valid() {
        let doc = include_str!("../docs/api.md");
        let section = &doc[doc.find("## 8. Authentication and tenants").unwrap()..];
        let block: String = section
            .lines()
            .skip_while(|l| *l != "```text")
            .skip(1)
            .take_while(|l| *l != "```")
            .map(|l| format!("{l}\n"))
            .collect();
        let cfg = Config::from_toml(&block).unwrap();
        assert_eq!(cfg.tenants.len(), 3);
        assert!(cfg.tenants.iter().any(|t| t.admin && t.salt.is_none()));
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(Config::from_toml("[store]\nurl = 1").is_err());
        assert!(Config::from_toml("[server]\nbody_read_timeout = \"0s\"").is_err());
        assert!(Config::from_toml("[server]\nresponse_write_timeout = \"0s\"").is_err());
        assert!(Config::from_toml("[stor]").is_err());
        let dup = r#"
            [[namespaces]]
            label = "a"
            model_id = "m"
            kv_dtype = "bf16"
            layout = { num_layers = 1, num_kv_heads = 1, head_dim = 8 }
            [[namespaces]]
            label = "a"
            model_id = "m"
            kv_dtype = "bf16"
            layout = { num_layers = 1, num_kv_heads = 1, head_dim = 8 }
        "#;
        assert!(matches!(
            Config::from_toml(dup),
            Err(Error::InvalidNamespace(_))
        ));
        assert!(Config::from_toml("[[namespaces]]\nlabel = \"a\"\nmodel_id = \"m\"\nkv_dtype = \"int4\"\nlayout = { num_layers = 1, num_kv_heads = 1, head_dim = 8 }").is_err());
    }
}
