//! Knowing a hash is not enough to change a block: with tenants configured, delete, pin,
//! unpin and purge need an admin token, over HTTP and gRPC, and a refused call changes
//! nothing (not even this sidecar's L1). Pinned bytes are capped per namespace, counted in
//! Redis across sidecars, and a pinned block deleted behind kvshelf's back gives its room back.

mod support;

use std::time::Duration;

use bytes::Bytes;
use kvshelf::client::{Client, ClientError, Protocol};
use kvshelf::config::TenantConfig;
use kvshelf::store::{PutResult, block_key, pins_key};
use kvshelf::{BlockHash, Namespace, PrefixHasher};
use support::{Sidecar, namespace, payload, redis_cli, redis_url, sidecar_config};

fn prompt(ns: &Namespace, blocks: u32, seed: u32) -> Vec<u32> {
    (0..blocks * ns.block_size).map(|t| t * 7 + seed).collect()
}

fn tenant(name: &str, salt: Option<&str>, admin: bool) -> TenantConfig {
    TenantConfig {
        name: name.into(),
        token: format!("tok-{name}"),
        salt: salt.map(Into::into),
        admin,
    }
}

fn api_code(e: ClientError) -> String {
    match e {
        ClientError::Api { code, .. } => code,
        other => panic!("expected an API error, got {other}"),
    }
}

/// A raw gRPC request with a bearer token, to see the status code itself.
fn grpc_request<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

