#!/usr/bin/env python3
"""Issue 11's targets in one run: kvshelf's library and sidecar against LMCache 0.5.6's own
`resp://` connector and redis-benchmark, on one Redis, in interleaved rounds.

Run through benches/lmcache_compare.sh, which prepares the LMCache venv and the release
binary. Each round, for each chunk size, runs these steps (their order rotated from round to
round, Redis flushed after each, so a noisy minute cannot favour one side and every put
writes new keys), each path making `requests` calls of 8 chunks: --bytes / (8 × chunk
size), rounded up (at 4 callers at least 8, 2 per caller):

- LMCache: `RESPConnector` (what LMCache builds for `remote_url: resp://host:port`: its C++
  RESP client with its default 8 worker threads), created by LMCache's `CreateConnector` on
  CPU and called from one thread through the asyncio loop it runs on, as LMCache's remote
  backend does. `batched_put` of 8 chunks under new keys, `requests` times (then Redis must
  hold them all: the connector only logs a failed put); then the same 8 chunks are stored
  once, read once untimed (bytes checked) and `batched_get` reads them `requests` times
  (LMCache allocates each result from its LocalCPUBackend, as it would in use).
- `kvshelf bench` at 1 caller (library fetch `RedisStore::get`, library put of new blocks,
  the in-process sidecar over HTTP and gRPC with L1 off) and at 4 callers (library, HTTP,
  gRPC): the same 8 blocks read over and over at 1 caller, like the LMCache get.
- 2 MiB only: `redis-benchmark -t set,get -c 1 -P 8 -r 8 -n <8 × requests>` of the same
  value size (at 32 MiB redis-benchmark gives up on pipelines of 8; no target uses it).

Prints one table of medians (GB/s, 10^9 bytes of payload per second) and each target's
ratio of medians with the range of the same-round ratios, met or missed.

With `--before-bin OLD`, the two `kvshelf bench` steps also run with an older build's binary
(e.g. `git worktree add /tmp/old <commit>; cargo build --release` there), as two more steps
of the same rotation, and a last table gives this build / the older one per path: whether a
change made anything slower, measured side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse

import torch
from lmcache.utils import CacheEngineKey
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.storage_backend.connector import CreateConnector
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

from lmcache_common import BATCH, DIM, HEADS, LAYERS, TOKENS, fill_random, flushall, start_redis

SIZE_BYTES = {name: 2 * LAYERS * tokens * HEADS * DIM * 2 for name, tokens in TOKENS.items()}

# (name, numerator row, denominator row, at least): the targets, rows as in `rows`.
TARGETS = [
    ("library fetch 2MiB ≥ 1.0× redis-benchmark GET", ("2MiB", 1, "library"),
     ("2MiB", 1, "redis-benchmark GET"), 1.0),
    ("library fetch 2MiB ≥ 1.2× LMCache batched get", ("2MiB", 1, "library"),
     ("2MiB", 1, "LMCache get"), 1.2),
    ("library fetch 32MiB ≥ 1.2× LMCache batched get", ("32MiB", 1, "library"),
     ("32MiB", 1, "LMCache get"), 1.2),
    # Like for like with LMCache's client, which reads into buffers its caller preallocated.
    ("library read_into 2MiB ≥ 1.2× LMCache batched get", ("2MiB", 1, "library-into"),
     ("2MiB", 1, "LMCache get"), 1.2),
    ("library read_into 32MiB ≥ 1.2× LMCache batched get", ("32MiB", 1, "library-into"),
     ("32MiB", 1, "LMCache get"), 1.2),
    ("library put (new) 2MiB ≥ 1.0× LMCache batched put (new)", ("2MiB", 1, "put"),
     ("2MiB", 1, "LMCache put"), 1.0),
] + [
    (f"sidecar {proto} {size} {c} caller{'s' if c > 1 else ''} ≥ 0.8× library",
     (size, c, proto), (size, c, "library"), 0.8)
    for size in TOKENS for c in (1, 4) for proto in ("http", "grpc")
]


class LMCacheResp:
    """LMCache's `resp://` connector for one chunk size, with 8 source chunks of random bytes."""

    def __init__(self, host: str, port: int, tokens: int):
        self.host, self.port = host, port
        url = f"resp://{host}:{port}"
        chunk_bytes = 2 * LAYERS * tokens * HEADS * DIM * 2
        # Room for the 8 source chunks and the 8 chunks each get allocates, with slack.
        cpu_gb = 4 * BATCH * chunk_bytes / 2**30
        self.config = LMCacheEngineConfig.from_defaults(
            chunk_size=tokens, local_cpu=False, max_local_cpu_size=cpu_gb, remote_url=url,
            remote_serde="naive", save_unfull_chunk=False,
            # RESPConnector requires chunks without a metadata prefix.
            extra_config={"save_chunk_meta": False})
        self.metadata = LMCacheMetadata(
            model_name="bench", world_size=1, local_world_size=1, worker_id=0,
            local_worker_id=0, kv_dtype=torch.bfloat16, kv_shape=(LAYERS, 2, tokens, HEADS, DIM),
            chunk_size=tokens)
        self.cpu = LocalCPUBackend(self.config, self.metadata)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.conn = CreateConnector(url, self.loop, self.cpu, self.config, self.metadata)
        self.src = [self._alloc() for _ in range(BATCH)]
        for o in self.src:
            fill_random(o.tensor)
        self.chunk_bytes = self.src[0].get_size()
        assert self.chunk_bytes == chunk_bytes, (self.chunk_bytes, chunk_bytes)

    def _alloc(self):
        obj = self.cpu.allocate(self.metadata.get_shapes(), self.metadata.get_dtypes(), None)
        assert obj is not None, "LMCache's CPU allocator is full"
        return obj

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def _put(self, keys: list[CacheEngineKey]) -> None:
        # The connector drops one reference to each chunk it stored (it owns what it is
        # given); LMCache's remote backend takes one first, and so does this.
        for o in self.src:
            o.ref_count_up()
        self._run(self.conn.batched_put(keys, self.src))

    def close(self) -> None:
        # What RESPConnector.close() means to do; in 0.5.6 it awaits the executor's
        # synchronous shutdown() (a TypeError, after a deadlock when run on its own loop).
        inner = self.conn.getWrappedConnector()
        self._run(inner.pq_executor.shutdown_async(wait=True))
        inner.client.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        for o in self.src:
            o.ref_count_down()

    def _new_keys(self) -> list[CacheEngineKey]:
        return [CacheEngineKey("bench", 1, 0, int.from_bytes(os.urandom(8), "little"),
                               torch.bfloat16) for _ in range(BATCH)]

    def put_new(self, requests: int) -> float:
        """GB/s of `requests` batched puts, each of the 8 chunks under 8 new keys."""
        elapsed = 0.0
        for _ in range(requests):
            keys = self._new_keys()
            t = time.perf_counter()
            self._put(keys)
            elapsed += time.perf_counter() - t
        # The connector logs a failed put and carries on; count what Redis holds instead
        # (the step starts on an empty Redis).
        stored = int(subprocess.run(["redis-cli", "-h", self.host, "-p", str(self.port), "DBSIZE"],
                                    capture_output=True, text=True, check=True).stdout)
        assert stored == requests * BATCH, f"LMCache stored {stored} of {requests * BATCH} chunks"
        return requests * BATCH * self.chunk_bytes / elapsed / 1e9

    def get(self, requests: int) -> float:
        """GB/s of `requests` batched gets of the same 8 chunks (stored first, untimed)."""
        keys = self._new_keys()
        self._put(keys)
        # One untimed get first, as `kvshelf bench` fetches once per client before its
        # clock starts; it is the one whose bytes are checked.
        got = self._run(self.conn.batched_get(keys))
        assert all(g is not None and torch.equal(g.tensor.view(torch.uint8),
                                                 s.tensor.view(torch.uint8))
                   for g, s in zip(got, self.src, strict=True)), "LMCache read wrong bytes"
        for g in got:
            g.ref_count_down()
        elapsed = 0.0
        for _ in range(requests):
            t = time.perf_counter()
            got = self._run(self.conn.batched_get(keys))
            elapsed += time.perf_counter() - t
            assert all(g is not None for g in got), "LMCache missed a chunk"
            for g in got:
                g.ref_count_down()
        return requests * BATCH * self.chunk_bytes / elapsed / 1e9


