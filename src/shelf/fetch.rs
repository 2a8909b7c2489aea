//! The read path: lookups, and fetches streamed in chunks through L1 (or from the embedded
//! store). A fetch's memory is bounded by the fetch budget (`fetch_memory_bytes`): room for
//! a chunk is taken before it is read, and each block's share travels with its payload
//! until the transport drops it.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use super::{Admission, ApiError, Caller, FetchItem, Shelf};
use crate::frame::EndReason;
use crate::hashing::BlockHash;
use crate::l1::Served;
use crate::namespace::Namespace;
use crate::store::Read;

/// What a lookup is asked about.
#[derive(Debug)]
pub enum LookupInput {
    /// Token ids (hashed here with the caller's salt) and optional per-block extra keys.
    Tokens(Vec<u32>, Vec<Vec<Vec<u8>>>),
    /// Block hashes the caller computed (or got from `hash`).
    Hashes(Vec<BlockHash>),
}

/// The answer to a lookup.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LookupResult {
    /// Leading blocks present.
    pub hit_blocks: usize,
    /// `hit_blocks × block_size`.
    pub hit_tokens: usize,
    /// The hashes of the request.
    pub block_hashes: Vec<BlockHash>,
    /// False when the backend did not answer in time: the answer is then a miss.
    pub backend_ok: bool,
}

/// The items of one fetch, in order, ending with [`FetchItem::End`]. The request keeps its
/// concurrency slot until this is dropped (the response has been sent, or the client left).
#[derive(Debug)]
pub struct FetchStream {
    rx: mpsc::Receiver<FetchItem>,
    _admission: Admission,
}

impl FetchStream {
    /// The next item; `None` after the end item.
    pub async fn recv(&mut self) -> Option<FetchItem> {
        self.rx.recv().await
    }
}

impl futures_util::Stream for FetchStream {
    type Item = FetchItem;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<FetchItem>> {
        self.rx.poll_recv(cx)
    }
}

impl Shelf {
    /// How many leading blocks are on the shelf: leading L1 entries, then ONE backend
    /// round trip for the rest. With `warm`, the hit blocks are read into L1 in the
    /// background (`Shelf::warm`): the answer does not wait for them.
    pub async fn lookup(
        &self,
        _admission: Admission,
        caller: &Caller,
        label: &str,
        input: LookupInput,
        warm: bool,
    ) -> Result<LookupResult, ApiError> {
        let started = Instant::now();
        let ns = self.namespace(label)?.clone();
        let hashes = match input {
            LookupInput::Tokens(tokens, extras) => self.hash(caller, label, tokens, extras).await?,
            LookupInput::Hashes(h) => {
                self.check_count(h.len())?;
                h
            }
        };
        let in_l1 = match &self.inner.l1 {
            Some(l1) => hashes
                .iter()
                .take_while(|h| l1.contains(label, h) && self.l1_covers(label, h))
                .count(),
            None => 0,
        };
        let rest = &hashes[in_l1..];
        let (found, backend_ok) = if rest.is_empty() {
            (0, true)
        } else {
            match self
                .fail_open(
                    "lookup",
                    self.inner.cfg.lookup_timeout,
                    self.inner.backend.lookup(&ns, rest),
                )
                .await?
            {
                Some(n) => (n, true),
                None => (0, false),
            }
        };
        let hit_blocks = in_l1 + found;
        if warm && hit_blocks > 0 {
            self.warm(&ns, &hashes[..hit_blocks]);
        }
        metrics::counter!("kvshelf_lookup_blocks_total", "namespace" => ns.label.clone(), "result" => "hit")
            .increment(hit_blocks as u64);
        metrics::counter!("kvshelf_lookup_blocks_total", "namespace" => ns.label.clone(), "result" => "miss")
            .increment((hashes.len() - hit_blocks) as u64);
        metrics::histogram!("kvshelf_request_duration_seconds", "op" => "lookup")
            .record(started.elapsed().as_secs_f64());
        Ok(LookupResult {
            hit_blocks,
            hit_tokens: hit_blocks * ns.block_size as usize,
            block_hashes: hashes,
            backend_ok,
        })
    }

