//! The completion engine behind LMCache's `native_plugin` protocol.
//!
//! LMCache hands a batch of keys and buffers to `submit_batch_*`, which must return a
//! future id at once; later it polls an eventfd and calls `drain_completions` for
//! `(future_id, ok, error, per-key bools)`. Here a submit parses the keys (LMCache's own,
//! hashed with the `lmcache` scheme; in any other namespace, kvshelf block hashes the
//! caller computed, as `kvshelf.vllm` does with `vllm_key_hash`), takes the buffers, and
//! spawns the Redis work on the
//! shared tokio runtime: no GIL and no Python on the data path. A finished batch pushes its
//! completion and writes the eventfd.
//!
//! Why the buffers stay in `pending` until their completion is drained, not until the task
//! ends: LMCache may reuse a buffer as soon as it has seen the completion, and never
//! before; holding the `PyBuffer` (and so the exporter) until then means no write can land
//! in memory LMCache has moved on from, and the release happens under the GIL in `drain`.
//! Why every batch runs under `timeout`: the cache fails open, so a hung Redis becomes
//! misses in bounded time. A batch's sub-batches record their keys as each one finishes,
//! so keys done before the deadline keep their result; the copy into a buffer happens
//! inside the timed future, so once the timeout fired nothing writes into that batch's
//! buffers.
//! Why `close` sets `closed` under the task map's lock: it waits for the tasks with the
//! GIL released, when another thread may submit; a submit checks the flag under the same
//! lock as it spawns, so no batch starts that `close` would not stop before it releases
//! the buffers.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use kvshelf::{BlockHash, RedisStore};
use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::Arc;

use crate::{Namespace, RawBuf, byte_buffer, hash_of, runtime, store_config, to_py};

/// One finished batch, as LMCache's `drain_completions` returns it.
type Completion = (u64, bool, String, Option<Vec<bool>>);

/// What the spawned tasks share with the engine.
struct Shared {
    store: RedisStore,
    ns: kvshelf::Namespace,
    timeout: Duration,
    done: Mutex<Vec<Completion>>,
    /// The eventfd LMCache polls; `None` once closed, so no task writes to a reused fd.
    efd: Mutex<Option<File>>,
    /// Keys whose reads may be outstanding at once, across every batch (`max_keys_loading`
    /// permits; `None`: no bound). Several batches submitted together would otherwise send
    /// all their GETs at once: Redis then copies every value into its reply buffers before
    /// it writes much of any, tens of MiB that no cache holds, and every batch finishes
    /// late (BENCHMARKS.md, "Issue 19").
    loading: Option<(tokio::sync::Semaphore, usize)>,
}

impl Shared {
    fn complete(&self, c: Completion) {
        self.done.lock().expect("not poisoned").push(c);
        if let Some(f) = self.efd.lock().expect("not poisoned").as_mut() {
            // The counter only overflows after 2^64-1 unread completions; a failed write
            // cannot lose the completion, which is already queued.
            let _ = f.write(&1u64.to_ne_bytes());
        }
    }
}

/// Per-key outcome of a batch, and what went wrong for the keys that failed.
struct Outcome {
    bools: Vec<bool>,
    errors: Vec<String>,
}

impl Outcome {
    fn new(n: usize) -> Self {
        Outcome {
            bools: vec![false; n],
            errors: Vec::new(),
        }
    }

    /// `ok` of a get or set: every key was loaded or stored. `ok` of an exists or delete
    /// (`answers`): Redis answered for every key, whatever the answers are, as LMCache's
    /// adapter reads a lookup's bools only when `ok`.
    fn into_completion(self, id: u64, keys_total: usize, answers: bool) -> Completion {
        let ok = self.errors.is_empty() && (answers || self.bools.iter().all(|b| *b));
        let failed = self.bools.iter().filter(|b| !**b).count();
        let err = if ok {
            String::new()
        } else {
            let mut e = if answers {
                format!("{} of {keys_total} keys failed", self.errors.len())
            } else {
                format!("{failed} of {keys_total} keys failed or missed")
            };
            for m in self.errors.iter().take(8) {
                e.push_str("; ");
                e.push_str(m);
            }
            if self.errors.len() > 8 {
                e.push_str(&format!("; and {} more", self.errors.len() - 8));
            }
            e
        };
        (id, ok, err, Some(self.bools))
    }
}

