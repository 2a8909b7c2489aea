"""One in-process LMCache instance whose remote storage is kvshelf, built the way LMCache
builds it (CreateStorageBackends + remote_storage_plugins). Also a script: `python
lmcache_instance.py URL LABEL SEED N` stores N seeded bf16 chunks and exits, so a test can
share chunks between two processes."""

from __future__ import annotations

import asyncio
import sys
import threading

import torch
from lmcache.utils import CacheEngineKey
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.storage_backend import CreateStorageBackends

MODEL = "Qwen/Qwen3-8B"
LAYERS, HEADS, DIM, CHUNK = 4, 2, 16, 32


class Instance:
    def __init__(self, url: str, label: str, blocking_timeout_secs: int = 10, **extra) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        extra_config = {
            "remote_storage_plugin.kvshelf.module_path": "kvshelf.lmcache_connector",
            "remote_storage_plugin.kvshelf.class_name": "KvshelfConnector",
            "remote_storage_plugin.kvshelf.url": url,
            "remote_storage_plugin.kvshelf.namespace": label,
            **{f"remote_storage_plugin.kvshelf.{k}": v for k, v in extra.items()},
        }
        self.config = LMCacheEngineConfig.from_defaults(
            chunk_size=CHUNK, local_cpu=True, max_local_cpu_size=0.05, remote_serde="naive",
            remote_storage_plugins=["kvshelf"], extra_config=extra_config,
            blocking_timeout_secs=blocking_timeout_secs,
        )
        self.metadata = LMCacheMetadata(
            model_name=MODEL, world_size=1, local_world_size=1, worker_id=0,
            local_worker_id=0, kv_dtype=torch.bfloat16,
            kv_shape=(LAYERS, 2, CHUNK, HEADS, DIM), chunk_size=CHUNK,
        )
        self.backends = CreateStorageBackends(self.config, self.metadata, self.loop, "cpu")
        self.remote = self.backends["RemoteBackend-kvshelf"]
        self.local = self.backends["LocalCPUBackend"]

    def key(self, chunk_hash: int) -> CacheEngineKey:
        return CacheEngineKey(MODEL, 1, 0, chunk_hash, torch.bfloat16)

    def chunk(self, seed: int, tokens: int = CHUNK):
        obj = self.local.allocate(self.metadata.get_shapes(tokens), self.metadata.get_dtypes(),
                                  MemoryFormat.KV_2LTD)
        g = torch.Generator().manual_seed(seed)
        obj.tensor.copy_(torch.randn(obj.tensor.shape, generator=g).to(torch.bfloat16))
        return obj

    def put(self, key, obj, timeout: float = 20.0) -> None:
        self.remote.submit_put_task(key, obj).result(timeout)

    def close(self) -> None:
        for b in self.backends.values():
            try:
                b.close()
            except Exception:
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


if __name__ == "__main__":
    url, label, seed, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    inst = Instance(url, label)
    for i in range(n):
        obj = inst.chunk(seed + i)
        inst.put(inst.key(seed + i), obj)
        obj.ref_count_down()
    print("stored", n, flush=True)
    inst.close()
