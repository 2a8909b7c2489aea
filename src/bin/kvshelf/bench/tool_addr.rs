//! Where Redis's own tools (redis-benchmark, redis-cli) reach the Redis of the bench's
//! store: the store's own URL parsing ([`StoreConfig::first_node`]), turned into the tools'
//! flags.

use kvshelf::store::{NodeAddress, StoreConfig};

/// Which of Redis's tools the flags are for.
#[derive(Clone, Copy, Debug)]
pub(super) enum Tool {
    /// redis-benchmark.
    Benchmark,
    /// redis-cli.
    Cli,
}

/// Where Redis's own tools reach the Redis of a store configuration.
pub(super) struct ToolAddr {
    node: NodeAddress,
    ca_file: Option<std::path::PathBuf>,
}

impl ToolAddr {
    /// The first data node of `store`'s URL, read as every connection of the store reads
    /// it (percent-decoding, user-only logins, valkey aliases). A Sentinel URL is refused:
    /// the tools need a data node.
    pub(super) fn of(store: &StoreConfig) -> anyhow::Result<ToolAddr> {
        let node = store
            .first_node()
            .map_err(|e| anyhow::anyhow!("Redis's own tools need a data node: {e}"))?;
        Ok(ToolAddr {
            node,
            ca_file: store.tls_ca_file.clone(),
        })
    }

    /// Whether the tools are given a password (redis-cli then wants `--no-auth-warning`).
    pub(super) fn has_password(&self) -> bool {
        self.node.password.is_some() || self.node.username.is_some()
    }

    /// `-h host -p port`, the login (`--user`, `-a`), the database and TLS, as `tool`
    /// (`Tool::Benchmark` or `Tool::Cli`) takes them: they differ only in the database
    /// flag. (redis-cli also wants `--no-auth-warning`, which redis-benchmark refuses.) The
    /// password is on the command line, where `ps` shows it: the bench runs against a Redis
    /// of the benchmarker's own.
    pub(super) fn args(&self, tool: Tool) -> Vec<String> {
        let n = &self.node;
        let mut args = vec![
            "-h".to_owned(),
            n.host.clone(),
            "-p".to_owned(),
            n.port.to_string(),
        ];
        if let Some(user) = &n.username {
            args.extend(["--user".to_owned(), user.clone()]);
        }
        if let Some(password) = &n.password {
            args.extend(["-a".to_owned(), password.clone()]);
        } else if n.username.is_some() {
            // A user alone logs in with an empty password (a `nopass` user), as the store does.
            args.extend(["-a".to_owned(), String::new()]);
        }
        if n.db != 0 {
            let flag = match tool {
                Tool::Benchmark => "--dbnum",
                Tool::Cli => "-n",
            };
            args.extend([flag.to_owned(), n.db.to_string()]);
        }
        if n.tls {
            args.push("--tls".to_owned());
            if let Some(ca) = &self.ca_file {
                args.extend(["--cacert".to_owned(), ca.display().to_string()]);
            }
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: &str) -> Vec<String> {
        let store = StoreConfig {
            url: url.into(),
            ..Default::default()
        };
        ToolAddr::of(&store).expect(url).args(Tool::Benchmark)
    }

    #[test]
    fn redis_tools_get_what_the_store_reads_from_the_url() {
        assert_eq!(args("redis://127.0.0.1"), ["-h", "127.0.0.1", "-p", "6379"]);
        assert_eq!(
            args("rediss://kv:p%40ss+w@redis.internal:6390/2"),
            [
                "-h",
                "redis.internal",
                "-p",
                "6390",
                "--user",
                "kv",
                "-a",
                "p@ss+w",
                "--dbnum",
                "2",
                "--tls"
            ]
        );
        assert_eq!(
            args("redis://:pw@[::1]:6390"),
            ["-h", "::1", "-p", "6390", "-a", "pw"]
        );
        assert_eq!(
            args("valkey://reader@h"),
            ["-h", "h", "-p", "6379", "--user", "reader", "-a", ""]
        );
        for url in [
            "redis+sentinel://s1:26379/kvshelf",
            "unix:///tmp/redis.sock",
            "http://h:1",
        ] {
            let store = StoreConfig {
                url: url.into(),
                ..Default::default()
            };
            assert!(ToolAddr::of(&store).is_err(), "{url}");
        }
    }
}
