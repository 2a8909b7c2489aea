//! The test fixtures themselves (`tests/support`): a `redis-server` that lost its port is
//! started elsewhere and never confused with the server that holds the port; a refused
//! port stays refused; container cleanup only touches containers of provably dead test
//! processes.

mod support;

use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use support::{RedisSentinel, RedisServer, StartError, is_orphan, owner_label, redis_cli};

fn redis_pid(url: &str) -> String {
    let info = redis_cli(url, &["INFO", "server"]).expect("a Redis answers");
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .expect("process_id")
        .trim()
        .to_owned()
}

#[test]
fn redis_moves_to_another_port_when_its_port_was_taken() {
    // Someone (not Redis) took the first candidate port between its pick and the bind.
    let squatter = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().port();
    let others = std::iter::repeat_with(support::free_ports::<1>).map(|[p]| p);
    let (server, []) =
        RedisServer::start_on_candidates(std::iter::once(taken).chain(others), |[]| Vec::new());
    assert_ne!(server.port, taken);
    assert_eq!(redis_pid(&server.url()), server.pid().to_string());
}

#[test]
fn a_redis_that_holds_the_port_is_not_taken_for_ours() {
    let first = RedisServer::start(&[]);
    // The port answers PING, but not from the server we start: that start failed.
    match RedisServer::try_start_on(first.port, &[]) {
        Err(StartError::PortTaken(log)) => assert!(log.contains("Address already in use")),
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!("a second redis-server cannot own port {}", first.port),
    }
    assert_eq!(redis_pid(&first.url()), first.pid().to_string());
}

#[tokio::test]
async fn a_refused_port_refuses_and_cannot_be_taken() {
    let (_held, port) = support::refused_port();
    let err = TcpStream::connect(("127.0.0.1", port)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(TcpListener::bind(("127.0.0.1", port)).is_err());
}

#[test]
fn only_containers_of_provably_dead_test_processes_are_orphans() {
    let me = owner_label();
    assert!(!me.is_empty(), "this host has /proc");
    // `<boot id>/<pid namespace>/<pid>/<start time>`
    let mut parts = me.rsplitn(3, '/');
    let (started, _pid, here) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();

    assert!(!is_orphan(&me), "a live test process");
    assert!(is_orphan(&format!("{here}/{dead}/{started}")), "a gone one");
    let me_pid = std::process::id();
    assert!(
        is_orphan(&format!("{here}/{me_pid}/1")),
        "a reused pid: another process started at another time"
    );
    let (boot, pid_ns) = here.split_once('/').unwrap();
    for elsewhere in [
        format!("00000000-0000-0000-0000-000000000000/{pid_ns}/{dead}/{started}"),
        format!("{boot}/pid:[1]/{dead}/{started}"),
    ] {
        assert!(
            !is_orphan(&elsewhere),
            "another boot or pid namespace: its pid means nothing here ({elsewhere})"
        );
    }
    for unreadable in [
        String::new(),
        "1234".into(),
        format!("{here}/{dead}/"),
        format!("{here}/x/{started}"),
    ] {
        assert!(!is_orphan(&unreadable), "{unreadable:?}");
    }
}

/// The Sentinel fixture as redis-cli sees it: its URL names the three Sentinels and the
/// master; a killed primary is replaced by its replica, which keeps what was replicated,
/// takes writes, and knows the documented ACL user (ACLs do not replicate).
#[test]
fn the_sentinel_fixture_fails_over_a_killed_primary() {
    let mut sentinel = RedisSentinel::start();
    let ports: Vec<String> = sentinel
        .sentinels
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port))
        .collect();
    assert_eq!(
        sentinel.url(),
        format!("redis+sentinel://{}/kvshelf", ports.join(","))
    );
    assert_eq!(
        sentinel.user_url(),
        format!(
            "redis+sentinel://kvshelf:{}@{}/kvshelf",
            RedisSentinel::PASSWORD,
            ports.join(",")
        )
    );
    assert_eq!(sentinel.primary(), Some(0));
    set(sentinel.primary_node(), "before");
    sentinel.wait_replicated(Duration::from_secs(10));

    assert_eq!(sentinel.kill_primary(), 0);
    assert!(sentinel.data[0].is_none());
    assert_eq!(sentinel.wait_failover_from(0, Duration::from_secs(30)), 1);
    let primary = sentinel.primary_node();
    assert_eq!(get(primary, "before").as_deref(), Some("before"));
    set(primary, "after");
    let user = format!(
        "redis://kvshelf:{}@127.0.0.1:{}",
        RedisSentinel::PASSWORD,
        primary.port
    );
    let denied = redis_cli(&user, &["EXISTS", "after"]).unwrap_or_default();
    assert!(
        denied.contains("NOPERM"),
        "the rule confines the user: {denied}"
    );
    assert_eq!(
        redis_cli(&user, &["EXISTS", "kvshelf:v1:x:y"])
            .as_deref()
            .map(str::trim),
        Some("0"),
        "the user exists on the promoted node"
    );
}

/// A paused (SIGSTOP) primary is failed over like a dead one; resumed, it is no longer
/// the primary the Sentinels report.
#[test]
fn the_sentinel_fixture_fails_over_a_paused_primary() {
    let sentinel = RedisSentinel::start();
    set(sentinel.primary_node(), "before");
    sentinel.wait_replicated(Duration::from_secs(10));
    let paused = sentinel.pause_primary();
    assert_eq!(paused.index, 0);
    assert_eq!(sentinel.wait_failover_from(0, Duration::from_secs(30)), 1);
    drop(paused);
    let primary = sentinel.primary_node();
    assert_eq!(primary.port, sentinel.data[1].as_ref().unwrap().port);
    assert_eq!(get(primary, "before").as_deref(), Some("before"));
    set(primary, "after");
}

fn set(node: &RedisServer, key: &str) {
    assert_eq!(
        node.cli(&["SET", key, key]).as_deref().map(str::trim),
        Some("OK")
    );
}

fn get(node: &RedisServer, key: &str) -> Option<String> {
    node.cli(&["GET", key]).map(|v| v.trim().to_owned())
}
