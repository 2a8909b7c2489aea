//! Where Redis's own tools (redis-benchmark, redis-cli) reach the Redis of a URL: the
//! bench's own small URL reading, kept in a file of its own.

/// Where Redis's own tools (redis-benchmark, redis-cli) reach the Redis of a URL.
pub(super) struct ToolAddr {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) password: Option<String>,
}

impl ToolAddr {
    /// Reads `redis://[user][:password@]host[:port][/db]` (also `rediss://`, `valkey://`,
    /// `valkeys://`) as the library's Redis client does: port 6379 unless given, the
    /// password percent-decoded, an IPv6 host without its brackets. The user name and the
    /// database are not passed on: the tools authenticate with the password alone (as the
    /// default user) and use database 0.
    pub(super) fn of(url: &str) -> anyhow::Result<ToolAddr> {
        let parsed =
            url::Url::parse(url).map_err(|e| anyhow::anyhow!("Redis URL did not parse: {e}"))?;
        match parsed.scheme() {
            "redis" | "rediss" | "valkey" | "valkeys" => {}
            "redis+unix" | "valkey+unix" | "unix" => anyhow::bail!(
                "redis-benchmark needs a TCP address, not the Unix socket {}",
                parsed.path()
            ),
            other => anyhow::bail!("not a Redis URL: scheme {other:?}"),
        }
        let host = match parsed.host() {
            Some(url::Host::Domain(name)) => name.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => anyhow::bail!("the Redis URL names no host"),
        };
        let password = match parsed.password() {
            Some(p) => Some(
                percent_encoding::percent_decode_str(p)
                    .decode_utf8()
                    .map_err(|_| anyhow::anyhow!("the Redis URL's password is not UTF-8"))?
                    .into_owned(),
            ),
            None => None,
        };
        Ok(ToolAddr {
            host,
            port: parsed.port().unwrap_or(6379),
            password,
        })
    }

    /// `-h host -p port`, and `-a password` with a password: what both tools take.
    /// (redis-cli also wants `--no-auth-warning`, which redis-benchmark refuses.)
    pub(super) fn args(&self) -> Vec<String> {
        let mut args = vec![
            "-h".to_owned(),
            self.host.clone(),
            "-p".to_owned(),
            self.port.to_string(),
        ];
        if let Some(password) = &self.password {
            args.extend(["-a".to_owned(), password.clone()]);
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_tools_get_the_host_port_and_decoded_password_of_the_url() {
        let args = |url: &str| ToolAddr::of(url).expect(url).args();
        assert_eq!(args("redis://127.0.0.1"), ["-h", "127.0.0.1", "-p", "6379"]);
        assert_eq!(
            args("rediss://kv:p%40ss+w@redis.internal:6390/2"),
            ["-h", "redis.internal", "-p", "6390", "-a", "p@ss+w"]
        );
        assert_eq!(args("redis://[::1]:6390"), ["-h", "::1", "-p", "6390"]);
        for url in [
            "redis+unix:///tmp/redis.sock",
            "unix:///tmp/redis.sock",
            "http://h:1",
        ] {
            assert!(ToolAddr::of(url).is_err(), "{url}");
        }
    }
}
