//! The sidecar on port 0 against a real Redis, through HTTP, gRPC and the Rust client:
//! every operation, every error code, framed batches, L1 coalescing, tenants, draining.

mod support;

use bytes::Bytes;
use kvshelf::client::{ClientError, Protocol};
use kvshelf::config::TenantConfig;
use kvshelf::frame::{self, EndReason};
use kvshelf::shelf::BodyKind;
use kvshelf::store::PutResult;
use kvshelf::{BlockHash, Namespace};
use support::{Sidecar, namespace, payload, redis_url, sidecar_config};

const BOTH: [Protocol; 2] = [Protocol::Http, Protocol::Grpc];

fn prompt(ns: &Namespace, blocks: u32, seed: u32) -> Vec<u32> {
    (0..blocks * ns.block_size).map(|t| t * 31 + seed).collect()
}

async fn sidecar(ns: &[Namespace]) -> Sidecar {
    Sidecar::start(sidecar_config(Some(redis_url()), ns.to_vec())).await
}

#[tokio::test]
async fn every_operation_through_both_protocols() {
    for protocol in BOTH {
        let ns = namespace("ops");
        let side = sidecar(std::slice::from_ref(&ns)).await;
        let c = side.client(protocol, None);
        let tokens = prompt(&ns, 4, 1);
        let mut with_tail = tokens.clone();
        with_tail.push(7); // a partial block is never hashed
        let hashes = c.hash(&ns.label, &with_tail).await.unwrap();
        assert_eq!(
            hashes,
            kvshelf::PrefixHasher::new(&ns, None).hash_prefix(&tokens)
        );

        let miss = c.lookup_tokens(&ns.label, &tokens, false).await.unwrap();
        assert_eq!((miss.hit_blocks, miss.backend_ok), (0, true));

        let blocks: Vec<(BlockHash, Bytes)> = hashes
            .iter()
            .enumerate()
            .map(|(i, h)| (*h, payload(&ns, i as u8)))
            .collect();
        let put = c.put(&ns.label, &blocks[..3], false).await.unwrap();
        assert_eq!(put, vec![PutResult::Stored; 3], "{protocol:?}");
        let again = c.put(&ns.label, &blocks[..1], false).await.unwrap();
        assert_eq!(again, vec![PutResult::AlreadyPresent]);

        let hit = c.lookup_tokens(&ns.label, &tokens, true).await.unwrap();
        assert_eq!(
            (hit.hit_blocks, hit.hit_tokens),
            (3, 3 * ns.block_size as usize)
        );
        assert_eq!(hit.block_hashes, hashes);
        let by_hash = c.lookup_hashes(&ns.label, &hashes, false).await.unwrap();
        assert_eq!(by_hash.hit_blocks, 3);

        let fetched = c.fetch(&ns.label, &hashes).await.unwrap();
        assert_eq!(fetched.reason, EndReason::Miss, "block 3 is missing");
        assert_eq!(
            fetched.blocks,
            blocks[..3].to_vec(),
            "exact bytes, in order"
        );
        let all3 = c.fetch(&ns.label, &hashes[..3]).await.unwrap();
        assert_eq!(all3.reason, EndReason::Complete);

        // Async put: queued at once, stored soon after.
        let queued = c.put(&ns.label, &blocks[3..], true).await.unwrap();
        assert_eq!(queued, vec![PutResult::Queued]);
        let mut n = 0;
        for _ in 0..200 {
            n = c
                .lookup_hashes(&ns.label, &hashes, false)
                .await
                .unwrap()
                .hit_blocks;
            if n == 4 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(n, 4, "the queued put landed");

        assert!(c.pin(&ns.label, &hashes[0], true).await.unwrap());
        assert_eq!(
            side.shelf.ttl(&ns.label, &hashes[0]).await.unwrap(),
            Some(None)
        );
        assert!(c.pin(&ns.label, &hashes[0], false).await.unwrap());
        assert!(
            side.shelf
                .ttl(&ns.label, &hashes[0])
                .await
                .unwrap()
                .unwrap()
                .is_some()
        );

        assert_eq!(c.delete(&ns.label, &hashes[3..]).await.unwrap(), 1);
        assert_eq!(
            c.lookup_hashes(&ns.label, &hashes, false)
                .await
                .unwrap()
                .hit_blocks,
            3
        );
        assert_eq!(c.purge(&ns.label).await.unwrap().deleted, 3);
        let gone = c.fetch(&ns.label, &hashes).await.unwrap();
        assert!(
            gone.blocks.is_empty(),
            "purge also clears this sidecar's L1"
        );
        side.shutdown().await;
    }
}

#[tokio::test]
async fn http_single_block_endpoints_and_stats() {
    let ns = namespace("single");
    let side = sidecar(std::slice::from_ref(&ns)).await;
    let http = reqwest::Client::new();
    let h = kvshelf::PrefixHasher::new(&ns, None).hash_prefix(&prompt(&ns, 1, 2))[0];
    let url = format!("{}/v1/blocks/{}/{h}", side.url(), ns.label);
    let body = payload(&ns, 9);
    let r = http.put(&url).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let r = http.put(&url).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), r#"{"outcome":"already_present"}"#);
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    assert_eq!(r.bytes().await.unwrap(), body);
    let r = http.delete(&url).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), r#"{"deleted":1}"#);
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 404);

    let stats: serde_json::Value = http
        .get(format!("{}/v1/stats", side.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["backend"], "redis");
    assert_eq!(stats["backend_ready"], true);
    assert_eq!(stats["namespaces"][0]["label"], ns.label.as_str());
    assert_eq!(stats["namespaces"][0]["block_bytes"], ns.block_bytes());
    let r = http
        .get(format!("{}/readyz", side.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let m = http
        .get(format!("{}/metrics", side.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("kvshelf_put_blocks_total"), "{m}");
    assert!(m.contains("# HELP kvshelf_fetch_blocks_total"));
}

#[tokio::test]
async fn framed_batches_of_1_and_256_blocks() {
    let ns = namespace("frames");
    let side = sidecar(std::slice::from_ref(&ns)).await;
    let http = reqwest::Client::new();
    for n in [1u32, 256] {
        let hashes = kvshelf::PrefixHasher::new(&ns, None).hash_prefix(&prompt(&ns, n, n));
        let payloads: Vec<Bytes> = (0..n).map(|i| payload(&ns, i as u8)).collect();
        let body = frame::encode_stream(hashes.iter().zip(payloads.iter().map(|p| &p[..])));
        let r = http
            .post(format!("{}/v1/put?namespace={}", side.url(), ns.label))
            .header("content-type", frame::CONTENT_TYPE)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let out: serde_json::Value = r.json().await.unwrap();
        assert_eq!(out["outcomes"].as_array().unwrap().len(), n as usize);

        let r = http
            .post(format!("{}/v1/fetch", side.url()))
            .json(&serde_json::json!({ "namespace": ns.label, "block_hashes": hashes }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["content-type"], frame::CONTENT_TYPE);
        let bytes = r.bytes().await.unwrap();
        let mut d = frame::Decoder::new(u64::MAX);
        d.feed(&bytes);
        let mut got = Vec::new();
        while let Some(f) = d.next_frame().unwrap() {
            got.push(f);
        }
        d.finish().unwrap();
        assert_eq!(got.len(), n as usize + 1);
        for (i, f) in got[..n as usize].iter().enumerate() {
            let frame::Frame::Block {
                index,
                hash,
                payload,
            } = f
            else {
                panic!("block frame expected")
            };
            assert_eq!((*index, *hash), (i as u32, hashes[i]));
            assert_eq!(payload, &payloads[i]);
        }
        assert_eq!(
            got[n as usize],
            frame::Frame::End {
                blocks: n,
                reason: EndReason::Complete
            }
        );
    }
}

/// The HTTP status and error code of a raw request.
async fn http_error(rb: reqwest::RequestBuilder) -> (u16, String) {
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.expect("errors have a JSON body");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    (status, body["error"].as_str().unwrap().to_owned())
}

fn api_code(e: ClientError) -> String {
    match e {
        ClientError::Api { code, .. } => code,
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test]
async fn every_error_code_through_both_protocols() {
    let ns = namespace("errors");
    let mut cfg = sidecar_config(Some(redis_url()), vec![ns.clone()]);
    cfg.server.max_blocks_per_request = 8;
    cfg.server.max_body_bytes = 64 * 1024;
    cfg.tenants = vec![
        TenantConfig {
            name: "a".into(),
            token: "tok-a".into(),
            salt: None,
            admin: false,
        },
        TenantConfig {
            name: "root".into(),
            token: "tok-root".into(),
            salt: None,
            admin: true,
        },
    ];
    let side = Sidecar::start(cfg).await;
    let base = side.url();
    let http = reqwest::Client::new();
    let auth = |rb: reqwest::RequestBuilder| rb.bearer_auth("tok-a");
    let hashes = kvshelf::PrefixHasher::new(&ns, None).hash_prefix(&prompt(&ns, 2, 3));
    let h = hashes[0];

    // HTTP: status and code for each.
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            http.post(format!("{base}/v1/hash"))
                .json(&serde_json::json!({"namespace": ns.label, "tokens": [1]})),
            401,
            "unauthenticated",
        ),
        (
            http.post(format!("{base}/v1/hash"))
                .bearer_auth("nope")
                .json(&serde_json::json!({"namespace": ns.label, "tokens": [1]})),
            401,
            "unauthenticated",
        ),
        (
            auth(http.post(format!("{base}/v1/namespaces/{}/purge", ns.label))),
            403,
            "forbidden",
        ),
        (
            auth(
                http.post(format!("{base}/v1/hash"))
                    .json(&serde_json::json!({"namespace": "nosuch", "tokens": [1]})),
            ),
            404,
            "unknown_namespace",
        ),
        (
            auth(
                http.post(format!("{base}/v1/hash"))
                    .json(&serde_json::json!({"namespace": "bad:label", "tokens": [1]})),
            ),
            400,
            "invalid_namespace",
        ),
        (
            auth(http.post(format!("{base}/v1/hash")).body("{not json")),
            400,
            "invalid_request",
        ),
        (
            auth(
                http.post(format!("{base}/v1/hash"))
                    .json(&serde_json::json!({"namespace": ns.label, "tokens": [-1]})),
            ),
            400,
            "invalid_request",
        ),
        (
            auth(
                http.post(format!("{base}/v1/lookup"))
                    .json(&serde_json::json!({"namespace": ns.label})),
            ),
            400,
            "invalid_request",
        ),
        (
            auth(
                http.post(format!("{base}/v1/fetch"))
                    .json(&serde_json::json!({"namespace": ns.label, "block_hashes": ["xyz"]})),
            ),
            400,
            "invalid_request",
        ),
        (
            auth(http.get(format!("{base}/v1/blocks/{}/zz", ns.label))),
            400,
            "invalid_request",
        ),
        (
            auth(http.get(format!("{base}/v1/nothing"))),
            404,
            "no_such_route",
        ),
        (
            auth(http.post(format!("{base}/v1/lookupx"))),
            404,
            "no_such_route",
        ),
        (
            auth(http.get(format!("{base}/v1/lookup"))),
            405,
            "method_not_allowed",
        ),
        (
            auth(
                http.put(format!("{base}/v1/blocks/{}/{h}", ns.label))
                    .body(vec![0u8; 10]),
            ),
            400,
            "invalid_input",
        ),
        (
            auth(
                http.put(format!("{base}/v1/blocks/{}/{h}", ns.label))
                    .body(vec![0u8; 100_000]),
            ),
            413,
            "payload_too_large",
        ),
        (
            auth(
                http.post(format!("{base}/v1/put?namespace={}", ns.label))
                    .body("KVFRAME1\x07"),
            ),
            400,
            "invalid_request",
        ),
        (
            auth(http.post(format!("{base}/v1/put"))),
            400,
            "invalid_request",
        ),
        (
            auth(http.post(format!("{base}/v1/put?namespace={}&bogus=1", ns.label))),
            400,
            "invalid_request",
        ),
        (
            auth(
                http.post(format!("{base}/v1/hash"))
                    .json(&serde_json::json!({"namespace": ns.label, "tokens": vec![1; 9 * 4]})),
            ),
            400,
            "too_many_blocks",
        ),
        (
            auth(http.get(format!("{base}/v1/blocks/{}/{h}", ns.label))),
            404,
            "not_found",
        ),
    ];
    for (i, (rb, status, code)) in cases.into_iter().enumerate() {
        assert_eq!(http_error(rb).await, (status, code.to_owned()), "case {i}");
    }
    assert_eq!(
        side.shelf
            .lookup(
                side.shelf.admit(BodyKind::None, None).await.unwrap(),
                &Default::default(),
                &ns.label,
                kvshelf::shelf::LookupInput::Hashes(hashes.clone()),
                false
            )
            .await
            .unwrap()
            .hit_blocks,
        0,
        "no failed request wrote anything"
    );

    // gRPC: the same codes in `kvshelf-error`, with the matching status codes.
    let anon = side.client(Protocol::Grpc, None);
    let a = side.client(Protocol::Grpc, Some("tok-a"));
    assert_eq!(
        api_code(anon.hash(&ns.label, &[1]).await.unwrap_err()),
        "unauthenticated"
    );
    assert_eq!(api_code(a.purge(&ns.label).await.unwrap_err()), "forbidden");
    assert_eq!(
        api_code(a.hash("nosuch", &[1]).await.unwrap_err()),
        "unknown_namespace"
    );
    assert_eq!(
        api_code(a.hash("bad:label", &[1]).await.unwrap_err()),
        "invalid_namespace"
    );
    assert_eq!(
        api_code(a.hash(&ns.label, &[1; 9 * 4]).await.unwrap_err()),
        "too_many_blocks"
    );
    let short = vec![(h, Bytes::from_static(b"short"))];
    assert_eq!(
        api_code(a.put(&ns.label, &short, false).await.unwrap_err()),
        "invalid_input"
    );
    let big = vec![(h, Bytes::from(vec![0u8; 100_000]))];
    assert_eq!(
        api_code(a.put(&ns.label, &big, false).await.unwrap_err()),
        "payload_too_large"
    );
    let root = side.client(Protocol::Grpc, Some("tok-root"));
    assert_eq!(
        root.purge(&ns.label).await.unwrap().deleted,
        0,
        "admins may purge"
    );

    // Raw gRPC status codes, through the generated client.
    let channel = tonic::transport::Endpoint::from_shared(side.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw = kvshelf::proto::shelf_client::ShelfClient::new(channel);
    let err = raw
        .fetch(kvshelf::proto::FetchRequest {
            namespace: ns.label.clone(),
            block_hashes: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let mut req = tonic::Request::new(kvshelf::proto::FetchRequest {
        namespace: ns.label.clone(),
        block_hashes: vec![Bytes::from_static(b"short")],
    });
    req.metadata_mut()
        .insert("authorization", "Bearer tok-a".parse().unwrap());
    let err = raw.fetch(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        err.metadata().get("kvshelf-error").unwrap(),
        "invalid_request"
    );
}

#[tokio::test]
async fn too_many_concurrent_requests_get_429_and_resource_exhausted() {
    let ns = namespace("overload");
    let mut cfg = sidecar_config(Some(redis_url()), vec![ns.clone()]);
    cfg.server.max_concurrent_requests = 1;
    let side = Sidecar::start(cfg).await;
    // Hold the only slot with a fetch whose stream nobody reads yet.
    let hashes = kvshelf::PrefixHasher::new(&ns, None).hash_prefix(&prompt(&ns, 2, 4));
    let held = side
        .shelf
        .fetch(
            side.shelf.admit(BodyKind::None, None).await.unwrap(),
            &Default::default(),
            &ns.label,
            hashes.clone(),
        )
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/v1/lookup", side.url()))
        .json(&serde_json::json!({"namespace": ns.label, "block_hashes": hashes}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let g = side.client(Protocol::Grpc, None);
    assert_eq!(
        api_code(
            g.lookup_hashes(&ns.label, &hashes, false)
                .await
                .unwrap_err()
        ),
        "overloaded"
    );
    drop(held);
    // The slot comes back once the held stream ends.
    let mut ok = false;
    for _ in 0..100 {
        if g.lookup_hashes(&ns.label, &hashes, false).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(ok);
}

#[tokio::test]
async fn concurrent_fetches_of_a_cold_block_make_one_redis_read() {
    let ns = namespace("coalesce");
    let side = sidecar(std::slice::from_ref(&ns)).await;
    let h = kvshelf::PrefixHasher::new(&ns, None).hash_prefix(&prompt(&ns, 1, 5))[0];
    // Put it behind the sidecar's back, so this sidecar's L1 does not have it.
    kvshelf::RedisStore::new(kvshelf::StoreConfig {
        url: redis_url(),
        ..Default::default()
    })
    .unwrap()
    .put(&ns, &[(h, payload(&ns, 5))])
    .await
    .unwrap();
    let series = format!(
        "kvshelf_backend_block_reads_total{{namespace=\"{}\"}}",
        ns.label
    );
    assert_eq!(side.metric(&series).await, 0.0);
    let fetches: Vec<_> = (0..16)
        .map(|i| {
            let c = side.client(
                if i % 2 == 0 {
                    Protocol::Http
                } else {
                    Protocol::Grpc
                },
                None,
            );
            let label = ns.label.clone();
            tokio::spawn(async move { c.fetch(&label, &[h]).await.unwrap() })
        })
        .collect();
    for f in fetches {
        let got = f.await.unwrap();
        assert_eq!(got.blocks.len(), 1);
        assert_eq!(got.blocks[0].1, payload(&ns, 5));
    }
    assert_eq!(
        side.metric(&series).await,
        1.0,
        "16 fetches, one Redis read"
    );
    let l1_hits = side
        .metric(&format!(
            "kvshelf_fetch_blocks_total{{namespace=\"{}\",result=\"l1_hit\"}}",
            ns.label
        ))
        .await;
    let coalesced = side
        .metric(&format!(
            "kvshelf_fetch_blocks_total{{namespace=\"{}\",result=\"coalesced\"}}",
            ns.label
        ))
        .await;
    assert_eq!(l1_hits + coalesced, 15.0);
}

#[tokio::test]
async fn tenants_cannot_see_each_others_prefixes() {
    let ns = namespace("tenants");
    let mut cfg = sidecar_config(Some(redis_url()), vec![ns.clone()]);
    cfg.tenants = vec![
        TenantConfig {
            name: "a".into(),
            token: "tok-a".into(),
            salt: Some("salt-a".into()),
            admin: false,
        },
        TenantConfig {
            name: "b".into(),
            token: "tok-b".into(),
            salt: Some("salt-b".into()),
            admin: false,
        },
    ];
    let side = Sidecar::start(cfg).await;
    for protocol in BOTH {
        let a = side.client(protocol, Some("tok-a"));
        let b = side.client(protocol, Some("tok-b"));
        let tokens = prompt(&ns, 3, protocol as u32 + 10);
        let ha = a.hash(&ns.label, &tokens).await.unwrap();
        let blocks: Vec<_> = ha.iter().map(|h| (*h, payload(&ns, 1))).collect();
        a.put(&ns.label, &blocks, false).await.unwrap();
        assert_eq!(
            a.lookup_tokens(&ns.label, &tokens, false)
                .await
                .unwrap()
                .hit_blocks,
            3
        );

        // B hashes the same tokens with its own salt: different hashes, nothing found.
        let hb = b.hash(&ns.label, &tokens).await.unwrap();
        assert!(ha.iter().all(|h| !hb.contains(h)));
        assert_eq!(
            b.lookup_tokens(&ns.label, &tokens, false)
                .await
                .unwrap()
                .hit_blocks,
            0
        );
        assert!(b.fetch(&ns.label, &hb).await.unwrap().blocks.is_empty());
        // Unsalted hashes (what B could compute itself) find nothing either.
        let plain = kvshelf::PrefixHasher::new(&ns, None).hash_prefix(&tokens);
        assert_eq!(
            b.lookup_hashes(&ns.label, &plain, false)
                .await
                .unwrap()
                .hit_blocks,
            0
        );
    }
}

#[tokio::test]
async fn shutdown_drains_queued_puts() {
    let ns = namespace("drain");
    let side = sidecar(std::slice::from_ref(&ns)).await;
    let c = side.client(Protocol::Http, None);
    let hashes = kvshelf::PrefixHasher::new(&ns, None).hash_prefix(&prompt(&ns, 64, 6));
    let blocks: Vec<_> = hashes.iter().map(|h| (*h, payload(&ns, 6))).collect();
    assert_eq!(
        c.put(&ns.label, &blocks, true).await.unwrap(),
        vec![PutResult::Queued; 64]
    );
    side.shutdown().await;
    let store = kvshelf::RedisStore::new(kvshelf::StoreConfig {
        url: redis_url(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        store.lookup(&ns, &hashes).await.unwrap(),
        64,
        "queued puts were flushed before exit"
    );
}

#[tokio::test]
async fn a_full_put_queue_drops_and_counts() {
    let ns = namespace("queuefull");
    let mut cfg = sidecar_config(Some(redis_url()), vec![ns.clone()]);
    cfg.server.put_queue_bytes = ns.block_bytes(); // room for exactly one block
    let side = Sidecar::start(cfg).await;
    let c = side.client(Protocol::Grpc, None);
    let hashes = kvshelf::PrefixHasher::new(&ns, None).hash_prefix(&prompt(&ns, 2, 7));
    let two: Vec<_> = hashes.iter().map(|h| (*h, payload(&ns, 7))).collect();
    assert_eq!(
        c.put(&ns.label, &two, true).await.unwrap(),
        vec![PutResult::Dropped; 2]
    );
    let series = format!(
        "kvshelf_put_blocks_total{{namespace=\"{}\",result=\"dropped_queue_full\"}}",
        ns.label
    );
    assert_eq!(side.metric(&series).await, 2.0);
}

#[tokio::test]
async fn embedded_store_serves_without_redis() {
    let side = Sidecar::start(sidecar_config(None, vec![])).await;
    let ns = kvshelf::shelf::demo_namespace();
    for protocol in BOTH {
        let c = side.client(protocol, None);
        let tokens = prompt(&ns, 2, protocol as u32);
        let hashes = c.hash("demo", &tokens).await.unwrap();
        let blocks: Vec<_> = hashes.iter().map(|h| (*h, payload(&ns, 3))).collect();
        assert_eq!(
            c.put("demo", &blocks, false).await.unwrap(),
            vec![PutResult::Stored; 2]
        );
        assert_eq!(
            c.lookup_tokens("demo", &tokens, false)
                .await
                .unwrap()
                .hit_blocks,
            2
        );
        assert_eq!(c.fetch("demo", &hashes).await.unwrap().blocks, blocks);
    }
    let r = reqwest::get(format!("{}/readyz", side.url()))
        .await
        .unwrap();
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"backend":"memory","ready":true}"#
    );
}

#[tokio::test]
async fn grpc_health_is_served() {
    let side = sidecar(&[namespace("health")]).await;
    let channel = tonic::transport::Endpoint::from_shared(side.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "kvshelf.v1.Shelf".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

/// `listen_unix`: the same API on a Unix socket, through both protocols, sharing the shelf
/// with the TCP listener; a stale socket file is replaced, any other file is refused.
#[tokio::test]
async fn the_api_is_served_on_a_unix_socket_too() {
    let ns = namespace("unix");
    let dir = std::env::temp_dir().join(format!("kvshelf-test-unix-{}", rand::random::<u64>()));
    std::fs::create_dir(&dir).unwrap();
    let path = dir.join("kvshelf.sock");
    // A stale socket from an earlier run: bound, then abandoned.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let unix = kvshelf::server::bind_unix(&path).expect("a stale socket is replaced");
    let not_a_socket = dir.join("file");
    std::fs::write(&not_a_socket, b"keep me").unwrap();
    assert!(kvshelf::server::bind_unix(&not_a_socket).is_err());
    assert_eq!(std::fs::read(&not_a_socket).unwrap(), b"keep me");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_url = format!("http://{}", listener.local_addr().unwrap());
    let shelf =
        kvshelf::shelf::Shelf::new(&sidecar_config(Some(redis_url()), vec![ns.clone()])).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(kvshelf::server::run_with_unix(
        listener,
        Some(unix),
        shelf,
        async move {
            let _ = stopped.await;
        },
    ));
    let client = |url: String, protocol| {
        kvshelf::client::Client::new(kvshelf::client::ClientConfig {
            url,
            protocol,
            ..Default::default()
        })
        .unwrap()
    };
    let tokens = prompt(&ns, 2, 5);
    let hashes = kvshelf::PrefixHasher::new(&ns, None).hash_prefix(&tokens);
    for (i, protocol) in BOTH.into_iter().enumerate() {
        let over_unix = client(format!("unix:{}", path.display()), protocol);
        let block = (hashes[i], payload(&ns, i as u8));
        let put = over_unix
            .put(&ns.label, std::slice::from_ref(&block), false)
            .await
            .unwrap();
        assert_eq!(put, vec![PutResult::Stored], "{protocol:?}");
        // Written over the socket, read over TCP: one shelf behind both listeners.
        let fetched = client(tcp_url.clone(), protocol)
            .fetch(&ns.label, &hashes[i..=i])
            .await
            .unwrap();
        assert_eq!(fetched.blocks, vec![block], "{protocol:?}");
        let found = over_unix
            .lookup_tokens(&ns.label, &tokens, false)
            .await
            .unwrap();
        assert_eq!(found.hit_blocks, i + 1, "{protocol:?}");
    }
    let _ = stop.send(());
    server.await.unwrap().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
