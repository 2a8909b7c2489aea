"""kvshelf.Store against a real Redis: reads into caller buffers, write-once puts, misses,
bad input, and Redis down (an exception with a code for the Store; the plugin turns it
into misses)."""

import asyncio
import threading

import numpy as np
import pytest

import kvshelf


def blocks(ns: kvshelf.Namespace, n: int, seed: int = 0):
    hashes = kvshelf.PrefixHasher(ns).hash_prefix(
        [seed * 1000 + t for t in range(n * ns.block_size)]
    )
    rng = np.random.default_rng(seed)
    payloads = [rng.integers(0, 256, ns.block_bytes, dtype=np.uint8) for _ in range(n)]
    return hashes, payloads


def test_put_then_get_into_numpy_bytearray_and_memoryview(store, ns):
    hashes, payloads = blocks(ns, 3)
    assert store.put(ns, hashes, payloads) == ["stored"] * 3
    assert store.put(ns, hashes[:1], [payloads[1]]) == ["already_present"]
    assert store.lookup(ns, hashes) == 3

    as_f16 = np.empty(ns.block_bytes // 2, dtype=np.float16)  # not a byte format: viewed as bytes
    as_bytearray = bytearray(ns.block_bytes)
    backing = bytearray(ns.block_bytes)
    written = store.get_into(ns, hashes, [as_f16, as_bytearray, memoryview(backing)])
    assert written == [ns.block_bytes] * 3
    assert as_f16.view(np.uint8).tobytes() == payloads[0].tobytes()  # first writer's bytes
    assert bytes(as_bytearray) == payloads[1].tobytes()
    assert bytes(backing) == payloads[2].tobytes()
    assert store.get(ns, hashes[2:]) == [payloads[2].tobytes()]
    ttl = store.ttl(ns, hashes[0])
    assert ttl is not None and 0 < ttl <= 3600


def test_misses_are_none_and_lookup_stops_at_the_first_gap(store, ns):
    hashes, payloads = blocks(ns, 3, seed=1)
    store.put(ns, [hashes[0], hashes[2]], [payloads[0], payloads[2]])
    assert store.lookup(ns, hashes) == 1
    assert store.exists(ns, hashes) == [True, False, True]
    bufs = [np.zeros(ns.block_bytes, np.uint8) for _ in hashes]
    assert store.get_into(ns, hashes, bufs) == [ns.block_bytes, None, ns.block_bytes]
    assert not bufs[1].any()
    assert store.delete(ns, hashes) == 2
    assert store.exists(ns, hashes) == [False] * 3


def test_bad_input_raises_value_error_and_changes_nothing(store, ns):
    hashes, payloads = blocks(ns, 2, seed=2)
    with pytest.raises(ValueError, match="bytes of payload"):
        store.put(ns, hashes, [payloads[0], payloads[1][:-2]])
    assert store.exists(ns, hashes) == [False, False]
    store.put(ns, hashes, payloads)
    small = bytearray(ns.block_bytes - 1)
    big = bytearray(ns.block_bytes)
    with pytest.raises(ValueError, match="buffer 1 holds"):
        store.get_into(ns, hashes, [big, small])
    assert big == bytearray(ns.block_bytes), "no buffer is written when one is too small"
    with pytest.raises(ValueError, match="writable"):
        store.get_into(ns, hashes[:1], [bytes(ns.block_bytes)])
    with pytest.raises(ValueError):
        store.get_into(ns, hashes, [big])
    with pytest.raises(ValueError, match="32 bytes"):
        store.exists(ns, [b"short"])


def test_foreign_namespace_stores_partial_chunks(store, label):
    ns = kvshelf.Namespace(label=label, model_id="m", kv_dtype="bf16", num_layers=2,
                           num_kv_heads=1, head_dim=4, block_size=8, hash_scheme="lmcache")
    assert ns.hash_scheme == "lmcache"
    key = kvshelf.lmcache_key_hash("m@00000000@0@" + "ab" * 32)
    partial = np.arange(ns.block_bytes // 2, dtype=np.uint8)
    assert store.put(ns, [key], [partial]) == ["stored"]
    out = np.zeros(ns.block_bytes, np.uint8)
    assert store.get_into(ns, [key], [out]) == [partial.size]
    assert (out[: partial.size] == partial).all() and not out[partial.size:].any()
    with pytest.raises(ValueError):
        store.put(ns, [key], [np.zeros(ns.block_bytes + 1, np.uint8)])


def test_redis_down_raises_kvshelf_error_with_a_code(own_redis, ns):
    s = kvshelf.Store(own_redis.url, response_timeout=1, connection_timeout=0.5)
    hashes, payloads = blocks(ns, 1, seed=3)
    s.put(ns, hashes, payloads)
    own_redis.stop()
    with pytest.raises(kvshelf.KvshelfError) as e:
        s.get(ns, hashes)
    assert e.value.code in ("backend_unavailable", "backend_timeout")
    own_redis.start()
    assert s.get(ns, hashes) == [None]  # a fresh Redis: reconnected, empty
    s.put(ns, hashes, payloads)
    assert s.get(ns, hashes) == [payloads[0].tobytes()]


def test_reads_release_the_gil(store, ns):
    """Python threads keep running while a store call waits on Redis: a counter thread
    advances during many big reads."""
    hashes, payloads = blocks(ns, 8, seed=4)
    store.put(ns, hashes, payloads)
    bufs = [np.empty(ns.block_bytes, np.uint8) for _ in hashes]
    stop, ticks = threading.Event(), [0]

    def count():
        while not stop.is_set():
            ticks[0] += 1

    t = threading.Thread(target=count)
    t.start()
    try:
        before = ticks[0]
        for _ in range(200):
            store.get_into(ns, hashes, bufs)
        assert ticks[0] > before
    finally:
        stop.set()
        t.join()


def test_async_store(redis, ns):
    async def main():
        s = kvshelf.AsyncStore(redis.url)
        hashes, payloads = blocks(ns, 2, seed=5)
        assert await s.put(ns, hashes, payloads) == ["stored", "stored"]
        bufs = [bytearray(ns.block_bytes) for _ in hashes]
        got = await asyncio.gather(s.get_into(ns, hashes[:1], bufs[:1]),
                                   s.get_into(ns, hashes[1:], bufs[1:]))
        assert got == [[ns.block_bytes], [ns.block_bytes]]
        assert [bytes(b) for b in bufs] == [p.tobytes() for p in payloads]
        assert await s.lookup(ns, hashes) == 2

    asyncio.run(main())
