//! Admission: memory is bounded before work is admitted (docs/design.md, Security).
//!
//! A request takes its concurrency slot and its share of the body budget before a byte of
//! its body is read. Its cap follows from what it may carry: a framed put at most
//! `max_blocks_per_request` frames of the namespace's `block_bytes`, a single-block put
//! exactly `block_bytes`, a control message (JSON or protobuf) the hashes or tokens of
//! `max_blocks_per_request` blocks. A `Content-Length` over the cap is refused before
//! anything is read (so HTTP/1.1 never sends `100 Continue` for it); a body of unknown
//! length is counted as it arrives and refused once it passes the cap.
//!
//! The body budget (`body_memory_bytes`) is one semaphore of bytes shared by every request:
//! a request reserves its `Content-Length` up front, or, for a body of unknown length (HTTP
//! chunked, a gRPC stream), grows its reservation step by step ahead of what arrives. When
//! the budget has no room, the request waits at most `put_timeout` and is then refused as
//! `overloaded`, holding its slot while it waits so that waiting is bounded too.
//!
//! A body that stops arriving is cut off by the transport after `body_read_timeout` without
//! a byte ([`Admission::stalled`]): the request ends `request_timeout` and, being dropped,
//! gives its slot and its room back; idle sockets cannot hold either.
//!
//! [`PutBatch`] checks a put's blocks as they arrive, so a stream of a million empty
//! payloads is refused at block `max_blocks_per_request + 1`, not at its end.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::ServerConfig;
use crate::frame::{self, Decoder, Frame, FrameError};
use crate::hashing::BlockHash;
use crate::namespace::Namespace;
use crate::shelf::ApiError;

