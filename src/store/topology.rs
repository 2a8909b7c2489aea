//! Which node serves a key: one Redis, the primary the sentinels name, or the Redis
//! Cluster node of the key's slot.
//!
//! A Cluster's slot map, and how it is kept fresh, are `cluster.rs`'s.
//!
//! A Sentinel primary is looked up when none is known, and forgotten only on evidence
//! about the server: it says it is a replica (`READONLY`), or a sentinel names another
//! primary. A call to it that failed on the server's or the network's account (refused,
//! reset, no answer in time) asks the sentinels in the background (at most one check
//! running, at most one per [`CHECK_EVERY`]) whether the primary is still the one they
//! name; an error the client made itself (its reconnect pacing, no pool slot free in
//! time) changes nothing. The sentinels are asked on pooled connections (one per
//! sentinel), paced by `connect_rate` like every other pool, with their own login.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::cluster::{Cluster, slot};
use super::conn::{Addr, Dialer, Got, Pool};
use super::url::{Endpoints, Target};
use crate::error::{BackendError, BackendErrorKind, Error};
use crate::resp::{Arg, Caps, Reply, Request};

/// Least time between two background checks of a Sentinel primary.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Longest `CLUSTER NODES` or `INFO` reply read (a few hundred bytes per node).
pub(crate) const TEXT_REPLY: usize = 16 << 20;

/// The nodes behind a store.
#[derive(Debug)]
pub(crate) enum Topology {
    /// One Redis.
    Single(Arc<Pool>),
    /// The primary named by sentinels.
    Sentinel(Arc<Sentinel>),
    /// A Redis Cluster.
    Cluster(Arc<Cluster>),
}

/// A primary node, as a full scan or a report sees it.
#[derive(Debug)]
pub(crate) struct Primary {
    /// How reports name it.
    pub(crate) name: String,
    /// Its connections; `None` when the cluster marks it as failed (its slots are
    /// unreachable until a replica takes over).
    pub(crate) pool: Option<Arc<Pool>>,
}

impl Topology {
    pub(crate) fn new(target: &Target, dialer: Arc<Dialer>) -> Topology {
        let pools = Pools {
            dialer: dialer.clone(),
            by_addr: Mutex::new(HashMap::new()),
        };
        match &target.endpoints {
            Endpoints::Single(addr) => Topology::Single(Arc::new(Pool::new(addr.clone(), dialer))),
            Endpoints::Sentinel { sentinels, master } => Topology::Sentinel(Arc::new(Sentinel {
                sentinels: sentinels.clone(),
                master: master.clone(),
                // Sentinels are asked with their own login (not the data nodes'), on one
                // kept connection each, dialled again at most `connect_rate` times a
                // second: lookups in a storm of errors cost the sentinels no connections.
                sentinels_pools: Pools {
                    dialer: Arc::new(Dialer {
                        login: target.sentinel_login.clone(),
                        tls: dialer.tls.clone(),
                        connect_timeout: dialer.connect_timeout,
                        response_timeout: dialer.response_timeout,
                        command_retries: 1,
                        max_connections: 1,
                        connect_rate: dialer.connect_rate,
                    }),
                    by_addr: Mutex::new(HashMap::new()),
                },
                pools,
                current: Mutex::new(None),
                discovering: tokio::sync::Mutex::new(()),
                discoveries: AtomicU64::new(0),
                checking: AtomicBool::new(false),
                last_check: Mutex::new(None),
            })),
            Endpoints::Cluster(seeds) => {
                Topology::Cluster(Arc::new(Cluster::new(seeds.clone(), pools)))
            }
        }
    }