def kvshelf_bench(binary: str, url: str, size: str, callers: int, requests: int,
                  paths: list[str]) -> dict[str, float]:
    """`kvshelf bench` for one round of `paths` (in that order): GB/s per path."""
    cmd = [binary, "--redis", url, "bench", "--size", size, "--batch", str(BATCH),
           "--concurrency", str(callers), "--requests", str(requests), "--rounds", "1",
           "--paths", ",".join(paths), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True,
                         env={**os.environ, "RUST_LOG": "warn"})
    if out.returncode != 0:
        sys.exit(f"lmcache_compare: {' '.join(cmd)} failed:\n{out.stderr}")
    return {p["path"]: p["gbps"] for p in json.loads(out.stdout)["paths"]}


def redis_benchmark(host: str, port: int, size: str, requests: int) -> dict[str, float]:
    """redis-benchmark SET then GET of the value size, 1 client, pipelines of 8 over 8 keys."""
    cmd = ["redis-benchmark", "-h", host, "-p", str(port), "-t", "set,get", "--csv",
           "-d", str(SIZE_BYTES[size]), "-n", str(requests * BATCH), "-c", "1",
           "-P", str(BATCH), "-r", str(BATCH)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    res = {}
    for line in out.stdout.splitlines():
        cols = [c.strip('"') for c in line.split(",")]
        if cols[0] in ("SET", "GET"):
            res[f"redis-benchmark {cols[0]}"] = float(cols[1]) * SIZE_BYTES[size] / 1e9
    if out.returncode != 0 or len(res) != 2:
        sys.exit(f"lmcache_compare: {' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    return res


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def machine(host: str, port: int) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    info = subprocess.run(["redis-cli", "-h", host, "-p", str(port), "INFO", "server"],
                          capture_output=True, text=True).stdout
    version = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                    if line.startswith("redis_version:")), "?")
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip() or "?"
    return f"{os.cpu_count()} CPU {cpu}, Redis {version}, kvshelf {commit}"


