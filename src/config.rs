//! The service's configuration as plain data: one TOML file, every field defaulted.
//!
//! ```toml
//! [store]
//! url = "redis://127.0.0.1:6379"
//! ttl = "1h"
//!
//! [[namespaces]]
//! label = "qwen2.5-0.5b"
//! model_id = "Qwen/Qwen2.5-0.5B-Instruct"
//! kv_dtype = "bfloat16"
//! block_size = 16
//! layout = { num_layers = 24, num_kv_heads = 2, head_dim = 64 }
//! ```
//!
//! Flags and environment variables override the file (see `kvshelf --help`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::namespace::Namespace;
use crate::store::StoreConfig;

/// Everything `kvshelf` reads from its config file.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where blocks live. Default: see [`StoreConfig`].
    pub store: StoreConfig,
    /// The namespaces this deployment serves. Default: none.
    pub namespaces: Vec<Namespace>,
}

impl Config {
    /// Parses and validates a TOML document.
    pub fn from_toml(text: &str) -> Result<Config, Error> {
        let cfg: Config = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads, parses and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Checks every namespace, and that no label is used twice.
    pub fn validate(&self) -> Result<(), Error> {
        let mut seen = std::collections::HashSet::new();
        for ns in &self.namespaces {
            ns.validate()?;
            if !seen.insert(&ns.label) {
                return Err(Error::InvalidNamespace(format!(
                    "label {:?} is configured twice",
                    ns.label
                )));
            }
        }
        Ok(())
    }

    /// The namespace with this label.
    pub fn namespace(&self, label: &str) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.label == label)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_module_doc_example_parses() {
        let doc = include_str!("config.rs");
        let example: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| l.trim_start_matches("//!").trim_start())
            .collect::<Vec<_>>()
            .join("\n");
        let cfg = Config::from_toml(&example).unwrap();
        assert_eq!(cfg.store.ttl, Duration::from_secs(3600));
        let ns = cfg.namespace("qwen2.5-0.5b").unwrap();
        assert_eq!(ns.block_bytes(), 192 * 1024);
        assert_eq!(ns.layout.order, "lkthd");
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(Config::from_toml("[store]\nurl = 1").is_err());
        assert!(Config::from_toml("[stor]").is_err());
        let dup = r#"
            [[namespaces]]
            label = "a"
            model_id = "m"
            kv_dtype = "bf16"
            layout = { num_layers = 1, num_kv_heads = 1, head_dim = 8 }
            [[namespaces]]
            label = "a"
            model_id = "m"
            kv_dtype = "bf16"
            layout = { num_layers = 1, num_kv_heads = 1, head_dim = 8 }
        "#;
        assert!(matches!(
            Config::from_toml(dup),
            Err(Error::InvalidNamespace(_))
        ));
        assert!(Config::from_toml("[[namespaces]]\nlabel = \"a\"\nmodel_id = \"m\"\nkv_dtype = \"int4\"\nlayout = { num_layers = 1, num_kv_heads = 1, head_dim = 8 }").is_err());
    }
}
