"""The tier's sidecar backend (``backend="sidecar"``): the same harness and the same real
scheduler, through a real ``kvshelf serve`` in front of a real Redis."""

from __future__ import annotations

import pytest
from vllm.v1.kv_offload.base import LookupResult

from instance import Instance, model_dir
from test_scheduler import prompt, tier
from vllm_support import CHUNK, Harness, Sidecar, guard, keys_of  # noqa: F401 (guard: autouse)

HIT, MISS = LookupResult.HIT, LookupResult.MISS


@pytest.fixture()
def sidecar(redis, label):
    s = Sidecar(redis.url, label)
    yield s
    s.stop()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_store_lookup_load_through_the_sidecar(sidecar, label, protocol):
    h = Harness(sidecar.url, label, backend="sidecar", protocol=protocol)
    other = Harness(sidecar.url, label, backend="sidecar", protocol=protocol)
    try:
        keys = keys_of(4)
        want = [h.fill(i, seed=20 + i) for i in range(3)]
        r = h.store(keys[:3], [0, 1, 2])
        assert (r.success, r.transfer_bytes) == (True, 3 * CHUNK)
        # Another instance on the node finds and loads them.
        assert other.lookup(keys) == [HIT, HIT, HIT, MISS]
        r = other.load(keys, [4, 5, 6, 7])
        assert r.success is False and list(r.successful_keys) == keys[:3]
        assert [other.chunk(c) for c in (4, 5, 6)] == want
        assert other.chunk(7) == bytes(CHUNK)
    finally:
        h.close()
        other.close()


def test_sidecar_down_is_a_miss_and_a_failed_job(redis, label):
    s = Sidecar(redis.url, label)
    h = Harness(s.url, label, backend="sidecar", timeout=1.0)
    try:
        keys = keys_of(1)
        h.fill(0, 30)
        s.stop()
        assert h.lookup(keys) == [MISS]
        assert h.store(keys, [0]).success is False
        assert h.load(keys, [1]).success is False
    finally:
        h.close()


def test_scheduler_instances_share_blocks_through_the_sidecar(redis, label, tmp_path):
    s = Sidecar(redis.url, label, chunk_bytes=Instance.chunk_bytes_of())
    cfg = tier(s.url, label, backend="sidecar")
    model = model_dir(tmp_path)
    a, b = Instance(model, cfg), Instance(model, cfg)
    try:
        got = a.serve(prompt(11))
        assert (got["loaded_blocks"], got["computed_blocks"]) == (0, 5)
        got = b.serve(prompt(11))
        assert (got["loaded_blocks"], got["computed_blocks"]) == (5, 0)
    finally:
        a.shutdown()
        b.shutdown()
        s.stop()


def test_sigstopped_sidecar_fails_the_load_in_time_and_never_writes_the_chunk_after(
        redis, label):
    import signal
    import time

    from conftest import sigstop

    s = Sidecar(redis.url, label)
    h = Harness(s.url, label, backend="sidecar", timeout=1.0)
    try:
        keys = keys_of(1)
        h.fill(0, 31)
        assert h.store(keys, [0]).success
        h.kv[1].fill_(0x22)
        sigstop(s.proc)
        try:
            r = h.load(keys, [1], within=5.0)
            assert r.success is False
            h.kv[1].fill_(0x11)  # vLLM reuses the chunk at once
        finally:
            s.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            assert h.chunk(1) == b"\x11" * CHUNK, "the chunk was written after the job ended"
            h.tier.get_finished_jobs()
            time.sleep(0.05)
        assert h.lookup(keys, req="resumed") == [HIT]
    finally:
        h.close()
        s.stop()