/// A prepared key: its index in the batch, its kvshelf hash and (for get/set) its buffer.
#[derive(Clone, Copy)]
struct Item {
    index: usize,
    hash: BlockHash,
    buf: RawBuf,
}

/// The Rust half of `kvshelf.lmcache.KvshelfNativeConnector` (see the module docs).
#[pyclass(frozen, module = "kvshelf._native")]
pub struct Engine {
    shared: Arc<Shared>,
    /// Batches a get or set is split into, run concurrently (the library sends one
    /// pipeline per call on one connection; several spread a batch over connections).
    fanout: usize,
    next_id: AtomicU64,
    /// Buffers of batches whose completion has not been drained yet.
    pending: Mutex<HashMap<u64, Vec<PyBuffer<u8>>>>,
    tasks: Mutex<Tasks>,
}

/// The running batches, and whether `close` has begun (see the module docs).
#[derive(Default)]
struct Tasks {
    closed: bool,
    running: HashMap<u64, tokio::task::JoinHandle<()>>,
}

enum Op {
    Get,
    Set,
    Exists,
    Delete,
    Touch,
}

#[pymethods]
impl Engine {
    /// `Engine(url, namespace, event_fd, timeout=5.0, fanout=2, max_keys_loading=8,
    /// **store_options)`. Takes ownership of `event_fd` (an `os.eventfd(0, EFD_NONBLOCK |
    /// EFD_CLOEXEC)`) and closes it in `close`. `max_keys_loading`: keys whose reads may be
    /// outstanding at once across all batches (0: no bound); a batch waits for room within
    /// its own deadline.
    #[new]
    #[pyo3(signature = (url, namespace, event_fd, timeout=5.0, fanout=2, max_keys_loading=8, **options))]
    fn new(
        url: &str,
        namespace: &Namespace,
        event_fd: i32,
        timeout: f64,
        fanout: usize,
        max_keys_loading: usize,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let cfg = store_config(url, options)?;
        let store = {
            let _rt = runtime().enter();
            RedisStore::new(cfg).map_err(to_py)?
        };
        if !(timeout > 0.0 && timeout.is_finite()) {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "timeout must be a positive number of seconds",
            ));
        }
        // SAFETY: the caller hands this fd over (documented above); nothing else closes it.
        let efd = unsafe { File::from_raw_fd(event_fd) };
        Ok(Engine {
            shared: Arc::new(Shared {
                store,
                ns: namespace.0.clone(),
                timeout: Duration::from_secs_f64(timeout),
                done: Mutex::new(Vec::new()),
                efd: Mutex::new(Some(efd)),
                loading: (max_keys_loading > 0).then(|| {
                    (
                        tokio::sync::Semaphore::new(max_keys_loading),
                        max_keys_loading,
                    )
                }),
            }),
            fanout: fanout.max(1),
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Tasks::default()),
        })
    }

    /// Reads `keys[i]` into `bufs[i]`. A key is loaded only if its chunk has exactly the
    /// buffer's length; anything else (absent, corrupt, other length, Redis down or slow)
    /// is `False` for that key.
    fn submit_get(&self, keys: &Bound<'_, PyAny>, bufs: &Bound<'_, PyAny>) -> u64 {
        self.submit(Op::Get, keys, Some(bufs))
    }

    /// Writes `bufs[i]` under `keys[i]`, write-once with the namespace's TTL. `True` for a
    /// key stored now or already there.
    fn submit_set(&self, keys: &Bound<'_, PyAny>, bufs: &Bound<'_, PyAny>) -> u64 {
        self.submit(Op::Set, keys, Some(bufs))
    }

    /// Whether each key's chunk is on the shelf, in one round trip.
    fn submit_exists(&self, keys: &Bound<'_, PyAny>) -> u64 {
        self.submit(Op::Exists, keys, None)
    }

    /// Deletes each key's chunk; `True` where one existed.
    fn submit_delete(&self, keys: &Bound<'_, PyAny>) -> u64 {
        self.submit(Op::Delete, keys, None)
    }

    /// Slides the TTL of each key's chunk (`PEXPIRE … XX`, one round trip per node), as a
    /// read would with `sliding_ttl`; pinned chunks stay pinned. `ok` when Redis answered;
    /// the per-key bools are all `True` then (the store counts, it does not say which).
    fn submit_touch(&self, keys: &Bound<'_, PyAny>) -> u64 {
        self.submit(Op::Touch, keys, None)
    }

    /// Every completion since the last call; releases their buffers.
    fn drain(&self) -> Vec<Completion> {
        if let Some(f) = self.shared.efd.lock().expect("not poisoned").as_mut() {
            // Reset the counter before taking the queue: a completion pushed after the
            // take writes the fd again, so none is left unsignalled.
            let mut counter = [0u8; 8];
            let _ = f.read(&mut counter);
        }
        let done = std::mem::take(&mut *self.shared.done.lock().expect("not poisoned"));
        let mut pending = self.pending.lock().expect("not poisoned");
        let mut tasks = self.tasks.lock().expect("not poisoned");
        for (id, ..) in &done {
            pending.remove(id);
            tasks.running.remove(id);
        }
        done
    }

    /// Batches submitted and not drained yet.
    fn in_flight(&self) -> usize {
        self.pending.lock().expect("not poisoned").len()
    }

    /// Cancels batches still running, waits until none can touch a buffer, closes the
    /// eventfd, releases every buffer. Submits from the moment `close` is called (from any
    /// thread) complete at once with every key failed and touch no buffer.
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.stop_tasks());
        self.shared.efd.lock().expect("not poisoned").take();
        self.pending.lock().expect("not poisoned").clear();
    }
}

