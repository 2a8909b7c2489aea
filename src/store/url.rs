//! The store's URL forms (one Redis, Cluster seeds, Sentinel): parsing them into where
//! Redis is and how to log in. Hiding their logins for logs is `redact.rs`'s.

use percent_encoding::percent_decode_str;

use super::config::StoreConfig;
use super::conn::{Addr, Login};
use crate::error::Error;

/// The URLs of a comma-separated list: a comma starts a new URL only where a scheme
/// (`…://`) follows it, so a comma inside a password, or between a sentinel URL's hosts,
/// stays where it is.
pub(super) fn split_urls(list: &str) -> Vec<String> {
    let mut urls: Vec<String> = Vec::new();
    for piece in list.split(',') {
        match urls.last_mut() {
            Some(last) if !piece.contains("://") => {
                last.push(',');
                last.push_str(piece);
            }
            _ => urls.push(piece.to_owned()),
        }
    }
    urls.into_iter()
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect()
}

/// Where the store's URL says Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Endpoints {
    /// One Redis.
    Single(Addr),
    /// Seed nodes of a Redis Cluster.
    Cluster(Vec<Addr>),
    /// The sentinels, and the name of the primary they watch.
    Sentinel {
        sentinels: Vec<Addr>,
        master: String,
    },
}

/// The first data node a URL names and its login, as Redis's own tools (`redis-cli`,
/// `redis-benchmark`) take them: read by the same parser as every connection of the store.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeAddress {
    /// Host name or IP address (an IPv6 address without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// ACL user, if the URL names one.
    pub username: Option<String>,
    /// Password, percent-decoded.
    pub password: Option<String>,
    /// Database number.
    pub db: i64,
    /// Whether the URL asks for TLS.
    pub tls: bool,
}

impl std::fmt::Debug for NodeAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeAddress")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("db", &self.db)
            .field("tls", &self.tls)
            .finish()
    }
}

/// What a URL says: where, who, and whether over TLS.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) endpoints: Endpoints,
    pub(crate) login: Login,
    /// How to log in to the sentinels (Sentinel URLs only).
    pub(crate) sentinel_login: Login,
    pub(crate) tls: bool,
}

/// The schemes kvshelf speaks, and what each means: (TLS, Sentinel). `valkey…` are
/// aliases of the `redis…` schemes (Valkey speaks the same protocol, and its clients take
/// these names).
fn scheme(name: &str) -> Option<(bool, bool)> {
    Some(match name {
        "redis" | "valkey" => (false, false),
        "rediss" | "valkeys" => (true, false),
        "redis+sentinel" | "valkey+sentinel" => (false, true),
        "rediss+sentinel" | "valkeys+sentinel" => (true, true),
        _ => return None,
    })
}

impl StoreConfig {
    /// The first data node of `url` (a standalone Redis, or the first Cluster seed) and its
    /// login. A Sentinel URL names sentinels, not a data node: an error.
    pub fn first_node(&self) -> Result<NodeAddress, Error> {
        let target = self.target()?;
        let addr = match target.endpoints {
            Endpoints::Single(addr) => addr,
            Endpoints::Cluster(mut seeds) => seeds.remove(0),
            Endpoints::Sentinel { .. } => {
                return Err(Error::Config(format!(
                    "redis url {}: a Sentinel URL names the sentinels, not a data node",
                    self.redacted_url()
                )));
            }
        };
        Ok(NodeAddress {
            host: addr.host,
            port: addr.port,
            username: target.login.username,
            password: target.login.password,
            db: target.login.db,
            tls: target.tls,
        })
    }