/// What a request's body may carry: this sets its cap.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum BodyKind<'a> {
    /// Nothing: the request's body is never read (GET, DELETE, pin, purge).
    None,
    /// A JSON or protobuf control message naming at most `max_blocks_per_request` blocks
    /// (by hash, or by their tokens and extra keys).
    Control,
    /// A framed stream of blocks of this namespace (`POST /v1/put`).
    Frames(&'a Namespace),
    /// Exactly one payload of this namespace (`PUT /v1/blocks/…`).
    Payload(&'a Namespace),
    /// A gRPC put stream: its namespace comes with its first message (`None` until then,
    /// when the cap is that of the namespace with the largest blocks).
    GrpcPut(Option<&'a Namespace>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    None,
    Control,
    Frames,
    Payload,
    GrpcPut,
}

/// Bytes a JSON token id may take, with its separator and some whitespace: u32 ids have at
/// most 10 digits (pretty-printers add a newline and indentation).
const JSON_TOKEN_BYTES: u64 = 16;
/// Room per block of a control message besides its tokens: a hash in hex with quotes and a
/// comma is 67 bytes; the rest is for extra keys (a 64-hex-digit key is 69 bytes).
const CONTROL_BLOCK_BYTES: u64 = 256;
/// Room for the fields of a control message besides its lists.
const CONTROL_SLACK: u64 = 64 << 10;
/// gRPC put framing per block, if every block came in a message of its own: the 5-byte
/// gRPC message prefix, the namespace (≤ 64 bytes + 2), `async` (2), the `blocks` entry
/// (≤ 11), its hash (34) and the payload's tag and length (≤ 11): 129, rounded up.
const GRPC_BLOCK_BYTES: u64 = 160;
/// The first reservation of a body of unknown length.
const FIRST_STEP: u64 = 64 << 10;
/// A body of unknown length grows its reservation by what it holds, up to this much at a
/// time: few waits on the budget, little reserved ahead of what arrives.
const MAX_STEP: u64 = 8 << 20;

/// The caps, from the configuration and the configured namespaces.
#[derive(Debug)]
struct Limits {
    max_blocks: u64,
    /// `max_body_bytes`, the whole budget and what one reservation can take, whichever is
    /// smallest: no request may need more.
    max_body: u64,
    largest_block_bytes: u64,
    largest_block_size: u64,
    body_read_timeout: Duration,
}

impl Limits {
    fn cap(&self, body: BodyKind<'_>) -> u64 {
        let m = self.max_blocks;
        let carries = match body {
            BodyKind::None => 0,
            BodyKind::Control => m
                .saturating_mul(JSON_TOKEN_BYTES * self.largest_block_size + CONTROL_BLOCK_BYTES)
                .saturating_add(CONTROL_SLACK),
            BodyKind::Frames(ns) => m
                .saturating_mul(frame::BLOCK_HEAD_LEN as u64 + ns.block_bytes())
                .saturating_add((frame::STREAM_MAGIC.len() + frame::END_LEN) as u64),
            BodyKind::Payload(ns) => ns.block_bytes(),
            // Room for one block more than allowed: a stream with a block too many is told
            // so (`too_many_blocks`, when that block's message arrives) rather than that
            // its bytes are too many.
            BodyKind::GrpcPut(ns) => {
                let block = ns.map_or(self.largest_block_bytes, Namespace::block_bytes);
                (m + 1).saturating_mul(block + GRPC_BLOCK_BYTES)
            }
        };
        carries.min(self.max_body)
    }
}

fn kind(body: BodyKind<'_>) -> Kind {
    match body {
        BodyKind::None => Kind::None,
        BodyKind::Control => Kind::Control,
        BodyKind::Frames(_) => Kind::Frames,
        BodyKind::Payload(_) => Kind::Payload,
        BodyKind::GrpcPut(_) => Kind::GrpcPut,
    }
}

/// The door every counted request goes through: the slots and the body budget.
#[derive(Debug)]
pub(crate) struct Admitter {
    limits: Arc<Limits>,
    requests: Arc<Semaphore>,
    budget: Arc<Semaphore>,
    budget_bytes: u64,
    wait: Duration,
}

impl Admitter {
    pub(crate) fn new<'a>(
        cfg: &ServerConfig,
        namespaces: impl Iterator<Item = &'a Namespace>,
    ) -> Admitter {
        let budget_bytes = cfg
            .body_memory_bytes
            .min(Semaphore::MAX_PERMITS as u64)
            .max(1);
        let (mut largest_block_bytes, mut largest_block_size) = (0, 0);
        for ns in namespaces {
            largest_block_bytes = largest_block_bytes.max(ns.block_bytes());
            largest_block_size = largest_block_size.max(ns.block_size as u64);
        }
        Admitter {
            limits: Arc::new(Limits {
                max_blocks: cfg.max_blocks_per_request as u64,
                max_body: cfg
                    .max_body_bytes
                    .min(cfg.body_memory_bytes)
                    .min(u32::MAX as u64),
                largest_block_bytes,
                largest_block_size,
                body_read_timeout: cfg.body_read_timeout,
            }),
            requests: Arc::new(Semaphore::new(cfg.max_concurrent_requests)),
            budget: Arc::new(Semaphore::new(budget_bytes as usize)),
            budget_bytes,
            wait: cfg.put_timeout,
        }
    }

    /// The most any request body may be (`max_body_bytes`, or less when the budget is).
    pub(crate) fn largest_cap(&self) -> u64 {
        self.limits.max_body
    }

    /// Body bytes reserved by the requests in flight.
    pub(crate) fn in_use(&self) -> u64 {
        self.budget_bytes - self.budget.available_permits() as u64
    }

    /// Admits a request whose body has not been read: checks the announced length against
    /// the cap (`payload_too_large`), takes a slot (`overloaded` at once when none is free),
    /// then reserves the announced length, or a first step of a body of unknown length, in
    /// the body budget (waiting at most `put_timeout`, then `overloaded`).
    pub(crate) async fn admit(
        &self,
        body: BodyKind<'_>,
        announced: Option<u64>,
    ) -> Result<Admission, ApiError> {
        let cap = self.limits.cap(body);
        let kind = kind(body);
        if kind != Kind::None
            && let Some(len) = announced
            && len > cap
        {
            return Err(refused(Refusal::TooLarge(cap)));
        }
        let slot = self
            .requests
            .clone()
            .try_acquire_owned()
            .map_err(|_| refused(Refusal::Overloaded))?;
        let first = match kind {
            Kind::None => 0,
            _ => announced.unwrap_or(FIRST_STEP).min(cap),
        };
        let reserved = reserve(&self.budget, first, self.wait).await?;
        Ok(Admission {
            _slot: slot,
            meter: BodyMeter(Arc::new(Account {
                limits: self.limits.clone(),
                budget: self.budget.clone(),
                wait: self.wait,
                kind,
                state: Mutex::new(AccountState {
                    reserved,
                    received: 0,
                    cap,
                    refused: None,
                }),
            })),
        })
    }
}

/// Why a body was refused while it arrived.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    TooLarge(u64),
    Overloaded,
    Stalled(Duration),
}

