"""The native_plugin connector driven by LMCache's own NativeConnectorL2Adapter, built by
LMCache's native_plugin factory from the same JSON the MP server's --l2-adapter takes."""

from __future__ import annotations

import os
import select
import time

import pytest
import torch


from lmcache.v1.distributed.api import ObjectKey  # noqa: E402
from lmcache.v1.distributed.l2_adapters.factory import create_l2_adapter_from_registry  # noqa: E402
from lmcache.v1.distributed.l2_adapters.native_plugin_l2_adapter import (  # noqa: E402
    NativePluginL2AdapterConfig,
)
from lmcache.v1.memory_allocators.ad_hoc_memory_allocator import AdHocMemoryAllocator  # noqa: E402
from lmcache.v1.memory_management import MemoryFormat  # noqa: E402
from lmcache.v1.platform.event_notifier import consume_fd  # noqa: E402

import kvshelf  # noqa: E402
from conftest import sigstop  # noqa: E402

LAYERS, HEADS, DIM, CHUNK = 4, 2, 16, 32  # a small model: 16 KiB per full chunk in bf16
DEADLINE = 20.0  # seconds: a test-level bound, fails instead of hanging


def adapter_for(url: str, label: str, **extra):
    cfg = NativePluginL2AdapterConfig.from_dict({
        "type": "native_plugin",
        "module_path": "kvshelf.lmcache",
        "class_name": "KvshelfNativeConnector",
        "adapter_params": {
            "url": url, "namespace": label, "kv_dtype": "bfloat16",
            "num_layers": LAYERS, "num_kv_heads": HEADS, "head_dim": DIM,
            "chunk_size": CHUNK, **extra,
        },
    })
    return create_l2_adapter_from_registry(cfg)


def keys(n: int, salt: str = "", rank: int = 0) -> list[ObjectKey]:
    return [ObjectKey(chunk_hash=os.urandom(32), model_name="Qwen/Qwen3-8B", kv_rank=rank,
                      object_group_id=0, cache_salt=salt) for _ in range(n)]


_ALLOCATED: list = []


@pytest.fixture(autouse=True)
def release_chunks():
    """Gives every chunk a test allocated back, as LMCache's own callers do."""
    yield
    while _ALLOCATED:
        _ALLOCATED.pop().ref_count_down()


def chunks(n: int, tokens: int = CHUNK, fill: bool = True):
    alloc = AdHocMemoryAllocator("cpu")
    out = []
    for i in range(n):
        obj = alloc.allocate(torch.Size([2, LAYERS, tokens, HEADS * DIM]), torch.bfloat16,
                             MemoryFormat.KV_2LTD)
        if fill:
            obj.tensor.copy_(torch.randn(obj.tensor.shape, dtype=torch.float32).to(torch.bfloat16))
        else:
            obj.tensor.zero_()
        out.append(obj)
        _ALLOCATED.append(obj)
    return out


def wait(fd: int, poll):
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        result = poll()
        if result is not None:
            return result
        r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if r:
            consume_fd(fd)
    raise AssertionError("no completion within the deadline")


def store(adapter, ks, objs) -> int:
    """Bytes stored, or -1 when the batch failed (LMCache's L2StoreResult)."""
    task = adapter.submit_store_task(ks, objs)
    done = wait(adapter.get_store_event_fd(),
                lambda: adapter.pop_completed_store_tasks().get(task))
    return int(done)


def lookup(adapter, ks) -> list[bool]:
    task = adapter.submit_lookup_and_lock_task(ks, {})
    bitmap = wait(adapter.get_lookup_and_lock_event_fd(),
                  lambda: adapter.query_lookup_and_lock_result(task))
    adapter.submit_unlock(ks)
    return [bitmap.test(i) for i in range(len(ks))]


def load(adapter, ks, objs) -> list[bool]:
    task = adapter.submit_load_task(ks, objs)
    bitmap = wait(adapter.get_load_event_fd(), lambda: adapter.query_load_result(task))
    return [bitmap.test(i) for i in range(len(ks))]


def same(a, b) -> bool:
    return a.tensor.view(torch.uint8).equal(b.tensor.view(torch.uint8))


