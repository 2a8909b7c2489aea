#!/usr/bin/env python3
"""kvshelf's LMCache plugin against LMCache's native `resp://` client, both driven through
LMCache's own NativeConnectorL2Adapter (built by LMCache's factories from --l2-adapter
JSON), on one Redis, in interleaved rounds; and kvshelf.Store reading into numpy against
redis-py GET of the same blocks.

Run with the LMCache venv after `bash python/ci.sh` (or `pip install ./python`):

    ~/.cache/kvshelf/lmcache-venv/bin/python benches/lmcache_plugin.py [--rounds 9]

It starts its own redis-server on a free port (no persistence) and prints one table of
medians (GB/s) and the ratios kvshelf / LMCache. Writes use new keys every round for both
paths (kvshelf is write-once; overwriting would compare different work); the Redis is
flushed between rounds.
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import time

import numpy as np
import torch
from lmcache.v1.distributed.api import ObjectKey
from lmcache.v1.distributed.l2_adapters.factory import create_l2_adapter_from_registry
from lmcache.v1.distributed.l2_adapters.config import get_l2_adapter_config_class
from lmcache.v1.memory_allocators.ad_hoc_memory_allocator import AdHocMemoryAllocator
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.platform.event_notifier import consume_fd

import kvshelf
from lmcache_common import BATCH, DIM, HEADS, LAYERS, TOKENS, fill_random, flushall, start_redis


def adapter(kind: str, port: int, tokens: int, fanout: int):
    if kind == "lmcache-resp":
        d = {"type": "resp", "host": "127.0.0.1", "port": port, "num_workers": 8}
    else:
        d = {"type": "native_plugin", "module_path": "kvshelf.lmcache",
             "class_name": "KvshelfNativeConnector",
             "adapter_params": {"url": f"redis://127.0.0.1:{port}", "namespace": "bench",
                                "kv_dtype": "bfloat16", "num_layers": LAYERS,
                                "num_kv_heads": HEADS, "head_dim": DIM, "chunk_size": tokens,
                                "fanout": fanout, "timeout": 60}}
    cfg = get_l2_adapter_config_class(d["type"]).from_dict(d)
    return create_l2_adapter_from_registry(cfg)


def wait(fd: int, poll):
    while True:
        r = poll()
        if r is not None:
            return r
        if select.select([fd], [], [], 60)[0]:
            consume_fd(fd)


def chunks(tokens: int, fill: bool):
    alloc = AdHocMemoryAllocator("cpu")
    objs = [alloc.allocate(torch.Size([2, LAYERS, tokens, HEADS * DIM]), torch.bfloat16,
                           MemoryFormat.KV_2LTD) for _ in range(BATCH)]
    for o in objs:
        if fill:
            fill_random(o.tensor)
        else:
            o.tensor.zero_()
    return objs


def one_round(ad, src, dst) -> tuple[float, float]:
    keys = [ObjectKey(chunk_hash=os.urandom(32), model_name="bench", kv_rank=0,
                      object_group_id=0) for _ in range(BATCH)]
    t0 = time.perf_counter()
    task = ad.submit_store_task(keys, src)
    stored = wait(ad.get_store_event_fd(), lambda: ad.pop_completed_store_tasks().get(task))
    t1 = time.perf_counter()
    assert int(stored) >= 0, "store failed"
    task = ad.submit_load_task(keys, dst)
    bitmap = wait(ad.get_load_event_fd(), lambda: ad.query_load_result(task))
    t2 = time.perf_counter()
    assert bitmap.popcount() == BATCH, "load missed"
    assert all(torch.equal(a.tensor.view(torch.uint8), b.tensor.view(torch.uint8))
               for a, b in zip(src, dst)), "bytes differ"
    nbytes = sum(o.get_size() for o in src)
    return nbytes / (t2 - t1) / 1e9, nbytes / (t1 - t0) / 1e9


def store_vs_redis_py(port: int, tokens: int, rounds: int) -> tuple[float, float]:
    import redis as redis_py

    ns = kvshelf.Namespace(label="bench-py", model_id="bench", kv_dtype="bfloat16",
                           num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM,
                           block_size=tokens)
    store = kvshelf.Store(f"redis://127.0.0.1:{port}")
    hashes = kvshelf.PrefixHasher(ns).hash_prefix(list(range(BATCH * tokens)))
    payloads = [np.random.default_rng(i).integers(0, 256, ns.block_bytes, dtype=np.uint8)
                for i in range(BATCH)]
    store.put(ns, hashes, payloads)
    keys = [kvshelf.block_key(ns.label, h) for h in hashes]
    r = redis_py.Redis(port=port)
    bufs = [np.empty(ns.block_bytes, np.uint8) for _ in range(BATCH)]
    ours, theirs = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        assert store.get_into(ns, hashes, bufs) == [ns.block_bytes] * BATCH
        t1 = time.perf_counter()
        pipe = r.pipeline(transaction=False)
        for k in keys:
            pipe.get(k)
        values = pipe.execute()
        t2 = time.perf_counter()
        assert all(v is not None for v in values)
        ours.append(BATCH * ns.block_bytes / (t1 - t0) / 1e9)
        theirs.append(sum(len(v) for v in values) / (t2 - t1) / 1e9)
    return statistics.median(ours), statistics.median(theirs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--fanout", type=int, default=2, help="kvshelf plugin sub-batches")
    args = ap.parse_args()
    proc, port = start_redis()
    try:
        print(f"{BATCH} chunks per batch, {args.rounds} interleaved rounds, medians, GB/s; "
              f"kvshelf fanout {args.fanout}; {os.cpu_count()} CPUs")
        print("| chunk | path | read | write |")
        print("|---|---|---:|---:|")
        for name, tokens in TOKENS.items():
            ads = {k: adapter(k, port, tokens, args.fanout) for k in ("lmcache-resp", "kvshelf")}
            src, dst = chunks(tokens, True), chunks(tokens, False)
            res = {k: ([], []) for k in ads}
            for _ in range(args.rounds):
                for k, ad in ads.items():
                    rd, wr = one_round(ad, src, dst)
                    res[k][0].append(rd)
                    res[k][1].append(wr)
                    flushall("127.0.0.1", port)
            med = {k: (statistics.median(v[0]), statistics.median(v[1])) for k, v in res.items()}
            for k in ads:
                print(f"| {name} | {k} | {med[k][0]:.2f} | {med[k][1]:.2f} |")
            print(f"| {name} | ratio kvshelf / LMCache | "
                  f"{med['kvshelf'][0] / med['lmcache-resp'][0]:.2f}x | "
                  f"{med['kvshelf'][1] / med['lmcache-resp'][1]:.2f}x |")
            for ad in ads.values():
                ad.close()
            for o in src + dst:
                o.ref_count_down()
        for name, tokens in TOKENS.items():
            ours, theirs = store_vs_redis_py(port, tokens, args.rounds)
            print(f"| {name} | kvshelf.Store.get_into numpy / redis-py GET (pipeline of 8) | "
                  f"{ours:.2f} / {theirs:.2f} = {ours / theirs:.2f}x | |")
            flushall("127.0.0.1", port)
    finally:
        proc.kill()


if __name__ == "__main__":
    main()
