//! How to reach Redis: the store's configuration, its URL forms (one Redis, Cluster seeds,
//! Sentinel) and their redaction for logs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize};

use super::conn::{Addr, Dialer, Login, Tls};
use crate::error::Error;

/// How to reach Redis and how long blocks live there.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Where Redis is:
    /// - `redis://[user[:password]@]host[:port][/db]`, or `rediss://` for TLS: one Redis;
    /// - with `cluster`: one or more seed nodes of a Redis Cluster, separated by commas
    ///   (`redis://a:7000,redis://b:7001`);
    /// - `redis+sentinel://[user[:password]@]host:port[,host:port…]/<master-name>[/db]`
    ///   (`rediss+sentinel://` for TLS to sentinels and nodes): the primary the sentinels
    ///   name, followed through failovers. The user and password are the data nodes'; the
    ///   sentinels are asked without them.
    ///
    /// Default: `redis://127.0.0.1:6379`.
    pub url: String,
    /// Talk to a Redis Cluster: keys spread over every slot (no hash tags), commands are
    /// grouped per key and sent to each node concurrently. Default: false.
    pub cluster: bool,
    /// PEM file of the CA certificates to trust for `rediss://`, instead of the system's.
    /// Default: none (the system trust store).
    pub tls_ca_file: Option<PathBuf>,
    /// Time to live of a block after it is put (and after each hit, when `sliding_ttl`).
    /// Default: 1h.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Whether a hit pushes the block's expiry back to a full `ttl`. Pinned blocks stay
    /// pinned. Default: true.
    pub sliding_ttl: bool,
    /// How long to wait for a reply. A 32 MiB value takes tens of milliseconds on loopback,
    /// so a short timeout would fail big batches on a busy host. Also how long a connection
    /// whose call was given up mid-exchange may take to be drained back into step, and how
    /// long a tracking connection waits for the answer to its heartbeat `PING`.
    /// Default: 5s.
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    /// How long to wait for a new connection. Default: 1s.
    #[serde(with = "humantime_serde")]
    pub connection_timeout: Duration,
    /// How often a pipeline is sent again, each time on a newly dialled connection, when
    /// Redis closed the connection under it (a restart, its idle `timeout`). Every command
    /// kvshelf sends is idempotent, so resending is safe. A dial that fails is not retried:
    /// the call fails (open) and a later call dials again, paced by `connect_rate`. The
    /// one retry policy of every connection, in every topology. Default: 1.
    pub command_retries: u32,
    /// Most connections open at once to each Redis node; more concurrent calls wait for
    /// one (at most `response_timeout`). Bounds what a hung or slow Redis sees from one
    /// process. Default: 64.
    pub max_connections: usize,
    /// New connections per second to each node once a burst of `max_connections` is
    /// spent; a call that needs one beyond that fails open at once. A call cut off by a
    /// deadline leaves its connection to be drained back into the pool (and calls wait for
    /// a draining connection rather than dial), so connections are dialled again only when
    /// they broke (a Redis restart, its idle `timeout`, a cut); this bound keeps even that
    /// from turning into a reconnect (and `AUTH`) storm against a struggling Redis. 0: no
    /// bound. Default: 10.
    pub connect_rate: u32,
    /// Connections one batch (of one node) is spread over: a batch of many blocks is cut
    /// into this many pipelines sent at once, so that parsing and copying are not
    /// serialized on one socket. 1: one pipeline per node. Default: 2 (1, 2 and 4
    /// measured within noise of each other on 2 vCPU; BENCHMARKS.md, "batch_connections").
    pub batch_connections: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: "redis://127.0.0.1:6379".into(),
            cluster: false,
            tls_ca_file: None,
            ttl: Duration::from_secs(3600),
            sliding_ttl: true,
            response_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(1),
            command_retries: 1,
            max_connections: 64,
            connect_rate: 10,
            batch_connections: 2,
        }
    }
}