def test_store_lookup_load_byte_exact_with_partial_misses(redis, label):
    adapter = adapter_for(redis.url, label)
    try:
        ks, objs = keys(8), chunks(8)
        assert store(adapter, ks, objs) == sum(o.get_size() for o in objs)

        absent = keys(2)
        asked = [ks[0], absent[0], ks[1], ks[2], absent[1]]
        assert lookup(adapter, asked) == [True, False, True, True, False]

        dst = chunks(len(asked), fill=False)
        assert load(adapter, asked, dst) == [True, False, True, True, False]
        assert same(dst[0], objs[0]) and same(dst[2], objs[1]) and same(dst[3], objs[2])
        assert not dst[1].tensor.view(torch.uint8).any(), "a miss leaves its buffer alone"

        # Everything LMCache's key carries is in the kvshelf key: another rank, another
        # salt of the same chunk hash is another chunk.
        other = [ObjectKey(chunk_hash=ks[0].chunk_hash, model_name=ks[0].model_name,
                           kv_rank=1, object_group_id=0),
                 ObjectKey(chunk_hash=ks[0].chunk_hash, model_name=ks[0].model_name,
                           kv_rank=0, object_group_id=0, cache_salt="tenant-b")]
        assert lookup(adapter, other) == [False, False]
    finally:
        adapter.close()


