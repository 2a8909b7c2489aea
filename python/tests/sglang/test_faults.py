"""Fail open, never fail dead, and never touch the pool after a call returns: Redis killed,
SIGSTOPped or paused under SGLang's storage threads; and two SGLang processes sharing
pages through one Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import sigstop
from sglang_env import (guard, PAGE, extra_config, fill_byte, fill_random,  # noqa: F401
                        make_backend, make_pool, page_keys, pages, two_instances)

TIMEOUT = 0.5   # the backend's per-call deadline in these tests
SLACK = 1.5     # how much later than its deadline a call may return on a loaded 2-core VM
HERE = Path(__file__).resolve().parent


def timed(f, *args):
    t0 = time.monotonic()
    out = f(*args)
    return out, time.monotonic() - t0


class Prefetcher(threading.Thread):
    """A stand-in for SGLang's prefetch + backup threads: calls the backend in a loop and
    records every answer and how long it took; dies only if a call raises."""

    def __init__(self, backend, pool, keys, at, into):
        super().__init__(daemon=True)
        self.b, self.pool, self.keys, self.at, self.into = backend, pool, keys, at, into
        self.stop = threading.Event()
        self.log: list[tuple[str, object, float, float]] = []
        self.error: BaseException | None = None

    def run(self):
        try:
            while not self.stop.is_set():
                for name, call in (("exists", lambda: self.b.batch_exists(self.keys)),
                                   ("get", lambda: self.b.batch_get_v1(self.keys, self.into)),
                                   ("set", lambda: self.b.batch_set_v1(self.keys, self.at))):
                    t0 = time.monotonic()
                    out = call()
                    self.log.append((name, out, t0, time.monotonic() - t0))
        except BaseException as e:  # noqa: BLE001 - what the test checks for
            self.error = e

    def since(self, t: float):
        return [e for e in self.log if e[2] >= t]


def run_through_outage(own_redis, label, outage, recover):
    extra = extra_config(own_redis.url, label, timeout=TIMEOUT,
                         store_options={"connection_timeout": TIMEOUT})
    src, dst, w, r, keys, at = two_instances(extra, 4, seed=20)
    assert w.batch_set_v1(keys, at) == [True] * 4
    into = dst.alloc(4 * PAGE)
    t = Prefetcher(r, dst, keys, at, into)
    t.start()
    try:
        time.sleep(0.3)
        assert t.since(0) and all(e[1] in (4, [True] * 4) for e in t.log), t.log[:3]
        outage()
        down = time.monotonic()
        time.sleep(4 * (TIMEOUT + SLACK))
        up_at = time.monotonic()
        during = [e for e in t.since(down) if e[2] + e[3] < up_at]
        assert {n for n, _, _, _ in during} == {"exists", "get", "set"}, during
        for name, out, _, took in during:
            assert out in (0, [False] * 4), (name, out)
            assert took < TIMEOUT + SLACK, (name, took)
        assert t.is_alive() and t.error is None
        recover()
        up = time.monotonic()
        deadline = up + 15
        while time.monotonic() < deadline:
            after = t.since(up)
            if any(n == "get" and o == [True] * 4 for n, o, _, _ in after) and \
               any(n == "exists" and o == 4 for n, o, _, _ in after):
                break
            time.sleep(0.1)
    finally:
        t.stop.set()
        t.join(10)
    assert not t.is_alive() and t.error is None, t.error
    after = t.since(up)
    assert any(n == "get" and o == [True] * 4 for n, o, _, _ in after), "reads did not resume"
    assert any(n == "exists" and o == 4 for n, o, _, _ in after), "lookups did not resume"
    assert pages(dst, into) == pages(src, at)


def test_redis_killed_mid_run_gives_false_within_the_deadline_and_hits_resume(own_redis, label):
    # Redis restarts empty: the backup calls of the loop write the pages again.
    run_through_outage(own_redis, label, own_redis.stop, own_redis.start)


def test_redis_sigstopped_mid_run_gives_false_within_the_deadline_and_hits_resume(own_redis, label):
    import signal
    run_through_outage(own_redis, label, lambda: sigstop(own_redis.proc),
                       lambda: own_redis.proc.send_signal(signal.SIGCONT))


def test_pages_are_never_written_after_batch_get_v1_returns(own_redis, label):
    """Redis paused: the read gives up at its deadline; the caller then refills those
    pages with 0x11 and watches them until well after Redis answers again."""
    extra = extra_config(own_redis.url, label, timeout=TIMEOUT)
    src, dst, w, r, keys, at = two_instances(extra, 4, seed=21)
    assert w.batch_set_v1(keys, at) == [True] * 4
    into = dst.alloc(4 * PAGE)
    assert r.batch_exists(keys) == 4  # connections are up
    assert own_redis.cli("CLIENT", "PAUSE", "2000", "ALL").strip() == b"OK"
    out, took = timed(r.batch_get_v1, keys, into)
    assert out == [False] * 4 and took < TIMEOUT + SLACK
    fill_byte(dst, into, 0x11)
    want = [b"\x11" * len(p) for p in pages(dst, into)]
    end = time.monotonic() + 3.5
    while time.monotonic() < end:
        assert pages(dst, into) == want, "a page was written after batch_get_v1 returned"
        time.sleep(0.05)
    assert r.batch_get_v1(keys, into) == [True] * 4  # and the next read is right


def test_pages_are_never_read_after_batch_set_v1_returns(own_redis, label):
    """Redis paused: the write gives up at its deadline; the caller then overwrites those
    pages with 0x22. Whatever reaches Redis afterwards is the old bytes or nothing."""
    extra = extra_config(own_redis.url, label, timeout=TIMEOUT)
    src, dst, w, r, keys, at = two_instances(extra, 4, seed=22)
    original = pages(src, at)
    assert w.batch_exists(keys) == 0
    assert own_redis.cli("CLIENT", "PAUSE", "2000", "WRITE").strip() == b"OK"
    out, took = timed(w.batch_set_v1, keys, at)
    assert out == [False] * 4 and took < TIMEOUT + SLACK
    fill_byte(src, at, 0x22)
    time.sleep(2.5)  # the pause is over: anything still queued has reached Redis
    into = dst.alloc(4 * PAGE)
    got = r.batch_get_v1(keys, into)
    for i, ok in enumerate(got):
        if ok:
            assert pages(dst, into)[i] == original[i]


CHILD = r"""
import sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[1])
from sglang_env import PAGE, extra_config, fill_random, make_backend, make_pool, page_keys
url, label, mode = sys.argv[2], sys.argv[3], sys.argv[4]
pool = make_pool()
b = make_backend(pool, extra_config(url, label))
keys = page_keys(5, seed=30)
at = pool.alloc(5 * PAGE)
if mode == "write":
    fill_random(pool, at, seed=30)
    assert b.batch_set_v1(keys, at) == [True] * 5
