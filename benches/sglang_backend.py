#!/usr/bin/env python3
"""kvshelf's SGLang HiCache backend (``kvshelf.sglang``) through its zero-copy
``batch_set_v1`` / ``batch_get_v1`` on SGLang's own host pool (``MHATokenToKVPoolHost`` on
CPU) with Llama-3-8B pages (32 layers, 8 KV heads, head_dim 128, bf16: 128 KiB per
token), against the library's ``Store.put`` / ``Store.get_into`` of the very same page
regions on the same Redis, in interleaved rounds (each path first in every other round);
and ``batch_exists`` of 128 pages against ``Store.lookup`` of the same keys. Each call
moves ``--pages`` 64-token pages' worth of bytes (16: 128 MiB), as that many 64-token
pages or a quarter as many 256-token ones.

Run with the SGLang venv after ``bash python/ci.sh`` (or a wheel installed there):

    ~/.cache/kvshelf/sglang-venv/bin/python benches/sglang_backend.py [--rounds 9] [--pages 16]

It starts its own redis-server on a free port (no persistence) and prints one table of
medians and the ratios backend / library. Writes use new keys every round for both paths
(pages are write-once); the Redis is flushed between rounds.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torch
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
    from sglang.srt.mem_cache.utils import get_hash_str

import kvshelf

LAYERS, HEADS, DIM = 32, 8, 128  # Llama-3-8B, one rank (TP 1), bf16
TOKEN_BYTES = LAYERS * 2 * HEADS * DIM * 2


def start_redis() -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port),
         "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", tempfile.mkdtemp(prefix="kvshelf-bench-redis-")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as c:
                c.sendall(b"PING\r\n")
                if c.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def flushall(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(b"FLUSHALL\r\n")
        assert c.recv(16).startswith(b"+OK")


def setup(layout: str, page: int, pages: int, url: str):
    tokens = 2 * pages * page  # a source and a destination range
    dev = MHATokenToKVPool(size=tokens // 2, page_size=page, dtype=torch.bfloat16,
                           head_num=HEADS, head_dim=DIM, layer_num=LAYERS, device="cpu",
                           enable_memory_saver=False)
    pool = MHATokenToKVPoolHost(dev._mha_buffer_info(), host_to_device_ratio=2.0, host_size=0,
                                page_size=page, layout=layout, pin_memory=False, device="cpu",
                                device_capacity_tokens=tokens // 2, start_layer=0,
                                end_layer=LAYERS)
    del dev
    cfg = HiCacheStorageConfig(
        tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=False, enable_storage_metrics=False,
        is_page_first_layout=layout == "page_first", model_name="meta-llama/Meta-Llama-3-8B",
        extra_config={"backend_name": "kvshelf", "module_path": "kvshelf.sglang",
                      "class_name": "KvshelfHiCacheStorage", "interface_v1": 1, "url": url,
                      "namespace": "bench", "timeout": 60})
    backend = StorageBackendFactory.create_backend("dynamic", cfg, pool)
    backend.register_mem_pool_host(pool)
    src, dst = pool.alloc(pages * page), pool.alloc(pages * page)
    pool.kv_buffer.view(torch.uint8).random_(0, 256)
    return pool, backend, src, dst


def keys_of(round_: int, pages: int, page: int) -> list[str]:
    return get_hash_str([round_ * 10_000_000 + t for t in range(pages * page)], None,
                        page_size=page)


def bench(layout: str, page: int, pages: int, rounds: int, port: int) -> dict:
    url = f"redis://127.0.0.1:{port}"
    pool, backend, src, dst = setup(layout, page, pages, url)
    store = kvshelf.Store(url, response_timeout=60)
    nbytes = pages * page * TOKEN_BYTES
    t = {k: [] for k in ("set", "put", "get", "read", "exists", "lookup")}
    for r in range(rounds):
        keys = keys_of(2 * r, pages, page)
        exist_keys = keys_of(2 * r, 128, page)[:128]
        # The library on the same regions under other hashes (computed outside the timing).
        lib_keys = keys_of(2 * r + 1, pages, page)
        hashes = backend._hashes(lib_keys, False)
        regions_src = backend._regions(lib_keys, src)
        regions_dst = backend._regions(lib_keys, dst)
        lookup_hashes = backend._hashes(exist_keys, False)

        def via_backend():
            # Keys to hashes, pool indices to regions, and the calls, as SGLang's threads
            # run them.
            t0 = time.perf_counter()
            assert backend.batch_set_v1(keys, src) == [True] * pages
            t["set"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert backend.batch_get_v1(keys, dst) == [True] * pages
            t["get"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            backend.batch_exists(exist_keys)
            t["exists"].append(time.perf_counter() - t0)

        def via_library():
            t0 = time.perf_counter()
            out = store.put(backend.ns, hashes, regions_src, timeout=60)
            t["put"].append(time.perf_counter() - t0)
            assert set(out) == {"stored"}
            t0 = time.perf_counter()
            got = store.get_into(backend.ns, hashes, regions_dst, timeout=60)
            t["read"].append(time.perf_counter() - t0)
            assert all(g == len(b) for g, b in zip(got, regions_dst))
            t0 = time.perf_counter()
            store.lookup(backend.ns, lookup_hashes)
            t["lookup"].append(time.perf_counter() - t0)

        # Interleaved, each path first in every other round.
        for f in ((via_backend, via_library) if r % 2 == 0 else (via_library, via_backend)):
            f()
        flushall(port)
    del pool, backend
    med = {k: statistics.median(v) for k, v in t.items()}
    return {"layout": layout, "page": page, "pages": pages, "parts": len(regions_src) // pages,
            "set": nbytes / med["set"] / 1e9, "put": nbytes / med["put"] / 1e9,
            "get": nbytes / med["get"] / 1e9, "read": nbytes / med["read"] / 1e9,
            "exists": med["exists"] * 1e3, "lookup": med["lookup"] * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--pages", type=int, default=16, help="pages per batch call")
    args = ap.parse_args()
    proc, port = start_redis()
    try:
        rows = [bench(layout, page, args.pages * 64 // page, args.rounds, port)
                for layout in ("page_first", "layer_first") for page in (64, 256)]
    finally:
        proc.kill()
    print(f"Llama-3-8B pages ({TOKEN_BYTES // 1024} KiB/token, bf16), {args.rounds} rounds, "
          "medians; GB/s of page bytes")
    print("| layout | page | pages/call | values/page | batch_set_v1 | Store.put | ratio "
          "| batch_get_v1 | Store.get_into | ratio | batch_exists(128) | Store.lookup(128) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['page']} | {r['pages']} | {r['parts']} "
              f"| {r['set']:.2f} | {r['put']:.2f} | **{r['set'] / r['put']:.2f}** "
              f"| {r['get']:.2f} | {r['read']:.2f} | **{r['get'] / r['read']:.2f}** "
              f"| {r['exists']:.2f} ms | {r['lookup']:.2f} ms |")


if __name__ == "__main__":
    main()
