#!/usr/bin/env python3
"""Issue 20's targets: kvshelf's vLLM tier (``kvshelf.vllm.KvshelfTier``) in vLLM's tier
harness against the library's own ``Store.put`` / ``Store.get_into`` on the same Redis, in
the same run.

The tier is built from vLLM's real ``TieringOffloadingSpec``; the CPU tier's memory is a
torch CPU tensor viewed as vLLM views it. A round stores a job of chunks through the
tier (one ``submit_store`` job, polled with ``get_finished_jobs`` as vLLM polls it), loads
them back (one ``submit_load``) and checks the bytes, then does the same with the library
(one ``put``, one ``get_into`` over the same chunks' memory, in the tier's own namespace).
A job is 8 chunks of 2 MiB, or ``--mib`` / 64 chunks of 32 MiB (default 4). Rounds
alternate tier and library; the table shows medians in GB/s and the tier/library ratio
(target: >= 0.9). Then ``--lookups`` lookups of 256 keys each: the tier's
batched per-step lookup (256 ``lookup`` calls, the step's end, the answers), and the
library's ``Store.exists`` of the same 256 keys; p50 and p99 in ms (target: one round
trip, p99 <= 1 ms on a quiet machine).

    ~/.cache/kvshelf/vllm-venv/bin/python benches/vllm_tier.py            # own redis-server
    ~/.cache/kvshelf/vllm-venv/bin/python benches/vllm_tier.py --redis redis://127.0.0.1:6390

Run it in the venv of ``python/vllm-venv.sh`` with the kvshelf wheel installed. Without
``--redis`` it starts its own ``redis-server`` on a free port (FLUSHALLed between steps).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python", "tests", "vllm"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python", "tests"))

import torch  # noqa: E402
from vllm.v1.kv_offload.base import LookupResult, ReqContext, ScheduleEndContext  # noqa: E402
from vllm.v1.kv_offload.base import make_offload_key  # noqa: E402
from vllm.v1.kv_offload.tiering.base import TransferJob  # noqa: E402
from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec  # noqa: E402

import kvshelf  # noqa: E402
from kvshelf.vllm import KvshelfTier  # noqa: E402
from vllm_support import offloading_config  # noqa: E402

MiB = 1 << 20


def start_redis() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", tempfile.mkdtemp()],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}"
    store = kvshelf.Store(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            store.ping()
            return proc, url
        except kvshelf.KvshelfError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def flushall(url: str) -> None:
    port = url.rsplit(":", 1)[1]
    subprocess.run([shutil.which("redis-cli") or "redis-cli", "-p", port, "FLUSHALL"],
                   check=True, capture_output=True)


class Bench:
    def __init__(self, url: str, chunk: int, chunks: int) -> None:
        self.url, self.chunk, self.n = url, chunk, chunks
        self.label = f"bench-{uuid.uuid4().hex[:8]}"
        spec = TieringOffloadingSpec(offloading_config(chunk_bytes=chunk))
        # Source chunks [0, n) and destination chunks [n, 2n).
        self.kv = torch.randint(-128, 128, (2 * chunks, chunk), dtype=torch.int8)
        self.view = memoryview(self.kv.numpy())
        self.tier = KvshelfTier(spec, self.view, "KvshelfTier", url=url, namespace=self.label,
                                timeout=60.0)
        self.flat = self.view.cast("B")
        self.lib = kvshelf.Store(url)
        self.lib_ns = self.tier.namespace
        self.next_job = 1

    def keys(self, n: int):
        return [make_offload_key(hashlib.sha256(uuid.uuid4().bytes).digest(), 0)
                for _ in range(n)]

    def _job(self, keys, chunk_ids, promotion):
        j = TransferJob(self.next_job, keys, torch.tensor(chunk_ids).numpy(), promotion,
                        ReqContext("bench"))
        self.next_job += 1
        return j

    def _finish(self, job_id: int) -> None:
        while True:
            for r in self.tier.get_finished_jobs():
                assert r.job_id == job_id and r.success, r
                return
            time.sleep(0.0001)

    def tier_round(self) -> tuple[float, float]:
        keys = self.keys(self.n)
        t0 = time.perf_counter()
        j = self._job(keys, list(range(self.n)), False)
        self.tier.submit_store(j)
        self._finish(j.job_id)
        t1 = time.perf_counter()
        j = self._job(keys, list(range(self.n, 2 * self.n)), True)
        self.tier.submit_load(j)
        self._finish(j.job_id)
        t2 = time.perf_counter()
        assert torch.equal(self.kv[: self.n], self.kv[self.n:])
        self.kv[self.n:].zero_()
        total = self.n * self.chunk
        return total / (t1 - t0) / 1e9, total / (t2 - t1) / 1e9

    def lib_round(self) -> tuple[float, float]:
        hashes = [hashlib.sha256(uuid.uuid4().bytes).digest() for _ in range(self.n)]
        src = [self.flat[i * self.chunk:(i + 1) * self.chunk] for i in range(self.n)]
        dst = [self.flat[(self.n + i) * self.chunk:(self.n + i + 1) * self.chunk]
               for i in range(self.n)]
        t0 = time.perf_counter()
        assert self.lib.put(self.lib_ns, hashes, src) == ["stored"] * self.n
        t1 = time.perf_counter()
        assert self.lib.get_into(self.lib_ns, hashes, dst) == [self.chunk] * self.n
        t2 = time.perf_counter()
        assert torch.equal(self.kv[: self.n], self.kv[self.n:])
        self.kv[self.n:].zero_()
        total = self.n * self.chunk
        return total / (t1 - t0) / 1e9, total / (t2 - t1) / 1e9

    def lookups(self, rounds: int) -> tuple[list[float], list[float]]:
        keys = self.keys(256)
        j = self._job(keys[:128], [0] * 128, False)  # half of them on the shelf
        self.tier.submit_store(j)
        self._finish(j.job_id)
        hashes = [kvshelf.vllm_key_hash(self.tier.identity, bytes(k)) for k in keys]
        tier_ms, lib_ms = [], []
        for r in range(rounds):
            ctx = ReqContext(f"lookup-{r}")
            self.tier.on_new_request(ctx)
            t0 = time.perf_counter()
            first = [self.tier.lookup(k, ctx) for k in keys]
            self.tier.on_schedule_end(ScheduleEndContext((), ()))
            while True:
                got = [self.tier.lookup(k, ctx) for k in keys]
                if LookupResult.RETRY not in got:
                    break
                time.sleep(0.00005)
            tier_ms.append((time.perf_counter() - t0) * 1e3)
            assert set(first) == {LookupResult.RETRY}
            assert got == [LookupResult.HIT] * 128 + [LookupResult.MISS] * 128
            self.tier.on_request_finished(ctx)
            t0 = time.perf_counter()
            found = self.lib.exists(self.lib_ns, hashes)
            lib_ms.append((time.perf_counter() - t0) * 1e3)
            assert found == [True] * 128 + [False] * 128
        return tier_ms, lib_ms

    def close(self) -> None:
        self.tier.shutdown()


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--redis", help="a Redis to use (FLUSHALLed!); default: start one")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--lookups", type=int, default=200)
    ap.add_argument("--mib", type=int, default=256,
                    help="MiB of 32 MiB chunks per round, stored and loaded (a job is half)")
    args = ap.parse_args()
    proc, url = (None, args.redis) if args.redis else start_redis()
    try:
        print(f"vLLM tier vs library, {args.rounds} interleaved rounds, medians; "
              f"load average {os.getloadavg()[0]:.2f}")
        print("| chunk | chunks/job | tier store | library put | ratio | tier load | "
              "library get_into | ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for chunk_mib in (2, 32):
            chunk = chunk_mib * MiB
            n = max(1, args.mib // chunk_mib // 2) if chunk_mib == 32 else 8
            b = Bench(url, chunk, n)
            ts, tl, ls, ll = [], [], [], []
            for _ in range(args.rounds):
                flushall(url)
                s, lo = b.tier_round()
                ts.append(s)
                tl.append(lo)
                flushall(url)
                s, lo = b.lib_round()
                ls.append(s)
                ll.append(lo)
            m = statistics.median
            print(f"| {chunk_mib} MiB | {n} | {m(ts):.2f} GB/s | {m(ls):.2f} GB/s | "
                  f"{m(ts) / m(ls):.2f} | {m(tl):.2f} GB/s | {m(ll):.2f} GB/s | "
                  f"{m(tl) / m(ll):.2f} |")
            b.close()
        flushall(url)
        b = Bench(url, 64 * 1024, 1)
        tier_ms, lib_ms = b.lookups(args.lookups)
        b.close()
        print()
        print("| lookup of 256 keys (128 on the shelf) | p50 | p99 |")
        print("|---|---|---|")
        print(f"| tier: 256 lookups, step end, answers | {pct(tier_ms, 50):.3f} ms | "
              f"{pct(tier_ms, 99):.3f} ms |")
        print(f"| library Store.exists | {pct(lib_ms, 50):.3f} ms | {pct(lib_ms, 99):.3f} ms |")
        print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
