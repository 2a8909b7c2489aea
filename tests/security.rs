//! Redis access control and TLS: the ACL rule documented in `docs/operations.md` is enough
//! for every store operation, a wrong password is refused, and `rediss://` works with a
//! private CA.

mod support;

use std::time::Duration;

use kvshelf::store::PinOutcome;
use kvshelf::{PrefixHasher, StoreConfig};
use support::{
    RedisServer, apply_documented_acl_rule, make_certs, namespace, payload, redis_cli, store_with,
};

async fn exercise_every_operation(cfg: StoreConfig) {
    let s = store_with(cfg);
    let ns = namespace("acl");
    let tokens: Vec<u32> = (0..3 * ns.block_size).collect();
    let hs = PrefixHasher::new(&ns, None).hash_prefix(&tokens);
    let blocks: Vec<_> = hs.iter().map(|h| (*h, payload(&ns, 1))).collect();
    s.ping().await.unwrap();
    s.put(&ns, &blocks).await.unwrap();
    assert_eq!(s.lookup(&ns, &hs).await.unwrap(), 3);
    assert_eq!(s.fetch_prefix(&ns, &hs).await.unwrap().len(), 3);
    assert!(s.pin(&ns.label, &hs[0]).await.unwrap());
    // A capped pin over the cap runs every command of the pin records (record, count,
    // prune with HSCAN + EXISTS, roll back).
    let refused = s.pin_within(&ns, &hs[1], ns.block_bytes()).await.unwrap();
    assert!(
        matches!(refused, PinOutcome::OverLimit { .. }),
        "{refused:?}"
    );
    assert!(s.unpin(&ns.label, &hs[0]).await.unwrap());
    assert_eq!(s.pinned_bytes(&ns).await.unwrap(), 0);
    assert!(s.ttl(&ns.label, &hs[0]).await.unwrap().is_some());
    let key = kvshelf::store::block_key(&ns.label, &hs[0]);
    assert!(s.inspect(&key).await.unwrap().is_some());
    assert_eq!(s.count(&ns.label).await.unwrap(), 3);
    assert_eq!(
        s.count_by_namespace().await.unwrap().get(&ns.label),
        Some(&3)
    );
    assert!(s.info("memory").await.unwrap().contains("used_memory"));
    assert_eq!(s.delete(&ns.label, &hs[2..]).await.unwrap(), 1);
    assert_eq!(s.purge(&ns.label).await.unwrap().deleted, 2);
}

#[tokio::test]
async fn the_documented_acl_rule_is_enough_and_passwords_are_checked() {
    let server = RedisServer::start(&[]);
    apply_documented_acl_rule(&server, "s3cret-pw");

    let url = format!("redis://kvshelf:s3cret-pw@127.0.0.1:{}", server.port);
    exercise_every_operation(StoreConfig {
        url: url.clone(),
        ..Default::default()
    })
    .await;
    // A URL that names a database sends `SELECT` on every connection: the rule allows it
    // (issue 17 §5: it lacked `+select`, and every such call failed with NOPERM).
    exercise_every_operation(StoreConfig {
        url: format!("{url}/2"),
        ..Default::default()
    })
    .await;
    // A sidecar as that user: its L1 follows Redis's invalidations (docs/api.md §10.1).
    let side =
        support::Sidecar::start(support::sidecar_config(Some(url), vec![namespace("acl")])).await;
    assert_eq!(
        side.shelf.l1_coherence(),
        kvshelf::shelf::L1Coherence::Tracking,
        "the rule allows CLIENT TRACKING"
    );

    // The rule confines the user to kvshelf's keys and commands.
    let user_url = format!("redis://kvshelf:s3cret-pw@127.0.0.1:{}", server.port);
    let denied = redis_cli(&user_url, &["SET", "other:key", "x"]).unwrap_or_default();
    assert!(denied.contains("NOPERM"), "{denied}");
    let denied = redis_cli(&user_url, &["FLUSHALL"]).unwrap_or_default();
    assert!(denied.contains("NOPERM"), "{denied}");
    // What docs/operations.md warns of: `+scan` lists key names outside `kvshelf:*`, though
    // the user can neither read nor change those keys.
    redis_cli(&server.url(), &["SET", "other:secret-name", "x"]).unwrap();
    let names = redis_cli(
        &user_url,
        &["SCAN", "0", "MATCH", "other:*", "COUNT", "1000"],
    )
    .unwrap();
    assert!(names.contains("other:secret-name"), "{names}");
    let denied = redis_cli(&user_url, &["GET", "other:secret-name"]).unwrap_or_default();
    assert!(denied.contains("NOPERM"), "{denied}");

    let wrong = store_with(StoreConfig {
        url: format!("redis://kvshelf:wrong@127.0.0.1:{}", server.port),
        ..Default::default()
    });
    let err = wrong.ping().await.unwrap_err();
    assert!(!err.is_caller_error(), "{err}");
    assert!(
        !format!("{err}").contains("wrong"),
        "the password never shows in errors"
    );
}

