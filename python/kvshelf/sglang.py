"""kvshelf as SGLang's HiCache L3 storage (``docs/sglang.md``).

SGLang loads this class through its ``dynamic`` storage backend::

    --enable-hierarchical-cache --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "kvshelf",
        "module_path": "kvshelf.sglang", "class_name": "KvshelfHiCacheStorage",
        "interface_v1": 1, "url": "redis://redis:6379", "namespace": "sglang"}'

and calls it from its prefetch and backup threads. With ``interface_v1`` SGLang uses the
zero-copy methods: ``batch_get_v1`` reads each page straight from the socket into the
registered host pool's memory and ``batch_set_v1`` writes from it, on kvshelf's Rust
threads with the GIL released. A page that the host pool lays out as several regions
(``get_page_buffer_meta``: K and V, or one region per layer) is stored as one value per
region; the page is a hit only when every region is.

Fail open, never fail dead: a page that cannot be served — absent, corrupt, Redis down,
hung or slower than ``timeout`` — is ``False`` (``batch_exists`` counts fewer pages); no
data-path method raises or returns ``None``. Every call on the pool's memory runs as a
``Pending`` with a deadline and has ended — completed, timed out or been cancelled and
awaited — before the method returns, so kvshelf never touches the pool's pages after it.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Optional, Sequence

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from ._native import Client, Namespace, Pending, Store, sglang_key_hashes

__all__ = ["KvshelfHiCacheStorage", "storage_identity"]

logger = logging.getLogger(__name__)

WARN_EVERY = 10.0  # seconds between two warnings about failing calls of one kind

# extra_config keys that belong to SGLang, not to this backend.
_SGLANG_KEYS = frozenset(
    {"backend_name", "module_path", "class_name", "interface_v1", "tp_lcm_size",
     "prefetch_threshold", "prefetch_timeout_base", "prefetch_timeout_per_ki_token",
     "hicache_storage_pass_prefix_keys"}
)
_PARAMS = frozenset(
    {"backend", "url", "namespace", "timeout", "ttl", "store_options", "sidecar_url",
     "sidecar_namespace", "protocol", "token"}
)


def _dtype_name(dtype: torch.dtype) -> str:
    """PyTorch's spelling without ``torch.``: ``bfloat16``, ``float8_e4m3fn``."""
    return str(dtype).removeprefix("torch.")


def storage_identity(
    config: HiCacheStorageConfig, pool: Any, parts: int | str
) -> str:
    """The text that names what a page's bytes mean (``docs/hashing.md`` §10), hashed with
    every page key: ``name=value`` lines, in this order, joined by ``\\n``. ``parts`` is the
    number of regions a page is stored as (``"flat"``: one value, SGLang's flat data page).
    MLA KV is the same on every tensor-parallel rank, so its ``tp`` is ``shared``."""
    tp = "shared" if config.is_mla_model else f"{config.tp_rank}/{config.tp_size}"
    fields = [
        ("model", config.model_name or ""),
        ("page_size", str(pool.page_size)),
        ("kv_dtype", _dtype_name(pool.dtype)),
        ("layout", pool.layout),
        ("mla", "1" if config.is_mla_model else "0"),
        ("tp", tp),
        ("pp", f"{config.pp_rank}/{config.pp_size}"),
        ("cp", f"{config.attn_cp_rank}/{config.attn_cp_size}"),
        ("dcp", f"{config.dcp_rank}/{config.dcp_size}"),
        ("parts", str(parts)),
        ("format", getattr(pool, "storage_format_tag", None) or ""),
    ]
    return "\n".join(f"{k}={v}" for k, v in fields)


class _PoolBytes:
    """The host pool's tensors as flat byte views, to cut page regions out of without a
    copy; a region outside every tensor is refused (a pool whose meta points elsewhere is
    not one this backend can serve)."""

    def __init__(self, pool: Any) -> None:
        self.spans: list[tuple[int, int, memoryview]] = []
        for name in ("kv_buffer", "k_buffer", "v_buffer"):
            t = getattr(pool, name, None)
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.numel() == 0:
                continue
            if not t.is_contiguous():
                continue
            flat = t.view(torch.uint8).reshape(-1).numpy()
            base = t.data_ptr()
            if any(b == base for b, _, _ in self.spans):
                continue
            self.spans.append((base, base + flat.nbytes, memoryview(flat)))
        if not self.spans:
            raise ValueError(
                f"kvshelf: host pool {type(pool).__name__} has no contiguous CPU tensor "
                "(kv_buffer) to read pages into"
            )

    def region(self, ptr: int, size: int) -> memoryview:
        for base, end, view in self.spans:
            if base <= ptr and ptr + size <= end:
                return view[ptr - base : ptr - base + size]
        raise ValueError(f"kvshelf: page region at {ptr:#x} (+{size}) is outside the host pool")


