"""kvshelf: a shared, Redis-backed shelf of attention KV blocks, keyed by prompt prefix.

The Rust library in this process: the hashing contract (``docs/hashing.md``), the Redis
store (``Store``: reads land in your buffers with the GIL released), a client of the
sidecar (``Client``, HTTP or gRPC), the LMCache storage plugin (``kvshelf.lmcache``),
vLLM's secondary offloading tier (``kvshelf.vllm``) and SGLang's HiCache storage backend
(``kvshelf.sglang``).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Optional, Sequence

from ._native import (
    Client,
    KvshelfError,
    Namespace,
    Pending,
    PrefixHasher,
    Store,
    block_key,
    lmcache_key_hash,
    vllm_identity,
    vllm_key_hash,
    sglang_key_hash,
    sglang_key_hashes,
)
from ._pending import finish

__all__ = [
    "AsyncClient",
    "AsyncStore",
    "Client",
    "KvshelfError",
    "Namespace",
    "Pending",
    "PrefixHasher",
    "Store",
    "block_key",
    "lmcache_key_hash",
    "vllm_identity",
    "vllm_key_hash",
    "sglang_key_hash",
    "sglang_key_hashes",
]


class AsyncStore:
    """``Store`` for asyncio code. The Rust side releases the GIL while it talks to Redis,
    so the event loop and other threads keep running meanwhile.

    ``get_into`` and ``put`` lend your buffers: they run as a native task
    (``Store.start_get_into`` / ``start_put``) that a cancellation of the awaiting
    coroutine — ``asyncio.wait_for`` giving up, ``task.cancel()`` — stops, and
    ``CancelledError`` reaches you only once that task has ended: from then on kvshelf
    never touches the buffers again, so you may reuse or free them. ``timeout`` (seconds)
    bounds the call itself (``KvshelfError``, ``backend_timeout``). The other methods run
    the synchronous method on a worker thread of the loop's default executor."""

    def __init__(self, url: str = "redis://127.0.0.1:6379", **options: Any) -> None:
        self.sync = Store(url, **options)

    async def _run(self, name: str, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(getattr(self.sync, name), *args))

    async def ping(self) -> None:
        return await self._run("ping")

    async def lookup(self, ns: Namespace, hashes: Sequence[bytes | str]) -> int:
        return await self._run("lookup", ns, hashes)

    async def exists(self, ns: Namespace, hashes: Sequence[bytes | str]) -> list[bool]:
        return await self._run("exists", ns, hashes)

    async def get_into(
        self,
        ns: Namespace,
        hashes: Sequence[bytes | str],
        buffers: Sequence[Any],
        timeout: Optional[float] = None,
    ) -> list[Optional[int]]:
        return await finish(self.sync.start_get_into(ns, hashes, buffers, timeout))

    async def get(self, ns: Namespace, hashes: Sequence[bytes | str]) -> list[Optional[bytes]]:
        return await self._run("get", ns, hashes)

    async def put(
        self,
        ns: Namespace,
        hashes: Sequence[bytes | str],
        buffers: Sequence[Any],
        timeout: Optional[float] = None,
    ) -> list[str]:
        return await finish(self.sync.start_put(ns, hashes, buffers, timeout))

    async def delete(self, ns: Namespace, hashes: Sequence[bytes | str]) -> int:
        return await self._run("delete", ns, hashes)


class AsyncClient:
    """``Client`` for asyncio code, like ``AsyncStore``: ``fetch_into`` runs as a native
    task (``Client.start_fetch_into``) that a cancellation stops and awaits to its end
    before ``CancelledError`` reaches you; ``put`` copies your buffers before its first
    await (``Client.start_put``), so they are yours again at once. The other calls run
    the synchronous method (which releases the GIL) on a worker thread of the loop's
    default executor."""

    def __init__(self, url: str = "http://127.0.0.1:7070", **options: Any) -> None:
        self.sync = Client(url, **options)

    async def _run(self, name: str, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        call = functools.partial(getattr(self.sync, name), *args, **kwargs)
        return await loop.run_in_executor(None, call)

    async def hash(self, namespace: str, tokens: Sequence[int]) -> list[bytes]:
        return await self._run("hash", namespace, tokens)

    async def lookup(self, namespace: str, **kwargs: Any) -> dict[str, Any]:
        return await self._run("lookup", namespace, **kwargs)

    async def fetch_into(
        self, namespace: str, hashes: Sequence[bytes | str], buffers: Sequence[Any]
    ) -> tuple[int, str]:
        return await finish(self.sync.start_fetch_into(namespace, hashes, buffers))

    async def fetch(self, namespace: str, hashes: Sequence[bytes | str]) -> tuple[list[bytes], str]:
        return await self._run("fetch", namespace, hashes)

    async def put(
        self,
        namespace: str,
        hashes: Sequence[bytes | str],
        buffers: Sequence[Any],
        asynchronous: bool = False,
    ) -> list[str]:
        return await finish(self.sync.start_put(namespace, hashes, buffers, asynchronous))

    async def delete(self, namespace: str, hashes: Sequence[bytes | str]) -> int:
        return await self._run("delete", namespace, hashes)