#[tokio::test]
async fn rediss_urls_work_with_a_private_ca() {
    let dir = support::temp_dir("tls");
    make_certs(&dir);
    let p = |f: &str| dir.join(f).display().to_string();
    let (cert, key, ca) = (p("server.pem"), p("server.key"), p("ca.pem"));
    let (server, [port]) = RedisServer::start_with(|[tls_port]| {
        [
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
        ]
        .map(String::from)
        .to_vec()
    });
    let tls = |ca_file: Option<&str>| StoreConfig {
        url: format!("rediss://127.0.0.1:{port}"),
        tls_ca_file: ca_file.map(Into::into),
        connection_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    exercise_every_operation(tls(Some(&ca))).await;

    // Without our CA the server's certificate is not trusted: the connection is refused.
    assert!(store_with(tls(None)).ping().await.is_err());
    // Plain-text Redis protocol on the TLS port does not work either.
    let plain = store_with(StoreConfig {
        url: format!("redis://127.0.0.1:{port}"),
        response_timeout: Duration::from_millis(500),
        ..Default::default()
    });
    assert!(plain.ping().await.is_err());
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 18 §2: each login form of docs/api.md §9 logs in as what the URL says, against a
/// real Redis with ACL users, with passwords holding `/ : @ %` (percent-encoded). On main,
/// `redis://kv:@host` ran as `default` (no `AUTH`), `redis://np@host` sent `np` as a
/// password, and a password with `/` or `%` could not be written at all.
#[tokio::test]
async fn every_login_form_logs_in_as_its_url_says() {
    let server = support::RedisServer::start(&[]);
    let port = server.port;
    let password = "a/b:c@d%e";
    for setup in [
        vec!["ACL", "SETUSER", "kv", "on", ">a/b:c@d%e", "+@all", "~*"],
        vec!["ACL", "SETUSER", "np", "on", "nopass", "+@all", "~*"],
        // `default` may only run PING: a store that silently ran as it could not put.
        vec![
            "ACL",
            "SETUSER",
            "default",
            "on",
            ">s3cr/et%",
            "-@all",
            "+ping",
            "+auth",
            "+select",
        ],
    ] {
        server.cli(&setup).expect("ACL SETUSER");
    }
    // `INFO` needs more than `default` may run: it answers only for the right user.
    async fn works(url: String) -> Result<String, String> {
        let s = store_with(StoreConfig {
            url,
            ..Default::default()
        });
        s.info("server").await.map_err(|e| e.to_string())
    }
    for url in [
        format!("redis://kv:a%2Fb%3Ac%40d%25e@127.0.0.1:{port}"),
        // `:` and `@` may stay unencoded.
        format!("redis://kv:a%2Fb:c@d%25e@127.0.0.1:{port}"),
        format!("valkey://kv:a%2Fb:c@d%25e@127.0.0.1:{port}"),
        format!("redis://np@127.0.0.1:{port}"),
        format!("redis://np:@127.0.0.1:{port}"),
    ] {
        let r = works(url.clone()).await;
        assert!(r.is_ok(), "{url}: {r:?}");
    }
    // `default` authenticates with the password alone, and may not put.
    let r = works(format!("redis://:s3cr%2Fet%25@127.0.0.1:{port}")).await;
    let e = r.expect_err("default may not run INFO");
    assert!(e.contains("NOPERM"), "{e}");
    // A user whose password is not given does not fall back to `default`: it is refused.
    for url in [
        format!("redis://kv:@127.0.0.1:{port}"),
        format!("redis://kv@127.0.0.1:{port}"),
    ] {
        let e = works(url.clone()).await.expect_err(&url);
        assert!(e.contains("WRONGPASS"), "{url}: {e}");
    }
    // A password cut short by an unencoded `/` is refused before any connection, and its
    // rest never shows.
    let e = store_with_err(format!("redis://kv:{password}@127.0.0.1:{port}"));
    assert!(e.contains("percent-encode") && !e.contains("d%e"), "{e}");
}

fn store_with_err(url: String) -> String {
    match kvshelf::RedisStore::new(StoreConfig {
        url,
        ..Default::default()
    }) {
        Ok(_) => panic!("a URL with an unencoded `/` in its password was accepted"),
        Err(e) => e.to_string(),
    }
}