class KvshelfHiCacheStorage(HiCacheStorage):
    """SGLang's ``HiCacheStorage`` backed by kvshelf.

    ``extra_config`` (``--hicache-storage-backend-extra-config``), besides SGLang's own
    ``backend_name``, ``module_path``, ``class_name`` and ``interface_v1``:

    - ``backend``: ``"store"`` (default: straight to Redis through kvshelf's Rust store,
      any topology its URL names) or ``"sidecar"`` (the node's kvshelf sidecar).
    - ``url``: Redis URL for ``store`` (default ``redis://127.0.0.1:6379``).
    - ``namespace``: the label in Redis keys (default ``sglang``).
    - ``timeout``: seconds a call may take before its pages are ``False`` (default 5).
    - ``ttl``: seconds or ``"1h"``, the store's TTL of written pages (default the store's).
    - ``store_options``: more ``StoreConfig`` fields for ``store`` (``max_connections``,
      ``tls_ca_file``, ``cluster``, ``sliding_ttl``, ...).
    - ``sidecar_url``, ``sidecar_namespace`` (``{tp_rank}`` and ``{pp_rank}`` in it are
      this rank's), ``protocol``, ``token``: for ``sidecar``.
    """

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None):
        self.config = storage_config
        extra = dict(storage_config.extra_config or {})
        unknown = set(extra) - _SGLANG_KEYS - _PARAMS
        if unknown:
            logger.warning("kvshelf: ignoring unknown extra_config keys %s", sorted(unknown))
        if storage_config.should_split_heads:
            raise ValueError(
                "kvshelf: heterogeneous tensor parallelism (tp_lcm_size, split heads) is "
                "not supported"
            )
        if storage_config.dcp_size > 1:
            raise ValueError(
                "kvshelf: decode context parallelism (dcp_size > 1) is not supported"
            )
        self.interface_v1 = bool(extra.get("interface_v1", 0))
        self.backend = extra.get("backend", "store")
        self.label = extra.get("namespace", "sglang")
        self.timeout = float(extra.get("timeout", 5.0))
        if not self.timeout > 0:
            raise ValueError("kvshelf: timeout must be > 0 seconds")
        self.ttl = extra.get("ttl")
        self.is_writer = storage_config.is_storage_writer
        self._warned: dict[str, tuple[float, int]] = {}
        self._pool: Any = None
        self._bytes: Optional[_PoolBytes] = None
        if self.backend == "store":
            options = dict(extra.get("store_options") or {})
            options.setdefault("response_timeout", self.timeout)
            if self.ttl is not None:
                options["ttl"] = self.ttl
            self._store: Optional[Store] = Store(
                extra.get("url", "redis://127.0.0.1:6379"), **options
            )
            self._client: Optional[Client] = None
        elif self.backend == "sidecar":
            self._store = None
            self._client = Client(
                extra.get("sidecar_url", "http://127.0.0.1:7070"),
                protocol=extra.get("protocol", "http"),
                token=extra.get("token"),
                timeout=self.timeout,
            )
            # One sidecar namespace per rank when KV differs per rank: "{tp_rank}" in the
            # name is this rank's.
            self.sidecar_namespace = str(extra.get("sidecar_namespace", self.label)).format(
                tp_rank=storage_config.tp_rank, pp_rank=storage_config.pp_rank
            )
        else:
            raise ValueError(f"kvshelf: backend must be 'store' or 'sidecar', not {self.backend!r}")

    def _warn(self, op: str, pages: int, e: BaseException) -> None:
        """One warning per kind of call every WARN_EVERY seconds, with how many failed calls
        it stands for: an outage under SGLang's threads would otherwise flood the log."""
        now = time.monotonic()
        last, quiet = self._warned.get(op, (-WARN_EVERY, 0))
        if now - last < WARN_EVERY:
            self._warned[op] = (last, quiet + 1)
            return
        self._warned[op] = (now, 0)
        more = f" ({quiet} more failed calls since the last warning)" if quiet else ""
        logger.warning("kvshelf: %s of %d pages failed: %s%s", op, pages, e, more)

    # -- setup -----------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Learns the page geometry from SGLang's host pool: the identity (``docs/hashing.md``
        §10), how many regions a page is (``get_page_buffer_meta``) and the namespace that
        bounds one stored value."""
        super().register_mem_pool_host(mem_pool_host)
        pool = mem_pool_host
        self._pool = pool
        self.page_size = int(pool.page_size)
        self._bytes = _PoolBytes(pool)
        # Regions of one page, measured on page 0 (any page has the same shape).
        probe = torch.arange(self.page_size, dtype=torch.int64)
        ptrs, sizes = pool.get_page_buffer_meta(probe)
        for p, s in zip(ptrs, sizes):
            self._bytes.region(int(p), int(s))
        self.parts = len(ptrs)
        self.part_sizes = [int(s) for s in sizes]
        self.page_bytes = sum(self.part_sizes)
        self.flat_bytes = int(pool.get_dummy_flat_data_page().nbytes)
        self.identity_v1 = storage_identity(self.config, pool, self.parts)
        self.identity_flat = storage_identity(self.config, pool, "flat")
        largest = max(self.part_sizes + [self.flat_bytes])
        fields: dict[str, Any] = dict(
            label=self.label,
            model_id=self.config.model_name or "sglang",
            kv_dtype="uint8",
            num_layers=1,
            num_kv_heads=1,
            head_dim=math.ceil(largest / 2),
            block_size=1,
            hash_scheme="sglang",
        )
        if self.ttl is not None:
            fields["ttl"] = self.ttl
        self.ns = Namespace(**fields)
        # Through the sidecar a page is one value, its regions joined in the pool's order
        # (a copy either way: the sidecar's HTTP/gRPC body is one); its namespace there is
        # a kvshelf-v1 one whose block is exactly that page (docs/sglang.md).
        self.identity_joined = storage_identity(self.config, pool, f"{self.parts}-joined")

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        raise NotImplementedError(
            f"kvshelf: hybrid host pools (batch_*_v2, pool {host_pool_name!s}) are not "
            "supported; run the model without a hybrid/sidecar pool or use another backend"
        )

    # -- keys ------------------------------------------------------------------------------

    def _hashes(self, keys: Sequence[str], flat: bool) -> list[bytes]:
        """Page-major: every region of page 0, then of page 1, ... (one per page for the
        flat pages of the plain methods, and for the joined pages of the sidecar)."""
        if flat:
            return sglang_key_hashes(self.identity_flat, keys, 1)
        if self.backend == "sidecar":
            return sglang_key_hashes(self.identity_joined, keys, 1)
        return sglang_key_hashes(self.identity_v1, keys, self.parts)

    def _regions(self, keys: Sequence[str], host_indices: torch.Tensor) -> list[memoryview]:
        if host_indices.numel() != len(keys) * self.page_size:
            raise ValueError(
                f"{host_indices.numel()} host indices for {len(keys)} pages of "
                f"{self.page_size} tokens"
            )
        ptrs, sizes = self._pool.get_page_buffer_meta(host_indices)
        if len(ptrs) != len(keys) * self.parts:
            raise ValueError(f"{len(ptrs)} page regions for {len(keys)} pages")
        return [self._bytes.region(int(p), int(s)) for p, s in zip(ptrs, sizes)]

    # -- the calls over caller memory ------------------------------------------------------

    def _finish(self, pending: Pending) -> Any:
        """Waits for a call over the pool's memory to end; once this returns or raises, the
        call touches nothing any more (``Pending.wait``: GIL released)."""
        try:
            return pending.wait()
        except BaseException:
            # wait() returns only once the task has ended; a KeyboardInterrupt that got in
            # before it was called still leaves it running: stop it and wait for its end.
            if not pending.done():
                pending.cancel()
                try:
                    pending.wait()
                except BaseException:
                    pass
            raise

    def _read(self, hashes: list[bytes], bufs: list[Any], keep: Any) -> list[bool]:
        """Per buffer: whether it now holds its whole value."""
        if self.backend == "store":
            call = self._store.start_get_into(self.ns, hashes, bufs, self.timeout, keep)
            got = self._finish(call)
            return [n is not None and n == len(b) for n, b in zip(got, bufs)]
        call = self._client.start_fetch_into(self.sidecar_namespace, hashes, bufs, keep)
        n, _reason = self._finish(call)
        return [i < n for i in range(len(bufs))]

    def _write(self, hashes: list[bytes], bufs: list[Any], keep: Any) -> list[bool]:
        if self.backend == "store":
            out = self._finish(self._store.start_put(self.ns, hashes, bufs, self.timeout, keep))
            return [o in ("stored", "already_present") for o in out]
        out = self._finish(self._client.start_put(self.sidecar_namespace, hashes, bufs))
        return [o in ("stored", "already_present", "queued") for o in out]

    def _sidecar_get_v1(self, keys: list[str], bufs: list[memoryview]) -> list[bool]:
        """Fetches joined pages into scratch memory, then copies the leading run into the
        pool's regions (the sidecar path has a copy either way)."""
        scratch = [bytearray(self.page_bytes) for _ in keys]
        ok = self._read(self._hashes(keys, False), scratch, scratch)
        for i, good in enumerate(ok):
            if not good:
                break
            off = 0
            for j in range(self.parts):
                region = bufs[i * self.parts + j]
                region[:] = scratch[i][off : off + len(region)]
                off += len(region)
        return ok

    @staticmethod
    def _pages(ok: list[bool], parts: int) -> list[bool]:
        return [all(ok[i * parts : (i + 1) * parts]) for i in range(len(ok) // parts)]

    # -- zero-copy interface (interface_v1) ------------------------------------------------

    def batch_get_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None
    ) -> list[bool]:
        """Reads each page into the host pool at ``host_indices`` (``page_size`` indices per
        page), straight from the socket. ``False`` for a page that is absent, corrupt, or
        not read within ``timeout``; its regions may hold part of a value."""
        if not keys:
            return []
        try:
            bufs = self._regions(keys, host_indices)
            if self.backend == "sidecar":
                return self._sidecar_get_v1(keys, bufs)
            ok = self._read(self._hashes(keys, False), bufs, self._pool)
            return self._pages(ok, self.parts)
        except Exception as e:  # noqa: BLE001 - never into SGLang's prefetch thread
            self._warn("batch_get_v1", len(keys), e)
            return [False] * len(keys)

    def batch_set_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None
    ) -> list[bool]:
        """Writes each page from the host pool, without a copy. A page already stored counts
        as written (pages are write-once). On a rank that is not the storage writer (MLA:
        every rank but one holds the same KV) nothing is written and every page is ``True``:
        the writer stores it."""
        if not keys:
            return []
        if not self.is_writer:
            return [True] * len(keys)
        try:
            bufs = self._regions(keys, host_indices)
            if self.backend == "sidecar":
                joined = [
                    b"".join(bufs[i * self.parts : (i + 1) * self.parts]) for i in range(len(keys))
                ]
                return self._write(self._hashes(keys, False), joined, None)
            ok = self._write(self._hashes(keys, False), bufs, self._pool)
            return self._pages(ok, self.parts)
        except Exception as e:  # noqa: BLE001 - never into SGLang's backup thread
            self._warn("batch_set_v1", len(keys), e)
            return [False] * len(keys)

    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        """How many leading pages are stored: one round trip over every region of every
        page; 0 when Redis cannot say within ``timeout``."""
        if not keys:
            return 0
        flat = not self.interface_v1
        parts = 1 if flat or self.backend == "sidecar" else self.parts
        try:
            hashes = self._hashes(keys, flat)
            if self.backend == "store":
                n = self._store.lookup(self.ns, hashes)
            else:
                n = self._client.lookup(self.sidecar_namespace, block_hashes=hashes)["hit_blocks"]
            return int(n) // parts
        except Exception as e:  # noqa: BLE001 - never into SGLang's prefetch thread
            self._warn("batch_exists", len(keys), e)
            return 0

    # -- plain interface (SGLang's flat data pages, one value per page) --------------------

    def get(
        self, key: str, target_location: Optional[Any] = None, target_sizes: Optional[Any] = None
    ) -> torch.Tensor | None:
        return self.batch_get([key], [target_location])[0]

    def batch_get(
        self,
        keys: list[str],
        target_locations: Optional[Any] = None,
        target_sizes: Optional[Any] = None,
    ) -> list[torch.Tensor | None]:
        """Reads each page's flat data into ``target_locations[i]`` (a contiguous tensor of
        one flat page, ``get_dummy_flat_data_page()``; a new one when ``None``)."""
        if not keys:
            return []
        targets = list(target_locations or [None] * len(keys))
        try:
            targets = [
                t if t is not None else self._pool.get_dummy_flat_data_page() for t in targets
            ]
            bufs = [t.view(torch.uint8).numpy() for t in targets]
            ok = self._read(self._hashes(keys, True), bufs, targets)
            return [t if good else None for t, good in zip(targets, ok)]
        except Exception as e:  # noqa: BLE001
            self._warn("batch_get", len(keys), e)
            return [None] * len(keys)

    def set(
        self,
        key: str,
        value: Optional[Any] = None,
        target_location: Optional[Any] = None,
        target_sizes: Optional[Any] = None,
    ) -> bool:
        return self.batch_set([key], [value])

    def batch_set(
        self,
        keys: list[str],
        values: Optional[Any] = None,
        target_locations: Optional[Any] = None,
        target_sizes: Optional[Any] = None,
    ) -> bool:
        """Writes each flat page (``get_data_page(index, flat=True)``); whether all were."""
        if not keys:
            return True
        if not self.is_writer:
            return True
        try:
            vals = [v.contiguous() for v in values]
            bufs = [v.view(torch.uint8).numpy() for v in vals]
            return all(self._write(self._hashes(keys, True), bufs, vals))
        except Exception as e:  # noqa: BLE001
            self._warn("batch_set", len(keys), e)
            return False

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def clear(self) -> None:
        """Nothing: pages expire by TTL and are shared with other instances."""

    def close(self) -> None:
        """Drops the connections (calls in flight have ended: each method waits for its own)."""
        self._store = None
        self._client = None
