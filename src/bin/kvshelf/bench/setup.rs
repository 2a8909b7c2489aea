//! What a bench run measures: value sizes, paths, the settings it overrides, its config.

use std::time::Duration;

use serde::Serialize;

use kvshelf::namespace::{Dtype, Layout, Namespace};
use kvshelf::store::StoreConfig;

/// The value sizes the bench knows, named after the KV blocks they stand for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum ValueSize {
    /// 192 KiB: a 16-token block of a 0.5B-class model (24 layers, 2 KV heads × 64, bf16).
    #[value(name = "192KiB")]
    K192,
    /// 2 MiB: a 16-token block of an 8B-class model (32 layers, 8 KV heads × 128, bf16).
    #[value(name = "2MiB")]
    M2,
    /// 32 MiB: a 256-token chunk of the 8B-class model.
    #[value(name = "32MiB")]
    M32,
}

impl ValueSize {
    /// The namespace whose blocks have this size.
    pub fn namespace(self) -> Namespace {
        let (label, layers, heads, dim, block) = match self {
            ValueSize::K192 => ("bench-192kib", 24, 2, 64, 16),
            ValueSize::M2 => ("bench-2mib", 32, 8, 128, 16),
            ValueSize::M32 => ("bench-32mib", 32, 8, 128, 256),
        };
        Namespace {
            label: label.into(),
            model_id: format!("kvshelf/{label}"),
            model_revision: String::new(),
            kv_dtype: Dtype::Bfloat16,
            layout: Layout {
                num_layers: layers,
                num_kv_heads: heads,
                head_dim: dim,
                tp_size: 1,
                tp_rank: 0,
                order: "lkthd".into(),
            },
            block_size: block,
            lora_adapter: None,
            ttl: Some(Duration::from_secs(3600)),
            max_pinned_bytes: None,
            hash_scheme: Default::default(),
        }
    }
}

/// One path to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchPath {
    /// The kvshelf library straight to Redis (`RedisStore::get`, verifying each block).
    Library,
    /// The library reading each payload straight into a buffer the caller owns and reuses
    /// (`RedisStore::read_into`, verifying in place), as LMCache's client does.
    LibraryInto,
    /// The sidecar over HTTP (framed stream), L1 off: every block is read from Redis.
    Http,
    /// The sidecar over gRPC (server stream), L1 off.
    Grpc,
    /// The sidecar over HTTP, served from its L1 (warmed before the clock starts).
    HttpL1,
    /// The sidecar over gRPC, served from its L1.
    GrpcL1,
    /// The sidecar over HTTP on its Unix socket (`listen_unix`), L1 off.
    HttpUnix,
    /// The sidecar over gRPC on its Unix socket, L1 off.
    GrpcUnix,
    /// Puts of new blocks through the library (`SET NX PX`, pipelined).
    Put,
    /// Puts of new blocks through the sidecar over HTTP (synchronous).
    HttpPut,
}

impl BenchPath {
    /// The path's name as printed and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            BenchPath::Library => "library",
            BenchPath::LibraryInto => "library-into",
            BenchPath::Http => "http",
            BenchPath::Grpc => "grpc",
            BenchPath::HttpL1 => "http-l1",
            BenchPath::GrpcL1 => "grpc-l1",
            BenchPath::HttpUnix => "http-unix",
            BenchPath::GrpcUnix => "grpc-unix",
            BenchPath::Put => "put",
            BenchPath::HttpPut => "http-put",
        }
    }

    pub(super) fn is_put(self) -> bool {
        matches!(self, BenchPath::Put | BenchPath::HttpPut)
    }
}

/// The settings `kvshelf bench` runs with that differ from a user's defaults, and why;
/// printed under every table. Fetch and lookup deadlines are the defaults.
pub const OVERRIDES: &str = "settings that differ from the defaults: [store] \
response_timeout = 60s (64 clients x 32 MiB queue up behind each other in Redis); \
in-process sidecars: [server] put_timeout = 60s (a synchronous put of 8 x 32 MiB waits \
behind the other clients' puts), max_concurrent_requests = 4096, max_body_bytes and \
body_memory_bytes unbounded (the bench's clients, not the limits, are measured), \
l1_bytes = 0 on the paths without -l1";

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// The store settings (URL, TLS, cluster, `batch_connections`, …) of the library
    /// paths and the in-process sidecars; the response timeout is raised to 60 s.
    pub store: StoreConfig,
    /// Value size.
    pub size: ValueSize,
    /// Blocks per request.
    pub batch: usize,
    /// Concurrent clients, each with its own connection(s).
    pub concurrency: usize,
    /// Requests per path and round.
    pub requests: usize,
    /// Paths, in order (rotated each round).
    pub paths: Vec<BenchPath>,
    /// Rounds: every path (and ceiling) is measured once per round, paths interleaved, and
    /// the median round is reported, so a noisy moment does not decide a ratio.
    pub rounds: usize,
    /// Also measure the ceilings (redis-benchmark GET/SET, loopback TCP) in every round.
    pub ceilings: bool,
    /// Drive this already running sidecar instead of one started in-process (HTTP and gRPC
    /// paths; its config must have the bench namespace).
    pub sidecar: Option<String>,
    /// With `sidecar`: its Unix socket, `unix:<path>` (the `-unix` paths).
    pub sidecar_unix: Option<String>,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kvshelf::config::Config;

    use super::*;

    #[test]
    fn the_bench_sidecar_config_has_the_bench_namespaces() {
        let cfg =
            Config::from_toml(include_str!("../../../../examples/bench.toml")).expect("parses");
        for size in [ValueSize::K192, ValueSize::M2, ValueSize::M32] {
            let ns = size.namespace();
            assert_eq!(cfg.namespace(&ns.label), Some(&ns), "{}", ns.label);
            let mut put = ns.clone();
            put.label = format!("{}-put", ns.label);
            put.ttl = Some(Duration::from_secs(120));
            assert_eq!(cfg.namespace(&put.label), Some(&put), "{}", put.label);
        }
    }
}
