//! How to reach Redis: the store's configuration (its URL forms are read and redacted in
//! `url.rs`), and the dialer every connection of a store shares.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::conn::{Dialer, Tls};
use super::redact::redact_url;
use super::url::Target;
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
    ///   sentinels are asked with `sentinel_username` and `sentinel_password` (without
    ///   any, by default).
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
    /// The ACL user kvshelf logs in to the sentinels as (`AUTH user password`), for
    /// sentinels whose ACL has one; needs `sentinel_password`. Only for `redis+sentinel://`
    /// URLs: the URL's user and password are the data nodes'. Default: none.
    pub sentinel_username: Option<String>,
    /// The password of the sentinels (their `requirepass`, or of `sentinel_username`).
    /// Never logged. Default: none (the sentinels are asked without `AUTH`).
    pub sentinel_password: Option<String>,
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
            sentinel_username: None,
            sentinel_password: None,
        }
    }
}

impl StoreConfig {
    /// The URL with every password (and user name) replaced by `***`, for logs.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
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
            sentinel_username,
            sentinel_password,
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
            .field("sentinel_username", sentinel_username)
            .field(
                "sentinel_password",
                &sentinel_password.as_ref().map(|_| "***"),
            )
            .finish()
    }
}

impl StoreConfig {
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
