"""In-process LMCache with `remote_storage_plugins: [kvshelf]`: LMCache's own
CreateStorageBackends builds a RemoteBackend around kvshelf's RemoteConnector; KV_2LTD
bf16 chunks round-trip byte-exactly, partial chunks included, within one process and
between two processes sharing one Redis."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch


from lmcache_instance import CHUNK, Instance  # noqa: E402

import kvshelf  # noqa: E402


def as_bytes(obj) -> torch.Tensor:
    return obj.tensor.contiguous().view(torch.uint8).flatten()


@pytest.fixture()
def instance(redis, label):
    inst = Instance(redis.url, label)
    yield inst
    inst.close()


def test_the_plugin_is_loaded_by_module_path(instance):
    from kvshelf.lmcache_connector import KvshelfConnector

    # LMCache wraps every connector in its InstrumentedRemoteConnector.
    conn = instance.remote.connection
    assert isinstance(getattr(conn, "_connector", conn), KvshelfConnector)


def test_full_and_partial_kv_2ltd_bf16_chunks_round_trip(instance, redis, label):
    full, partial = instance.chunk(1), instance.chunk(2, tokens=CHUNK // 2 + 3)
    k_full, k_partial, k_absent = instance.key(101), instance.key(102), instance.key(103)
    assert not instance.remote.contains(k_full)
    instance.put(k_full, full)
    instance.put(k_partial, partial)
    assert instance.remote.contains(k_full) and instance.remote.contains(k_partial)
    assert not instance.remote.contains(k_absent)

    got = instance.remote.get_blocking(k_full)
    assert got is not None and got.tensor.dtype == torch.bfloat16
    assert torch.equal(as_bytes(got), as_bytes(full))
    got_p = instance.remote.get_blocking(k_partial)
    assert got_p is not None
    assert got_p.get_shape() == partial.get_shape()
    assert torch.equal(as_bytes(got_p), as_bytes(partial))
    assert instance.remote.get_blocking(k_absent) is None

    # Stored under kvshelf's schema, keyed by LMCache's whole key; header readable.
    key = kvshelf.block_key(label, kvshelf.lmcache_key_hash(k_partial.to_string()))
    head = redis.cli("GETRANGE", key, "0", "511").decode("utf-8", "replace")
    assert f'"payload_len":{partial.get_size()}' in head and '"hash_scheme":"lmcache"' in head
    for o in (full, partial, got, got_p):
        o.ref_count_down()


def test_redis_down_is_a_miss_not_an_exception(own_redis, label):
    inst = Instance(own_redis.url, label, response_timeout=1, connection_timeout=0.5)
    try:
        obj = inst.chunk(3)
        inst.put(inst.key(7), obj)
        own_redis.stop()
        assert inst.remote.contains(inst.key(7)) is False
        assert inst.remote.get_blocking(inst.key(7)) is None
        inst.put(inst.key(8), obj)  # dropped, logged, no exception
        own_redis.start()
        inst.put(inst.key(7), obj)
        got = inst.remote.get_blocking(inst.key(7))
        assert got is not None and torch.equal(as_bytes(got), as_bytes(obj))
        got.ref_count_down()
        obj.ref_count_down()
    finally:
        inst.close()


def test_two_processes_share_chunks_through_one_redis(instance, redis, label):
    script = Path(__file__).with_name("lmcache_instance.py")
    seed, n = 5000, 3
    out = subprocess.run([sys.executable, str(script), redis.url, label, str(seed), str(n)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"stored {n}" in out.stdout
    for i in range(n):
        want = instance.chunk(seed + i)  # the same seeded bytes, made here
        got = instance.remote.get_blocking(instance.key(seed + i))
        assert got is not None, f"chunk {i} written by the other process is not found"
        assert torch.equal(as_bytes(got), as_bytes(want))
        got.ref_count_down()
        want.ref_count_down()