impl StoreConfig {
    /// The URL with any password replaced by `***`, for logs.
    pub fn redacted_url(&self) -> String {
        self.url
            .split(',')
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Every field, with the password of the URL redacted (the config is logged at startup).
impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Destructured, so a new field cannot be left out of the output unnoticed.
        let StoreConfig {
            url: _,
            cluster,
            tls_ca_file,
            ttl,
            sliding_ttl,
            response_timeout,
            connection_timeout,
            command_retries,
            max_connections,
            connect_rate,
            batch_connections,
        } = self;
        f.debug_struct("StoreConfig")
            .field("url", &self.redacted_url())
            .field("cluster", cluster)
            .field("tls_ca_file", tls_ca_file)
            .field("ttl", ttl)
            .field("sliding_ttl", sliding_ttl)
            .field("response_timeout", response_timeout)
            .field("connection_timeout", connection_timeout)
            .field("command_retries", command_retries)
            .field("max_connections", max_connections)
            .field("connect_rate", connect_rate)
            .field("batch_connections", batch_connections)
            .finish()
    }
}

/// `scheme://user:secret@host` → `scheme://user:***@host`, and the `pass=` query parameter
/// of a URL that carries it in the query (`…?pass=secret`, as some clients' Unix-socket URLs
/// do; kvshelf's own forms never do) → `pass=***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = redact_query(path);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                "***".to_owned()
            };
            format!("{scheme}://{masked}@{host}{path}")
        }
        None => format!("{scheme}://{authority}{path}"),
    }
}

/// `path?db=1&pass=secret` → `path?db=1&pass=***` (some clients take `pass` in the query).
fn redact_query(path: &str) -> String {
    let Some((path, query)) = path.split_once('?') else {
        return path.to_owned();
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some(("pass", _)) => "pass=***".to_owned(),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{path}?{}", query.join("&"))
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

/// What a URL says: where, who, and whether over TLS.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) endpoints: Endpoints,
    pub(crate) login: Login,
    pub(crate) tls: bool,
}

impl StoreConfig {
    /// Parses `url` (and `cluster`).
    pub(crate) fn target(&self) -> Result<Target, Error> {
        let bad = |why: &str| Error::Config(format!("redis url {}: {why}", self.redacted_url()));
        let urls: Vec<&str> = self
            .url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        let first = *urls.first().ok_or_else(|| bad("empty"))?;
        let (scheme, _) = first.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let (tls, sentinel) = match scheme {
            "redis" => (false, false),
            "rediss" => (true, false),
            "redis+sentinel" => (false, true),
            "rediss+sentinel" => (true, true),
            other => {
                return Err(bad(&format!(
                    "scheme {other:?}: kvshelf speaks redis://, rediss://, redis+sentinel:// and \
                     rediss+sentinel://"
                )));
            }
        };
        if sentinel {
            if self.cluster {
                return Err(bad("a sentinel URL cannot be a cluster"));
            }
            // redis+sentinel://[user:pass@]h1:p1,h2:p2/master[/db]: the commas split the
            // authority, so parse the whole URL at once.
            let rest = &self.url[self.url.find("://").expect("checked") + 3..];
            let (authority, path) =
                rest.split_at(rest.find('/').ok_or_else(|| bad("no master name"))?);
            let (login, hosts) = split_login(authority).map_err(|e| bad(&e))?;
            let mut parts = path.trim_start_matches('/').split('/');
            let master = parts
                .next()
                .filter(|m| !m.is_empty())
                .ok_or_else(|| bad("no master name"))?;
            let db = match parts.next() {
                None | Some("") => 0,
                Some(db) => db
                    .parse()
                    .map_err(|_| bad("the database is not a number"))?,
            };
            let sentinels = hosts
                .split(',')
                .map(|h| parse_addr(h, 26379))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(&e))?;
            return Ok(Target {
                endpoints: Endpoints::Sentinel {
                    sentinels,
                    master: percent_decode_str(master).decode_utf8_lossy().into_owned(),
                },
                login: Login { db, ..login },
                tls,
            });
        }
        let mut addrs = Vec::new();
        let mut login = None;
        for url in &urls {
            let (s, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
            if s != scheme {
                return Err(bad("every seed must use the same scheme"));
            }
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let (this_login, host) = split_login(authority).map_err(|e| bad(&e))?;
            let path = path.split('?').next().unwrap_or_default().trim_matches('/');
            let db = if path.is_empty() {
                0
            } else {
                path.parse()
                    .map_err(|_| bad("the database is not a number"))?
            };
            addrs.push(parse_addr(host, 6379).map_err(|e| bad(&e))?);
            login.get_or_insert(Login { db, ..this_login });
        }
        let login = login.expect("at least one url");
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
            tls,
        })
    }

    /// The dialer every pool of this store shares.
    pub(crate) fn dialer(&self, target: &Target) -> Result<Arc<Dialer>, Error> {
        let tls = if target.tls {
            Some(tls(self.tls_ca_file.as_deref())?)
        } else if self.tls_ca_file.is_some() {
            return Err(Error::Config(
                "tls_ca_file is set but the URL is not rediss://".into(),
            ));
        } else {
            None
        };
        Ok(Arc::new(Dialer {
            login: target.login.clone(),
            tls,
            connect_timeout: self.connection_timeout,
            response_timeout: self.response_timeout,
            command_retries: self.command_retries,
            max_connections: self.max_connections,
            connect_rate: self.connect_rate,
        }))
    }
}

