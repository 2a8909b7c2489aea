"""kvshelf as a secondary tier of vLLM's own KV offloading (``docs/vllm.md``).

vLLM's ``OffloadingConnector`` with ``TieringOffloadingSpec`` loads this class by module
path::

    --kv-transfer-config '{"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
      "kv_connector_extra_config": {"spec_name": "TieringOffloadingSpec",
        "cpu_bytes_to_use": 8589934592,
        "secondary_tiers": [{"type": "KvshelfTier", "module_path": "kvshelf.vllm",
                             "url": "redis://redis:6379", "namespace": "vllm-qwen3-8b"}]}}'

The tier runs in vLLM's scheduler process, under its tiering manager's lock. Every call
returns at once: the Redis work (or the sidecar's) runs on kvshelf's Rust threads without
the GIL, reading from and writing into the CPU tier's chunks in place (a memoryview row of
the CPU tier is the buffer; nothing is copied in Python). Completions come back through
``get_finished_jobs``; a job's chunks are released by kvshelf before its result is
reported, and never touched afterwards. Redis down, slow or hung is a ``MISS`` or a failed
job within ``timeout``, never an exception in the scheduler.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import vllm

from ._native import Client, Engine, Namespace, vllm_identity, vllm_key_hash

__all__ = [
    "KvshelfTier",
    "SUPPORTED_VLLM",
    "check_vllm_version",
    "identity_of",
]

logger = logging.getLogger(__name__)

SUPPORTED_VLLM = ("0.33",)
"""vLLM release lines this tier is tested with (``major.minor``). The secondary-tier API is
marked experimental by vLLM and changes between releases."""


def check_vllm_version(version: str) -> None:
    """Raises ``RuntimeError`` naming ``version`` and the tested releases unless ``version``
    is one of them: a clear error when vLLM builds the tier at startup, rather than a
    crash in the middle of a request."""
    line = ".".join(version.split("+")[0].split(".")[:2])
    if line not in SUPPORTED_VLLM:
        raise RuntimeError(
            f"kvshelf.vllm supports vLLM {', '.join(v + '.x' for v in SUPPORTED_VLLM)}; "
            f"this is vLLM {version}, whose secondary-tier API may differ. Install a "
            f"supported vLLM, or use kvshelf through LMCache (docs/lmcache.md)."
        )


check_vllm_version(vllm.__version__)

# Imported after the version check: on another release these may not exist.
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import (  # noqa: E402
    OffloadingConnectorStats,
)
from vllm.v1.kv_offload.base import (  # noqa: E402
    Locality,
    LookupResult,
    Medium,
    OffloadingCounterMetadata,
    OffloadingEvent,
    OffloadingMetricMetadata,
    OffloadKey,
    ReqContext,
    RequestOffloadingContext,
    ScheduleEndContext,
)
from vllm.v1.kv_offload.tiering.base import (  # noqa: E402
    JobResult,
    SecondaryTierManager,
    TransferJob,
)

# Metric names (counters) reported through vLLM's stats hooks.
LOOKUP_KEYS = "kvshelf:tier_lookup_keys"
JOBS = "kvshelf:tier_jobs"
BYTES = "kvshelf:tier_bytes"


def identity_of(spec: Any, chunk_bytes: int, model: Optional[str] = None) -> bytes:
    """The identity digest (``docs/hashing.md`` §9) of the vLLM instance whose offloading
    spec is ``spec``: its model, KV dtype, tokens per hash, blocks per chunk, chunk bytes,
    parallel sizes, rank and KV cache groups. ``model`` overrides the model name (two
    deployments serving the same weights under different paths may share)."""
    cfg = spec.config
    extra = {
        "groups": [
            {"tokens_per_block": g.tokens_per_block, "layer_names": list(g.layer_names)}
            for g in cfg.groups
        ],
        "replicated_layout": bool(cfg.replicated_layout),
        "canonical_layout": bool(cfg.canonical_layout),
        "kv_cache_layout": cfg.kv_cache_layout,
    }
    return vllm_identity(
        model=model or cfg.model.name,
        kv_dtype=str(cfg.model.dtype).removeprefix("torch."),
        tokens_per_hash=cfg.cache.tokens_per_hash,
        blocks_per_chunk=cfg.cache.blocks_per_chunk,
        chunk_bytes=chunk_bytes,
        tp_size=cfg.parallel.tp_size,
        pp_size=cfg.parallel.pp_size,
        pcp_size=cfg.parallel.pcp_size,
        dcp_size=cfg.parallel.dcp_size,
        rank=cfg.parallel.rank,
        extra=json.dumps(extra, sort_keys=True, separators=(",", ":")),
    )


# ---------------------------------------------------------------------------------------
# Backends: both take kvshelf block hashes and the CPU tier's chunks, run the work off
# the scheduler thread, and hand back (id, ok, error, per-key bools) completions whose
# buffers they no longer touch.


class _RedisBackend:
    """Straight to Redis through the Rust ``Engine`` (LMCache's completion engine): gets
    read from the socket into the chunks, sets write from them, no copy."""

    def __init__(self, url: str, ns: Namespace, timeout: float, fanout: int, **options: Any):
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            # The engine owns the fd; `drain` resets it. Nothing polls it: the tiering
            # manager polls get_finished_jobs every step.
            self._engine = Engine(url, ns, fd, timeout, fanout, **options)
        except BaseException:
            os.close(fd)
            raise

    def get(self, hashes: list[bytes], bufs: list[memoryview]) -> int:
        return self._engine.submit_get(hashes, bufs)

    def put(self, hashes: list[bytes], bufs: list[memoryview]) -> int:
        return self._engine.submit_set(hashes, bufs)

    def exists(self, hashes: list[bytes]) -> int:
        return self._engine.submit_exists(hashes)

    def touch(self, hashes: list[bytes]) -> Optional[int]:
        return self._engine.submit_touch(hashes)

    def drain(self) -> list[tuple[int, bool, str, list[bool], bool]]:
        """``(id, ok, error, per-key bools, answered)``; ``answered``: Redis answered for
        every key, so a key that failed is absent (or was corrupt), not unreachable. The
        engine lists each backend error after ``"; "`` in the error text; a batch whose
        only failures are misses has none."""
        return [
            (bid, ok, err, bools if bools is not None else [], ok or "; " not in err)
            for bid, ok, err, bools in self._engine.drain()
        ]

    def close(self) -> None:
        self._engine.close()


class _Failed:
    """A call that could not start: done at once, its ``wait`` raises why."""

    def __init__(self, error: Exception) -> None:
        self._error = error

    def done(self) -> bool:
        return True

    def wait(self) -> Any:
        raise self._error

    def cancel(self) -> None:
        return None


class _SidecarBackend:
    """Through a node's kvshelf sidecar (``kvshelf.Client``, HTTP or gRPC), so that vLLM
    instances on one node share its L1. Reads are ``start_fetch_into`` (the sidecar's
    bytes land in the chunk; a leading run of the job's keys), writes ``start_put`` (the
    payloads are copied before it returns), lookups one ``lookup`` call per batch on a
    worker thread. The sidecar's namespace ``namespace`` must be configured with a layout
    of exactly one chunk (``docs/vllm.md``)."""

    def __init__(self, url: str, namespace: str, timeout: float, **options: Any):
        self._client = Client(url, timeout=timeout, **options)
        self._ns = namespace
        self._next = 1
        self._running: dict[int, tuple[str, Any, int]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvshelf-sidecar")

    def _add(self, kind: str, handle: Any, n: int) -> int:
        with self._lock:
            jid = self._next
            self._next += 1
            self._running[jid] = (kind, handle, n)
        return jid

    def get(self, hashes: list[bytes], bufs: list[memoryview]) -> int:
        return self._start("get", self._client.start_fetch_into, hashes, bufs)

    def put(self, hashes: list[bytes], bufs: list[memoryview]) -> int:
        return self._start("put", self._client.start_put, hashes, bufs)

    def _start(self, kind: str, start: Any, hashes: list[bytes], bufs: list[memoryview]) -> int:
        try:
            handle = start(self._ns, hashes, bufs)
        except Exception as e:  # noqa: BLE001 - fail open: a failed job, never a raise
            handle = _Failed(e)
        return self._add(kind, handle, len(hashes))

    def exists(self, hashes: list[bytes]) -> int:
        call = self._pool.submit(self._client.lookup, self._ns, block_hashes=hashes)
        return self._add("exists", call, len(hashes))

    def touch(self, hashes: list[bytes]) -> Optional[int]:
        # The sidecar slides TTLs on its own reads and L1 hits; nothing to send.
        return None

    def drain(self) -> list[tuple[int, bool, str, list[bool], bool]]:
        with self._lock:
            finished = [
                (jid, kind, h, n)
                for jid, (kind, h, n) in self._running.items()
                if h.done()
            ]
            for jid, *_ in finished:
                del self._running[jid]
        return [self._result(jid, kind, h, n) for jid, kind, h, n in finished]

    @staticmethod
    def _result(jid: int, kind: str, h: Any, n: int) -> tuple[int, bool, str, list[bool], bool]:
        try:
            if kind == "exists":
                answer = h.result()
                ok = bool(answer.get("backend_ok", True))
                hit = answer["hit_blocks"] if ok else 0
                # The sidecar answers a leading run: keys past the first miss are
                # reported absent (vLLM's prefix lookup stops there anyway).
                return (jid, ok, "", [i < hit for i in range(n)], ok)
            if kind == "get":
                loaded, reason = h.wait()
                bools = [i < loaded for i in range(n)]
                answered = reason in ("complete", "miss")
                return (jid, loaded == n, "" if loaded == n else reason, bools, answered)
            outcomes = h.wait()
            bools = [o in ("stored", "already_present", "queued") for o in outcomes]
            ok = all(bools)
            return (jid, ok, "" if ok else ",".join(outcomes), bools, ok)
        except Exception as e:  # noqa: BLE001 - fail open: a failed job, never a raise
            return (jid, False, str(e), [False] * n, False)

    def close(self) -> None:
        with self._lock:
            running = list(self._running.values())
            self._running.clear()
        for kind, h, _ in running:
            if kind == "exists":
                continue
            h.cancel()
            try:
                h.wait()  # returns once nothing touches the chunk any more
            except Exception:  # noqa: BLE001
                pass
        self._pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------


@dataclass
class _Job:
    """A load, store, lookup or touch in flight: the vLLM job it serves, its keys."""

    kind: str  # "load", "store", "lookup", "touch"
    keys: list[OffloadKey]
    job_id: int = -1
    req_id: str = ""
    started: float = field(default_factory=time.monotonic)


class KvshelfTier(SecondaryTierManager):
    """vLLM secondary tier backed by kvshelf (see the module docs and ``docs/vllm.md``).

    Parameters (the tier's entry in ``secondary_tiers``, besides ``type`` and
    ``module_path``):

    - ``backend``: ``"redis"`` (default: straight to Redis through kvshelf's store) or
      ``"sidecar"`` (through a node's sidecar, ``kvshelf.Client``).
    - ``url``: Redis URL (``redis://``, ``rediss://``, ``redis+sentinel://``; default
      ``redis://127.0.0.1:6379``), or the sidecar's URL for ``backend="sidecar"``
      (default ``http://127.0.0.1:7070``).
    - ``namespace``: the label in Redis keys (default ``"vllm"``); for the sidecar, the
      name of its configured namespace.
    - ``model``: the model name in the identity (default: vLLM's served model).
    - ``ttl``: seconds (or ``"1h"``) a chunk lives after its last store, read or touch;
      default the store's (1 hour). Redis backend only (the sidecar has its own).
    - ``timeout``: seconds any job may take before its unfinished keys fail (default 2).
    - ``fanout``: sub-batches a load or store is split into, run concurrently (default 2).
    - ``max_keys_loading``: chunks whose loads may be outstanding at once across all jobs
      (default 8; 0: no bound).
    - ``enable_kv_events``: emit ``BlockStored`` / ``BlockRemoved`` events with
      ``medium=STORAGE`` (default false; effective when vLLM's KV events are on).
    - ``locality``: ``"LOCAL"`` or ``"REMOTE"``, reported on events (default ``"REMOTE"``).
    - ``protocol``, ``token``, ``connect_timeout``: sidecar client options.
    - anything else: a ``StoreConfig`` field for the Redis backend (``response_timeout``,
      ``connection_timeout``, ``max_connections``, ``cluster``, ``tls_ca_file``, ...).
    """

    medium: ClassVar[Medium] = Medium.STORAGE

    def __init__(
        self,
        offloading_spec: Any,
        primary_kv_view: memoryview,
        tier_type: str,
        backpressure_detector: Any = None,
        *,
        backend: str = "redis",
        url: Optional[str] = None,
        namespace: str = "vllm",
        model: Optional[str] = None,
        ttl: Optional[float | str] = None,
        timeout: float = 2.0,
        fanout: int = 2,
        enable_kv_events: bool = False,
        locality: Optional[str] = "REMOTE",
        **options: Any,
    ) -> None:
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        self.locality = Locality(locality) if locality is not None else None
        # One flat byte view of the CPU tier (a 2-D memoryview has no row sub-views);
        # chunk c is the slice [c * chunk, (c + 1) * chunk): no copy.
        self._flat = primary_kv_view.cast("B")
        chunk = self.block_size_bytes
        self.identity = identity_of(offloading_spec, chunk, model)
        if backend == "redis":
            # A foreign-hash namespace whose largest payload is one chunk of the CPU tier:
            # kvshelf stores the chunk as opaque bytes with a checksummed header.
            fields: dict[str, Any] = dict(
                label=namespace,
                model_id=model or offloading_spec.config.model.name,
                kv_dtype="uint8",
                num_layers=1,
                num_kv_heads=1,
                head_dim=(chunk + 1) // 2,
                block_size=1,
                hash_scheme="vllm",
            )
            if ttl is not None:
                fields["ttl"] = ttl
            self.namespace: Optional[Namespace] = Namespace(**fields)
            self._backend: Any = _RedisBackend(
                url or "redis://127.0.0.1:6379", self.namespace, timeout, fanout, **options
            )
        elif backend == "sidecar":
            self.namespace = None
            self._backend = _SidecarBackend(
                url or "http://127.0.0.1:7070", namespace, timeout, **options
            )
        else:
            raise ValueError(f"kvshelf tier: backend must be 'redis' or 'sidecar', not {backend!r}")
        self.backend = backend
        logger.info(
            "kvshelf tier: backend %s, namespace %s, chunk %d bytes, identity %s",
            backend, namespace, chunk, self.identity.hex(),
        )
        self._events: Optional[list[OffloadingEvent]] = None
        if enable_kv_events:
            if offloading_spec.kv_events_config.enable_kv_cache_events:
                self._events = []
            else:
                logger.warning(
                    "kvshelf tier: enable_kv_events is set but vLLM's KV cache events are "
                    "off; the tier emits none"
                )
        # Backend id -> what it serves.
        self._jobs: dict[int, _Job] = {}
        # Results collected but not reported yet (drain_jobs collects ahead).
        self._results: list[JobResult] = []
        # Per request: each key's verdict (None while its lookup is in flight).
        self._verdicts: dict[str, dict[OffloadKey, Optional[bool]]] = {}
        # Per request: keys asked about this step, looked up together at its end.
        self._batch: dict[str, list[OffloadKey]] = {}
        # Keys whose store is in flight: asked about, they are RETRY, not a MISS.
        self._storing: dict[OffloadKey, int] = {}
        self._stats = OffloadingConnectorStats()
        self._last_collect = 0.0
        self._closed = False

    # -- keys ----------------------------------------------------------------------------

    def _hashes(self, keys: Iterable[OffloadKey]) -> list[bytes]:
        ident = self.identity
        return [vllm_key_hash(ident, bytes(k)) for k in keys]

    def _chunks(self, chunk_ids: Iterable[int]) -> list[memoryview]:
        flat, n = self._flat, self.block_size_bytes
        return [flat[int(c) * n : (int(c) + 1) * n] for c in chunk_ids]

    # -- lookups -------------------------------------------------------------------------

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        self._verdicts.setdefault(req_context.req_id, {})
        return RequestOffloadingContext()

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        """``HIT``/``MISS`` from this request's cached answer; ``RETRY`` while the answer
        is being fetched (every key asked in a step is looked up in one round trip at the
        step's end) or while the key's own store is in flight."""
        verdicts = self._verdicts.setdefault(req_context.req_id, {})
        if key not in verdicts:
            if key in self._storing:
                return LookupResult.RETRY
            verdicts[key] = None
            self._batch.setdefault(req_context.req_id, []).append(key)
            return LookupResult.RETRY
        v = verdicts[key]
        if v is None:
            # Pick up finished lookups, at most once per 100 us: vLLM asks about a
            # request's keys one by one, and one drain answers them all.
            now = time.monotonic()
            if now - self._last_collect > 0.0001:
                self._last_collect = now
                self._collect()
                v = verdicts.get(key)
            if v is None:
                return LookupResult.RETRY
        return LookupResult.HIT if v else LookupResult.MISS

    def on_schedule_end(self, context: ScheduleEndContext) -> None:
        self._flush_lookups()

    def _flush_lookups(self) -> None:
        batch, self._batch = self._batch, {}
        for req_id, keys in batch.items():
            if self._closed:
                self._resolve(req_id, keys, [False] * len(keys))
                continue
            bid = self._backend.exists(self._hashes(keys))
            self._jobs[bid] = _Job("lookup", keys, req_id=req_id)

    def _resolve(self, req_id: str, keys: list[OffloadKey], found: list[bool]) -> None:
        verdicts = self._verdicts.get(req_id)
        hits = sum(found)
        self._stats.increase_counter(LOOKUP_KEYS, hits, ("hit",))
        self._stats.increase_counter(LOOKUP_KEYS, len(keys) - hits, ("miss",))
        if verdicts is None:  # the request finished meanwhile
            return
        for k, f in zip(keys, found):
            verdicts[k] = f

    def _forget(self, keys: Collection[OffloadKey]) -> None:
        """Marks ``keys`` absent in every request's answers: a load found them gone (or
        failed), and asking again in the same request would only fail again."""
        gone = set(keys)
        for verdicts in self._verdicts.values():
            for k in gone.intersection(verdicts):
                verdicts[k] = False

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        """Slides the TTL of ``keys`` (one ``PEXPIRE … XX`` round trip, fire and forget)."""
        if self._closed or not keys:
            return
        keys = list(keys)
        bid = self._backend.touch(self._hashes(keys))
        if bid is not None:
            self._jobs[bid] = _Job("touch", keys, req_id=req_context.req_id)

    def on_request_finished(self, req_context: ReqContext) -> None:
        self._verdicts.pop(req_context.req_id, None)
        self._batch.pop(req_context.req_id, None)

    # -- transfers -----------------------------------------------------------------------

    def submit_store(self, job_metadata: TransferJob) -> None:
        keys = list(job_metadata.keys)
        if self._closed:
            self._results.append(JobResult(job_metadata.job_id, False))
            return
        bid = self._backend.put(self._hashes(keys), self._chunks(job_metadata.chunk_ids))
        self._jobs[bid] = _Job("store", keys, job_id=job_metadata.job_id)
        for k in keys:
            self._storing[k] = self._storing.get(k, 0) + 1

    def submit_load(self, job_metadata: TransferJob) -> None:
        keys = list(job_metadata.keys)
        if self._closed:
            self._results.append(JobResult(job_metadata.job_id, False))
            return
        bid = self._backend.get(self._hashes(keys), self._chunks(job_metadata.chunk_ids))
        self._jobs[bid] = _Job("load", keys, job_id=job_metadata.job_id)

    def _collect(self) -> None:
        """Turns the backend's completions into job results, verdicts and events. By the
        time a completion is here, the backend has let go of its chunks."""
        for bid, ok, err, bools, answered in self._backend.drain():
            job = self._jobs.pop(bid, None)
            if job is None:
                continue
            bools = bools or [False] * len(job.keys)
            if job.kind == "lookup":
                if not ok:
                    logger.debug("kvshelf tier: lookup failed (a miss): %s", err)
                    self._stats.increase_counter(LOOKUP_KEYS, len(job.keys), ("error",))
                    bools = [False] * len(job.keys)
                self._resolve(job.req_id, job.keys, bools)
                continue
            if job.kind == "touch":
                if not ok:
                    logger.debug("kvshelf tier: touch failed: %s", err)
                continue
            elapsed = time.monotonic() - job.started
            done = [k for k, b in zip(job.keys, bools) if b]
            nbytes = len(done) * self.block_size_bytes
            op = job.kind
            self._stats.increase_counter(JOBS, 1, (op, "ok" if ok else "failed"))
            self._stats.increase_counter(BYTES, nbytes, (op,))
            if not ok:
                logger.debug("kvshelf tier: %s job %d failed: %s", op, job.job_id, err)
            if job.kind == "store":
                for k in job.keys:
                    n = self._storing.get(k, 0) - 1
                    if n > 0:
                        self._storing[k] = n
                    else:
                        self._storing.pop(k, None)
                if self._events is not None and done:
                    self._events.append(
                        OffloadingEvent(
                            keys=done, medium=self.medium, removed=False, locality=self.locality
                        )
                    )
                self._results.append(JobResult(job.job_id, ok, None, elapsed, nbytes))
                continue
            failed = [k for k, b in zip(job.keys, bools) if not b]
            if failed:
                self._forget(failed)
                if self._events is not None and answered:
                    # The backend answered for every key and these were not there
                    # (expired, evicted, found corrupt and deleted): the shelf no longer
                    # holds them. Unreachable keys say nothing about the shelf.
                    self._events.append(
                        OffloadingEvent(
                            keys=failed, medium=self.medium, removed=True, locality=self.locality
                        )
                    )
            self._results.append(
                JobResult(
                    job.job_id,
                    ok,
                    None if ok else (tuple(done) if done else None),
                    elapsed,
                    nbytes,
                )
            )

    def get_finished_jobs(self) -> Iterable[JobResult]:
        self._collect()
        results, self._results = self._results, []
        return results

    def has_pending_work(self) -> bool:
        return any(j.kind in ("load", "store") for j in self._jobs.values()) or bool(
            self._results
        )

    def drain_jobs(self) -> None:
        """Waits until every load and store has finished (each within ``timeout``); their
        results are reported by the next ``get_finished_jobs``."""
        while True:
            self._collect()
            if not any(j.kind in ("load", "store") for j in self._jobs.values()):
                return
            time.sleep(0.001)

    # -- events and metrics --------------------------------------------------------------

    def take_events(self) -> Iterable[OffloadingEvent]:
        if self._events is None:
            return ()
        events, self._events = self._events, []
        return events

    @classmethod
    def build_metric_definitions(
        cls, extra_config: dict[str, Any]
    ) -> dict[str, OffloadingMetricMetadata]:
        return {
            LOOKUP_KEYS: OffloadingCounterMetadata(
                documentation="Keys the kvshelf tier looked up, by result (hit, miss, error).",
                labelnames=("result",),
            ),
            JOBS: OffloadingCounterMetadata(
                documentation="kvshelf tier loads and stores, by op and result (ok, failed).",
                labelnames=("op", "result"),
            ),
            BYTES: OffloadingCounterMetadata(
                documentation="Bytes the kvshelf tier loaded or stored, by op.",
                labelnames=("op",),
            ),
        }

    def get_stats(self) -> Optional[OffloadingConnectorStats]:
        stats, self._stats = self._stats, OffloadingConnectorStats()
        return None if stats.is_empty() else stats

    def shutdown(self) -> None:
        """Stops every job (waiting until none touches a chunk) and closes the backend."""
        if self._closed:
            return
        self._closed = True
        self._backend.close()
        # No job holds a chunk any more: let vLLM unmap the CPU tier.
        try:
            self._flat.release()
        except BufferError:  # a caller still holds a chunk slice; it keeps the map alive
            logger.warning("kvshelf tier: a view of the CPU tier is still in use at shutdown")