impl Drop for Engine {
    /// An engine dropped without `close` must not free buffers a task still writes into:
    /// stop the tasks first (they never take the GIL, so waiting here cannot deadlock).
    fn drop(&mut self) {
        self.stop_tasks();
    }
}

impl Engine {
    /// Marks the engine closed, aborts every running batch and waits until none can touch
    /// a buffer: a JoinHandle resolves once its task's future has been dropped, and the
    /// future writes into buffers only while it is polled.
    fn stop_tasks(&self) {
        let tasks: Vec<_> = {
            let mut tasks = self.tasks.lock().expect("not poisoned");
            tasks.closed = true;
            tasks.running.drain().map(|(_, t)| t).collect()
        };
        for t in &tasks {
            t.abort();
        }
        if !tasks.is_empty() {
            runtime().block_on(async {
                for t in tasks {
                    let _ = t.await;
                }
            });
        }
    }

    fn submit(&self, op: Op, keys: &Bound<'_, PyAny>, bufs: Option<&Bound<'_, PyAny>>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let lmcache = self.shared.ns.hash_scheme == kvshelf::HashScheme::Lmcache;
        let keys: Vec<Bound<'_, PyAny>> = match keys.extract() {
            Ok(k) => k,
            Err(e) => {
                let want = if lmcache { "str" } else { "block hashes" };
                self.shared.complete((
                    id,
                    false,
                    format!("keys must be a list of {want}: {e}"),
                    None,
                ));
                return id;
            }
        };
        let n = keys.len();
        let answers = matches!(op, Op::Exists | Op::Delete | Op::Touch);
        let mut outcome = Outcome::new(n);
        if self.tasks.lock().expect("not poisoned").closed {
            return self.refuse_closed(id, outcome, n, answers);
        }
        let buffers: Option<Vec<Bound<'_, PyAny>>> = match bufs.map(|b| b.extract()) {
            None => None,
            Some(Ok(b)) => Some(b),
            Some(Err(e)) => {
                outcome
                    .errors
                    .push(format!("bufs must be a list of buffers: {e}"));
                self.shared
                    .complete(outcome.into_completion(id, n, answers));
                return id;
            }
        };
        if let Some(b) = &buffers
            && b.len() != n
        {
            outcome
                .errors
                .push(format!("{n} keys but {} buffers", b.len()));
            self.shared
                .complete(outcome.into_completion(id, n, answers));
            return id;
        }
        let mut items = Vec::with_capacity(n);
        let mut held = Vec::with_capacity(n);
        for (i, key) in keys.iter().enumerate() {
            let hash = if lmcache {
                key.extract::<String>()
                    .map_err(|e| e.to_string())
                    .and_then(|k| kvshelf::hashing::lmcache_key_hash(&k).map_err(|e| e.to_string()))
            } else {
                hash_of(key).map_err(|e| e.to_string())
            };
            let hash = match hash {
                Ok(h) => h,
                Err(e) => {
                    outcome.errors.push(format!("key {i}: {e}"));
                    continue;
                }
            };
            let buf = match &buffers {
                None => RawBuf { ptr: 0, len: 0 },
                Some(b) => match byte_buffer(&b[i], matches!(op, Op::Get)) {
                    Ok(pb) => {
                        let raw = RawBuf::of(&pb);
                        held.push(pb);
                        raw
                    }
                    Err(e) => {
                        outcome.errors.push(format!("key {i}: {e}"));
                        continue;
                    }
                },
            };
            items.push(Item {
                index: i,
                hash,
                buf,
            });
        }
        let shared = Arc::clone(&self.shared);
        let fanout = self.fanout;
        // Hold the task map's lock across spawn so a fast completion drained at once
        // cannot race the insert of its own handle, and `close` cannot begin between the
        // check of `closed` and the spawn.
        let mut tasks = self.tasks.lock().expect("not poisoned");
        if tasks.closed {
            drop(tasks);
            drop(held);
            return self.refuse_closed(id, outcome, n, answers);
        }
        self.pending.lock().expect("not poisoned").insert(id, held);
        let handle = runtime().spawn(async move {
            let work = run(&shared, &op, &items, fanout, &mut outcome);
            if tokio::time::timeout(shared.timeout, work).await.is_err() {
                outcome.errors.push(format!(
                    "timed out after {:?}: Redis did not answer in time",
                    shared.timeout
                ));
                // Keys recorded before the deadline keep their result (`run` records
                // each sub-batch as it finishes); a get's were fully copied by then.
            }
            shared.complete(outcome.into_completion(id, n, answers));
        });
        tasks.running.insert(id, handle);
        id
    }

    /// The completion of a batch submitted once `close` has begun: every key failed.
    /// Nobody polls the fd any more; the completion is still queued.
    fn refuse_closed(&self, id: u64, mut outcome: Outcome, n: usize, answers: bool) -> u64 {
        outcome.errors.push("connector closed".into());
        self.shared
            .complete(outcome.into_completion(id, n, answers));
        id
    }
}

