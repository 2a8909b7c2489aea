//! Fail-open that recovers (issue 17 §3), measured through a sidecar with a user's default
//! settings (L1 off, so every fetch reaches Redis):
//!
//! 1. **big blocks on a healthy Redis**: 4 callers each fetch the same 8 blocks of 32 MiB
//!    (LMCache's default 256-token chunk of an 8B model) 3 times over HTTP. Reports how many
//!    fetches came back short, the sidecar's `backend_unavailable` ends, and how many
//!    connections Redis received meanwhile (`total_connections_received`).
//! 2. **a 3 s SIGSTOP under load**: 4 callers fetch 8 blocks of 2 MiB in a loop; Redis is
//!    stopped (SIGSTOP: connections stay open, nothing answers) for 3 s, then continued.
//!    Reports the fetches that failed open meanwhile, the time from SIGCONT to each caller's
//!    next complete fetch, and the connections Redis received during the whole phase.
//!
//! ```sh
//! redis-server --port 6399 --save '' &
//! KVSHELF_BENCH_REDIS=redis://127.0.0.1:6399 cargo bench --bench brownout
//! ```
//!
//! The Redis must be local (the bench reads its pid from `INFO server` and signals it) and
//! is given the blocks of the namespaces `brownout-32mib` and `brownout-2mib` (~300 MiB).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvshelf::client::{Client, ClientConfig, Protocol};
use kvshelf::config::Config;
use kvshelf::frame::EndReason;
use kvshelf::{BlockHash, Dtype, Layout, Namespace, PrefixHasher, RedisStore, StoreConfig};

fn namespace(label: &str, block_size: u32) -> Namespace {
    Namespace {
        label: label.into(),
        model_id: format!("kvshelf/{label}"),
        model_revision: String::new(),
        kv_dtype: Dtype::Bfloat16,
        layout: Layout {
            num_layers: 32,
            num_kv_heads: 8,
            head_dim: 128,
            tp_size: 1,
            tp_rank: 0,
            order: "lkthd".into(),
        },
        block_size,
        lora_adapter: None,
        ttl: Some(Duration::from_secs(600)),
        max_pinned_bytes: None,
        hash_scheme: Default::default(),
    }
}

fn hashes(ns: &Namespace, n: u32) -> Vec<BlockHash> {
    let tokens: Vec<u32> = (0..n * ns.block_size).collect();
    PrefixHasher::new(ns, None).hash_prefix(&tokens)
}

async fn info(redis: &mut redis::aio::MultiplexedConnection, section: &str, field: &str) -> u64 {
    let text: String = redis::cmd("INFO")
        .arg(section)
        .query_async(redis)
        .await
        .expect("INFO");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("INFO {section} has no {field}"))
}