/// Counts the refusal and returns its error.
fn refused(r: Refusal) -> ApiError {
    let (reason, e) = match r {
        Refusal::TooLarge(limit) => ("payload_too_large", ApiError::PayloadTooLarge { limit }),
        Refusal::Overloaded => ("overloaded", ApiError::Overloaded),
        Refusal::Stalled(after) => {
            metrics::counter!("kvshelf_stalled_requests_total", "reason" => "body_read_timeout")
                .increment(1);
            return ApiError::RequestTimeout(after);
        }
    };
    metrics::counter!("kvshelf_rejected_requests_total", "reason" => reason).increment(1);
    e
}

/// `bytes` of the body budget, waiting at most `wait` for them.
async fn reserve(
    budget: &Arc<Semaphore>,
    bytes: u64,
    wait: Duration,
) -> Result<OwnedSemaphorePermit, ApiError> {
    // Caps are at most u32::MAX (see `Limits::max_body`), so this never truncates.
    let n = u32::try_from(bytes).unwrap_or(u32::MAX);
    if let Ok(permit) = budget.clone().try_acquire_many_owned(n) {
        return Ok(permit);
    }
    match tokio::time::timeout(wait, budget.clone().acquire_many_owned(n)).await {
        Ok(Ok(permit)) => Ok(permit),
        _ => {
            metrics::counter!("kvshelf_rejected_requests_total", "reason" => "body_memory")
                .increment(1);
            Err(ApiError::Overloaded)
        }
    }
}

/// A request let in: its concurrency slot and its reservation in the body budget, both
/// given back when it is dropped. Every counted operation of [`crate::shelf::Shelf`] takes
/// one; [`crate::shelf::Shelf::admit`] makes it before the request's body is read.
#[derive(Debug)]
pub struct Admission {
    _slot: OwnedSemaphorePermit,
    meter: BodyMeter,
}

impl Admission {
    /// Accounts for `n` more body bytes received: refuses a body over its cap
    /// (`payload_too_large`) and, past what is reserved, reserves more of the body budget
    /// (waiting at most `put_timeout`, then `overloaded`). Call it for each chunk before
    /// keeping the chunk.
    pub async fn receive(&self, n: usize) -> Result<(), ApiError> {
        self.meter.receive(n).await
    }

    /// A handle that accounts for the body's bytes where the body is read (a transport's
    /// body wrapper), sharing this admission's reservation.
    pub fn meter(&self) -> BodyMeter {
        self.meter.clone()
    }

    /// Gives the body's room back, for a request that lives on after its body was read and
    /// parsed into something smaller (a fetch, until its stream is sent). Keeps the slot.
    pub(crate) fn release_body(&self) {
        let mut state = self.meter.0.state();
        let held = state.reserved.num_permits();
        drop(state.reserved.split(held));
    }

    /// The most body bytes this request may send.
    pub fn cap(&self) -> u64 {
        self.meter.0.state().cap
    }

    /// The reason the body was refused while it arrived, if it was (a transport that reads
    /// the body through a [`BodyMeter`] sees only that the body failed).
    pub fn refusal(&self) -> Option<ApiError> {
        self.meter.0.state().refused.map(|r| match r {
            Refusal::TooLarge(limit) => ApiError::PayloadTooLarge { limit },
            Refusal::Overloaded => ApiError::Overloaded,
            Refusal::Stalled(after) => ApiError::RequestTimeout(after),
        })
    }

    /// See [`BodyMeter::stalled`].
    pub fn stalled(&self) -> ApiError {
        self.meter.stalled()
    }
}

