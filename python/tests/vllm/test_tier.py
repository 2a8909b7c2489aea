"""kvshelf's vLLM secondary tier in vLLM's tier harness: the CPU tier's memory is a torch
CPU tensor viewed as vLLM views it, the spec is vLLM's real ``TieringOffloadingSpec``,
and every byte goes through a real redis-server."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import vllm
from vllm.v1.kv_offload.base import LookupResult, Medium, OffloadingEvent
from vllm.v1.kv_offload.tiering.base import SecondaryTierManager

import kvshelf
from conftest import sigstop
from kvshelf.vllm import KvshelfTier, check_vllm_version
from vllm_support import CHUNK, Harness, guard, keys_of  # noqa: F401 (guard: autouse)

HIT, MISS = LookupResult.HIT, LookupResult.MISS


@pytest.fixture()
def h(redis, label):
    harness = Harness(redis.url, label, enable_kv_events=True)
    yield harness
    harness.close()


def redis_key(h: Harness, label: str, key) -> str:
    return kvshelf.block_key(label, kvshelf.vllm_key_hash(h.tier.identity, bytes(key)))


def test_is_a_real_secondary_tier(h):
    assert isinstance(h.tier, SecondaryTierManager)
    assert h.tier.block_size_bytes == CHUNK
    assert h.tier.medium is Medium.STORAGE


def test_store_then_load_is_byte_exact_and_partial_hits_are_reported(h, redis, label):
    keys = keys_of(4)
    want = [h.fill(i, seed=i) for i in range(3)]
    r = h.store(keys[:3], [0, 1, 2])
    assert (r.success, r.transfer_bytes) == (True, 3 * CHUNK)
    # Each key is one Redis key of the documented mapping, with the namespace's TTL.
    for k in keys[:3]:
        assert redis.cli("EXISTS", redis_key(h, label, k)).strip() == b"1"
    assert 3000 < int(redis.cli("TTL", redis_key(h, label, keys[0]))) <= 3600

    # The lookup of a request's keys is one batch per step; the fourth was never stored.
    assert h.lookup(keys) == [HIT, HIT, HIT, MISS]

    # A load of all four: the three stored land byte for byte, the fourth is reported
    # missing by name (successful_keys) and its chunk is not written.
    r = h.load(keys, [4, 5, 6, 7])
    assert r.success is False
    assert list(r.successful_keys) == keys[:3]
    assert r.transfer_bytes == 3 * CHUNK
    assert [h.chunk(c) for c in (4, 5, 6)] == want
    assert h.chunk(7) == bytes(CHUNK)
    # Asked again in the same request, the missing key stays a miss (no livelock).
    assert h.lookup(keys[3:]) == [MISS]

    r = h.load(keys[:2], [6, 7])
    assert (r.success, r.successful_keys) == (True, None)
    assert [h.chunk(6), h.chunk(7)] == want[:2]

    # KV events: the stored keys, then the missing one removed, medium STORAGE.
    events = list(h.tier.take_events())
    assert all(isinstance(e, OffloadingEvent) and e.medium is Medium.STORAGE for e in events)
    assert [(e.removed, e.keys) for e in events] == [(False, keys[:3]), (True, keys[3:])]
    assert list(h.tier.take_events()) == []


def test_corrupt_or_unlinked_chunk_is_a_miss_never_wrong_bytes(h, redis, label):
    keys = keys_of(3)
    for i in range(3):
        h.fill(i, seed=10 + i)
    assert h.store(keys, [0, 1, 2]).success
    # Flip one payload byte of the first chunk (past its header) and unlink the second.
    k0 = redis_key(h, label, keys[0])
    assert int(redis.cli("STRLEN", k0)) > CHUNK  # header + payload
    redis.cli("SETRANGE", k0, str(int(redis.cli("STRLEN", k0)) - 100), "X")
    assert redis.cli("UNLINK", redis_key(h, label, keys[1])).strip() == b"1"

    r = h.load(keys, [4, 5, 6])
    assert r.success is False
    assert list(r.successful_keys) == [keys[2]]
    assert h.chunk(6) == h.chunk(2)
    # The corrupt chunk was found out and deleted: a new request sees two misses.
    assert redis.cli("EXISTS", k0).strip() == b"0"
    assert h.lookup(keys, req="r2") == [MISS, MISS, HIT]


def test_instances_share_exactly_when_their_identity_matches(redis, label):
    a = Harness(redis.url, label)
    same = Harness(redis.url, label)
    others = [Harness(redis.url, label, **kw) for kw in
              (dict(model="other/model"), dict(dtype="float16"), dict(tp_size=2), dict(rank=1))]
    try:
        keys = keys_of(2)
        want = [a.fill(0, 1), a.fill(1, 2)]
        assert a.store(keys, [0, 1]).success
        assert same.lookup(keys) == [HIT, HIT]
        assert same.load(keys, [2, 3]).success
        assert [same.chunk(2), same.chunk(3)] == want
        for o in others:
            assert o.lookup(keys) == [MISS, MISS]
    finally:
        for x in (a, same, *others):
            x.close()


def test_touch_slides_the_ttl(redis, label):
    h = Harness(redis.url, label, ttl=60)
    try:
        keys = keys_of(1)
        h.fill(0, 3)
        assert h.store(keys, [0]).success
        k = redis_key(h, label, keys[0])
        redis.cli("EXPIRE", k, "5")
        h.tier.touch(keys, h.job([], [], False).req_context)
        deadline = time.monotonic() + 10
        while int(redis.cli("TTL", k)) <= 5:
            assert time.monotonic() < deadline, "touch did not slide the TTL"
            h.tier.get_finished_jobs()
            time.sleep(0.01)
        assert 50 < int(redis.cli("TTL", k)) <= 60
    finally:
        h.close()


def test_redis_down_is_a_miss_and_a_failed_job(own_redis, label):
    h = Harness(own_redis.url, label, timeout=1.0, enable_kv_events=True)
    try:
        keys = keys_of(2)
        h.fill(0, 4)
        assert h.store(keys[:1], [0]).success
        assert [e.removed for e in h.tier.take_events()] == [False]
        own_redis.stop()
        assert h.lookup(keys) == [MISS, MISS]
        r = h.store(keys[1:], [0])
        assert (r.success, r.transfer_bytes) == (False, 0)
        r = h.load(keys[:1], [1])
        assert (r.success, r.successful_keys) == (False, None)
        # An unreachable shelf says nothing about what it holds: no BlockRemoved.
        assert list(h.tier.take_events()) == []
        own_redis.start()
        assert h.lookup(keys[:1], req="after") == [MISS]  # a restarted Redis is empty
        assert h.store(keys[1:], [0]).success
        assert h.lookup(keys[1:], req="after2") == [HIT]
    finally:
        h.close()


def test_sigstopped_redis_fails_the_job_in_time_and_the_chunk_is_never_written_after(
        own_redis, label):
    """The boundary rule: once a load's result is reported, its CPU-tier chunk is vLLM's
    again; a Redis that answers later must not write into it."""
    h = Harness(own_redis.url, label, timeout=1.0)
    try:
        keys = keys_of(1)
        h.fill(0, 5)
        assert h.store(keys, [0]).success
        h.kv[1].fill_(0x22)
        sigstop(own_redis.proc)
        try:
            t0 = time.monotonic()
            assert h.lookup(keys, req="stopped") == [MISS]
            r = h.load(keys, [1], within=5.0)
            assert r.success is False
            assert time.monotonic() - t0 < 5.0
            h.kv[1].fill_(0x11)  # vLLM reuses the chunk at once
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            assert h.chunk(1) == b"\x11" * CHUNK, "the chunk was written after the job ended"
            h.tier.get_finished_jobs()
            time.sleep(0.05)
        # Redis is back: the chunk is found again by a new request.
        assert h.lookup(keys, req="resumed") == [HIT]
    finally:
        h.close()


def test_shutdown_stops_jobs_and_later_submits_fail_without_touching_chunks(own_redis, label):
    h = Harness(own_redis.url, label, timeout=30.0)
    keys = keys_of(1)
    h.fill(0, 6)
    assert h.store(keys, [0]).success
    sigstop(own_redis.proc)
    try:
        h.kv[1].fill_(0x22)
        h.tier.submit_load(h.job(keys, [1], True))
        h.tier.shutdown()  # returns once no job can touch a chunk
        h.kv[1].fill_(0x11)
        j = h.job(keys, [2], True)
        h.tier.submit_load(j)
        assert [(r.job_id, r.success) for r in h.tier.get_finished_jobs()] == [(j.job_id, False)]
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
    time.sleep(0.5)
    assert h.chunk(1) == b"\x11" * CHUNK


def test_metrics_through_vllm_stats_hooks(h):
    keys = keys_of(2)
    h.fill(0, 7)
    assert h.store(keys[:1], [0]).success
    assert h.lookup(keys) == [HIT, MISS]
    assert not h.load(keys, [1, 2]).success
    defs = KvshelfTier.build_metric_definitions({})
    stats = h.tier.get_stats().reduce()
    assert set(defs) == {name.split(":(")[0] for name in stats}  # every metric was counted
    assert stats["kvshelf:tier_lookup_keys:('hit',)"] == 1
    assert stats["kvshelf:tier_lookup_keys:('miss',)"] == 1
    assert stats["kvshelf:tier_jobs:('store', 'ok')"] == 1
    assert stats["kvshelf:tier_jobs:('load', 'failed')"] == 1
    assert stats["kvshelf:tier_bytes:('load',)"] == CHUNK
    assert h.tier.get_stats() is None  # taken and reset


def test_unsupported_vllm_is_a_clear_error_at_startup():
    check_vllm_version(vllm.__version__)
    for bad in ("0.32.1", "0.34.0", "1.0.0"):
        with pytest.raises(RuntimeError, match=f"supports vLLM 0.33.x; this is vLLM {bad},"):
            check_vllm_version(bad)
    # vLLM's own tier factory, loading the tier by module path under another version,
    # fails there (vLLM does this while it builds its offloading spec, before serving).
    code = ("import vllm; vllm.__version__ = '0.31.0'\n"
            "from vllm.v1.kv_offload.tiering.factory import SecondaryTierFactory\n"
            "SecondaryTierFactory.get_tier_class(\n"
            "    {'type': 'KvshelfTier', 'module_path': 'kvshelf.vllm'})\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert "kvshelf.vllm supports vLLM 0.33.x; this is vLLM 0.31.0" in out.stderr


def test_a_key_whose_store_is_in_flight_is_retry_not_miss(own_redis, label):
    """While its own store runs, a key is neither on the shelf nor absent: RETRY. Once the
    store has failed (Redis hung past the timeout), the key is looked up like any other."""
    h = Harness(own_redis.url, label, timeout=1.0)
    try:
        keys = keys_of(1)
        h.fill(0, 8)
        sigstop(own_redis.proc)
        try:
            j = h.job(keys, [0], False)
            h.tier.submit_store(j)
            ctx = h.job([], [], False).req_context
            assert h.tier.lookup(keys[0], ctx) is LookupResult.RETRY
            assert h.finish(j.job_id, within=5.0).success is False
            assert h.lookup(keys, req="after") == [MISS]
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        assert h.store(keys, [0]).success
        assert h.lookup(keys, req="stored") == [HIT]
    finally:
        h.close()


def test_drain_jobs_waits_for_every_transfer_and_keeps_the_results(h):
    """vLLM's reset_cache drains the tier before it frees CPU-tier slots: when drain_jobs
    returns, nothing is in flight, and every job's result is still reported."""
    keys = keys_of(4)
    for i in range(4):
        h.fill(i, 40 + i)
    stores = [h.job(keys[:2], [0, 1], False), h.job(keys[2:], [2, 3], False)]
    for j in stores:
        h.tier.submit_store(j)
    h.tier.drain_jobs()
    assert h.tier.has_pending_work()  # finished, with results still to report
    load = h.job(keys, [4, 5, 6, 7], True)
    h.tier.submit_load(load)
    h.tier.drain_jobs()
    got = {r.job_id: r.success for r in h.tier.get_finished_jobs()}
    assert got == {stores[0].job_id: True, stores[1].job_id: True, load.job_id: True}
    assert [h.chunk(c) for c in (4, 5, 6, 7)] == [h.chunk(c) for c in (0, 1, 2, 3)]
    assert not h.tier.has_pending_work()
