//! A Redis Cluster: the slot of a key, and the slot map read from `CLUSTER NODES`.
//!
//! The map is read once before the first command, and after that only in the background:
//! a `MOVED` reply updates the one slot at once and asks for a refresh, a node that fails
//! asks for one too, and requests to healthy nodes never wait for it (at most one refresh
//! runs, at most one per [`REFRESH_EVERY`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use super::conn::{Addr, all};
use super::topology::{Pools, TEXT_REPLY};
use crate::error::{BackendError, BackendErrorKind, Error};
use crate::resp::{Arg, Reply, Request};

/// Slots of a Redis Cluster.
const SLOTS: usize = 16384;

/// Least time between two slot-map refreshes.
const REFRESH_EVERY: Duration = Duration::from_millis(250);

/// The slot of a key (hash tags honoured), as Redis Cluster computes it.
pub(crate) fn slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16::State::<crc16::XMODEM>::calculate(hashed) % SLOTS as u16
}

/// A cluster's slot map.
#[derive(Debug, Clone)]
pub(super) struct SlotMap {
    /// Per slot, the index of its node in `nodes`.
    pub(super) slots: Vec<Option<u16>>,
    pub(super) nodes: Vec<Addr>,
    /// Every primary, and whether the cluster marks it as failed.
    pub(super) primaries: Vec<(Addr, bool)>,
}

/// A Redis Cluster.
#[derive(Debug)]
pub(crate) struct Cluster {
    seeds: Vec<Addr>,
    pub(super) pools: Pools,
    pub(super) map: RwLock<Option<Arc<SlotMap>>>,
    /// One first load at a time.
    loading: tokio::sync::Mutex<()>,
    refreshing: AtomicBool,
    last_refresh: Mutex<Option<Instant>>,
}

impl Cluster {
    /// A cluster known by its seeds; its slot map is read on first use.
    pub(super) fn new(seeds: Vec<Addr>, pools: Pools) -> Cluster {
        Cluster {
            seeds,
            pools,
            map: RwLock::new(None),
            loading: tokio::sync::Mutex::new(()),
            refreshing: AtomicBool::new(false),
            last_refresh: Mutex::new(None),
        }
    }

    /// The slot map; the first call reads it (the only time a request waits for it).
    pub(super) async fn map(&self) -> Result<Arc<SlotMap>, Error> {
        if let Some(m) = self.map.read().expect("map lock").clone() {
            return Ok(m);
        }
        let _one = self.loading.lock().await;
        if let Some(m) = self.map.read().expect("map lock").clone() {
            return Ok(m);
        }
        self.refresh().await?;
        Ok(self
            .map
            .read()
            .expect("map lock")
            .clone()
            .expect("a refresh that succeeded sets the map"))
    }

    pub(super) fn moved(self: &Arc<Self>, slot: u16, addr: &Addr) {
        {
            let mut map = self.map.write().expect("map lock");
            if let Some(m) = map.as_mut() {
                let m = Arc::make_mut(m);
                let node = match m.nodes.iter().position(|n| n == addr) {
                    Some(i) => i,
                    None => {
                        m.nodes.push(addr.clone());
                        m.nodes.len() - 1
                    }
                };
                m.slots[slot as usize] = Some(node as u16);
            }
        }
        self.schedule_refresh();
    }

    /// Refreshes the map in the background, unless a refresh runs or ran just now.
    pub(super) fn schedule_refresh(self: &Arc<Self>) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let wait = this
                .last_refresh
                .lock()
                .expect("refresh lock")
                .map(|at| (at + REFRESH_EVERY).saturating_duration_since(Instant::now()));
            if let Some(wait) = wait {
                tokio::time::sleep(wait).await;
            }
            if let Err(e) = this.refresh().await {
                tracing::warn!(error = %e, "redis cluster: slot map not refreshed");
            }
            this.refreshing.store(false, Ordering::Release);
        });
    }

    /// Reads `CLUSTER NODES` from the first node that answers (known primaries first,
    /// then the seeds) and replaces the map.
    pub(super) async fn refresh(&self) -> Result<(), Error> {
        *self.last_refresh.lock().expect("refresh lock") = Some(Instant::now());
        let mut candidates: Vec<Addr> = match self.map.read().expect("map lock").as_ref() {
            Some(m) => m
                .primaries
                .iter()
                .filter(|(_, failed)| !failed)
                .map(|(a, _)| a.clone())
                .collect(),
            None => Vec::new(),
        };
        for seed in &self.seeds {
            if !candidates.contains(seed) {
                candidates.push(seed.clone());
            }
        }
        let mut last = None;
        for addr in candidates {
            let pool = self.pools.get(&addr);
            let mut req = Request::default();
            req.cmd_bulk(TEXT_REPLY, &[Arg::Small(b"CLUSTER"), Arg::Small(b"NODES")]);
            let text = match pool
                .exec(&req, &mut [])
                .await
                .map_err(Error::from)
                .and_then(all)
            {
                Ok(mut r) => match r.pop() {
                    Some(Reply::Bulk(b)) => String::from_utf8_lossy(&b).into_owned(),
                    other => {
                        last = Some(Error::Backend(BackendError::new(
                            BackendErrorKind::Protocol,
                            format!("CLUSTER NODES answered {other:?}"),
                        )));
                        continue;
                    }
                },
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            let map = parse_nodes(&text, &addr);
            let mut current = self.map.write().expect("map lock");
            let changed = current
                .as_ref()
                .is_none_or(|m| m.primaries != map.primaries);
            *current = Some(Arc::new(map));
            if changed {
                tracing::info!("redis cluster: the primaries changed");
            }
            return Ok(());
        }
        Err(last.unwrap_or_else(|| Error::Config("no cluster seed nodes".into())))
    }
}