/// Accounts for a request body's bytes as they arrive (see [`Admission::receive`]).
#[derive(Clone, Debug)]
pub struct BodyMeter(Arc<Account>);

#[derive(Debug)]
struct Account {
    limits: Arc<Limits>,
    budget: Arc<Semaphore>,
    wait: Duration,
    kind: Kind,
    state: Mutex<AccountState>,
}

#[derive(Debug)]
struct AccountState {
    reserved: OwnedSemaphorePermit,
    received: u64,
    cap: u64,
    refused: Option<Refusal>,
}

impl Account {
    fn state(&self) -> std::sync::MutexGuard<'_, AccountState> {
        // Nothing panics while holding it; a poisoned lock still holds consistent numbers.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl BodyMeter {
    /// Records that the body stopped arriving (the transport's `body_read_timeout` passed
    /// without a byte) and counts it: the request's error, `request_timeout`.
    pub fn stalled(&self) -> ApiError {
        let r = Refusal::Stalled(self.0.limits.body_read_timeout);
        self.0.state().refused = Some(r);
        refused(r)
    }

    /// See [`Admission::receive`].
    pub async fn receive(&self, n: usize) -> Result<(), ApiError> {
        let more = {
            let mut s = self.0.state();
            s.received += n as u64;
            if s.received > s.cap {
                s.refused = Some(Refusal::TooLarge(s.cap));
                return Err(refused(Refusal::TooLarge(s.cap)));
            }
            let reserved = s.reserved.num_permits() as u64;
            if s.received <= reserved {
                return Ok(());
            }
            // Ahead of what arrives: as much again as is held (up to MAX_STEP), never past
            // the cap.
            (s.received - reserved)
                .max(reserved.min(MAX_STEP))
                .min(s.cap - reserved)
        };
        match reserve(&self.0.budget, more, self.0.wait).await {
            Ok(permit) => {
                self.0.state().reserved.merge(permit);
                Ok(())
            }
            Err(e) => {
                self.0.state().refused = Some(Refusal::Overloaded);
                Err(e)
            }
        }
    }
}

/// The blocks of one put, checked as they arrive: at most `max_blocks_per_request`, each
/// exactly `block_bytes` (a frame announcing more is refused from its head, before its
/// payload is read). Made by [`crate::shelf::Shelf::put_batch`].
#[derive(Debug)]
pub struct PutBatch {
    ns: Namespace,
    max_blocks: usize,
    blocks: Vec<(BlockHash, Bytes)>,
    /// For a framed body (`POST /v1/put`).
    decoder: Option<Decoder>,
}

impl PutBatch {
    pub(crate) fn new(admission: &Admission, ns: &Namespace, max_blocks: usize) -> Self {
        let framed = admission.meter.0.kind == Kind::Frames;
        PutBatch {
            ns: ns.clone(),
            max_blocks,
            blocks: Vec::new(),
            decoder: framed.then(|| Decoder::new(ns.block_bytes())),
        }
    }

    /// Adds one block.
    pub fn push(&mut self, hash: BlockHash, payload: Bytes) -> Result<(), ApiError> {
        let i = self.blocks.len();
        if i == self.max_blocks {
            return Err(ApiError::TooManyBlocks {
                count: i + 1,
                limit: self.max_blocks,
            });
        }
        if !self.ns.accepts_payload_len(payload.len() as u64) {
            return Err(crate::store::wrong_size(&self.ns, i, payload.len() as u64).into());
        }
        self.blocks.push((hash, payload));
        Ok(())
    }