else:
    import time
    deadline = time.monotonic() + 60
    while b.batch_exists(keys) < 5:  # the writer is another process, starting meanwhile
        assert time.monotonic() < deadline, "the writer's pages never appeared"
        time.sleep(0.1)
    assert b.batch_get_v1(keys, at) == [True] * 5
    ref = make_pool(); ref_at = ref.alloc(5 * PAGE); fill_random(ref, ref_at, seed=30)
    from sglang_env import pages
    assert pages(pool, at) == pages(ref, ref_at)
print("ok")
"""


def test_two_sglang_processes_share_pages(redis, label):
    """Two SGLang processes at once: one writes pages, the other waits until it finds them
    and reads them byte-exact; then this process reads them too."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(HERE), redis.url, label, mode],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for mode in ("read", "write")]
    try:
        outs = [p.communicate(timeout=80) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.strip().endswith("ok"), err[-2000:]
    pool, ref = make_pool(), make_pool()
    b = make_backend(pool, extra_config(redis.url, label))
    keys = page_keys(5, seed=30)
    at, ref_at = pool.alloc(5 * PAGE), ref.alloc(5 * PAGE)
    fill_random(ref, ref_at, seed=30)
    assert b.batch_get_v1(keys, at) == [True] * 5
    assert pages(pool, at) == pages(ref, ref_at)
