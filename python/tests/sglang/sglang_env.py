"""Helpers for the SGLang tests — SGLang's own classes on CPU: its device KV pools
(``MHATokenToKVPool``, ``MLATokenToKVPool``) built on ``device="cpu"``, the host pools
HiCache copies them into (``MHATokenToKVPoolHost``, ``MLATokenToKVPoolHost``,
``pin_memory=False``), its ``HiCacheStorageConfig`` and its ``StorageBackendFactory``,
which builds kvshelf's backend from the ``dynamic`` extra-config exactly as
``--hicache-storage-backend dynamic`` does. Test modules import the ``guard`` fixture
(a test-level timeout) from here."""

from __future__ import annotations

import ctypes
import faulthandler
import warnings

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torch
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
    from sglang.srt.mem_cache.utils import get_hash_str


@pytest.fixture(autouse=True)
def guard():
    """A test-level timeout that works while a thread is inside native code: a hang fails
    the run with every thread's stack. Test modules import it to use it."""
    faulthandler.dump_traceback_later(GUARD, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()

GUARD = 90.0      # seconds a test may take before the process dumps its stacks and exits
MODEL = "kvshelf/test-llama"
PAGE = 4          # tokens per page
LAYERS = 3
HEADS = 2
DIM = 8
DEVICE_TOKENS = 64


def make_pool(kind: str = "mha", layout: str = "page_first", page: int = PAGE,
              layers: int = LAYERS, heads: int = HEADS, dim: int = DIM,
              dtype: torch.dtype = torch.bfloat16, device_tokens: int = DEVICE_TOKENS):
    """SGLang's host pool of `kind` over its device pool, both in CPU memory."""
    if kind == "mha":
        dev = MHATokenToKVPool(size=device_tokens, page_size=page, dtype=dtype, head_num=heads,
                               head_dim=dim, layer_num=layers, device="cpu",
                               enable_memory_saver=False)
        return MHATokenToKVPoolHost(dev._mha_buffer_info(), host_to_device_ratio=2.0,
                                    host_size=0, page_size=page, layout=layout,
                                    pin_memory=False, device="cpu",
                                    device_capacity_tokens=device_tokens, start_layer=0,
                                    end_layer=layers)
    dev = MLATokenToKVPool(size=device_tokens, page_size=page, dtype=dtype, kv_lora_rank=2 * dim,
                           qk_rope_head_dim=dim, layer_num=layers, device="cpu",
                           enable_memory_saver=False)
    return MLATokenToKVPoolHost(dev._mla_buffer_info(), host_to_device_ratio=2.0, host_size=0,
                                page_size=page, layout=layout, pin_memory=False, device="cpu",
                                device_capacity_tokens=device_tokens, start_layer=0,
                                end_layer=layers, target_layer_num=layers)


def storage_config(extra: dict, *, mla: bool = False, tp_rank: int = 0, tp_size: int = 1,
                   pool=None) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
        attn_cp_size=1, is_mla_model=mla, enable_storage_metrics=False,
        is_page_first_layout=pool is not None and pool.layout == "page_first",
        model_name=MODEL, extra_config=extra)


def extra_config(url: str, label: str, **more) -> dict:
    return {"backend_name": "kvshelf", "module_path": "kvshelf.sglang",
            "class_name": "KvshelfHiCacheStorage", "interface_v1": 1, "url": url,
            "namespace": label, **more}


def make_backend(pool, extra: dict, **config):
    """kvshelf's backend as SGLang's cache controller attaches it: the factory, then the
    host pool registered."""
    cfg = storage_config(extra, pool=pool, **config)
    backend = StorageBackendFactory.create_backend("dynamic", cfg, pool)
    backend.register_mem_pool_host(pool)
    return backend


def page_keys(n: int, seed: int = 0) -> list[str]:
    """SGLang's own page keys (chained hashes of a prompt's pages)."""
    tokens = [seed * 100_000 + i for i in range(n * PAGE)]
    return get_hash_str(tokens, None, page_size=PAGE)


def two_instances(extra: dict, n: int, seed: int):
    """A writer and a reader backend, each over a host pool of its own (two SGLang
    instances) with the same extra-config; `n` page keys; and the writer's pages `at`
    filled with random bytes (not stored yet). Returns (src, dst, w, r, keys, at)."""
    src, dst = make_pool(), make_pool()
    w, r = make_backend(src, extra), make_backend(dst, dict(extra))
    keys = page_keys(n, seed=seed)
    at = src.alloc(n * PAGE)
    fill_random(src, at, seed=seed)
    return src, dst, w, r, keys, at


def fill_random(pool, indices: torch.Tensor, seed: int) -> None:
    """Random bytes in the pages at `indices` (every region of each)."""
    g = torch.Generator().manual_seed(seed)
    ptrs, sizes = pool.get_page_buffer_meta(indices)
    for p, s in zip(ptrs, sizes):
        data = torch.randint(0, 256, (s,), dtype=torch.uint8, generator=g).numpy().tobytes()
        ctypes.memmove(p, data, s)


def fill_byte(pool, indices: torch.Tensor, byte: int) -> None:
    ptrs, sizes = pool.get_page_buffer_meta(indices)
    for p, s in zip(ptrs, sizes):
        ctypes.memset(p, byte, s)


def pages(pool, indices: torch.Tensor) -> list[bytes]:
    """Each page's bytes as SGLang itself sees them (`get_data_page(..., flat=True)`)."""
    return [pool.get_data_page(int(indices[i]), flat=True).contiguous().view(torch.uint8)
            .numpy().tobytes() for i in range(0, indices.numel(), pool.page_size)]


def region_bytes(pool, indices: torch.Tensor) -> bytes:
    ptrs, sizes = pool.get_page_buffer_meta(indices)
    return b"".join(ctypes.string_at(p, s) for p, s in zip(ptrs, sizes))

