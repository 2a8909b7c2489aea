//! Bearer tokens end to end: HTTP and gRPC accept exactly the same credentials (one parser),
//! tokens match exactly, and the Rust client sends a token read from a secret file (with its
//! trailing newline) and refuses an unsendable one with an error instead of panicking.
//! The sidecar runs on its in-process store: nothing here needs Redis.

mod support;

use kvshelf::client::{Client, ClientConfig, ClientError, Protocol};
use kvshelf::config::TenantConfig;
use support::{Sidecar, namespace, sidecar_config};

const TOKEN: &str = "tok-a";

async fn sidecar_with_token() -> (Sidecar, String) {
    let ns = namespace("tokens");
    let mut cfg = sidecar_config(None, vec![ns.clone()]);
    cfg.tenants = vec![TenantConfig {
        name: "a".into(),
        token: TOKEN.into(),
        salt: None,
        admin: false,
    }];
    (Sidecar::start(cfg).await, ns.label)
}

/// Whether `authorization` is accepted over HTTP, and over gRPC (each or neither).
async fn accepted(side: &Sidecar, label: &str, authorization: &str) -> (bool, bool) {
    let http = reqwest::Client::new()
        .post(format!("{}/v1/hash", side.url()))
        .header("authorization", authorization)
        .json(&serde_json::json!({"namespace": label, "tokens": [1, 2, 3, 4]}))
        .send()
        .await
        .unwrap()
        .status();
    assert!(http == 200 || http == 401, "{authorization:?}: HTTP {http}");
    let channel = tonic::transport::Endpoint::from_shared(side.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = kvshelf::proto::shelf_client::ShelfClient::new(channel);
    let mut req = tonic::Request::new(kvshelf::proto::HashRequest {
        namespace: label.to_owned(),
        tokens: vec![1, 2, 3, 4],
        extra_keys: vec![],
    });
    req.metadata_mut()
        .insert("authorization", authorization.parse().unwrap());
    let grpc = match grpc.hash(req).await {
        Ok(_) => true,
        Err(s) if s.code() == tonic::Code::Unauthenticated => false,
        Err(s) => panic!("{authorization:?}: gRPC {s:?}"),
    };
    (http == 200, grpc)
}

#[tokio::test]
async fn http_and_grpc_accept_the_same_credentials() {
    let (side, label) = sidecar_with_token().await;
    // The auth scheme is case-insensitive (RFC 9110 §11.1); blanks around the token are not
    // part of it.
    for good in [
        "Bearer tok-a",
        "bearer tok-a",
        "BEARER tok-a",
        "Bearer   tok-a ",
    ] {
        assert_eq!(
            accepted(&side, &label, good).await,
            (true, true),
            "{good:?}"
        );
    }
    // Only the exact token: no prefix, extension or other case; no other scheme.
    for bad in [
        "Bearer tok-",
        "Bearer tok-ab",
        "Bearer TOK-A",
        "Bearer tok-a tok-a",
        "tok-a",
        "Basic tok-a",
        "Bearertok-a",
    ] {
        assert_eq!(
            accepted(&side, &label, bad).await,
            (false, false),
            "{bad:?}"
        );
    }
}

fn client(side: &Sidecar, protocol: Protocol, token: &str) -> Result<Client, ClientError> {
    Client::new(ClientConfig {
        url: side.url(),
        protocol,
        token: Some(token.into()),
        ..Default::default()
    })
}

#[tokio::test]
async fn a_token_read_from_a_secret_file_works_with_its_newline() {
    let (side, label) = sidecar_with_token().await;
    let dir = std::env::temp_dir().join(format!("kvshelf-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // What `echo tok-a > token` or a mounted Kubernetes secret holds.
    std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
    let token = std::fs::read_to_string(dir.join("token")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    for protocol in [Protocol::Http, Protocol::Grpc] {
        let c = client(&side, protocol, &token).unwrap();
        let hashes = c.hash(&label, &[1, 2, 3, 4]).await.unwrap();
        assert_eq!(hashes.len(), 1, "{protocol:?}");
    }
}

#[tokio::test]
async fn an_unsendable_token_is_an_error_not_a_panic() {
    let (side, _) = sidecar_with_token().await;
    for protocol in [Protocol::Http, Protocol::Grpc] {
        for token in ["tok\u{7}-secret", "tök-secret", "tok\n-secret", "", " \n"] {
            match client(&side, protocol, token) {
                Err(e @ ClientError::Config(_)) => {
                    assert!(!e.to_string().contains("secret"), "{e}")
                }
                other => panic!("{token:?} over {protocol:?}: {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn debug_output_never_shows_the_token() {
    let (side, _) = sidecar_with_token().await;
    let cfg = ClientConfig {
        url: side.url(),
        token: Some("s3cret-token".into()),
        ..Default::default()
    };
    assert!(!format!("{cfg:?}").contains("s3cret"), "{cfg:?}");
    for protocol in [Protocol::Http, Protocol::Grpc] {
        let c = Client::new(ClientConfig {
            protocol,
            ..cfg.clone()
        })
        .unwrap();
        assert!(!format!("{c:?}").contains("s3cret"), "{c:?}");
    }
}
