#!/usr/bin/env python3
"""kvshelf's LMCache plugin (`native_plugin`) against LMCache's own `resp` adapter, both
measured by LMCache's own tool, `lmcache bench l2`, on one private redis-server, in
interleaved runs; with the physical ceiling (redis-benchmark GET of one key of the chunk's
size, loopback TCP) measured in the same run.

Run through its wrapper, which creates the LMCache venv and installs kvshelf into it:

    benches/lmcache_bench_l2.sh [--runs 3] [--rounds 5] [--chunks-kb 2048,32768]
                                [--in-flight 1,4] [--num-keys 8] [--json FILE]
                                [--before DIR]   # also an older kvshelf wheel's package

Per cell (chunk size x in-flight) and run, each adapter runs `lmcache bench l2` once (store,
lookup, load; verification on; `--rounds` measured rounds after one warm-up round), the
order of the two adapters alternating from run to run (ABBA), Redis flushed between
invocations. The table shows the median over runs of each run's mean throughput (MiB/s, as
LMCache reports it) and lookup p50, and the ratio kvshelf / resp.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from lmcache_common import DIM, HEADS, LAYERS, flushall, start_redis  # noqa: E402

# Bytes of KV per token of the Llama-3-8B-class layout (K and V, bf16).
TOKEN_BYTES = 2 * LAYERS * HEADS * DIM * 2


def adapter_json(kind: str, port: int, chunk_kb: int) -> str:
    kind = kind.split("@")[0]
    if kind == "resp":
        spec = {"type": "resp", "host": "127.0.0.1", "port": port, "num_workers": 8}
    else:
        tokens = chunk_kb * 1024 // TOKEN_BYTES
        assert tokens * TOKEN_BYTES == chunk_kb * 1024, "a chunk is whole tokens"
        spec = {
            "type": "native_plugin",
            "module_path": "kvshelf.lmcache",
            "class_name": "KvshelfNativeConnector",
            "adapter_params": {
                "url": f"redis://127.0.0.1:{port}",
                "namespace": "bench-l2",
                "kv_dtype": "bfloat16",
                "num_layers": LAYERS,
                "num_kv_heads": HEADS,
                "head_dim": DIM,
                "chunk_size": tokens,
            },
        }
    return json.dumps(spec)


def bench_l2(lmcache: str, spec: str, args, chunk_kb: int, in_flight: int,
             env: dict | None = None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [
            lmcache, "bench", "l2", "--l2-adapter", spec,
            "--num-keys", str(args.num_keys), "--data-size-kb", str(chunk_kb),
            "--in-flight", str(in_flight), "--rounds", str(args.rounds),
            "--warmup-rounds", "1", "--no-skip-verify",
            "--format", "json", "--output", out.name, "-q",
        ]
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if run.returncode != 0:
            sys.exit(f"lmcache bench l2 failed ({run.returncode}):\n{run.stdout}\n{run.stderr}")
        return json.loads(Path(out.name).read_text())


def metrics(report: dict) -> dict[str, float]:
    """Load and store MiB/s (LMCache's mean over the measured rounds) and lookup p50 ms, from
    the JSON `lmcache bench l2 --format json` writes: one `op_N` object per operation."""
    ops = {v["operation"]: v for k, v in report["metrics"].items() if k.startswith("op_")}
    for op in ("Store", "Load"):
        if ops[op]["total_success"] != ops[op]["total_keys"] or ops[op]["rounds_timed_out"]:
            sys.exit(f"{op}: not every key succeeded: {ops[op]}")
    return {
        "load": ops["Load"]["throughput_avg_mbps"],
        "store": ops["Store"]["throughput_avg_mbps"],
        "lookup_p50_ms": ops["Lookup"]["duration_p50_ms"],
    }


def ceiling(port: int, chunk_kb: int, clients: int) -> float:
    """redis-benchmark GET of one key of the chunk's size: MiB/s, the unit of LMCache's report."""
    size = chunk_kb * 1024
    n = max(64, (2 << 30) // size)
    out = subprocess.run(
        ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "set,get",
         "-d", str(size), "-n", str(n), "-c", str(clients), "--csv"],
        capture_output=True, text=True, check=True,
    ).stdout
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells and cells[0] == "GET":
            return float(cells[1]) * size / (1 << 20)
    sys.exit(f"no GET line in redis-benchmark's output:\n{out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lmcache", default=str(Path(sys.executable).parent / "lmcache"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--num-keys", type=int, default=8)
    ap.add_argument("--chunks-kb", default="2048,32768")
    ap.add_argument("--in-flight", default="1,4")
    ap.add_argument("--json", help="also write every measurement here")
    ap.add_argument("--before", metavar="DIR",
                    help="also measure the kvshelf package installed in DIR (pip install "
                         "--target DIR <wheel>), e.g. an older commit's wheel, as "
                         "`kvshelf@before`, interleaved with the others")
    args = ap.parse_args()

    proc, port = start_redis()
    rows, raw = [], []
    try:
        for chunk_kb in [int(c) for c in args.chunks_kb.split(",")]:
            for in_flight in [int(f) for f in args.in_flight.split(",")]:
                kinds = ["resp", "kvshelf"] + (["kvshelf@before"] if args.before else [])
                per: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
                for run in range(args.runs):
                    # Each run in another order (ABBA for two), so drift favours none.
                    order = kinds[run % len(kinds):] + kinds[:run % len(kinds)]
                    if run % 2 == 1:
                        order.reverse()
                    for kind in order:
                        flushall("127.0.0.1", port)
                        env = None
                        if kind == "kvshelf@before":
                            env = {**os.environ, "PYTHONPATH": args.before}
                        report = bench_l2(args.lmcache, adapter_json(kind, port, chunk_kb),
                                          args, chunk_kb, in_flight, env)
                        m = metrics(report)
                        per[kind].append(m)
                        raw.append({"chunk_kb": chunk_kb, "in_flight": in_flight, "run": run,
                                    "adapter": kind, **m})
                        print(f"chunk {chunk_kb} KiB in-flight {in_flight} run {run} "
                              f"{kind:14} {m}", file=sys.stderr, flush=True)
                flushall("127.0.0.1", port)
                ceil1 = ceiling(port, chunk_kb, 1)
                ceil8 = ceiling(port, chunk_kb, 8)
                flushall("127.0.0.1", port)
                med = {k: {f: statistics.median(r[f] for r in v) for f in v[0]}
                       for k, v in per.items()}
                rows.append((chunk_kb, in_flight, med, ceil1, ceil8))
    finally:
        proc.kill()

    print(f"`lmcache bench l2`, {args.num_keys} keys per submit, {args.rounds} rounds, "
          f"verification on; medians of {args.runs} interleaved runs; load average "
          f"{os.getloadavg()[0]:.2f}")
    print()
    print("| chunk | in-flight | load MiB/s kvshelf / resp | ratio | store MiB/s kvshelf / resp "
          "| ratio | lookup p50 ms kvshelf / resp | ceiling GET MiB/s (1 / 8 conns) |"
          + (" before: load / store ratio |" if args.before else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if args.before else ""))
    for chunk_kb, in_flight, med, ceil1, ceil8 in rows:
        k, r = med["kvshelf"], med["resp"]
        b = med.get("kvshelf@before")
        print(f"| {chunk_kb // 1024} MiB | {in_flight} "
              f"| {k['load']:.0f} / {r['load']:.0f} | **{k['load'] / r['load']:.2f}×** "
              f"| {k['store']:.0f} / {r['store']:.0f} | **{k['store'] / r['store']:.2f}×** "
              f"| {k['lookup_p50_ms']:.3f} / {r['lookup_p50_ms']:.3f} "
              f"| {ceil1:.0f} / {ceil8:.0f} |"
              + (f" {b['load'] / r['load']:.2f}× / {b['store'] / r['store']:.2f}× |" if b else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": raw, "time": time.time()}, indent=1))


if __name__ == "__main__":
    main()