/// `[user[:password]@]hosts` → the login (percent-decoded) and the hosts.
fn split_login(authority: &str) -> Result<(Login, &str), String> {
    let Some((userinfo, hosts)) = authority.rsplit_once('@') else {
        return Ok((Login::default(), authority));
    };
    let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
    let (user, password) = match userinfo.split_once(':') {
        Some((u, p)) => (u, Some(decode(p))),
        None => ("", Some(decode(userinfo))),
    };
    Ok((
        Login {
            username: (!user.is_empty()).then(|| decode(user)),
            password: password.filter(|p| !p.is_empty()),
            db: 0,
        },
        hosts,
    ))
}

/// `host[:port]` or `[v6]:port`.
fn parse_addr(s: &str, default_port: u16) -> Result<Addr, String> {
    let s = s.trim();
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unclosed [")?;
        (host, after.strip_prefix(':'))
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    let port = match port {
        None => default_port,
        Some(p) => p.parse().map_err(|_| format!("bad port {p:?}"))?,
    };
    Ok(Addr {
        host: host.to_owned(),
        port,
    })
}

#[cfg(feature = "tls")]
fn tls(ca_file: Option<&std::path::Path>) -> Result<Tls, Error> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| Error::Config(format!("tls_ca_file {}: {e}", path.display())))?;
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| Error::Config(format!("tls_ca_file {}: {e}", path.display())))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("tls: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Tls {
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
    })
}

#[cfg(not(feature = "tls"))]
fn tls(_ca_file: Option<&std::path::Path>) -> Result<Tls, Error> {
    Err(Error::Config(
        "rediss:// needs kvshelf built with the `tls` feature".into(),
    ))
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

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redact_url("rediss://kv:s3cret@redis.internal:6380/0"),
            "rediss://kv:***@redis.internal:6380/0"
        );
        assert_eq!(redact_url("redis://:pw@h/1"), "redis://:***@h/1");
        assert_eq!(
            redact_url("redis+unix:///run/redis.sock?db=2&pass=hunter2&user=kv"),
            "redis+unix:///run/redis.sock?db=2&pass=***&user=kv"
        );
        assert_eq!(
            redact_url("unix:///run/redis.sock?pass=hunter2"),
            "unix:///run/redis.sock?pass=***"
        );
        let cfg = StoreConfig {
            url: "redis://u:hunter2@h".into(),
            ..Default::default()
        };
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }

    #[test]
    fn debug_shows_every_field_but_no_password() {
        let cfg = StoreConfig {
            url: "redis://u:hunter2@a:6379,redis://u:hunter2@b:6379".into(),
            tls_ca_file: Some("/etc/ca.pem".into()),
            ..Default::default()
        };
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redis://u:***@a:6379,redis://u:***@b:6379"));
        // Every field a serialized config has (serde sees all of them) is in the output.
        let fields = serde_json::to_value(&cfg).unwrap();
        for field in fields.as_object().unwrap().keys() {
            assert!(
                shown.contains(&format!("{field}: ")),
                "{field} missing: {shown}"
            );
        }
    }

    #[test]
    fn config_reads_humane_durations() {
        let cfg: StoreConfig =
            serde_json::from_str(r#"{"ttl":"10m","sliding_ttl":false}"#).unwrap();
        assert_eq!(cfg.ttl, Duration::from_secs(600));
        assert!(!cfg.sliding_ttl);
        assert_eq!(cfg.response_timeout, Duration::from_secs(5));
    }
}