def test_partial_chunk_round_trips_and_an_operator_reads_its_header(redis, label):
    adapter = adapter_for(redis.url, label)
    try:
        ks, objs = keys(1), chunks(1, tokens=CHUNK // 4 + 1)  # the prompt's last, partial chunk
        assert store(adapter, ks, objs) >= 0
        dst = chunks(1, tokens=CHUNK // 4 + 1, fill=False)
        assert load(adapter, ks, dst) == [True]
        assert same(dst[0], objs[0])
        # A buffer of another length is a failed load, never half-filled garbage.
        assert load(adapter, ks, chunks(1, fill=False)) == [False]

        from lmcache.v1.distributed.l2_adapters.native_connector_l2_adapter import (
            _object_key_to_string,
        )
        key = kvshelf.block_key(label, kvshelf.lmcache_key_hash(_object_key_to_string(ks[0])))
        head = redis.cli("GETRANGE", key, "0", "511").decode("utf-8", "replace")
        assert head.startswith("KVSHELF/1 ")
        assert '"hash_scheme":"lmcache"' in head and f'"namespace":"{label}"' in head
        assert f'"payload_len":{objs[0].get_size()}' in head
        ttl = int(redis.cli("TTL", key))
        assert 0 < ttl <= 3600
    finally:
        adapter.close()


def test_redis_down_is_misses_then_hits_resume(own_redis, label):
    adapter = adapter_for(own_redis.url, label, timeout=2.0, response_timeout=1,
                          connection_timeout=0.5)
    try:
        ks, objs = keys(4), chunks(4)
        assert store(adapter, ks, objs) >= 0
        own_redis.stop()

        assert lookup(adapter, ks) == [False] * 4
        assert load(adapter, ks, chunks(4, fill=False)) == [False] * 4
        assert store(adapter, keys(1), chunks(1)) == -1

        own_redis.start()  # an empty Redis: store again, then hits come back
        deadline = time.monotonic() + DEADLINE
        while store(adapter, ks, objs) < 0:
            assert time.monotonic() < deadline, "stores never succeeded after Redis came back"
        assert lookup(adapter, ks) == [True] * 4
        dst = chunks(4, fill=False)
        assert load(adapter, ks, dst) == [True] * 4
        assert all(same(a, b) for a, b in zip(dst, objs))
    finally:
        adapter.close()


def test_a_hung_redis_fails_open_within_the_timeout(own_redis, label):
    adapter = adapter_for(own_redis.url, label, timeout=0.5)
    try:
        ks, objs = keys(2), chunks(2)
        assert store(adapter, ks, objs) >= 0
        sigstop(own_redis.proc)  # connected, never answers
        try:
            t0 = time.monotonic()
            assert load(adapter, ks, chunks(2, fill=False)) == [False, False]
            assert time.monotonic() - t0 < 5
        finally:
            own_redis.proc.send_signal(18)  # SIGCONT
    finally:
        adapter.close()


def test_delete_through_the_adapter(redis, label):
    adapter = adapter_for(redis.url, label)
    try:
        ks, objs = keys(3), chunks(3)
        assert store(adapter, ks, objs) >= 0
        adapter.delete(ks[:2])
        assert lookup(adapter, ks) == [False, False, True]
    finally:
        adapter.close()


def test_connector_protocol_never_raises_on_bad_input(redis, label):
    """Straight on the connector: malformed keys and buffers fail their keys only."""
    from kvshelf.lmcache import KvshelfNativeConnector

    c = KvshelfNativeConnector(redis.url, label, kv_dtype="bf16", num_layers=1,
                               num_kv_heads=1, head_dim=4, chunk_size=4)
    try:
        good = "m@00000000@0@" + "cd" * 32
        fid = c.submit_batch_set([good, "not-a-key"], [bytearray(b"x" * 16), bytearray(8)])
        too_big = c.submit_batch_set([good + "@s"], [bytearray(1000)])
        mismatch = c.submit_batch_get([good], [])
        readonly = c.submit_batch_get([good], [b"\0" * 16])
        pending = {fid, too_big, mismatch, readonly}
        results = {}
        deadline = time.monotonic() + DEADLINE
        while pending - results.keys():
            select.select([c.event_fd()], [], [], max(0.0, deadline - time.monotonic()))
            assert time.monotonic() < deadline
            for (f, ok, err, bools) in c.drain_completions():
                results[f] = (ok, err, bools)
        assert results[fid][0] is False and results[fid][2] == [True, False]
        assert "key 1" in results[fid][1]
        assert results[too_big][2] == [False]
        assert results[mismatch][0] is False
        assert results[readonly][2] == [False] and "writable" in results[readonly][1]
    finally:
        c.close()
    # After close: a submit completes at once, failed, and raises nothing.
    c.submit_batch_exists(["m@00000000@0@" + "cd" * 32])


def drain_all(c, ids, deadline_s: float = DEADLINE) -> dict:
    results = {}
    deadline = time.monotonic() + deadline_s
    while set(ids) - results.keys():
        left = deadline - time.monotonic()
        assert left > 0, "completions did not arrive in time"
        if select.select([c.event_fd()], [], [], left)[0]:
            for (f, ok, err, bools) in c.drain_completions():
                results[f] = (ok, err, bools)
    return results


def test_buffers_are_held_until_their_completion_is_drained(redis, label):
    import sys

    from kvshelf.lmcache import KvshelfNativeConnector

    c = KvshelfNativeConnector(redis.url, label, kv_dtype="bf16", num_layers=1,
                               num_kv_heads=1, head_dim=4, chunk_size=4)
    try:
        key = "m@00000000@0@" + "ef" * 32
        src = bytearray(range(16))
        drain_all(c, [c.submit_batch_set([key], [src])])
        dst = bytearray(16)
        before = sys.getrefcount(dst)
        fid = c.submit_batch_get([key], [memoryview(dst)])
        # The memoryview passed in is gone from Python's side; the connector still holds
        # the buffer (and so its exporter), which shows as a reference to `dst`.
        assert sys.getrefcount(dst) > before
        results = drain_all(c, [fid])
        assert results[fid] == (True, "", [True]) and dst == src
        assert sys.getrefcount(dst) == before, "released once drained"
    finally:
        c.close()


def test_many_batches_in_flight_from_many_threads(redis, label):
    """Concurrent submitters, one drainer: every batch completes once, byte-exact."""
    import threading

    from kvshelf.lmcache import KvshelfNativeConnector

    c = KvshelfNativeConnector(redis.url, label, kv_dtype="bf16", num_layers=2,
                               num_kv_heads=2, head_dim=8, chunk_size=16)
    chunk = 2 * 2 * 16 * 2 * 8 * 2
    try:
        data = {f"m@{t:08x}@0@{i:064x}": os.urandom(chunk) for t in range(4) for i in range(16)}
        keys = list(data)
        drain_all(c, [c.submit_batch_set(keys, [bytearray(data[k]) for k in keys])])
        outs: dict[int, tuple[list[str], list[bytearray]]] = {}
        lock = threading.Lock()

        def reader(t: int) -> None:
            for b in range(8):
                ks = keys[(t * 8 + b) % 48:][:8]
                bufs = [bytearray(chunk) for _ in ks]
                fid = c.submit_batch_get(ks, bufs)
                with lock:
                    outs[fid] = (ks, bufs)

        threads = [threading.Thread(target=reader, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=DEADLINE)
        results = drain_all(c, list(outs))
        assert len(results) == 32
        for fid, (ks, bufs) in outs.items():
            assert results[fid][0] is True and results[fid][2] == [True] * len(ks)
            assert all(bytes(b) == data[k] for k, b in zip(ks, bufs))
        assert c._engine.in_flight() == 0
    finally:
        c.close()


def _connector(url: str, label: str, **extra):
    from kvshelf.lmcache import KvshelfNativeConnector

    return KvshelfNativeConnector(url, label, kv_dtype="bf16", num_layers=2, num_kv_heads=2,
                                  head_dim=8, chunk_size=16, **extra)


_SMALL_CHUNK = 2 * 2 * 16 * 2 * 8 * 2  # _connector's full chunk in bytes


def _pipelines_waiting(port: int) -> int:
    """Connections to the Redis on `port` whose requests it has not read (it is stopped):
    the server side's receive queue in /proc/net/tcp. Each is one pipeline of GETs sent
    and not yet answered."""
    waiting = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            cols = line.split()
            local, state, queues = cols[1], cols[3], cols[4]
            rx = int(queues.split(":")[1], 16)
            if state == "01" and int(local.split(":")[1], 16) == port and rx > 0:
                waiting += 1
    return waiting


@pytest.mark.parametrize("cap", [2, 0])
def test_keys_loading_at_once_are_bounded_across_batches(own_redis, label, cap):
    """`max_keys_loading`: 8 batches of 4 keys submitted together send the GETs of at most
    `cap` keys at a time (0: all at once); every batch still completes byte-exact."""
    redis = own_redis
    c = _connector(redis.url, label, max_keys_loading=cap, timeout=DEADLINE)
    try:
        data = {f"m@00000000@0@{i:064x}": os.urandom(_SMALL_CHUNK) for i in range(32)}
        ks = list(data)
        drain_all(c, [c.submit_batch_set(ks, [bytearray(data[k]) for k in ks])])
        sigstop(redis.proc)
        try:
            outs = {}
            for b in range(8):
                batch = ks[b * 4:(b + 1) * 4]
                bufs = [bytearray(_SMALL_CHUNK) for _ in batch]
                outs[c.submit_batch_get(batch, bufs)] = (batch, bufs)
            # Let every GET that may be sent reach Redis, then count the pipelines held.
            seen, deadline = 0, time.monotonic() + 2.0
            while time.monotonic() < deadline:
                seen = max(seen, _pipelines_waiting(redis.port))
                time.sleep(0.05)
        finally:
            redis.proc.send_signal(18)  # SIGCONT
        if cap:
            # A sub-batch of 2 keys holds 2 permits and is cut into at most 2 pipelines.
            assert 1 <= seen <= cap, seen
        else:
            assert seen > 2, f"without a bound every batch's GETs go out at once: {seen}"
        results = drain_all(c, list(outs))
        for fid, (batch, bufs) in outs.items():
            assert results[fid][0] is True and results[fid][2] == [True] * 4, results[fid]
            assert all(bytes(b) == data[k] for k, b in zip(batch, bufs))
        assert c._engine.in_flight() == 0
    finally:
        c.close()


def test_a_batch_waiting_for_room_times_out_and_never_touches_its_buffers(own_redis, label):
    """A batch queued behind `max_keys_loading` is bounded by its own deadline: with Redis
    hung, the batch holding the room and the one waiting for it both fail in time, and the
    waiting one's buffer is never written, not even once Redis answers again."""
    c = _connector(own_redis.url, label, max_keys_loading=1, timeout=0.5)
    try:
        ks = [f"m@00000000@0@{i:064x}" for i in range(2)]
        drain_all(c, [c.submit_batch_set(ks, [bytearray(os.urandom(_SMALL_CHUNK)) for _ in ks])])
        sigstop(own_redis.proc)
        try:
            first, waiting = bytearray(_SMALL_CHUNK), bytearray(_SMALL_CHUNK)
            t0 = time.monotonic()
            ids = [c.submit_batch_get([ks[0]], [first]), c.submit_batch_get([ks[1]], [waiting])]
            results = drain_all(c, ids)
            assert time.monotonic() - t0 < 5
            assert all(r[0] is False and r[2] == [False] for r in results.values()), results
        finally:
            own_redis.proc.send_signal(18)  # SIGCONT
        time.sleep(0.5)  # Redis answers the GET that was sent: it is drained, not delivered
        assert waiting == bytearray(_SMALL_CHUNK) and first == bytearray(_SMALL_CHUNK)
        later = bytearray(_SMALL_CHUNK)
        assert drain_all(c, [fid := c.submit_batch_get([ks[1]], [later])])[fid][0] is True
    finally:
        c.close()