    /// The node for each key, grouped by node (in order of first appearance); keys whose
    /// slot no node serves get the error of that.
    pub(crate) async fn route(
        &self,
        keys: &[String],
    ) -> Result<(Vec<(Arc<Pool>, Vec<usize>)>, Vec<(usize, BackendError)>), Error> {
        match self {
            Topology::Single(pool) => Ok((vec![(pool.clone(), (0..keys.len()).collect())], vec![])),
            Topology::Sentinel(s) => Ok((
                vec![(s.primary().await?, (0..keys.len()).collect())],
                vec![],
            )),
            Topology::Cluster(c) => {
                let map = c.map().await?;
                let mut groups: Vec<(Arc<Pool>, Vec<usize>)> = Vec::new();
                let mut by_node: HashMap<u16, usize> = HashMap::new();
                let mut unserved = Vec::new();
                for (i, key) in keys.iter().enumerate() {
                    let Some(node) = map.slots[slot(key.as_bytes()) as usize] else {
                        unserved.push((
                            i,
                            BackendError::new(
                                BackendErrorKind::Unavailable,
                                format!("no cluster node serves the slot of {key}"),
                            ),
                        ));
                        continue;
                    };
                    let g = *by_node.entry(node).or_insert_with(|| {
                        groups.push((c.pools.get(&map.nodes[node as usize]), Vec::new()));
                        groups.len() - 1
                    });
                    groups[g].1.push(i);
                }
                Ok((groups, unserved))
            }
        }
    }

    /// The pool of the node at `addr` (a `MOVED`/`ASK` target).
    pub(crate) fn pool_at(&self, addr: &Addr) -> Option<Arc<Pool>> {
        match self {
            Topology::Cluster(c) => Some(c.pools.get(addr)),
            _ => None,
        }
    }

    /// A `MOVED slot addr` reply: the slot is served elsewhere now.
    pub(crate) fn moved(&self, slot: u16, addr: &Addr) {
        if let Topology::Cluster(c) = self {
            c.moved(slot, addr);
        }
    }

    /// A call to `pool`'s node failed with `err`: maybe the topology changed. Errors the
    /// client made itself (pacing, pool slots) and commands the server refused say
    /// nothing about that; `READONLY` says the node is a replica now (a Sentinel primary
    /// is forgotten at once); anything else (refused, reset, no answer) has the cluster's
    /// slot map read again or the sentinels asked, in the background.
    pub(crate) fn failed(&self, pool: &Arc<Pool>, err: &BackendError) {
        let readonly = err.server_code() == Some("READONLY");
        if err.is_client_side() || (err.kind() == BackendErrorKind::Refused && !readonly) {
            return;
        }
        match self {
            Topology::Single(_) => {}
            Topology::Sentinel(s) if readonly => s.forget(pool, "it answers READONLY"),
            Topology::Sentinel(s) => s.schedule_check(pool),
            Topology::Cluster(c) => c.schedule_refresh(),
        }
    }

    /// Every primary (the one Redis; the sentinels' primary; each cluster primary).
    pub(crate) async fn primaries(&self) -> Result<Vec<Primary>, Error> {
        match self {
            Topology::Single(pool) => Ok(vec![Primary {
                name: pool.addr().to_string(),
                pool: Some(pool.clone()),
            }]),
            Topology::Sentinel(s) => {
                let pool = s.primary().await?;
                Ok(vec![Primary {
                    name: pool.addr().to_string(),
                    pool: Some(pool),
                }])
            }
            Topology::Cluster(c) => {
                // Fresh, so that a report sees the nodes as the cluster does now.
                c.refresh().await?;
                let map = c.map().await?;
                Ok(map
                    .primaries
                    .iter()
                    .map(|(addr, failed)| Primary {
                        name: addr.to_string(),
                        pool: (!failed).then(|| c.pools.get(addr)),
                    })
                    .collect())
            }
        }
    }