    /// Decodes the next chunk of a framed body (each payload is copied once, into memory of
    /// its own) and adds the blocks it completes.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), ApiError> {
        let Some(decoder) = self.decoder.as_mut() else {
            return Err(ApiError::InvalidRequest(
                "this put does not carry a framed stream".into(),
            ));
        };
        decoder.feed(chunk);
        loop {
            let frame = self
                .decoder
                .as_mut()
                .expect("framed")
                .next_frame()
                .map_err(|e| self.frame_error(e))?;
            match frame {
                Some(Frame::Block { hash, payload, .. }) => self.push(hash, payload)?,
                Some(Frame::End { .. }) => {}
                None => return Ok(()),
            }
        }
    }

    fn frame_error(&self, e: FrameError) -> ApiError {
        match e {
            // A payload of the wrong size, as for `PUT /v1/blocks`: known from its head.
            FrameError::TooLarge { len, .. } => {
                crate::store::wrong_size(&self.ns, self.blocks.len(), len).into()
            }
            e => ApiError::InvalidRequest(format!("malformed frame stream: {e}")),
        }
    }

    /// The namespace's label.
    pub fn label(&self) -> &str {
        &self.ns.label
    }

    /// The namespace and the blocks, once the whole body is in: a framed body must have
    /// ended with its end frame.
    pub(crate) fn into_blocks(self) -> Result<(Namespace, Vec<(BlockHash, Bytes)>), ApiError> {
        if let Some(decoder) = &self.decoder {
            decoder.finish().map_err(|e| self.frame_error(e))?;
        }
        Ok((self.ns, self.blocks))
    }
}

