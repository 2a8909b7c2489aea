"""kvshelf as a remote storage plugin of in-process LMCache (``remote_storage_plugins``).

Configuration (``docs/lmcache.md``)::

    remote_storage_plugins: ["kvshelf"]
    extra_config:
      remote_storage_plugin.kvshelf.module_path: kvshelf.lmcache_connector
      remote_storage_plugin.kvshelf.class_name: KvshelfConnector
      remote_storage_plugin.kvshelf.url: redis://redis:6379
      remote_storage_plugin.kvshelf.namespace: lmc-qwen3-8b

The chunk's key is LMCache's ``CacheEngineKey.to_string()`` hashed with the ``lmcache``
scheme; its bytes are the memory object's ``byte_array``, partial chunks included.
Redis down or slow is a miss (``get`` returns ``None``, ``exists`` ``False``) or a
dropped put, logged, never an exception.

LMCache gives up on a get after ``blocking_timeout_secs`` (``future.result(timeout)``,
then ``future.cancel()``, which reaches this coroutine later, on the loop's thread). Reads
and puts therefore run as native tasks (``Store.start_get_into`` / ``start_put``) that a
cancellation stops and awaits to their end, and the memory object a get allocated goes
back to LMCache's allocator only after its read has ended: a get LMCache abandoned never
writes into memory its allocator has handed to another chunk. Each call also has its own
deadline (``timeout``, by default half of ``blocking_timeout_secs``), so that it normally
answers a miss before LMCache gives up.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, List, Optional

from lmcache.utils import CacheEngineKey
from lmcache.v1.memory_management import MemoryObj
from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector

from ._native import Namespace, Store, lmcache_key_hash
from ._pending import finish

__all__ = ["KvshelfConnector"]

log = logging.getLogger(__name__)

_PREFIX = "remote_storage_plugin.kvshelf."


class KvshelfConnector(RemoteConnector):
    """A ``RemoteConnector`` over kvshelf's Rust store (``Store``): reads land in the
    memory object LMCache allocated, with the GIL released.

    ``timeout``: seconds a get or put may take before it fails (a miss, a dropped put);
    the ``remote_storage_plugin.kvshelf.timeout`` option, by default half of LMCache's
    ``blocking_timeout_secs``. ``None``: only the store's own timeouts."""

    def __init__(self, loop: asyncio.AbstractEventLoop, local_cpu_backend: Any, config: Any):
        super().__init__(local_cpu_backend.config, local_cpu_backend.metadata)
        self.loop = loop
        self.local_cpu_backend = local_cpu_backend
        extra = (config.extra_config if config is not None else None) or {}
        opt = lambda name, default=None: extra.get(_PREFIX + name, default)  # noqa: E731
        md = local_cpu_backend.metadata
        layers, _kv, chunk, heads, dim = md.kv_shape
        self.namespace = Namespace(
            label=opt("namespace", "lmcache"),
            model_id=md.model_name,
            kv_dtype=str(md.kv_dtype).removeprefix("torch."),
            num_layers=int(layers),
            num_kv_heads=int(heads),
            head_dim=int(dim),
            block_size=int(chunk),
            hash_scheme="lmcache",
            **({"ttl": opt("ttl")} if opt("ttl") is not None else {}),
        )
        if self.namespace.block_bytes < self.full_chunk_size_bytes:
            raise ValueError(
                f"kvshelf namespace holds chunks of at most {self.namespace.block_bytes} bytes;"
                f" LMCache's full chunk is {self.full_chunk_size_bytes}"
            )
        blocking = getattr(config, "blocking_timeout_secs", None) or 10
        self.timeout: Optional[float] = float(opt("timeout", blocking / 2))
        options = {
            k[len(_PREFIX) :]: v
            for k, v in extra.items()
            if k.startswith(_PREFIX)
            and k[len(_PREFIX) :]
            not in {"module_path", "class_name", "url", "namespace", "ttl", "timeout"}
        }
        self.store = Store(opt("url", "redis://127.0.0.1:6379"), **options)

    async def _call(self, name: str, *args: Any) -> Any:
        """A call that lends no memory, on a worker thread of the loop's executor."""
        return await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(getattr(self.store, name), *args)
        )

    async def _put(self, keys: List[CacheEngineKey], memory_objs: List[MemoryObj]) -> None:
        pending = self.store.start_put(
            self.namespace,
            [self._hash(k) for k in keys],
            [m.byte_array for m in memory_objs],
            self.timeout,
            memory_objs,  # kept alive until the put has ended
        )
        await finish(pending)

    @staticmethod
    def _hash(key: CacheEngineKey) -> bytes:
        return lmcache_key_hash(key.to_string())

    async def exists(self, key: CacheEngineKey) -> bool:
        try:
            return (await self._call("exists", self.namespace, [self._hash(key)]))[0]
        except Exception as e:  # fail open: unreachable is "not cached"
            log.warning("kvshelf exists failed, answering a miss: %s", e)
            return False

    def exists_sync(self, key: CacheEngineKey) -> bool:
        try:
            return self.store.exists(self.namespace, [self._hash(key)])[0]
        except Exception as e:
            log.warning("kvshelf exists failed, answering a miss: %s", e)
            return False

    async def get(self, key: CacheEngineKey) -> Optional[MemoryObj]:
        memory_obj = self.local_cpu_backend.allocate(
            self.meta_shapes, self.meta_dtypes, self.meta_fmt
        )
        if memory_obj is None:
            log.debug("kvshelf get: no CPU memory for a chunk")
            return None
        try:
            # The Pending keeps memory_obj alive (un-freed) until the read has ended, even
            # if this coroutine is closed without running its handlers.
            pending = self.store.start_get_into(
                self.namespace, [self._hash(key)], [memory_obj.byte_array], self.timeout,
                memory_obj,
            )
            (n,) = await finish(pending)
        except asyncio.CancelledError:
            # LMCache gave up on this get. finish() returned after the read ended: the
            # memory object may go back to the allocator now, and not before.
            memory_obj.ref_count_down()
            raise
        except Exception as e:
            log.warning("kvshelf get failed, answering a miss: %s", e)
            n = None
        if n is None:
            memory_obj.ref_count_down()
            return None
        if n != self.full_chunk_size_bytes:
            return self.reshape_partial_chunk(memory_obj, n)
        return memory_obj

    async def put(self, key: CacheEngineKey, memory_obj: MemoryObj) -> None:
        try:
            await self._put([key], [memory_obj])
        except Exception as e:  # a dropped put is harmless: the chunk is recomputed
            log.warning("kvshelf put dropped: %s", e)

    def support_batched_put(self) -> bool:
        return True

    async def batched_put(self, keys: List[CacheEngineKey], memory_objs: List[MemoryObj]) -> None:
        try:
            await self._put(keys, memory_objs)
        except Exception as e:
            log.warning("kvshelf batched put dropped: %s", e)

    async def list(self) -> List[str]:
        # kvshelf keys hash LMCache's keys; the originals are not stored.
        return []

    async def close(self) -> None:
        return None

    def remove_sync(self, key: CacheEngineKey) -> bool:
        try:
            return self.store.delete(self.namespace, [self._hash(key)]) > 0
        except Exception as e:
            log.warning("kvshelf delete failed: %s", e)
            return False