    /// Calls `f` with the address of the primary that holds `key` now (by the current slot
    /// map, or the sentinels' current primary); `None` when none is known.
    pub(crate) fn owner_of<R>(&self, key: &[u8], f: impl FnOnce(&Addr) -> R) -> Option<R> {
        match self {
            Topology::Single(pool) => Some(f(pool.addr())),
            Topology::Sentinel(s) => s
                .current
                .lock()
                .expect("sentinel lock")
                .as_ref()
                .map(|p| f(p.addr())),
            Topology::Cluster(c) => {
                let map = c.map.read().expect("map lock");
                let m = map.as_ref()?;
                let node = m.slots[slot(key) as usize]?;
                Some(f(&m.nodes[node as usize]))
            }
        }
    }

    /// The primaries to track, as known now (a cluster's slot map is read only the first
    /// time), failed ones included: their streams are tried again until they answer or are
    /// no longer primaries.
    pub(crate) async fn tracked_primaries(&self) -> Result<Vec<Arc<Pool>>, Error> {
        match self {
            Topology::Single(pool) => Ok(vec![pool.clone()]),
            Topology::Sentinel(s) => Ok(vec![s.primary().await?]),
            Topology::Cluster(c) => {
                let map = c.map().await?;
                Ok(map
                    .primaries
                    .iter()
                    .map(|(addr, _)| c.pools.get(addr))
                    .collect())
            }
        }
    }
}

/// One pool per node address, made on first use and kept (with its reconnect pacing).
#[derive(Debug)]
pub(super) struct Pools {
    dialer: Arc<Dialer>,
    by_addr: Mutex<HashMap<Addr, Arc<Pool>>>,
}

impl Pools {
    pub(super) fn get(&self, addr: &Addr) -> Arc<Pool> {
        self.by_addr
            .lock()
            .expect("pools lock")
            .entry(addr.clone())
            .or_insert_with(|| Arc::new(Pool::new(addr.clone(), self.dialer.clone())))
            .clone()
    }
}

/// The primary the sentinels name.
#[derive(Debug)]
pub(crate) struct Sentinel {
    sentinels: Vec<Addr>,
    master: String,
    /// One pool (of one connection) per sentinel.
    sentinels_pools: Pools,
    pools: Pools,
    current: Mutex<Option<Arc<Pool>>>,
    /// One lookup at a time; the others wait for its answer.
    discovering: tokio::sync::Mutex<()>,
    /// Lookups made (the first, and one after each time the primary was forgotten).
    discoveries: AtomicU64,
    /// A background check runs; when the last one started.
    checking: AtomicBool,
    last_check: Mutex<Option<Instant>>,
}