def main() -> None:
    summary, method = __doc__.split("\n\n", 1)
    ap = argparse.ArgumentParser(description=summary, epilog=method,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/kvshelf", help="the kvshelf binary")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--bytes", type=int, default=1 << 30,
                    help="payload bytes each path moves per round (default 1 GiB)")
    ap.add_argument("--sizes", default="2MiB,32MiB", help="of 2MiB, 32MiB")
    ap.add_argument("--redis", metavar="URL",
                    help="redis://host:port to use instead of starting a redis-server; it is "
                         "FLUSHALLed after every step, so give it a throwaway server")
    ap.add_argument("--json", metavar="FILE", help="also write every round's figures here")
    ap.add_argument("--before-bin", metavar="PATH",
                    help="an older build's kvshelf binary, measured in the same rounds")
    args = ap.parse_args()
    sizes = [s for s in args.sizes.replace(",", " ").split()]
    for s in sizes:
        if s not in TOKENS:
            ap.error(f"unknown size {s} (2MiB or 32MiB)")

    proc = None
    if args.redis:
        u = urlparse(args.redis)
        if u.scheme != "redis" or not u.port or u.password or u.path not in ("", "/"):
            ap.error("--redis must look like redis://host:port")
        host, port = u.hostname, u.port
    else:
        # Room for the largest step (4 callers × 8 × 32 MiB read, 1 GiB written) and slack.
        proc, port = start_redis("8gb")
        host = "127.0.0.1"
    url = f"redis://{host}:{port}"
    try:
        run(args, sizes, host, port, url)
    finally:
        if proc:
            proc.kill()
            proc.wait()