fn signal(pid: u64, sig: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

fn main() {
    let url = std::env::var("KVSHELF_BENCH_REDIS").unwrap_or("redis://127.0.0.1:6379".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(run(url));
}

async fn run(url: String) {
    let big = namespace("brownout-32mib", 256);
    let small = namespace("brownout-2mib", 16);
    let store = RedisStore::connect(StoreConfig {
        url: url.clone(),
        response_timeout: Duration::from_secs(60),
        ..Default::default()
    })
    .await
    .expect("Redis answers");
    for (ns, n) in [(&big, 8), (&small, 8)] {
        let hs = hashes(ns, n);
        store.delete(&ns.label, &hs).await.expect("delete");
        let blocks: Vec<(BlockHash, Bytes)> = hs
            .iter()
            .enumerate()
            .map(|(i, h)| (*h, Bytes::from(vec![i as u8; ns.block_bytes() as usize])))
            .collect();
        for b in blocks.chunks(2) {
            store.put(ns, b).await.expect("put");
        }
    }
    let mut raw = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let pid = info(&mut raw, "server", "process_id").await;

    // The sidecar as a user runs it: default [server] and [store] settings, L1 off.
    let mut cfg = Config {
        store: Some(StoreConfig {
            url: url.clone(),
            ..Default::default()
        }),
        namespaces: vec![big.clone(), small.clone()],
        ..Default::default()
    };
    cfg.server.l1_bytes = 0;
    let shelf = kvshelf::shelf::Shelf::new(&cfg).expect("config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(kvshelf::server::run(
        listener,
        shelf,
        std::future::pending(),
    ));
    let client = || {
        Client::new(ClientConfig {
            url: base.clone(),
            protocol: Protocol::Http,
            timeout: Duration::from_secs(60),
            ..Default::default()
        })
        .unwrap()
    };

    // 1. Big blocks on a healthy Redis. One round first, so the sidecar's pool has dialled
    // what it needs (a user's sidecar has been running).
    let hs = hashes(&big, 8);
    let warm: Vec<_> = (0..4)
        .map(|_| {
            let (c, hs, label) = (client(), hs.clone(), big.label.clone());
            tokio::spawn(async move { c.fetch(&label, &hs).await.expect("fetch").blocks.len() })
        })
        .collect();
    for w in warm {
        w.await.unwrap();
    }
    let before = info(&mut raw, "stats", "total_connections_received").await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (c, hs, label) = (client(), hs.clone(), big.label.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                for _ in 0..3 {
                    let f = c.fetch(&label, &hs).await.expect("fetch");
                    out.push((f.blocks.len(), f.reason));
                }
                out
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.extend(t.await.unwrap());
    }
    let took = started.elapsed();
    let after = info(&mut raw, "stats", "total_connections_received").await;
    let short = results.iter().filter(|(n, _)| *n < 8).count();
    let unavailable = results
        .iter()
        .filter(|(_, r)| *r == EndReason::BackendUnavailable)
        .count();
    println!("## 1. 4 callers x 3 fetches of 8 x 32 MiB, default settings, L1 off");
    println!(
        "fetches: {}, short: {short}, ended backend_unavailable: {unavailable}, \
         took {:.2} s ({:.2} GB/s), connections Redis received meanwhile: {}",
        results.len(),
        took.as_secs_f64(),
        (results.len() as f64 * 8.0 * big.block_bytes() as f64) / took.as_secs_f64() / 1e9,
        after - before
    );

    // 2. A 3 s SIGSTOP under load.
    let hs = hashes(&small, 8);
    let stop = Arc::new(AtomicBool::new(false));
    let cont_at: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let failed = Arc::new(AtomicU64::new(0));
    let before = info(&mut raw, "stats", "total_connections_received").await;
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (c, hs, label) = (client(), hs.clone(), small.label.clone());
            let (stop, cont_at, failed) = (stop.clone(), cont_at.clone(), failed.clone());
            tokio::spawn(async move {
                // Time from SIGCONT to this caller's first complete fetch after it.
                let mut resumed: Option<Duration> = None;
                let mut complete = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let f = c.fetch(&label, &hs).await;
                    let ok = matches!(&f, Ok(f) if f.blocks.len() == 8);
                    if ok {
                        complete += 1;
                        let at = *cont_at.lock().unwrap();
                        if let (Some(at), None) = (at, resumed) {
                            resumed = Some(at.elapsed());
                        }
                    } else {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
                (complete, resumed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal(pid, "STOP");
    tokio::time::sleep(Duration::from_secs(3)).await;
    *cont_at.lock().unwrap() = Some(Instant::now());
    signal(pid, "CONT");
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    let mut resumed = Vec::new();
    let mut complete = 0;
    for t in tasks {
        let (c, r) = t.await.unwrap();
        complete += c;
        resumed.push(r);
    }
    let after = info(&mut raw, "stats", "total_connections_received").await;
    println!("## 2. 4 callers fetching 8 x 2 MiB in a loop; Redis SIGSTOPped for 3 s");
    let ms: Vec<String> = resumed
        .iter()
        .map(|r| r.map_or("never".into(), |d| format!("{} ms", d.as_millis())))
        .collect();
    println!(
        "complete fetches: {complete}, failed open: {}, first complete fetch after SIGCONT per caller: {}, \
         connections Redis received during the phase: {}",
        failed.load(Ordering::SeqCst),
        ms.join(", "),
        after - before
    );
    for ns in [&big, &small] {
        let _ = store.purge(&ns.label).await;
    }
}
