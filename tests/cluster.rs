//! The store and the sidecar on a real 3-primary Redis Cluster: keys spread over every
//! node, every operation works across slots, and a lost primary costs only its own blocks.

mod support;

use std::time::Duration;

use kvshelf::client::Protocol;
use kvshelf::frame::EndReason;
use kvshelf::store::{PinOutcome, block_key};
use kvshelf::{BlockHash, PrefixHasher, PutResult, RedisStore, StoreConfig};
use support::{RedisCluster, Sidecar, namespace, payload};

/// A store config for `cluster` with short timeouts, so a lost node fails fast.
fn cluster_config(cluster: &RedisCluster) -> StoreConfig {
    StoreConfig {
        url: cluster.url(),
        cluster: true,
        connection_timeout: Duration::from_millis(300),
        response_timeout: Duration::from_millis(500),
        ..Default::default()
    }
}

fn cluster_store(cluster: &RedisCluster) -> RedisStore {
    RedisStore::new(cluster_config(cluster)).unwrap()
}

#[tokio::test]
async fn every_store_operation_works_across_slots_and_nodes() {
    let cluster = RedisCluster::start(3);
    let s = cluster_store(&cluster);
    assert!(s.is_cluster());
    s.ping().await.unwrap();
    let ns = namespace("cluster-ops");
    let hashes =
        PrefixHasher::new(&ns, None).hash_prefix(&(0..64 * ns.block_size).collect::<Vec<_>>());
    let blocks: Vec<_> = hashes.iter().map(|h| (*h, payload(&ns, 1))).collect();
    assert_eq!(
        s.put(&ns, &blocks).await.unwrap(),
        vec![PutResult::Stored; 64]
    );
    assert_eq!(
        s.put(&ns, &blocks[..2]).await.unwrap(),
        vec![PutResult::AlreadyPresent; 2]
    );
    for i in 0..3 {
        assert!(
            cluster.dbsize(i) > 5,
            "no hash tag pins a namespace to one shard"
        );
    }
    assert_eq!(s.lookup(&ns, &hashes).await.unwrap(), 64);
    let got = s.fetch_prefix(&ns, &hashes).await.unwrap();
    assert_eq!(got.len(), 64);
    assert!(got.iter().all(|b| b.payload == blocks[0].1));
    assert!(s.pin(&ns.label, &hashes[5]).await.unwrap());
    assert_eq!(s.ttl(&ns.label, &hashes[5]).await.unwrap(), Some(None));
    assert!(s.unpin(&ns.label, &hashes[5]).await.unwrap());
    assert_eq!(
        s.count(&ns.label).await.unwrap(),
        64,
        "SCAN visits every primary"
    );
    assert_eq!(
        s.count_by_namespace().await.unwrap().get(&ns.label),
        Some(&64)
    );
    assert!(s.info("memory").await.unwrap().contains("used_memory"));
    let key = block_key(&ns.label, &hashes[9]);
    assert!(s.inspect(&key).await.unwrap().is_some());
    assert_eq!(s.delete(&ns.label, &hashes[60..]).await.unwrap(), 4);
    assert_eq!(s.lookup(&ns, &hashes).await.unwrap(), 60);
    assert_eq!(s.purge(&ns.label).await.unwrap().deleted, 60);
    assert_eq!(s.lookup(&ns, &hashes).await.unwrap(), 0);

    // Capped pins: the record key and the blocks live on different slots.
    let bb = ns.block_bytes();
    s.put(&ns, &blocks[..3]).await.unwrap();
    let pin = |i: usize| s.pin_within(&ns, &hashes[i], 2 * bb);
    assert_eq!(
        pin(0).await.unwrap(),
        PinOutcome::Pinned { pinned_bytes: bb }
    );
    assert_eq!(
        pin(1).await.unwrap(),
        PinOutcome::Pinned {
            pinned_bytes: 2 * bb
        }
    );
    assert_eq!(
        pin(2).await.unwrap(),
        PinOutcome::OverLimit {
            pinned_bytes: 2 * bb
        }
    );
    // A pinned block unlinked on its node behind kvshelf's back gives its room back.
    let gone = block_key(&ns.label, &hashes[0]);
    let node = cluster.owner(&gone).unwrap();
    let url = cluster.nodes[node].as_ref().unwrap().url();
    assert_eq!(
        support::redis_cli(&url, &["UNLINK", &gone]).unwrap().trim(),
        "1"
    );
    assert_eq!(
        pin(2).await.unwrap(),
        PinOutcome::Pinned {
            pinned_bytes: 2 * bb
        }
    );
    assert_eq!(s.pinned_bytes(&ns).await.unwrap(), 2 * bb);
    assert_eq!(s.purge(&ns.label).await.unwrap().deleted, 2);
    assert_eq!(s.pinned_bytes(&ns).await.unwrap(), 0);
    for i in 0..3 {
        assert_eq!(cluster.dbsize(i), 0, "no block and no pin record is left");
    }
}

