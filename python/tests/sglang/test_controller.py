"""kvshelf under SGLang's own HiCache controller (``HiCacheController``, CPU): SGLang
attaches the backend from the ``dynamic`` extra-config and selects the zero-copy page
functions (``interface_v1``); its backup thread writes host pages through
``batch_set_v1``, its prefetch thread counts hits with ``batch_exists`` and its prefetch
I/O thread reads them back into other host pages through ``batch_get_v1``. The test plays
only the scheduler's part: it hands the hit to the I/O thread with host pages to fill."""

from __future__ import annotations

import tempfile
import threading

import pytest
import torch
import torch.distributed as dist

from sglang_env import (guard, HEADS, DIM, LAYERS, PAGE, extra_config,  # noqa: F401
                        fill_random, pages)

from sglang.srt.managers.cache_controller import HiCacheController
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
from sglang.srt.mem_cache.utils import get_hash_str
from sglang.srt.runtime_context import get_parallel

from kvshelf.sglang import KvshelfHiCacheStorage

WAIT = 30.0  # seconds for one of SGLang's threads to answer through its queues


@pytest.fixture(scope="module")
def one_rank():
    """A single-rank torch.distributed world and SGLang's parallel context for it, as the
    scheduler process has them."""
    get_parallel().override_permanently(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1,
                                        attn_dcp_size=1, attn_dcp_rank=0)
    store = tempfile.NamedTemporaryFile(prefix="kvshelf-gloo-", delete=False).name
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def controller(redis_url: str, label: str, group):
    dev = MHATokenToKVPool(size=64, page_size=PAGE, dtype=torch.bfloat16, head_num=HEADS,
                           head_dim=DIM, layer_num=LAYERS, device="cpu",
                           enable_memory_saver=False)
    host = MHATokenToKVPoolHost(dev._mha_buffer_info(), host_to_device_ratio=4.0, host_size=0,
                                page_size=PAGE, layout="page_first", pin_memory=False,
                                device="cpu", device_capacity_tokens=64, start_layer=0,
                                end_layer=LAYERS)
    alloc = PagedTokenToKVPoolAllocator(64, PAGE, torch.bfloat16, "cpu", dev, False)
    ctl = HiCacheController(alloc, host, PAGE, group, threading.Event(), io_backend="direct",
                            storage_backend="dynamic", prefetch_threshold=PAGE,
                            model_name="kvshelf/test-llama",
                            storage_backend_extra_config=extra_config(redis_url, label))
    return ctl, host


def test_sglang_controller_backs_up_and_prefetches_pages_through_kvshelf(redis, label, one_rank):
    ctl, host = controller(redis.url, label, one_rank)
    try:
        assert isinstance(ctl.storage_backend, KvshelfHiCacheStorage)
        assert ctl.page_get_func.__name__ == "_page_get_zero_copy"
        assert ctl.page_set_func.__name__ == "_page_set_zero_copy"
        n = 5
        tokens = list(range(1000, 1000 + n * PAGE))
        src = host.alloc(n * PAGE)
        fill_random(host, src, seed=50)
        # Backup: SGLang's backup thread writes the pages.
        ctl.write_storage(src, tokens, hash_value=get_hash_str(tokens, None, page_size=PAGE))
        done = ctl.ack_backup_queue.get(timeout=WAIT)
        assert done.completed_tokens == n * PAGE
        # Prefetch: its prefetch thread counts the stored pages...
        op = ctl.prefetch("req-1", tokens + [7, 8])  # a partial last page is never looked up
        hit = ctl.prefetch_hit_queue.get(timeout=WAIT)
        assert hit is op and op.storage_hit_count == n * PAGE
        # ...the scheduler gives it host pages, and its I/O thread reads into them.
        into = host.alloc(n * PAGE)
        op.host_indices = into
        ctl.prefetch_buffer.put(op)
        acks = []
        while not any(a.completed_req for a in acks):
            acks.append(ctl.ack_prefetch_queue.get(timeout=WAIT))
        assert max(a.completed_tokens or 0 for a in acks) == n * PAGE
        assert pages(host, into) == pages(host, src)
    finally:
        ctl.detach_storage_backend()


def test_sglang_controller_finds_nothing_while_redis_is_down_and_its_threads_live_on(
        own_redis, label, one_rank):
    ctl, host = controller(own_redis.url, label, one_rank)
    try:
        tokens = list(range(2000, 2000 + 3 * PAGE))
        src = host.alloc(3 * PAGE)
        fill_random(host, src, seed=51)
        own_redis.stop()
        ctl.write_storage(src, tokens, hash_value=get_hash_str(tokens, None, page_size=PAGE))
        assert ctl.ack_backup_queue.get(timeout=WAIT).completed_tokens == 0
        op = ctl.prefetch("req-2", tokens)
        assert ctl.prefetch_hit_queue.get(timeout=WAIT) is op and op.storage_hit_count == 0
        assert ctl.backup_thread.is_alive() and ctl.prefetch_thread.is_alive()
        own_redis.start()
        # The same threads serve the next requests once Redis is back.
        ctl.write_storage(src, tokens, hash_value=get_hash_str(tokens, None, page_size=PAGE))
        assert ctl.ack_backup_queue.get(timeout=WAIT).completed_tokens == 3 * PAGE
        op = ctl.prefetch("req-3", tokens)
        assert ctl.prefetch_hit_queue.get(timeout=WAIT) is op and op.storage_hit_count == 3 * PAGE
    finally:
        ctl.detach_storage_backend()