/// The status code and the `kvshelf-error` entry of a failed RPC.
fn grpc_error<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> (tonic::Code, String) {
    let s = r.expect_err("the RPC must fail");
    let code = s
        .metadata()
        .get("kvshelf-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    (s.code(), code)
}

async fn raw_grpc(
    side: &Sidecar,
) -> kvshelf::proto::shelf_client::ShelfClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(side.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    kvshelf::proto::shelf_client::ShelfClient::new(channel)
}

#[tokio::test]
async fn only_admins_delete_pin_unpin_or_purge_and_a_refusal_changes_nothing() {
    let ns = namespace("tenancy");
    let label = ns.label.clone();
    let mut cfg = sidecar_config(Some(redis_url()), vec![ns.clone()]);
    cfg.tenants = vec![
        tenant("a", Some("salt-a"), false),
        tenant("b", Some("salt-b"), false),
        tenant("ops", None, true), // admins may go unsalted
    ];
    let side = Sidecar::start(cfg).await;
    let a = side.client(Protocol::Http, Some("tok-a"));

    // Tenant A puts its prompt; the sidecar keeps the blocks in its L1 too.
    let hashes = a.hash(&label, &prompt(&ns, 3, 1)).await.unwrap();
    let blocks: Vec<(BlockHash, Bytes)> = hashes.iter().map(|h| (*h, payload(&ns, 1))).collect();
    assert_eq!(
        a.put(&label, &blocks, false).await.unwrap(),
        vec![PutResult::Stored; 3]
    );
    let l1_before = side.shelf.stats().await.l1_entries;
    assert_eq!(l1_before, 3);

    // B has learned A's hashes. Every change is refused, for B and for A itself (neither is
    // an admin), over HTTP…
    let http = reqwest::Client::new();
    let base = side.url();
    let h = hashes[0];
    let attempts = [
        http.delete(format!("{base}/v1/blocks/{label}/{h}")),
        http.post(format!("{base}/v1/delete"))
            .json(&serde_json::json!({"namespace": label, "block_hashes": hashes})),
        http.post(format!("{base}/v1/blocks/{label}/{h}/pin")),
        http.post(format!("{base}/v1/blocks/{label}/{h}/unpin")),
        http.post(format!("{base}/v1/namespaces/{label}/purge")),
    ];
    for token in ["tok-b", "tok-a"] {
        for attempt in &attempts {
            let r = attempt
                .try_clone()
                .unwrap()
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 403, "{attempt:?}");
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["error"], "forbidden", "{body}");
            assert!(
                body["message"].as_str().unwrap().contains("admin token"),
                "{body}"
            );
        }
    }

    // …and over gRPC.
    let mut raw = raw_grpc(&side).await;
    let h_bytes = Bytes::copy_from_slice(&h.0);
    let forbidden = (tonic::Code::PermissionDenied, "forbidden".to_owned());
    for token in ["tok-b", "tok-a"] {
        let delete = kvshelf::proto::DeleteRequest {
            namespace: label.clone(),
            block_hashes: vec![h_bytes.clone()],
        };
        let pin = kvshelf::proto::PinRequest {
            namespace: label.clone(),
            block_hash: h_bytes.clone(),
        };
        let purge = kvshelf::proto::PurgeRequest {
            namespace: label.clone(),
        };
        assert_eq!(
            grpc_error(raw.delete(grpc_request(delete, token)).await),
            forbidden
        );
        assert_eq!(
            grpc_error(raw.pin(grpc_request(pin.clone(), token)).await),
            forbidden
        );
        assert_eq!(
            grpc_error(raw.unpin(grpc_request(pin, token)).await),
            forbidden
        );
        assert_eq!(
            grpc_error(raw.purge(grpc_request(purge, token)).await),
            forbidden
        );
    }

    // Nothing changed: every block is there with its TTL, and still in this sidecar's L1.
    for h in &hashes {
        let ttl = side.shelf.ttl(&label, h).await.unwrap();
        assert!(
            matches!(ttl, Some(Some(t)) if t > Duration::from_secs(3000)),
            "{ttl:?}"
        );
    }
    assert_eq!(
        a.lookup_hashes(&label, &hashes, false)
            .await
            .unwrap()
            .hit_blocks,
        3
    );
    assert_eq!(side.shelf.stats().await.l1_entries, l1_before);
    let pins = redis_cli(&redis_url(), &["EXISTS", &pins_key(&label)]).unwrap();
    assert_eq!(pins.trim(), "0", "no pin was recorded");

    // The admin can do each of them, over either protocol.
    let ops_http = side.client(Protocol::Http, Some("tok-ops"));
    let ops_grpc = side.client(Protocol::Grpc, Some("tok-ops"));
    assert!(ops_http.pin(&label, &hashes[0], true).await.unwrap());
    assert_eq!(
        side.shelf.ttl(&label, &hashes[0]).await.unwrap(),
        Some(None)
    );
    assert!(ops_grpc.pin(&label, &hashes[0], false).await.unwrap());
    assert!(matches!(
        side.shelf.ttl(&label, &hashes[0]).await.unwrap(),
        Some(Some(_))
    ));
    assert_eq!(ops_grpc.delete(&label, &hashes[2..]).await.unwrap(), 1);
    assert_eq!(ops_http.delete(&label, &hashes[1..2]).await.unwrap(), 1);
    assert_eq!(ops_grpc.purge(&label).await.unwrap().deleted, 1);
    assert_eq!(
        a.lookup_hashes(&label, &hashes, false)
            .await
            .unwrap()
            .hit_blocks,
        0
    );
}