#[tokio::test]
async fn losing_one_primary_costs_only_its_blocks() {
    let mut cluster = RedisCluster::start(3);
    let ns = namespace("cluster-loss");
    let mut cfg = support::sidecar_config(None, vec![ns.clone()]);
    cfg.store = Some(cluster_config(&cluster));
    cfg.server.l1_bytes = 0; // every read goes to the cluster
    cfg.server.lookup_timeout = Duration::from_secs(3);
    cfg.server.fetch_timeout = Duration::from_secs(3);
    let side = Sidecar::start(cfg).await;
    let c = side.client(Protocol::Http, None);
    let hashes =
        PrefixHasher::new(&ns, None).hash_prefix(&(0..30 * ns.block_size).collect::<Vec<_>>());
    let blocks: Vec<(BlockHash, _)> = hashes.iter().map(|h| (*h, payload(&ns, 2))).collect();
    c.put(&ns.label, &blocks, false).await.unwrap();
    let owners: Vec<usize> = hashes
        .iter()
        .map(|h| {
            cluster
                .owner(&block_key(&ns.label, h))
                .expect("stored somewhere")
        })
        .collect();

    // Inject: primary 0 dies (no replica takes over). Wait until the survivors mark it
    // failed (node timeout 1 s): the answers below must hold after that, not just before.
    let lost = 0;
    cluster.stop(lost);
    cluster.wait_failed(lost);
    let mut hits = 0;
    for (h, owner) in hashes.iter().zip(&owners) {
        let one = c.lookup_hashes(&ns.label, &[*h], false).await.unwrap();
        let fetched = c.fetch(&ns.label, &[*h]).await.unwrap();
        if *owner == lost {
            assert_eq!(one.hit_blocks, 0, "a block on the lost node is a miss");
            assert!(fetched.blocks.is_empty());
            assert_eq!(
                fetched.reason,
                EndReason::BackendUnavailable,
                "not \"not cached\": its node did not answer"
            );
        } else {
            assert_eq!(one.hit_blocks, 1, "a block on a live node still hits");
            assert_eq!(
                fetched.blocks,
                vec![(*h, payload(&ns, 2))],
                "with its exact bytes"
            );
            assert_eq!(fetched.reason, EndReason::Complete);
            hits += 1;
        }
    }
    assert_eq!(hits, owners.iter().filter(|o| **o != lost).count());
    assert!(hits > 0 && hits < 30);
    // The prefix is served up to the first block that lived on the lost node.
    let first_lost = owners.iter().position(|o| *o == lost).unwrap();
    let run = c.fetch(&ns.label, &hashes).await.unwrap();
    assert_eq!(
        (run.blocks.len(), run.reason),
        (first_lost, EndReason::BackendUnavailable),
        "{owners:?}"
    );
    assert_eq!(
        c.lookup_hashes(&ns.label, &hashes, false)
            .await
            .unwrap()
            .hit_blocks,
        first_lost
    );
}

