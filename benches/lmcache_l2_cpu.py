#!/usr/bin/env python3
"""Where a load through LMCache's L2 adapter spends its time: wall time, this process's CPU
and Redis's CPU per GB loaded, and Redis's own cost per GET (`INFO commandstats`), for
LMCache's `resp` adapter and kvshelf's `native_plugin` in any number of configurations,
interleaved on one private redis-server. The accounting behind BENCHMARKS.md, "Issue 19"
(throughput itself is measured by `lmcache bench l2`: benches/lmcache_bench_l2.sh).

    ~/.cache/kvshelf/lmcache-venv/bin/python benches/lmcache_l2_cpu.py \\
        --variant resp --variant kvshelf --variant kvshelf:fanout=4,batch_connections=2

A variant is `resp` or `kvshelf[:param=value,...]` with any `adapter_params` of
KvshelfNativeConnector (`fanout`, `batch_connections`, `sliding_ttl`, ...). Each repetition
stores one batch of `--keys` chunks through the adapter, then loads it `--loads` times
(each load a submit of the whole batch, waited for on the adapter's eventfd, as
`lmcache bench l2` does); the table shows medians over `--reps` repetitions. CPU per GB is
robust to a busy machine where throughput is not: a variant that costs more CPU per GB on
either side is slower on a quiet one.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from lmcache.v1.distributed.api import ObjectKey
from lmcache.v1.distributed.l2_adapters.config import get_l2_adapter_config_class
from lmcache.v1.distributed.l2_adapters.factory import create_l2_adapter_from_registry
from lmcache.v1.memory_allocators.ad_hoc_memory_allocator import AdHocMemoryAllocator
from lmcache.v1.memory_management import MemoryFormat

sys.path.insert(0, str(Path(__file__).parent))
from lmcache_common import DIM, HEADS, LAYERS, fill_random, flushall, start_redis  # noqa: E402
from lmcache_plugin import wait  # noqa: E402


def parse_value(v: str):
    if v in ("true", "false"):
        return v == "true"
    try:
        return int(v)
    except ValueError:
        return v


def make_adapter(variant: str, port: int, tokens: int):
    kind, _, params = variant.partition(":")
    if kind == "resp":
        d = {"type": "resp", "host": "127.0.0.1", "port": port, "num_workers": 8}
    elif kind == "kvshelf":
        extra = dict(p.split("=", 1) for p in params.split(",") if p)
        d = {"type": "native_plugin", "module_path": "kvshelf.lmcache",
             "class_name": "KvshelfNativeConnector",
             "adapter_params": {"url": f"redis://127.0.0.1:{port}", "namespace": "cpu",
                                "kv_dtype": "bfloat16", "num_layers": LAYERS,
                                "num_kv_heads": HEADS, "head_dim": DIM,
                                "chunk_size": tokens, "timeout": 60,
                                **{k: parse_value(v) for k, v in extra.items()}}}
    else:
        sys.exit(f"unknown variant {variant!r}: resp or kvshelf[:k=v,...]")
    return create_l2_adapter_from_registry(get_l2_adapter_config_class(d["type"]).from_dict(d))


def redis_info(port: int, section: str) -> dict[str, str]:
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", section],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split(":", 1) for line in out.splitlines() if ":" in line)


def redis_cpu(port: int) -> float:
    d = redis_info(port, "cpu")
    return float(d["used_cpu_sys"]) + float(d["used_cpu_user"])


def get_usec_per_call(port: int) -> float:
    stat = redis_info(port, "commandstats").get("cmdstat_get", "")
    fields = dict(f.split("=") for f in stat.split(",") if "=" in f)
    return float(fields.get("usec_per_call", "nan"))


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", help="resp | kvshelf[:k=v,...]")
    ap.add_argument("--tokens", type=int, default=16, help="tokens per chunk (16: 2 MiB)")
    ap.add_argument("--keys", type=int, default=8, help="chunks per submit")
    ap.add_argument("--loads", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--zero", action="store_true",
                    help="zero the load buffers with torch before each load, as `lmcache bench "
                         "l2` does (its OpenMP workers then spin while the load runs); wall "
                         "time counts the loads only")
    args = ap.parse_args()
    variants = args.variant or ["resp", "kvshelf"]

    proc, port = start_redis()
    alloc = AdHocMemoryAllocator("cpu")
    shape = torch.Size([2, LAYERS, args.tokens, HEADS * DIM])
    src = [alloc.allocate(shape, torch.bfloat16, MemoryFormat.KV_2LTD) for _ in range(args.keys)]
    dst = [alloc.allocate(shape, torch.bfloat16, MemoryFormat.KV_2LTD) for _ in range(args.keys)]
    for o in src:
        fill_random(o.tensor)
    results: dict[str, list[tuple[float, float, float, float]]] = {v: [] for v in variants}
    try:
        adapters = {v: make_adapter(v, port, args.tokens) for v in variants}
        for _ in range(args.reps):
            for v, ad in adapters.items():
                flushall("127.0.0.1", port)
                keys = [ObjectKey(chunk_hash=os.urandom(32), model_name="cpu", kv_rank=0,
                                  object_group_id=0) for _ in range(args.keys)]
                task = ad.submit_store_task(keys, src)
                wait(ad.get_store_event_fd(), lambda: ad.pop_completed_store_tasks().get(task))
                subprocess.run(["redis-cli", "-p", str(port), "CONFIG", "RESETSTAT"],
                               capture_output=True, check=True)
                w0, c0, r0 = time.perf_counter(), own_cpu(), redis_cpu(port)
                zeroing = 0.0
                for _ in range(args.loads):
                    if args.zero:
                        z = time.perf_counter()
                        for o in dst:
                            o.tensor.zero_()
                        zeroing += time.perf_counter() - z
                    task = ad.submit_load_task(keys, dst)
                    bitmap = wait(ad.get_load_event_fd(), lambda: ad.query_load_result(task))
                    assert bitmap.popcount() == args.keys, f"{v}: a load missed"
                w1, c1, r1 = time.perf_counter(), own_cpu(), redis_cpu(port)
                w1 -= zeroing
                assert all(torch.equal(a.tensor.view(torch.uint8), b.tensor.view(torch.uint8))
                           for a, b in zip(src, dst)), f"{v}: bytes differ"
                gb = args.loads * sum(o.get_size() for o in src) / 1e9
                results[v].append(((w1 - w0) / gb, (c1 - c0) / gb, (r1 - r0) / gb,
                                   get_usec_per_call(port)))
                for o in dst:
                    o.tensor.zero_()
        for ad in adapters.values():
            ad.close()
    finally:
        proc.kill()

    print(f"{args.keys} chunks of {args.tokens} tokens per load, {args.loads} loads, medians "
          f"of {args.reps} interleaved repetitions; load average {os.getloadavg()[0]:.2f}")
    print()
    print("| variant | GB/s | wall ms/GB | this process CPU ms/GB | Redis CPU ms/GB "
          "| Redis µs per GET |")
    print("|---|---|---|---|---|---|")
    for v, rows in results.items():
        wall, cpu, rcpu, usec = (statistics.median(r[i] for r in rows) for i in range(4))
        print(f"| `{v}` | {1 / wall:.2f} | {wall * 1000:.0f} | {cpu * 1000:.0f} "
              f"| {rcpu * 1000:.0f} | {usec:.0f} |")
    for o in src + dst:
        o.ref_count_down()


if __name__ == "__main__":
    main()