impl Sentinel {
    async fn primary(&self) -> Result<Arc<Pool>, Error> {
        if let Some(p) = self.current.lock().expect("sentinel lock").clone() {
            return Ok(p);
        }
        let _one = self.discovering.lock().await;
        if let Some(p) = self.current.lock().expect("sentinel lock").clone() {
            return Ok(p);
        }
        self.discoveries.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("kvshelf_store_sentinel_lookups_total").increment(1);
        let mut last = None;
        for sentinel in &self.sentinels {
            match self.ask(sentinel).await {
                Ok(addr) => {
                    let pool = self.pools.get(&addr);
                    // A sentinel may name a primary that has just been demoted (or is
                    // down): ask the node itself before sending it writes.
                    match is_primary(&pool).await {
                        Ok(true) => {
                            let mut current = self.current.lock().expect("sentinel lock");
                            if current.as_ref().is_none_or(|c| c.addr() != pool.addr()) {
                                tracing::info!(master = %self.master, primary = %addr, "sentinel: primary found");
                            }
                            *current = Some(pool.clone());
                            return Ok(pool);
                        }
                        Ok(false) => {
                            last = Some(BackendError::new(
                                BackendErrorKind::Unavailable,
                                format!("sentinel {sentinel} names {addr}, which is not a primary"),
                            ))
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last
            .unwrap_or_else(|| BackendError::new(BackendErrorKind::Unavailable, "no sentinels"))
            .into())
    }

    /// `SENTINEL GET-MASTER-ADDR-BY-NAME` of one sentinel.
    async fn ask(&self, sentinel: &Addr) -> Result<Addr, BackendError> {
        let pool = self.sentinels_pools.get(sentinel);
        let mut req = Request::default();
        req.cmd_caps(
            Caps::bulk(256).total(1024),
            &[
                Arg::Small(b"SENTINEL"),
                Arg::Small(b"GET-MASTER-ADDR-BY-NAME"),
                Arg::Small(self.master.as_bytes()),
            ],
        );
        let reply = pool
            .exec(&req, &mut [])
            .await?
            .replies
            .pop()
            .map(Got::unsplit);
        let unknown = || {
            BackendError::new(
                BackendErrorKind::Unavailable,
                format!("sentinel {sentinel} knows no primary {:?}", self.master),
            )
        };
        match reply {
            Some(Reply::Array(a)) if a.len() == 2 => {
                let host = a[0].text().ok_or_else(unknown)?.to_owned();
                let port = a[1]
                    .int()
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or_else(unknown)?;
                Ok(Addr { host, port })
            }
            Some(Reply::Error(e)) => Err(BackendError::from_reply(&e)),
            _ => Err(unknown()),
        }
    }

    fn forget(&self, pool: &Arc<Pool>, why: &str) {
        let mut current = self.current.lock().expect("sentinel lock");
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, pool)) {
            tracing::info!(master = %self.master, primary = %pool.addr(), why, "sentinel: primary forgotten; asking the sentinels again");
            *current = None;
        }
    }

    /// Asks the sentinels in the background whether `pool`'s node is still the primary
    /// they name, and forgets it if one names another; unless a check runs or ran less
    /// than [`CHECK_EVERY`] ago.
    fn schedule_check(self: &Arc<Self>, pool: &Arc<Pool>) {
        if self.checking.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        let pool = pool.clone();
        tokio::spawn(async move {
            let wait = this
                .last_check
                .lock()
                .expect("check lock")
                .map(|at| (at + CHECK_EVERY).saturating_duration_since(Instant::now()));
            if let Some(wait) = wait {
                tokio::time::sleep(wait).await;
            }
            *this.last_check.lock().expect("check lock") = Some(Instant::now());
            for sentinel in &this.sentinels {
                match this.ask(sentinel).await {
                    Ok(named) if named != *pool.addr() => {
                        this.forget(&pool, &format!("sentinel {sentinel} names {named}"));
                        break;
                    }
                    Ok(_) => break,
                    // Ask the next one.
                    Err(_) => continue,
                }
            }
            this.checking.store(false, Ordering::Release);
        });
    }
}

impl super::RedisStore {
    /// How many times this store asked the sentinels which node is the primary because
    /// it knew none (the first call, then once after each time it forgot the primary:
    /// `READONLY`, or a sentinel naming another). 0 for other topologies. Also counted in
    /// `kvshelf_store_sentinel_lookups_total`.
    pub fn sentinel_lookups(&self) -> u64 {
        match &*self.topo {
            Topology::Sentinel(s) => s.discoveries.load(Ordering::Relaxed),
            _ => 0,
        }
    }
}

/// Whether a node says it is a primary (`ROLE`).
async fn is_primary(pool: &Pool) -> Result<bool, BackendError> {
    let mut req = Request::default();
    // A primary lists its replicas (host, port, offset each): room for 1,000 of them.
    req.cmd_caps(
        Caps::bulk(64).total(256 << 10).elements(4096),
        &[Arg::Small(b"ROLE")],
    );
    let reply = pool
        .exec(&req, &mut [])
        .await?
        .replies
        .pop()
        .map(Got::unsplit);
    Ok(match reply {
        Some(Reply::Array(a)) => a.first().and_then(Reply::text) == Some("master"),
        Some(Reply::Error(e)) => return Err(BackendError::from_reply(&e)),
        _ => false,
    })
}