/// Runs one batch: get and set split into `fanout` concurrent sub-batches, delete one
/// call per key. Each sub-batch's keys are recorded in `out` as soon as it finishes, so a
/// deadline that cuts this future short leaves the finished ones' results in place.
async fn run(shared: &Shared, op: &Op, items: &[Item], fanout: usize, out: &mut Outcome) {
    let (ns, store) = (&shared.ns, &shared.store);
    match op {
        Op::Exists => {
            let hashes: Vec<BlockHash> = items.iter().map(|it| it.hash).collect();
            match store.exists(&ns.label, &hashes).await {
                Ok(found) => {
                    for (it, f) in items.iter().zip(found) {
                        out.bools[it.index] = f;
                    }
                }
                Err(e) => out.errors.push(format!("exists: {e}")),
            }
        }
        Op::Touch => {
            let hashes: Vec<BlockHash> = items.iter().map(|it| it.hash).collect();
            match store.touch(ns, &hashes).await {
                Ok(_) => {
                    for it in items {
                        out.bools[it.index] = true;
                    }
                }
                Err(e) => out.errors.push(format!("touch: {e}")),
            }
        }
        Op::Delete => {
            let mut deleted: FuturesUnordered<_> = items
                .iter()
                .map(|it| async move {
                    let d = store
                        .delete(&ns.label, std::slice::from_ref(&it.hash))
                        .await;
                    (it, d)
                })
                .collect();
            while let Some((it, d)) = deleted.next().await {
                match d {
                    Ok(n) => out.bools[it.index] = n > 0,
                    Err(e) => out.errors.push(format!("key {}: {e}", it.index)),
                }
            }
        }
        Op::Get | Op::Set => {
            let per = items.len().div_ceil(fanout).max(1);
            let mut results: FuturesUnordered<_> = items
                .chunks(per)
                .map(|group| async move {
                    // A get's sub-batch waits for room among the keys loading; never for
                    // more permits than there are, or it would wait forever.
                    let _room = match (op, &shared.loading) {
                        (Op::Get, Some((loading, cap))) => {
                            let n = u32::try_from(group.len().min(*cap)).unwrap_or(u32::MAX);
                            Some(loading.acquire_many(n).await.expect("never closed"))
                        }
                        _ => None,
                    };
                    (group, run_group(store, ns, op, group).await)
                })
                .collect();
            while let Some((group, r)) = results.next().await {
                match r {
                    Ok(per_key) => {
                        for (it, k) in group.iter().zip(per_key) {
                            match k {
                                Ok(b) => out.bools[it.index] = b,
                                Err(e) => out.errors.push(e),
                            }
                        }
                    }
                    Err(e) => {
                        let first = group.first().map_or(0, |it| it.index);
                        out.errors
                            .push(format!("keys {first}..{}: {e}", first + group.len()));
                    }
                }
            }
        }
    }
}