/// A purge with one primary down deletes every block on the live primaries, and says which
/// node it skipped: through the API (both protocols' client) and the CLI.
#[tokio::test]
async fn purge_with_a_primary_down_purges_the_rest_and_reports_the_node() {
    let mut cluster = RedisCluster::start(3);
    let ns = namespace("cluster-purge");
    let mut cfg = support::sidecar_config(None, vec![ns.clone()]);
    cfg.store = Some(cluster_config(&cluster));
    cfg.server.operator_timeout = Duration::from_secs(5);
    let side = Sidecar::start(cfg).await;
    let hashes =
        PrefixHasher::new(&ns, None).hash_prefix(&(0..30 * ns.block_size).collect::<Vec<_>>());
    let blocks: Vec<(BlockHash, _)> = hashes.iter().map(|h| (*h, payload(&ns, 3))).collect();
    let owners: Vec<usize> = {
        let c = side.client(Protocol::Http, None);
        c.put(&ns.label, &blocks, false).await.unwrap();
        hashes
            .iter()
            .map(|h| cluster.owner(&block_key(&ns.label, h)).unwrap())
            .collect()
    };
    let lost = 0;
    let on_live = owners.iter().filter(|o| **o != lost).count() as u64;
    assert!(on_live > 0 && on_live < 30, "{owners:?}");
    cluster.stop(lost);
    let lost_node = format!("127.0.0.1:{}", cluster.ports[lost]);
    let within = Duration::from_secs(60);

    for protocol in [Protocol::Http, Protocol::Grpc] {
        let c = side.client(protocol, None);
        // What the lost node held is gone from reach; put the rest back for each round.
        c.put(&ns.label, &blocks, false).await.unwrap();
        let report = tokio::time::timeout(within, c.purge(&ns.label))
            .await
            .expect("purge answers")
            .expect("a partial purge is not an error");
        assert_eq!(report.deleted, on_live, "{protocol:?}: {report:?}");
        assert_eq!(report.skipped.len(), 1, "{protocol:?}: {report:?}");
        assert_eq!(report.skipped[0].node, lost_node);
        assert_eq!(report.skipped[0].deleted, 0);
        assert!(!report.skipped[0].error.is_empty());
        for i in (0..3).filter(|i| *i != lost) {
            assert_eq!(cluster.dbsize(i), 0, "{protocol:?}: node {i} purged");
        }
    }

    // The CLI: the same report on stdout, and a failing exit status (the purge is incomplete).
    let c = side.client(Protocol::Http, None);
    c.put(&ns.label, &blocks, false).await.unwrap();
    let dir = std::env::temp_dir().join(format!("kvshelf-cluster-purge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("kvshelf.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\ncluster = true\nurl = \"{}\"\nconnection_timeout = \"300ms\"\n\
             response_timeout = \"500ms\"\n",
            cluster.url()
        ),
    )
    .unwrap();
    let out = tokio::time::timeout(
        within,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_kvshelf"))
            .arg("--config")
            .arg(&config)
            .args(["purge", &ns.label, "--yes"])
            .env_remove("KVSHELF_REDIS_URL")
            .env_remove("KVSHELF_CONFIG")
            .output(),
    )
    .await
    .expect("the CLI answers")
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an incomplete purge fails: {stdout}");
    assert!(
        stdout.contains(&format!("{}: {on_live} blocks deleted", ns.label)),
        "{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains(&format!("skipped node {lost_node}:")),
        "{stdout}\n{stderr}"
    );
    assert!(stderr.contains("incomplete"), "{stderr}");
    for i in (0..3).filter(|i| *i != lost) {
        assert_eq!(cluster.dbsize(i), 0, "CLI: node {i} purged");
    }
}