    /// Parses `url` (and `cluster`).
    pub(crate) fn target(&self) -> Result<Target, Error> {
        let bad = |why: &str| Error::Config(format!("redis url {}: {why}", self.redacted_url()));
        let urls = split_urls(&self.url);
        let first = urls.first().ok_or_else(|| bad("empty"))?;
        let (name, _) = first.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let (tls, sentinel) = scheme(name).ok_or_else(|| {
            bad(&format!(
                "scheme {name:?}: kvshelf speaks redis://, rediss://, redis+sentinel:// and \
                 rediss+sentinel:// (and their valkey aliases)"
            ))
        })?;
        if sentinel {
            if self.cluster {
                return Err(bad("a sentinel URL cannot be a cluster"));
            }
            if urls.len() > 1 {
                return Err(bad("one sentinel URL lists every sentinel"));
            }
            let (sentinels, master, login) = parse_sentinel(first).map_err(|e| bad(&e))?;
            return Ok(Target {
                endpoints: Endpoints::Sentinel { sentinels, master },
                login,
                sentinel_login: Login {
                    username: self.sentinel_username.clone(),
                    password: self.sentinel_password.clone(),
                    db: 0,
                },
                tls,
            });
        }
        let mut addrs = Vec::new();
        let mut login = None;
        for url in &urls {
            let (s, _) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
            if scheme(s) != Some((tls, sentinel)) {
                return Err(bad("every seed must use the same scheme (TLS or not)"));
            }
            let (addr, this_login) = parse_node(url, 6379).map_err(|e| bad(&e))?;
            addrs.push(addr);
            login.get_or_insert(this_login);
        }
        let login = login.expect("at least one url");
        if self.sentinel_username.is_some() || self.sentinel_password.is_some() {
            return Err(bad(
                "sentinel_username and sentinel_password are for redis+sentinel:// URLs",
            ));
        }
        let endpoints = if self.cluster {
            if login.db != 0 {
                return Err(bad("a cluster has only database 0"));
            }
            Endpoints::Cluster(addrs)
        } else if addrs.len() > 1 {
            return Err(bad("several URLs: set `cluster` for Redis Cluster seeds"));
        } else {
            Endpoints::Single(addrs.remove(0))
        };
        Ok(Target {
            endpoints,
            login,
            sentinel_login: Login::default(),
            tls,
        })
    }
}

/// What to tell a user whose URL has an `@` the URL parser did not take for the end of a
/// login (a `/`, `?` or `#` left unencoded in the password cuts the login short).
const ENCODE: &str = "percent-encode the user name and password (`/` as %2F, `?` as %3F, \
                      `#` as %23, `%` as %25, `@` as %40, `:` as %3A)";

/// One node's URL, `scheme://[user[:password]@]host[:port][/db]`, read by RFC 3986 (the
/// `url` crate): its address and login. Errors never quote the URL (it may hold a
/// password); the caller names it redacted.
fn parse_node(raw: &str, default_port: u16) -> Result<(Addr, Login), String> {
    let url = url::Url::parse(raw).map_err(|e| reason(raw, &e.to_string()))?;
    let mut login = login(raw, &url)?;
    let host = match url.host() {
        Some(url::Host::Domain("")) | None => return Err(reason(raw, "no host")),
        Some(url::Host::Domain(name)) => name.to_owned(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
    };
    let addr = Addr {
        host,
        port: url.port().unwrap_or(default_port),
    };
    let path = url.path().trim_matches('/');
    login.db = if path.is_empty() {
        0
    } else {
        path.parse::<u32>()
            .map_err(|_| reason(raw, "the database is not a number"))?
            .into()
    };
    Ok((addr, login))
}

/// `scheme://[user[:password]@]host[:port][,host[:port]…]/<master-name>[/db]`: not one RFC
/// 3986 authority (commas join several hosts), so the hosts are split off first and each
/// is read as a URL of its own; the login is read from a URL with the first host.
fn parse_sentinel(raw: &str) -> Result<(Vec<Addr>, String, Login), String> {
    let (name, rest) = raw.split_once("://").ok_or("no scheme")?;
    // The login ends at the last `@` before the path; the hosts, at the first `/` after it.
    let at = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (userinfo, after) = match rest[..at].rfind('@') {
        Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
        None => (None, rest),
    };
    if userinfo.is_none() && rest.contains('@') {
        return Err(format!("a login after the hosts: {ENCODE}"));
    }
    let (hosts, path) = after.split_at(after.find(['/', '?', '#']).unwrap_or(after.len()));
    let mut sentinels = Vec::new();
    for host in hosts.split(',') {
        let (addr, _) = parse_node(&format!("{name}://{}", host.trim()), 26379)?;
        sentinels.push(addr);
    }
    let login = match userinfo {
        Some(userinfo) => {
            let first = hosts.split(',').next().unwrap_or_default().trim();
            let (_, login) = parse_node(&format!("{name}://{userinfo}@{first}"), 26379)?;
            login
        }
        None => Login::default(),
    };
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let mut parts = path.trim_start_matches('/').split('/');
    let master = parts
        .next()
        .filter(|m| !m.is_empty())
        .ok_or("no master name")?;
    let master = percent_decode_str(master)
        .decode_utf8()
        .map_err(|_| "the master name is not UTF-8")?
        .into_owned();
    let db = match parts.next() {
        None | Some("") => 0,
        Some(db) => db
            .parse::<u32>()
            .map_err(|_| "the database is not a number")?
            .into(),
    };
    if parts.any(|p| !p.is_empty()) {
        return Err("a path after the database".into());
    }
    Ok((sentinels, master, Login { db, ..login }))
}

/// The login of a parsed URL, percent-decoded:
/// - no user and no password (or `:@`): no `AUTH`, Redis's `default` user;
/// - a password alone (`:pass@`): `AUTH pass`, the `default` user;
/// - a user and a password (`user:pass@`): `AUTH user pass`;
/// - a user alone (`user@`, `user:@`): `AUTH user ""`, which Redis accepts only for an ACL
///   user with `nopass`. redis-rs would send no `AUTH` (and run as `default`, silently) and
///   redis-cli would take `user` as the password; kvshelf logs in as the user it was
///   given, or fails to connect with Redis's `WRONGPASS`.
fn login(raw: &str, url: &url::Url) -> Result<Login, String> {
    let decode = |what: &str, s: &str| {
        percent_decode_str(s)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| format!("the {what} is not UTF-8 once percent-decoded"))
    };
    let username = Some(decode("user name", url.username())?).filter(|u| !u.is_empty());
    let password = match url.password() {
        Some(p) => Some(decode("password", p)?).filter(|p| !p.is_empty()),
        None => None,
    };
    // An `@` the parser did not see as the end of a login: a password cut short by a `/`,
    // `?` or `#` in it (`kv:s3cr/et@host` is the host `kv`, the port `s3cr`, a path).
    let after_scheme = raw.split_once("://").map_or(raw, |(_, r)| r);
    let authority = after_scheme
        .split(['/', '?', '#'])
        .next()
        .unwrap_or_default();
    if after_scheme.contains('@') && !authority.contains('@') {
        return Err(format!("an `@` outside the login: {ENCODE}"));
    }
    Ok(Login {
        password: match (&username, password) {
            (Some(_), None) => Some(String::new()),
            (_, password) => password,
        },
        username,
        db: 0,
    })
}