    /// Reads the leading blocks of `hashes` into L1 in the background, as a fetch would
    /// (through the fetch budget and single flight, so a fetch that comes meanwhile waits
    /// for the same reads instead of repeating them), and slides the TTL of those already
    /// in L1. At most half of L1 is warmed by one lookup (a longer prefix would evict its
    /// own first blocks before they are fetched), and at most [`super::MAX_WARMING`] warms run at
    /// once; past that, a lookup does not warm (counted).
    fn warm(&self, ns: &Namespace, hashes: &[BlockHash]) {
        let Some(l1) = &self.inner.l1 else {
            return; // the embedded store has no L1 to warm
        };
        let fits = (l1.usage().1 / 2 / ns.block_bytes().max(1)) as usize;
        let hashes = hashes[..hashes.len().min(fits)].to_vec();
        if hashes.is_empty() {
            return;
        }
        let Ok(slot) = self.inner.warming.clone().try_acquire_owned() else {
            metrics::counter!("kvshelf_warm_skipped_total").increment(1);
            return;
        };
        let (tx, mut rx) = mpsc::channel(self.chunk_blocks(ns));
        let me = self.clone();
        let ns = ns.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let read = me.stream_blocks(ns, hashes, tx);
            let drain = async { while rx.recv().await.is_some() {} };
            tokio::join!(read, drain);
        });
    }

    /// Streams the leading run of `hashes` that can be served, then an end item. Errors
    /// (unknown namespace, too many blocks, overload) come before any item; after that the
    /// stream fails open. Memory is bounded: the stream reads one chunk of about
    /// `fetch_chunk_bytes` at a time and waits for the consumer.
    pub async fn fetch(
        &self,
        admission: Admission,
        _caller: &Caller,
        label: &str,
        hashes: Vec<BlockHash>,
    ) -> Result<FetchStream, ApiError> {
        let ns = self.namespace(label)?.clone();
        self.check_count(hashes.len())?;
        // The request is parsed: while its stream is sent it holds its slot, not its body's
        // room (the stream's own memory is the fetch budget's).
        admission.release_body();
        let chunk = self.chunk_blocks(&ns);
        let (tx, rx) = mpsc::channel(chunk);
        let me = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            me.stream_blocks(ns, hashes, tx).await;
            metrics::histogram!("kvshelf_request_duration_seconds", "op" => "fetch")
                .record(started.elapsed().as_secs_f64());
        });
        Ok(FetchStream {
            rx,
            _admission: admission,
        })
    }

    /// One block, or `NotFound`.
    pub async fn get_one(
        &self,
        admission: Admission,
        caller: &Caller,
        label: &str,
        hash: BlockHash,
    ) -> Result<Bytes, ApiError> {
        let mut rx = self.fetch(admission, caller, label, vec![hash]).await?;
        match rx.recv().await {
            Some(FetchItem::Block { payload, .. }) => Ok(payload),
            _ => Err(ApiError::NotFound),
        }
    }

    fn chunk_blocks(&self, ns: &Namespace) -> usize {
        (self.inner.cfg.fetch_chunk_bytes / ns.block_bytes().max(1)).clamp(1, 1024) as usize
    }

    async fn stream_blocks(
        &self,
        ns: Namespace,
        hashes: Vec<BlockHash>,
        tx: mpsc::Sender<FetchItem>,
    ) {
        let mut sent = 0u32;
        let mut reason = EndReason::Complete;
        let block_bytes = ns.block_bytes();
        let label: Arc<str> = Arc::from(ns.label.as_str());
        'chunks: for chunk in hashes.chunks(self.chunk_blocks(&ns)) {
            // Room for this chunk in the fetch memory budget, before reading it. Each
            // block's share travels with its payload and is given back when the transport
            // drops the bytes (written to the client, or the client went away).
            // The wait is bounded: fetches whose readers stall hold their room (until
            // `response_write_timeout` cuts them off), and the others fail open instead of
            // queueing behind them.
            let want = chunk.len() as u64 * block_bytes;
            let deadline = self.read_deadline(want);
            let mut room = match tokio::time::timeout(deadline, self.fetch_room(want)).await {
                Ok(Some(room)) => room,
                Ok(None) => return,
                Err(_) => {
                    metrics::counter!("kvshelf_fetch_budget_timeouts_total").increment(1);
                    reason = EndReason::BackendUnavailable;
                    break 'chunks;
                }
            };
            let served = self.read_blocks(&ns, chunk).await;
            for (hash, served) in chunk.iter().zip(served) {
                if let (Served::Hit(_), Some(touch)) = (&served, &self.inner.touch_tx) {
                    // Full queue: this hit does not slide the TTL; a later one will.
                    let result = match touch.try_send((label.clone(), *hash)) {
                        Ok(()) => None,
                        Err(_) => Some("dropped"),
                    };
                    if let Some(result) = result {
                        metrics::counter!("kvshelf_l1_ttl_touches_total", "result" => result)
                            .increment(1);
                    }
                }
                let tier = match &served {
                    Served::Hit(_) => "l1_hit",
                    Served::Loaded(_) => "backend_hit",
                    Served::Coalesced(_) => "coalesced",
                    Served::Miss => "miss",
                    Served::Unavailable => "unavailable",
                };
                metrics::counter!("kvshelf_fetch_blocks_total", "namespace" => ns.label.clone(), "result" => tier)
                    .increment(1);
                let unavailable = served == Served::Unavailable;
                let Some(payload) = served.into_payload() else {
                    reason = if unavailable {
                        EndReason::BackendUnavailable
                    } else {
                        EndReason::Miss
                    };
                    break 'chunks;
                };
                metrics::counter!("kvshelf_fetch_bytes_total", "namespace" => ns.label.clone())
                    .increment(payload.len() as u64);
                let share = match room.num_permits() as u64 > block_bytes {
                    true => room.split(block_bytes as usize),
                    false => None,
                };
                let payload = match share {
                    Some(share) => held(payload, share),
                    None => held(payload, std::mem::replace(&mut room, self.no_room())),
                };
                let item = FetchItem::Block {
                    index: sent,
                    hash: *hash,
                    payload,
                };
                if tx.send(item).await.is_err() {
                    return; // the client went away
                }
                sent += 1;
            }
        }
        let _ = tx
            .send(FetchItem::End {
                blocks: sent,
                reason,
            })
            .await;
    }

    /// Waits for `bytes` of room in the fetch memory budget (all of it, for a chunk larger
    /// than the whole budget). `None` only if the budget was closed.
    async fn fetch_room(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let budget = &self.inner.fetch_budget;
        let want = bytes
            .min(self.inner.cfg.fetch_memory_bytes.max(1))
            .min(u32::MAX as u64) as u32;
        budget.clone().acquire_many_owned(want.max(1)).await.ok()
    }

    /// An empty permit of the fetch budget (what is left once a chunk's room is handed out).
    fn no_room(&self) -> OwnedSemaphorePermit {
        self.inner
            .fetch_budget
            .clone()
            .try_acquire_many_owned(0)
            .expect("zero permits are always available")
    }

    /// How long one wait for a chunk of `bytes` may last: `fetch_timeout`, plus the
    /// chunk's transfer at `fetch_min_bytes_per_second`. One 100 ms for any size would fail
    /// every big block on a busy host, and each failure would cost Redis a read it already
    /// did.
    pub(crate) fn read_deadline(&self, bytes: u64) -> std::time::Duration {
        let cfg = &self.inner.cfg;
        let transfer = match cfg.fetch_min_bytes_per_second {
            0 => std::time::Duration::ZERO,
            rate => std::time::Duration::from_secs_f64(bytes as f64 / rate as f64),
        };
        cfg.fetch_timeout + transfer
    }

    /// Reads one chunk through L1 (coalescing concurrent misses) or straight from the
    /// embedded store, every backend read and every wait within the chunk's
    /// [`Shelf::read_deadline`].
    async fn read_blocks(&self, ns: &Namespace, hashes: &[BlockHash]) -> Vec<Served> {
        let timeout = self.read_deadline(hashes.len() as u64 * ns.block_bytes());
        let load = |hs: Vec<BlockHash>| async move {
            metrics::counter!("kvshelf_backend_block_reads_total", "namespace" => ns.label.clone())
                .increment(hs.len() as u64);
            // `None`: the backend failed or was late (a caller error cannot happen here:
            // the namespace and hashes were checked before the stream started).
            self.fail_open("fetch", timeout, self.inner.backend.read(ns, &hs))
                .await
                .ok()
                .flatten()
        };
        let direct = |hs: Vec<BlockHash>| async move {
            let n = hs.len();
            match load(hs).await {
                Some(reads) => reads
                    .into_iter()
                    .map(|r| match r {
                        Read::Hit(h) => Served::Loaded(h.block.payload),
                        Read::Unavailable => Served::Unavailable,
                        _ => Served::Miss,
                    })
                    .chain(std::iter::repeat(Served::Miss))
                    .take(n)
                    .collect(),
                None => vec![Served::Unavailable; n],
            }
        };
        let Some(l1) = &self.inner.l1 else {
            return direct(hashes.to_vec()).await;
        };
        // Blocks of a primary whose invalidation stream is down are read from Redis, never
        // served from (or put into) L1.
        let covered: Vec<bool> = hashes
            .iter()
            .map(|h| self.l1_covers(&ns.label, h))
            .collect();
        if covered.iter().all(|c| *c) {
            return l1.get_or_load(&ns.label, hashes, timeout, load).await;
        }
        let (through, around): (Vec<_>, Vec<_>) = (0..hashes.len()).partition(|&i| covered[i]);
        let pick = |at: &[usize]| at.iter().map(|&i| hashes[i]).collect::<Vec<_>>();
        let (from_l1, from_redis) = tokio::join!(
            async {
                match through.is_empty() {
                    true => Vec::new(),
                    false => {
                        l1.get_or_load(&ns.label, &pick(&through), timeout, load)
                            .await
                    }
                }
            },
            direct(pick(&around)),
        );
        let mut served = vec![Served::Miss; hashes.len()];
        for (i, s) in through.into_iter().zip(from_l1) {
            served[i] = s;
        }
        for (i, s) in around.into_iter().zip(from_redis) {
            served[i] = s;
        }
        served
    }
}

/// A payload that keeps its share of the fetch memory budget until it is dropped.
struct Held {
    payload: Bytes,
    _room: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.payload
    }
}

/// `payload` as `Bytes` (no copy) that return `room` to the budget when the last clone drops.
fn held(payload: Bytes, room: OwnedSemaphorePermit) -> Bytes {
    Bytes::from_owner(Held {
        payload,
        _room: room,
    })
}
