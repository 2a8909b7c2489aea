"""The sidecar backend (``"backend": "sidecar"``): the same pages through the node's
kvshelf sidecar (the binary built from this repository, in front of a real Redis), with
SGLang's real host pools. Through the sidecar a page is one value, its regions joined, in a
kvshelf-v1 namespace whose block is exactly one page (docs/sglang.md)."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import SidecarProcess, sigstop
from sglang_env import (guard, DIM, HEADS, LAYERS, PAGE, extra_config, fill_byte,  # noqa: F401
                        fill_random, make_backend, make_pool, page_keys, pages,
                        two_instances)

TIMEOUT = 0.5
SLACK = 1.5


class Sidecar(SidecarProcess):
    """`kvshelf serve` with one namespace whose block is one joined page of the tests'
    page_first MHA pool: K then V, each [token, layer, head, dim] (order `ktlhd`)."""

    def __init__(self, redis_url: str, label: str) -> None:
        super().__init__(f"""
[store]
url = "{redis_url}"

[[namespaces]]
label = "{label}"
model_id = "kvshelf/test-llama"
kv_dtype = "bfloat16"
block_size = {PAGE}
layout = {{ num_layers = {LAYERS}, num_kv_heads = {HEADS}, head_dim = {DIM}, order = "ktlhd" }}
""", prefix="kvshelf-sglang-sidecar-")


@pytest.fixture()
def sidecar(redis, label):
    s = Sidecar(redis.url, label)
    yield s
    s.stop()


def sidecar_config(url: str, label: str) -> dict:
    extra = extra_config("unused", label, backend="sidecar", sidecar_url=url, timeout=TIMEOUT)
    extra.pop("url")
    return extra


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_pages_round_trip_through_the_sidecar(sidecar, label, protocol):
    extra = dict(sidecar_config(sidecar.url, label), protocol=protocol)
    src, dst, w, r, keys, at = two_instances(extra, 5, seed=40)
    assert r.batch_exists(keys) == 0
    assert w.batch_set_v1(keys[:3], at[:3 * PAGE]) == [True] * 3
    assert r.batch_exists(keys) == 3
    into = dst.alloc(5 * PAGE)
    assert r.batch_get_v1(keys, into) == [True, True, True, False, False]
    assert pages(dst, into)[:3] == pages(src, at)[:3]
    assert w.batch_set_v1(keys, at) == [True] * 5
    assert r.batch_get_v1(keys, into) == [True] * 5
    assert pages(dst, into) == pages(src, at)


def test_a_stopped_sidecar_gives_false_within_the_deadline(redis, label):
    s = Sidecar(redis.url, label)
    src, dst, w, r, keys, at = two_instances(sidecar_config(s.url, label), 3, seed=41)
    assert w.batch_set_v1(keys, at) == [True] * 3
    s.stop()
    into = dst.alloc(3 * PAGE)
    results = []

    def calls():
        for f, args in ((r.batch_exists, (keys,)), (r.batch_get_v1, (keys, into)),
                        (w.batch_set_v1, (keys, at))):
            t0 = time.monotonic()
            results.append((f(*args), time.monotonic() - t0))

    t = threading.Thread(target=calls)
    t.start()
    t.join(3 * (TIMEOUT + SLACK) + 5)
    assert not t.is_alive()
    assert [o for o, _ in results] == [0, [False] * 3, [False] * 3]
    assert all(took < TIMEOUT + SLACK for _, took in results), results


def test_redis_sigstopped_behind_the_sidecar_gives_false_within_the_deadline(own_redis, label):
    """Redis hung behind the sidecar: every call answers within the backend's deadline —
    False (0) or a hit the sidecar serves from its L1, never wrong bytes — and hits resume
    once Redis runs again."""
    import signal

    s = Sidecar(own_redis.url, label)
    try:
        src, dst, w, r, keys, at = two_instances(sidecar_config(s.url, label), 3, seed=42)
        assert w.batch_set_v1(keys, at) == [True] * 3
        into = dst.alloc(3 * PAGE)
        fill_byte(dst, into, 0x11)
        sigstop(own_redis.proc)
        try:
            # The sidecar may still answer from its in-memory L1 (a hit, the right bytes);
            # what it cannot serve is False, all within the backend's deadline.
            t0 = time.monotonic()
            assert r.batch_exists(keys) in (0, 3)
            got = r.batch_get_v1(keys, into)
            assert got in ([False] * 3, [True] * 3)
            assert w.batch_set_v1(page_keys(3, seed=43), at) == [False] * 3
            assert time.monotonic() - t0 < 3 * (TIMEOUT + SLACK)
            if got == [True] * 3:
                assert pages(dst, into) == pages(src, at)
            else:
                assert pages(dst, into) == [b"\x11" * len(p) for p in pages(dst, into)]
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 15
        while r.batch_get_v1(keys, into) != [True] * 3:
            assert time.monotonic() < deadline, "hits did not resume"
            time.sleep(0.1)
        assert pages(dst, into) == pages(src, at)
    finally:
        s.stop()
