//! The `kvshelf` operator commands, run as the binary an operator runs, against a real Redis:
//! exit statuses a script can rely on, and the same TTLs the sidecar's API gives.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use kvshelf::{Namespace, PrefixHasher};
use support::{namespace, payload, redis_url, store};

/// A config file naming the test Redis and `ns` (with a TTL of its own), removed on drop.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(ns: &Namespace) -> ConfigFile {
        Self::on(ns, &redis_url())
    }

    /// A config file naming the Redis at `url` and `ns`.
    fn on(ns: &Namespace, url: &str) -> ConfigFile {
        let l = &ns.layout;
        let text = format!(
            "[store]\nurl = \"{}\"\n\n[[namespaces]]\nlabel = \"{}\"\nmodel_id = \"{}\"\n\
             kv_dtype = \"{}\"\nblock_size = {}\nttl = \"6h\"\n\
             layout = {{ num_layers = {}, num_kv_heads = {}, head_dim = {} }}\n",
            url,
            ns.label,
            ns.model_id,
            ns.kv_dtype,
            ns.block_size,
            l.num_layers,
            l.num_kv_heads,
            l.head_dim,
        );
        let path = std::env::temp_dir().join(format!("kvshelf-cli-{}.toml", ns.label));
        std::fs::write(&path, text).unwrap();
        ConfigFile(path)
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs `kvshelf --config <config> args…` (bounded: a hung CLI fails the test).
async fn kvshelf(config: &Path, args: &[&str]) -> Output {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_kvshelf"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("KVSHELF_REDIS_URL")
        .env_remove("KVSHELF_CONFIG")
        .env("NO_COLOR", "1")
        .output();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the CLI answers")
        .expect("the CLI runs")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn pin_and_unpin_exit_non_zero_on_a_missing_block_and_unpin_restores_the_namespace_ttl() {
    let mut ns = namespace("cli-pin");
    ns.ttl = Some(Duration::from_secs(6 * 3600));
    let config = ConfigFile::new(&ns);
    let s = store();
    let hashes =
        PrefixHasher::new(&ns, None).hash_prefix(&(0..2 * ns.block_size).collect::<Vec<_>>());
    s.put(&ns, &[(hashes[0], payload(&ns, 4))]).await.unwrap();
    let (h, missing) = (hashes[0].to_string(), hashes[1].to_string());

    let out = kvshelf(&config.0, &["pin", &ns.label, &h]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        s.ttl(&ns.label, &hashes[0]).await.unwrap(),
        Some(None),
        "pinned"
    );

    // The namespace's TTL (6h), as the API's unpin gives, not the store's (1h).
    let out = kvshelf(&config.0, &["unpin", &ns.label, &h]).await;
    assert!(out.status.success(), "{}", text(&out));
    let ttl = s
        .ttl(&ns.label, &hashes[0])
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        ttl > Duration::from_secs(5 * 3600),
        "{ttl:?}\n{}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("6h"),
        "{}",
        text(&out)
    );

    let out = kvshelf(&config.0, &["unpin", &ns.label, &h, "--ttl", "2h"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let ttl = s
        .ttl(&ns.label, &hashes[0])
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        ttl > Duration::from_secs(3600) && ttl <= Duration::from_secs(2 * 3600),
        "{ttl:?}"
    );

    for command in ["pin", "unpin"] {
        let out = kvshelf(&config.0, &[command, &ns.label, &missing]).await;
        assert!(
            !out.status.success(),
            "{command} of a missing block fails: {}",
            text(&out)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no such block"),
            "{}",
            text(&out)
        );
    }
    assert_eq!(
        s.ttl(&ns.label, &hashes[1]).await.unwrap(),
        None,
        "nothing created"
    );
}

#[tokio::test]
async fn purge_reports_what_it_deleted() {
    let ns = namespace("cli-purge");
    let config = ConfigFile::new(&ns);
    let s = store();
    let hashes =
        PrefixHasher::new(&ns, None).hash_prefix(&(0..3 * ns.block_size).collect::<Vec<_>>());
    let blocks: Vec<_> = hashes.iter().map(|h| (*h, payload(&ns, 5))).collect();
    s.put(&ns, &blocks).await.unwrap();

    let out = kvshelf(&config.0, &["purge", &ns.label]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 blocks would be deleted"));
    let out = kvshelf(&config.0, &["purge", &ns.label, "--yes"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}: 3 blocks deleted\n", ns.label)
    );
    assert_eq!(s.lookup(&ns, &hashes).await.unwrap(), 0);
}

/// Issue 18 §2: a key kvshelf could never have written under a namespace's prefix (longer
/// than a `SCAN` page's cap, or not UTF-8) is skipped and reported, never the end of
/// `kvshelf stats` or `kvshelf purge`. On main both failed every time ("reply of 1116
/// bytes, longer than the command allows"; "not a SCAN page"). On a Redis of its own: the
/// foreign keys would be in every other test's `stats`.
#[tokio::test]
async fn foreign_keys_never_stop_stats_or_purge() {
    let server = support::RedisServer::start(&[]);
    let ns = namespace("cli-foreign");
    let config = ConfigFile::on(&ns, &server.url());
    let s = support::store_with(kvshelf::StoreConfig {
        url: server.url(),
        ..Default::default()
    });
    let hashes =
        PrefixHasher::new(&ns, None).hash_prefix(&(0..3 * ns.block_size).collect::<Vec<_>>());
    let blocks: Vec<_> = hashes.iter().map(|h| (*h, payload(&ns, 5))).collect();
    s.put(&ns, &blocks).await.unwrap();
    let prefix = format!("kvshelf:v1:{}:", ns.label);
    let long = format!("{prefix}{}", "x".repeat(1100));
    let mut not_utf8 = prefix.clone().into_bytes();
    not_utf8.extend_from_slice(&[0xff, 0xfe]);
    let mut raw = support::raw(&server.url()).await;
    let _: () = redis::cmd("SET")
        .arg(&long)
        .arg("foreign")
        .query_async(&mut raw)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&not_utf8)
        .arg("foreign")
        .query_async(&mut raw)
        .await
        .unwrap();

    assert_eq!(s.count(&ns.label).await.unwrap(), 3);
    let out = kvshelf(&config.0, &["stats"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&ns.label),
        "{}",
        text(&out)
    );
    let out = kvshelf(&config.0, &["purge", &ns.label]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 blocks would be deleted"));
    let out = kvshelf(&config.0, &["purge", &ns.label, "--yes"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}: 3 blocks deleted\n", ns.label)
    );
    assert!(text(&out).contains("SCAN skipped keys"), "{}", text(&out));
    // The foreign keys are left alone: kvshelf deletes only what it could have written.
    let left: i64 = redis::cmd("EXISTS")
        .arg(&long)
        .arg(&not_utf8)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(left, 2);
    assert_eq!(s.lookup(&ns, &hashes).await.unwrap(), 0);
}