impl Admission {
    /// For [`crate::shelf::Shelf::put_batch`]: once a gRPC put's first message has named its
    /// namespace, narrows its cap to that namespace's (other bodies' caps already are).
    pub(crate) fn for_put(&self, ns: &Namespace) -> Result<(), ApiError> {
        let account = &self.meter.0;
        if account.kind != Kind::GrpcPut {
            return Ok(());
        }
        let mut state = account.state();
        state.cap = state
            .cap
            .min(account.limits.cap(BodyKind::GrpcPut(Some(ns))));
        if state.received > state.cap {
            state.refused = Some(Refusal::TooLarge(state.cap));
            return Err(refused(Refusal::TooLarge(state.cap)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shelf::demo_namespace;

    fn admitter(f: impl FnOnce(&mut ServerConfig)) -> Admitter {
        let mut cfg = ServerConfig::default();
        f(&mut cfg);
        Admitter::new(&cfg, [demo_namespace()].iter())
    }

    #[test]
    fn caps_follow_from_what_a_request_carries() {
        let a = admitter(|_| {});
        let ns = demo_namespace();
        let l = &a.limits;
        assert_eq!(l.cap(BodyKind::Payload(&ns)), 2048);
        assert_eq!(l.cap(BodyKind::Frames(&ns)), 4096 * (45 + 2048) + 14);
        assert_eq!(l.cap(BodyKind::GrpcPut(Some(&ns))), 4097 * (2048 + 160));
        assert_eq!(l.cap(BodyKind::GrpcPut(None)), 4097 * (2048 + 160));
        assert_eq!(l.cap(BodyKind::Control), 4096 * (16 * 16 + 256) + 65536);
        assert_eq!(l.cap(BodyKind::None), 0);
        // Never over max_body_bytes, nor over the whole budget.
        let a = admitter(|c| c.max_body_bytes = 1000);
        assert_eq!(a.limits.cap(BodyKind::Frames(&ns)), 1000);
        let a = admitter(|c| c.body_memory_bytes = 999);
        assert_eq!(a.limits.cap(BodyKind::Frames(&ns)), 999);
    }

    #[tokio::test]
    async fn an_announced_length_over_the_cap_is_refused_before_a_slot_is_taken() {
        let a = admitter(|c| c.max_concurrent_requests = 1);
        let ns = demo_namespace();
        let e = a
            .admit(BodyKind::Payload(&ns), Some(2049))
            .await
            .unwrap_err();
        assert!(
            matches!(e, ApiError::PayloadTooLarge { limit: 2048 }),
            "{e}"
        );
        let held = a.admit(BodyKind::Payload(&ns), Some(2048)).await.unwrap();
        assert_eq!(a.in_use(), 2048);
        let e = a.admit(BodyKind::Control, None).await.unwrap_err();
        assert!(matches!(e, ApiError::Overloaded));
        drop(held);
        assert_eq!(a.in_use(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_exhausted_budget_waits_at_most_put_timeout_then_refuses() {
        let a = admitter(|c| {
            c.body_memory_bytes = 10_000;
            c.put_timeout = Duration::from_secs(2);
        });
        let ns = demo_namespace();
        let held = a.admit(BodyKind::Frames(&ns), Some(9_000)).await.unwrap();
        let started = tokio::time::Instant::now();
        let e = a
            .admit(BodyKind::Frames(&ns), Some(2_000))
            .await
            .unwrap_err();
        assert!(matches!(e, ApiError::Overloaded));
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        // Room that frees up while a request waits lets it in.
        let waiting = tokio::spawn(async move {
            let a = a;
            let admitted = a.admit(BodyKind::Frames(&ns), Some(2_000)).await;
            (admitted.is_ok(), a.in_use())
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(held);
        assert_eq!(waiting.await.unwrap(), (true, 2_000));
    }

    #[tokio::test]
    async fn a_body_of_unknown_length_reserves_ahead_and_stops_at_its_cap() {
        let a = admitter(|_| {});
        let ns = demo_namespace();
        let cap = a.limits.cap(BodyKind::Frames(&ns));
        let adm = a.admit(BodyKind::Frames(&ns), None).await.unwrap();
        assert_eq!(a.in_use(), FIRST_STEP);
        adm.receive(FIRST_STEP as usize).await.unwrap();
        assert_eq!(a.in_use(), FIRST_STEP, "within the reservation");
        adm.receive(1).await.unwrap();
        assert_eq!(a.in_use(), 2 * FIRST_STEP, "grown by as much again");
        let mut received = FIRST_STEP + 1;
        while received + (1 << 20) <= cap {
            adm.receive(1 << 20).await.unwrap();
            received += 1 << 20;
            assert!(a.in_use() >= received && a.in_use() <= received + MAX_STEP);
        }
        let fetch = a.admit(BodyKind::Control, Some(1000)).await.unwrap();
        let before = a.in_use();
        fetch.release_body();
        assert_eq!(a.in_use(), before - 1000, "released, the slot kept");
        drop(fetch);
        let e = adm
            .receive((cap - received + 1) as usize)
            .await
            .unwrap_err();
        assert!(matches!(e, ApiError::PayloadTooLarge { limit } if limit == cap));
        assert!(matches!(
            adm.refusal(),
            Some(ApiError::PayloadTooLarge { .. })
        ));
        drop(adm);
        assert_eq!(a.in_use(), 0);
    }

    #[tokio::test]
    async fn a_put_batch_refuses_block_max_plus_one_and_wrong_sizes_as_they_arrive() {
        let a = admitter(|c| c.max_blocks_per_request = 3);
        let ns = demo_namespace();
        let adm = a.admit(BodyKind::GrpcPut(None), None).await.unwrap();
        adm.for_put(&ns).unwrap();
        let mut batch = PutBatch::new(&adm, &ns, 3);
        let e = batch.push(BlockHash([0; 32]), Bytes::new()).unwrap_err();
        assert_eq!(e.code(), "invalid_input");
        for i in 0..3 {
            batch
                .push(BlockHash([i; 32]), Bytes::from(vec![i; 2048]))
                .unwrap();
        }
        let e = batch
            .push(BlockHash([9; 32]), Bytes::from(vec![0; 2048]))
            .unwrap_err();
        assert_eq!(e.code(), "too_many_blocks");
    }

    #[tokio::test]
    async fn a_frame_longer_than_block_bytes_is_invalid_input_from_its_head() {
        let a = admitter(|_| {});
        let ns = demo_namespace();
        let adm = a.admit(BodyKind::Frames(&ns), None).await.unwrap();
        let mut batch = PutBatch::new(&adm, &ns, 8);
        let mut head = frame::STREAM_MAGIC.to_vec();
        head.extend_from_slice(&frame::block_head(0, &BlockHash([1; 32]), 2049));
        let e = batch.feed(&head).unwrap_err();
        assert_eq!(e.code(), "invalid_input");
        assert!(e.to_string().contains("block 0 has 2049 bytes"), "{e}");
        // A truncated stream is a malformed request.
        let adm = a.admit(BodyKind::Frames(&ns), None).await.unwrap();
        let mut batch = PutBatch::new(&adm, &ns, 8);
        batch.feed(frame::STREAM_MAGIC).unwrap();
        assert_eq!(batch.into_blocks().unwrap_err().code(), "invalid_request");
    }
}
