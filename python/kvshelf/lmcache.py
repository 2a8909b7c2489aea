"""kvshelf as LMCache's L2 storage, in LMCache's multi-process (MP) mode.

LMCache's server loads this class by module path (``docs/lmcache.md``)::

    --l2-adapter '{"type": "native_plugin", "module_path": "kvshelf.lmcache",
                   "class_name": "KvshelfNativeConnector",
                   "adapter_params": {"url": "redis://redis:6379", "namespace": "lmc-qwen3-8b",
                                      "kv_dtype": "bfloat16", "num_layers": 36,
                                      "num_kv_heads": 8, "head_dim": 128, "chunk_size": 256}}'

and wraps it in its own ``NativeConnectorL2Adapter``. The protocol is LMCache's
(``event_fd``, ``submit_batch_get/set/exists/delete``, ``drain_completions``, ``close``);
the work runs on kvshelf's Rust threads without the GIL. A key that cannot be served —
absent, corrupt, Redis down or slower than ``timeout`` — is reported as failed in its
completion; no call on the data path raises.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Optional, Sequence

from ._native import Engine, Namespace

__all__ = ["KvshelfNativeConnector", "lmcache_namespace"]


def lmcache_namespace(
    namespace: str,
    *,
    kv_dtype: str,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    chunk_size: int = 256,
    tp_size: int = 1,
    model_id: str = "lmcache",
    ttl: Optional[float | str] = None,
) -> Namespace:
    """The kvshelf namespace that holds LMCache's chunks: label ``namespace``, hash scheme
    ``lmcache``. The layout describes one full chunk of one rank (LMCache's ``chunk_size``
    tokens), the largest payload stored; partial chunks are stored as they come."""
    fields: dict[str, Any] = dict(
        label=namespace,
        model_id=model_id,
        kv_dtype=kv_dtype,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        tp_size=tp_size,
        block_size=chunk_size,
        hash_scheme="lmcache",
    )
    if ttl is not None:
        fields["ttl"] = ttl
    return Namespace(**fields)


_NAMESPACE_FIELDS = frozenset(inspect.signature(lmcache_namespace).parameters) - {"namespace"}


class KvshelfNativeConnector:
    """LMCache's ``native_plugin`` connector, backed by kvshelf's Rust store.

    ``adapter_params``: ``url`` (Redis, default ``redis://127.0.0.1:6379``), ``namespace``
    (the label in Redis keys), the full-chunk layout (``kv_dtype``, ``num_layers``,
    ``num_kv_heads``, ``head_dim``, ``chunk_size`` = 256, ``tp_size`` = 1), ``ttl``
    (seconds or ``"1h"``; default the store's 1h), ``timeout`` (seconds a batch may take
    before its keys fail, default 5), ``fanout`` (sub-batches a get or set is split into and
    run concurrently, default 2), ``max_keys_loading`` (keys whose reads may be outstanding
    at once across all batches, default 8; 0: no bound), and any ``StoreConfig`` field
    (``response_timeout``, ``max_connections``, ``tls_ca_file``, ``cluster``, ...).
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379",
        namespace: str = "lmcache",
        *,
        timeout: float = 5.0,
        fanout: int = 2,
        **params: Any,
    ) -> None:
        # The namespace's fields are lmcache_namespace's keyword arguments (a missing one
        # raises its TypeError); everything else is a StoreConfig field.
        fields = {k: params.pop(k) for k in _NAMESPACE_FIELDS if k in params}
        self.namespace = lmcache_namespace(namespace, **fields)
        store_options = params
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            # The engine owns the fd from here on and closes it in close().
            self._engine = Engine(url, self.namespace, fd, timeout, fanout, **store_options)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def event_fd(self) -> int:
        """Readable when completions are waiting; ``drain_completions`` resets it."""
        return self._fd

    def submit_batch_get(self, keys: Sequence[str], bufs: Sequence[Any]) -> int:
        return self._engine.submit_get(keys, bufs)

    def submit_batch_set(self, keys: Sequence[str], bufs: Sequence[Any]) -> int:
        return self._engine.submit_set(keys, bufs)

    def submit_batch_exists(self, keys: Sequence[str]) -> int:
        return self._engine.submit_exists(keys)

    def submit_batch_delete(self, keys: Sequence[str]) -> int:
        return self._engine.submit_delete(keys)

    def drain_completions(self) -> list[tuple[int, bool, str, Optional[list[bool]]]]:
        """``(future_id, ok, error, per-key results)`` of every batch finished since the
        last call. A batch's buffers are released here, never before."""
        return self._engine.drain()

    def close(self) -> None:
        """Cancels running batches, waits until none touches a buffer, closes the fd."""
        self._engine.close()