def run(args, sizes: list[str], host: str, port: int, url: str) -> None:
    load_start = loadavg()
    print(f"lmcache_compare: {machine(host, port)}", file=sys.stderr)
    flushall(host, port)
    lmc = {s: LMCacheResp(host, port, TOKENS[s]) for s in sizes}
    # rows[(size, callers, path)] = GB/s per round
    rows: dict[tuple[str, int, str], list[float]] = {}

    def record(size: str, callers: int, got: dict[str, float]) -> None:
        for path, gbps in got.items():
            rows.setdefault((size, callers, path), []).append(gbps)

    started = time.monotonic()
    for rnd in range(args.rounds):
        for size in sizes:
            requests = math.ceil(args.bytes / (SIZE_BYTES[size] * BATCH))
            one = ["library", "library-into", "put", "http", "grpc"]
            four = ["library", "http", "grpc"]
            steps = [
                ("LMCache", lambda: record(size, 1, {
                    "LMCache put": lmc[size].put_new(requests),
                    "LMCache get": lmc[size].get(requests)})),
                ("kvshelf, 1 caller", lambda: record(size, 1, kvshelf_bench(
                    args.bin, url, size, 1, requests, one[rnd % 5:] + one[:rnd % 5]))),
                ("kvshelf, 4 callers", lambda: record(size, 4, kvshelf_bench(
                    args.bin, url, size, 4, max(requests, 8), four[rnd % 3:] + four[:rnd % 3]))),
            ]
            if args.before_bin:
                def before(callers: int, reqs: int, paths: list[str], size=size) -> None:
                    got = kvshelf_bench(args.before_bin, url, size, callers, reqs, paths)
                    record(size, callers, {f"{p}@before": v for p, v in got.items()})
                steps += [
                    ("kvshelf before, 1 caller", lambda: before(
                        1, requests, one[rnd % 5:] + one[:rnd % 5])),
                    ("kvshelf before, 4 callers", lambda: before(
                        4, max(requests, 8), four[rnd % 3:] + four[:rnd % 3])),
                ]
            if size == "2MiB":
                steps.append(("redis-benchmark", lambda: record(
                    size, 1, redis_benchmark(host, port, size, requests))))
            k = rnd % len(steps)
            for name, step in steps[k:] + steps[:k]:
                print(f"lmcache_compare: round {rnd + 1}/{args.rounds} {size}: {name} "
                      f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
                step()
                flushall(host, port)
    load_end = loadavg()
    for c in lmc.values():
        c.close()

    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"{machine(host, port)}; load average (1, 5, 15 min) {load_start} at the start, "
          f"{load_end} at the end")
    print(f"{args.rounds} interleaved rounds, {BATCH} blocks per call, "
          f"{args.bytes / 2**30:g} GiB per path and round; medians, GB/s")
    print()
    print("| chunk | callers | path | GB/s | rounds min–max |")
    print("|---|---:|---|---:|---:|")
    order = ["redis-benchmark GET", "redis-benchmark SET", "LMCache get", "LMCache put",
             "library", "library-into", "put", "http", "grpc"]
    label = {"LMCache get": "LMCache `resp://` batched get",
             "LMCache put": "LMCache `resp://` batched put, new keys",
             "library": "library fetch", "library-into": "library read_into (caller buffers)",
             "put": "library put, new blocks",
             "http": "sidecar HTTP, L1 off", "grpc": "sidecar gRPC, L1 off"}
    order += [f"{p}@before" for p in order]
    for key in sorted(rows, key=lambda k: (sizes.index(k[0]), k[1], order.index(k[2]))):
        v = rows[key]
        print(f"| {key[0]} | {key[1]} | {label.get(key[2], key[2])} | {med[key]:.2f} | "
              f"{min(v):.2f}–{max(v):.2f} |")
    print()
    print("| target | ratio of medians | same-round ratios | |")
    print("|---|---:|---:|---|")
    verdicts = []
    for name, num, den, least in TARGETS:
        if num not in rows or den not in rows:
            continue
        ratio = med[num] / med[den]
        per_round = [a / b for a, b in zip(rows[num], rows[den], strict=True)]
        met = ratio >= least
        verdicts.append({"target": name, "ratio": ratio, "rounds": per_round, "met": met})
        print(f"| {name} | {ratio:.2f}× | {min(per_round):.2f}–{max(per_round):.2f}× | "
              f"{'met' if met else '**missed**'} |")
    if args.before_bin:
        print()
        print(f"This build / the older one (`{args.before_bin}`), same rounds:")
        print()
        print("| chunk | callers | path | ratio of medians | same-round ratios |")
        print("|---|---:|---|---:|---:|")
        for key in sorted(rows, key=lambda k: (sizes.index(k[0]), k[1], order.index(k[2]))):
            old = (key[0], key[1], f"{key[2]}@before")
            if old not in rows:
                continue
            per_round = [a / b for a, b in zip(rows[key], rows[old], strict=True)]
            print(f"| {key[0]} | {key[1]} | {label.get(key[2], key[2])} | "
                  f"{med[key] / med[old]:.2f}× | {min(per_round):.2f}–{max(per_round):.2f}× |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(host, port), "loadavg_start": load_start,
                       "loadavg_end": load_end, "rounds": args.rounds, "bytes": args.bytes,
                       "rows": [{"size": k[0], "callers": k[1], "path": k[2], "gbps": v,
                                 "median": med[k]} for k, v in rows.items()],
                       "targets": verdicts}, f, indent=2)


if __name__ == "__main__":
    main()