/// Per key of one sub-batch of a get or set: loaded or stored, or why not.
async fn run_group(
    store: &RedisStore,
    ns: &kvshelf::Namespace,
    op: &Op,
    group: &[Item],
) -> Result<Vec<Result<bool, String>>, kvshelf::Error> {
    let hashes: Vec<BlockHash> = group.iter().map(|it| it.hash).collect();
    let raws: Vec<RawBuf> = group.iter().map(|it| it.buf).collect();
    if let Op::Get = op {
        // SAFETY: `pending` holds the writable buffers until this batch's completion is
        // drained (after this future has ended), and LMCache does not touch them before.
        let found = unsafe { crate::read_into(store, ns, &hashes, &raws) }.await?;
        Ok(group
            .iter()
            .zip(found)
            .map(|(it, r)| match r {
                Some(len) if len != it.buf.len => Err(format!(
                    "key {}: stored chunk has {len} bytes, buffer {}",
                    it.index, it.buf.len
                )),
                Some(_) => Ok(true),
                None => Ok(false),
            })
            .collect())
    } else {
        // SAFETY: `pending` holds the buffers until this batch's completion is drained,
        // after this future has ended.
        let outcomes = unsafe { crate::put_from(store, ns, &hashes, &raws) }.await?;
        Ok(outcomes
            .into_iter()
            .map(|o| match o {
                "unavailable" => Err("its Redis node did not answer".to_owned()),
                _ => Ok(true),
            })
            .collect())
    }
}