/// The records of pinned blocks in Redis, as an operator sees them.
fn recorded_pins(label: &str) -> usize {
    redis_cli(&redis_url(), &["HLEN", &pins_key(label)])
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

async fn put_all(c: &Client, ns: &Namespace, hashes: &[BlockHash]) {
    let blocks: Vec<_> = hashes.iter().map(|h| (*h, payload(ns, 3))).collect();
    let out = c.put(&ns.label, &blocks, false).await.unwrap();
    assert!(out.iter().all(|o| *o == PutResult::Stored), "{out:?}");
}

#[tokio::test]
async fn pinned_bytes_are_capped_per_namespace_across_sidecars() {
    let mut capped = namespace("pin-cap");
    let bb = capped.block_bytes();
    capped.max_pinned_bytes = Some(3 * bb); // its own cap
    let plain = namespace("pin-default"); // the server's cap
    let mut cfg = sidecar_config(Some(redis_url()), vec![capped.clone(), plain.clone()]);
    cfg.server.max_pinned_bytes = 2 * bb;
    let one = Sidecar::start(cfg.clone()).await;
    let two = Sidecar::start(cfg).await;
    let c1 = one.client(Protocol::Http, None);
    let c2 = two.client(Protocol::Grpc, None);
    let label = capped.label.clone();
    let hs = PrefixHasher::new(&capped, None).hash_prefix(&prompt(&capped, 6, 2));
    put_all(&c1, &capped, &hs).await;

    // Three blocks fit, pinned through both sidecars; pinning one again takes no more room.
    assert!(c1.pin(&label, &hs[0], true).await.unwrap());
    assert!(c2.pin(&label, &hs[1], true).await.unwrap());
    assert!(c1.pin(&label, &hs[2], true).await.unwrap());
    assert!(c2.pin(&label, &hs[0], true).await.unwrap());
    assert_eq!(recorded_pins(&label), 3);

    // A fourth is refused through either sidecar: the count lives in Redis.
    assert_eq!(
        api_code(c2.pin(&label, &hs[3], true).await.unwrap_err()),
        "pin_limit"
    );
    let r = reqwest::Client::new()
        .post(format!("{}/v1/blocks/{label}/{}/pin", one.url(), hs[3]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "pin_limit");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("max_pinned_bytes"),
        "{body}"
    );
    let mut raw = raw_grpc(&two).await;
    let pin_req = kvshelf::proto::PinRequest {
        namespace: label.clone(),
        block_hash: Bytes::copy_from_slice(&hs[3].0),
    };
    let refused = raw.pin(tonic::Request::new(pin_req)).await;
    assert_eq!(
        grpc_error(refused),
        (tonic::Code::ResourceExhausted, "pin_limit".to_owned())
    );
    // The refused block keeps its TTL; no record was left behind.
    assert!(matches!(
        one.shelf.ttl(&label, &hs[3]).await.unwrap(),
        Some(Some(_))
    ));
    assert_eq!(recorded_pins(&label), 3);

    // The gauge is read from Redis at each scrape; refusals are counted. (Both sidecars of
    // this test share one process, hence one metrics registry.)
    let gauge = format!("kvshelf_pinned_bytes{{namespace=\"{label}\"}}");
    let refusals = format!("kvshelf_pins_refused_total{{namespace=\"{label}\"}}");
    assert_eq!(one.metric(&gauge).await, (3 * bb) as f64);
    assert_eq!(two.metric(&refusals).await, 3.0);

    // Unpinning frees room.
    assert!(c1.pin(&label, &hs[1], false).await.unwrap());
    assert_eq!(recorded_pins(&label), 2);
    assert!(c2.pin(&label, &hs[3], true).await.unwrap());
    assert_eq!(one.metric(&gauge).await, (3 * bb) as f64);

    // A pinned block deleted behind kvshelf's back (redis-cli UNLINK) still holds its record…
    let gone = block_key(&label, &hs[0]);
    assert_eq!(
        redis_cli(&redis_url(), &["UNLINK", &gone]).unwrap().trim(),
        "1"
    );
    assert_eq!(recorded_pins(&label), 3);
    // …until a pin would pass the cap: the record is pruned, and the pin fits.
    assert!(c1.pin(&label, &hs[4], true).await.unwrap());
    assert_eq!(recorded_pins(&label), 3);
    let stale = redis_cli(
        &redis_url(),
        &["HEXISTS", &pins_key(&label), &hs[0].to_string()],
    );
    assert_eq!(stale.unwrap().trim(), "0");
    assert_eq!(two.metric(&gauge).await, (3 * bb) as f64);

    // A missing block is not pinned and leaves no record, even at the cap.
    let missing = PrefixHasher::new(&capped, None).hash_prefix(&prompt(&capped, 1, 99))[0];
    assert_eq!(recorded_pins(&label), 3);
    assert!(!c1.pin(&label, &missing, true).await.unwrap());
    assert_eq!(recorded_pins(&label), 3);
    assert!(c1.pin(&label, &hs[2], false).await.unwrap());
    assert!(!c1.pin(&label, &missing, true).await.unwrap());
    assert_eq!(recorded_pins(&label), 2);

    // The server-wide cap applies to a namespace without its own: two blocks.
    let ps = PrefixHasher::new(&plain, None).hash_prefix(&prompt(&plain, 3, 4));
    put_all(&c2, &plain, &ps).await;
    assert!(c2.pin(&plain.label, &ps[0], true).await.unwrap());
    assert!(c1.pin(&plain.label, &ps[1], true).await.unwrap());
    assert_eq!(
        api_code(c2.pin(&plain.label, &ps[2], true).await.unwrap_err()),
        "pin_limit"
    );

    // Delete and purge take their records with them.
    assert_eq!(c2.delete(&label, &hs[3..4]).await.unwrap(), 1);
    assert_eq!(recorded_pins(&label), 1);
    c1.purge(&label).await.unwrap();
    c2.purge(&plain.label).await.unwrap();
    for l in [&label, &plain.label] {
        let exists = redis_cli(&redis_url(), &["EXISTS", &pins_key(l)]).unwrap();
        assert_eq!(exists.trim(), "0", "{l}");
    }
    assert_eq!(one.metric(&gauge).await, 0.0);
}

#[tokio::test]
async fn concurrent_pins_never_pass_the_cap() {
    let mut ns = namespace("pin-race");
    let bb = ns.block_bytes();
    ns.max_pinned_bytes = Some(5 * bb);
    let cfg = sidecar_config(Some(redis_url()), vec![ns.clone()]);
    let one = Sidecar::start(cfg.clone()).await;
    let two = Sidecar::start(cfg).await;
    let label = ns.label.clone();
    let hs = PrefixHasher::new(&ns, None).hash_prefix(&prompt(&ns, 40, 5));
    put_all(&one.client(Protocol::Http, None), &ns, &hs).await;

    let clients = [
        one.client(Protocol::Http, None),
        two.client(Protocol::Grpc, None),
    ];
    let pins = hs.iter().enumerate().map(|(i, h)| {
        let (c, label) = (clients[i % 2].clone(), label.clone());
        let h = *h;
        tokio::spawn(async move { c.pin(&label, &h, true).await })
    });
    let results = tokio::time::timeout(
        Duration::from_secs(30),
        futures_util::future::join_all(pins),
    )
    .await
    .expect("the pins finish");
    let mut pinned = 0;
    for r in results {
        match r.unwrap() {
            Ok(found) => {
                assert!(found);
                pinned += 1;
            }
            Err(e) => assert_eq!(api_code(e), "pin_limit"),
        }
    }
    assert!((1..=5).contains(&pinned), "{pinned} pinned");
    // What is recorded is exactly what is pinned.
    let mut without_ttl = 0;
    for h in &hs {
        if one.shelf.ttl(&label, h).await.unwrap() == Some(None) {
            without_ttl += 1;
        }
    }
    assert_eq!((without_ttl, recorded_pins(&label)), (pinned, pinned));
    one.client(Protocol::Http, None)
        .purge(&label)
        .await
        .unwrap();
}

#[tokio::test]
async fn the_embedded_store_caps_pins_too() {
    let mut ns = namespace("pin-memory");
    ns.max_pinned_bytes = Some(2 * ns.block_bytes());
    let side = Sidecar::start(sidecar_config(None, vec![ns.clone()])).await;
    let c = side.client(Protocol::Http, None);
    let hs = PrefixHasher::new(&ns, None).hash_prefix(&prompt(&ns, 3, 6));
    put_all(&c, &ns, &hs).await;
    assert!(c.pin(&ns.label, &hs[0], true).await.unwrap());
    assert!(c.pin(&ns.label, &hs[1], true).await.unwrap());
    assert_eq!(
        api_code(c.pin(&ns.label, &hs[2], true).await.unwrap_err()),
        "pin_limit"
    );
    let gauge = format!("kvshelf_pinned_bytes{{namespace=\"{}\"}}", ns.label);
    assert_eq!(side.metric(&gauge).await, (2 * ns.block_bytes()) as f64);
    assert!(c.pin(&ns.label, &hs[0], false).await.unwrap());
    assert!(c.pin(&ns.label, &hs[2], true).await.unwrap());
    assert_eq!(c.delete(&ns.label, &hs[1..2]).await.unwrap(), 1);
    assert!(c.pin(&ns.label, &hs[0], true).await.unwrap());
}