/// The slot map in a `CLUSTER NODES` reply asked of `asked` (a node that does not know
/// its own address yet lists itself as `:port`).
fn parse_nodes(text: &str, asked: &Addr) -> SlotMap {
    let mut map = SlotMap {
        slots: vec![None; SLOTS],
        nodes: Vec::new(),
        primaries: Vec::new(),
    };
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(flags) = fields.get(2).map(|f| f.split(',').collect::<Vec<_>>()) else {
            continue;
        };
        if !flags.contains(&"master") {
            continue;
        }
        // `ip:port@cport[,hostname]`
        let Some((host, port)) = fields[1]
            .split('@')
            .next()
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        else {
            continue;
        };
        let host = if host.is_empty() {
            asked.host.as_str()
        } else {
            host
        };
        let addr = Addr {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
        };
        let failed = flags.contains(&"fail");
        let ranges = fields.get(8..).unwrap_or_default();
        // A failed primary that serves no slots any more (a replica took over) holds
        // nothing.
        if failed && ranges.is_empty() {
            continue;
        }
        map.primaries.push((addr.clone(), failed));
        let index = map.nodes.len() as u16;
        map.nodes.push(addr);
        for range in ranges {
            // `[slot->-node]` and `[slot-<-node]`: a slot being migrated; its owner is
            // still the node it is listed under, which answers `ASK` when needed.
            if range.starts_with('[') {
                continue;
            }
            let (from, to) = range.split_once('-').unwrap_or((range, range));
            if let (Ok(from), Ok(to)) = (from.parse::<usize>(), to.parse::<usize>()) {
                for s in from..=to.min(SLOTS - 1) {
                    map.slots[s] = Some(index);
                }
            }
        }
    }
    map.primaries.sort();
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_cluster_spec() {
        // The spec's test vector: CRC16/XMODEM("123456789") = 0x31C3.
        assert_eq!(slot(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(
            slot(b"foo{}{bar}"),
            slot(b"bar"),
            "an empty tag hashes the whole key"
        );
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
    }

    #[test]
    fn cluster_nodes_give_slots_and_primaries() {
        let nodes = "\
a1 10.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460 [5461->-b2]
b2 10.0.0.2:7001@17001 master,fail - 0 0 2 connected 5461-10922
c3 10.0.0.3:7002@17002 master,fail? - 0 0 3 connected 10923-16382 16383
d4 10.0.0.4:7003@17003 master,fail - 0 0 4 disconnected
e5 10.0.0.5:7004@17004 slave a1 0 0 1 connected
f6 :7005@17005 myself,master - 0 0 0 connected
";
        let asked = Addr {
            host: "10.0.0.9".into(),
            port: 7005,
        };
        let map = parse_nodes(nodes, &asked);
        let a = |h: &str, p| Addr {
            host: h.into(),
            port: p,
        };
        assert_eq!(
            map.primaries,
            vec![
                (a("10.0.0.1", 7000), false),
                (a("10.0.0.2", 7001), true),
                (a("10.0.0.3", 7002), false),
                (a("10.0.0.9", 7005), false),
            ],
            "a failed primary with slots is reported; one without slots holds nothing"
        );
        let at = |s: usize| map.slots[s].map(|i| map.nodes[i as usize].clone());
        assert_eq!(at(0), Some(a("10.0.0.1", 7000)));
        assert_eq!(at(5460), Some(a("10.0.0.1", 7000)));
        assert_eq!(at(5461), Some(a("10.0.0.2", 7001)));
        assert_eq!(at(16383), Some(a("10.0.0.3", 7002)));
    }
}