/// A parse error of a URL, with a hint when the URL holds a login that may be the cause.
fn reason(raw: &str, why: &str) -> String {
    if raw.contains('@') {
        format!("{why} ({ENCODE})")
    } else {
        why.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str, cluster: bool) -> Result<Target, Error> {
        StoreConfig {
            url: url.into(),
            cluster,
            ..Default::default()
        }
        .target()
    }

    fn addr(host: &str, port: u16) -> Addr {
        Addr {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn urls_parse_into_topologies() {
        let t = target("redis://127.0.0.1:6379", false).unwrap();
        assert_eq!(t.endpoints, Endpoints::Single(addr("127.0.0.1", 6379)));
        assert!(!t.tls);
        let t = target("rediss://kv:p%40ss@redis.internal/3", false).unwrap();
        assert_eq!(t.endpoints, Endpoints::Single(addr("redis.internal", 6379)));
        assert_eq!(t.login.username.as_deref(), Some("kv"));
        assert_eq!(t.login.password.as_deref(), Some("p@ss"));
        assert_eq!(t.login.db, 3);
        assert!(t.tls);
        let t = target("redis://:pw@[::1]:7000", false).unwrap();
        assert_eq!(t.endpoints, Endpoints::Single(addr("::1", 7000)));
        assert_eq!(t.login.username, None);
        assert_eq!(t.login.password.as_deref(), Some("pw"));
        let t = target("redis://a:7000, redis://b:7001", true).unwrap();
        assert_eq!(
            t.endpoints,
            Endpoints::Cluster(vec![addr("a", 7000), addr("b", 7001)])
        );
        let t = target("redis+sentinel://u:pw@s1:26379,s2,s3:5000/kvshelf/2", false).unwrap();
        assert_eq!(
            t.endpoints,
            Endpoints::Sentinel {
                sentinels: vec![addr("s1", 26379), addr("s2", 26379), addr("s3", 5000)],
                master: "kvshelf".into()
            }
        );
        assert_eq!(t.login.username.as_deref(), Some("u"));
        assert_eq!(t.login.db, 2);
        assert_eq!(
            t.sentinel_login.password, None,
            "the URL's login is the nodes'"
        );
        let t = StoreConfig {
            url: "redis+sentinel://u:pw@s1/kvshelf".into(),
            sentinel_username: Some("watcher".into()),
            sentinel_password: Some("spw".into()),
            ..Default::default()
        }
        .target()
        .unwrap();
        assert_eq!(t.sentinel_login.username.as_deref(), Some("watcher"));
        assert_eq!(t.sentinel_login.password.as_deref(), Some("spw"));
        assert_eq!(t.login.password.as_deref(), Some("pw"));
        let cfg = StoreConfig {
            url: "redis://a".into(),
            sentinel_password: Some("spw".into()),
            ..Default::default()
        };
        assert!(matches!(cfg.target(), Err(Error::Config(_))));
        assert!(!format!("{cfg:?}").contains("spw"), "{cfg:?}");
        for bad in [
            ("redis://a:1,redis://b:2", false),
            ("redis://a/1", true),
            ("http://a", false),
            ("redis+sentinel://s1", false),
            ("redis+sentinel://s1/m", true),
            ("redis://a:x", false),
            ("redis://a/x", false),
        ] {
            assert!(
                matches!(target(bad.0, bad.1), Err(Error::Config(_))),
                "{bad:?}"
            );
        }
        let e = target("redis://u:hunter2@a:x", false)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }

    /// (URL, user, password, db): the login each form of docs/api.md §9 sends, with
    /// passwords holding `/ : @ %` (percent-encoded where RFC 3986 wants them to be).
    #[test]
    fn logins_follow_rfc_3986() {
        let cases: &[(&str, Option<&str>, Option<&str>, i64)] = &[
            ("redis://h", None, None, 0),
            ("redis://@h", None, None, 0),
            ("redis://:@h", None, None, 0),
            ("redis://:pass@h", None, Some("pass"), 0),
            ("redis://kv:pass@h:6380/2", Some("kv"), Some("pass"), 2),
            // A user alone logs in as that user: `AUTH kv ""` (a `nopass` ACL user).
            ("redis://kv@h", Some("kv"), Some(""), 0),
            ("redis://kv:@h", Some("kv"), Some(""), 0),
            (
                "redis://kv:a%2Fb%3Ac%40d%25e@h",
                Some("kv"),
                Some("a/b:c@d%e"),
                0,
            ),
            // `:` and `@` may be left unencoded in a password: the first `:` and the last
            // `@` delimit it. So may a `%` that starts no escape.
            ("redis://kv:a:b@c@h:7000/1", Some("kv"), Some("a:b@c"), 1),
            ("redis://kv:50%@h", Some("kv"), Some("50%"), 0),
            ("redis://k%40v%3A:p@h", Some("k@v:"), Some("p"), 0),
            ("redis://kv:s3cr,et@h", Some("kv"), Some("s3cr,et"), 0),
            ("redis://kv:p@[::1]:7000/3", Some("kv"), Some("p"), 3),
            ("rediss://kv:p%2F@h", Some("kv"), Some("p/"), 0),
            ("valkey://kv:p%2F@h", Some("kv"), Some("p/"), 0),
            ("valkeys://:p@h/4", None, Some("p"), 4),
            (
                "redis+sentinel://kv:a%2Fb:c@d@s1,s2:5000/m",
                Some("kv"),
                Some("a/b:c@d"),
                0,
            ),
            ("redis+sentinel://kv@s1/m/5", Some("kv"), Some(""), 5),
            ("redis+sentinel://:p%25@s1/m", None, Some("p%"), 0),
            ("valkey+sentinel://kv:p@s1/m", Some("kv"), Some("p"), 0),
            ("valkeys+sentinel://s1/m", None, None, 0),
        ];
        for &(url, user, password, db) in cases {
            let t = target(url, false).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(t.login.username.as_deref(), user, "{url}");
            assert_eq!(t.login.password.as_deref(), password, "{url}");
            assert_eq!(t.login.db, db, "{url}");
        }
        let t = target("redis://kv:a:b@c@h:7000/1", false).unwrap();
        assert_eq!(t.endpoints, Endpoints::Single(addr("h", 7000)));
        let t = target("redis://a:7000,redis://kv:s3cr,et@b:7001", true).unwrap();
        assert_eq!(
            t.endpoints,
            Endpoints::Cluster(vec![addr("a", 7000), addr("b", 7001)])
        );
        let t = target("redis+sentinel://kv:a%2Fb:c@d@s1,[::1]:5000/m%20x/1", false).unwrap();
        assert_eq!(
            t.endpoints,
            Endpoints::Sentinel {
                sentinels: vec![addr("s1", 26379), addr("::1", 5000)],
                master: "m x".into()
            }
        );
    }

    #[test]
    fn valkey_schemes_are_aliases_of_the_redis_ones() {
        for (valkey, redis) in [
            ("valkey://kv:p@h:1/2", "redis://kv:p@h:1/2"),
            ("valkeys://kv:p@h:1/2", "rediss://kv:p@h:1/2"),
            (
                "valkey+sentinel://kv:p@s1,s2/m/2",
                "redis+sentinel://kv:p@s1,s2/m/2",
            ),
            ("valkeys+sentinel://s1/m", "rediss+sentinel://s1/m"),
        ] {
            let (a, b) = (
                target(valkey, false).unwrap(),
                target(redis, false).unwrap(),
            );
            assert_eq!(a.endpoints, b.endpoints, "{valkey}");
            assert_eq!(a.login, b.login, "{valkey}");
            assert_eq!(a.tls, b.tls, "{valkey}");
        }
        let t = target("valkey://a:1,valkey://b:2", true).unwrap();
        assert_eq!(
            t.endpoints,
            Endpoints::Cluster(vec![addr("a", 1), addr("b", 2)])
        );
        // Seeds may mix a scheme and its alias, never TLS and plain TCP.
        assert!(target("valkey://a:1,redis://b:2", true).is_ok());
        assert!(target("valkey://a:1,rediss://b:2", true).is_err());
    }

    /// Issue 18 §2: no form of a URL, valid or not, shows its password in an error, in the
    /// config's `Debug` or in the redacted URL.
    #[test]
    fn no_password_is_ever_shown() {
        for url in [
            "redis://kv:s3cr/et@127.0.0.1:6379",
            "redis://kv:s3cr?et@127.0.0.1:6379",
            "redis://kv:s3cr#et@127.0.0.1:6379",
            "redis://:s3cr/et@127.0.0.1",
            "redis://kv:s3cr:et@h:x",
            "redis://kv:s3cr@et@h/x",
            "redis://s3cret@h:x",
            "redis://kv:s3cr%ZZet@h/x",
            "redis://kv:s3cr%FFet@h",
            "rediss://kv:s3cret@h/9999999999999",
            "redis://a:1,redis://kv:s3cr,et@b:x",
            "redis://a:1,redis://kv:s3cr/et@b:2",
            "redis+sentinel://kv:s3cr/et@s1,s2/m",
            "redis+sentinel://kv:s3cr,et@s1,s2",
            "redis+sentinel://kv:s3cret@s1,s2:x/m",
            "valkey+sentinel://kv:s3cret@/m",
            "http://kv:s3cret@h",
            "redis://h/0?pass=s3cret&db=1",
            "kv:s3cret@h",
        ] {
            for cluster in [false, true] {
                let cfg = StoreConfig {
                    url: url.into(),
                    cluster,
                    ..Default::default()
                };
                let shown = [
                    cfg.target()
                        .map(|_| String::new())
                        .unwrap_or_else(|e| e.to_string()),
                    format!("{cfg:?}"),
                    cfg.redacted_url(),
                ];
                for s in shown {
                    assert!(!s.contains("s3cr"), "{url}: {s}");
                }
            }
        }
    }

    #[test]
    fn a_password_cut_short_by_a_reserved_character_is_refused_with_a_hint() {
        for url in [
            "redis://kv:s3cr/et@127.0.0.1:6379",
            "redis://kv:12/et@127.0.0.1:6379",
            "redis://kv:s3cr?et@127.0.0.1",
            "redis+sentinel://kv:s3cr/et@s1/m",
        ] {
            let e = target(url, false).unwrap_err().to_string();
            assert!(e.contains("percent-encode"), "{url}: {e}");
        }
        // A password that is not UTF-8 once decoded is refused, not altered.
        let e = target("redis://kv:%FF@h", false).unwrap_err().to_string();
        assert!(e.contains("not UTF-8"), "{e}");
    }
}
