#!/usr/bin/env python3
"""kvshelf's LMCache plugin (`native_plugin`) against LMCache's own `resp` adapter, both
measured by LMCache's own tool, `lmcache bench l2`, on one private redis-server, in
interleaved runs; with the physical ceiling measured in the same runs: the same values
loaded by a minimal blocking client (`benches/redis_get_ceiling.py`: one `GET` and one
`recv_into` per value, 8 connections, nothing else), and redis-benchmark's GET of one key of
the chunk's size for reference.

Run through its wrapper, which creates the LMCache venv and installs kvshelf into it:

    benches/lmcache_bench_l2.sh [--runs 3] [--rounds 5] [--chunks-kb 2048,32768]
                                [--in-flight 1,4] [--num-keys 8] [--json FILE]
                                [--before DIR]   # also an older kvshelf wheel's package
                                [--also-env NAME=VALUE ...]   # each adapter again with it
                                [--also-param NAME=VALUE ...] # kvshelf again with it

Per cell (chunk size x in-flight) and run, each adapter runs `lmcache bench l2` once (store,
lookup, load; verification on; `--rounds` measured rounds after one warm-up round), the
order of the two adapters alternating from run to run (ABBA), Redis flushed between
invocations; the ceiling client runs in the same rotation, on the same number of values
per round (keys per submit x in-flight). The table shows the median over runs of each
run's mean throughput (MiB/s, as LMCache reports it) and lookup p50, the ratio kvshelf /
resp, and each adapter's load as a share of the ceiling. `--also-env` measures both
adapters a second time per run with an environment variable set (e.g.
`OMP_WAIT_POLICY=PASSIVE`, to see what torch's spinning OpenMP workers cost each),
interleaved with the rest, and prints their rows under that name; `--also-param` does the
same for kvshelf alone with one more adapter parameter (`fanout=4`, `max_keys_loading=16`,
any integer `Store` option such as `batch_connections=4`).
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


def adapter_json(kind: str, port: int, chunk_kb: int, params: dict | None = None) -> str:
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
                **(params or {}),
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


def ceiling(port: int, chunk_kb: int, keys: int) -> float:
    """The minimal blocking client's load of `keys` values of the chunk's size per round,
    8 connections (as `resp`'s 8 workers): MiB/s. Runs outside the venv's torch."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "redis_get_ceiling.py"),
         "--port", str(port), "--size", str(chunk_kb * 1024), "--keys", str(keys),
         "--conns", "8", "--rounds", "10", "--json"],
        capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(out)["mib_s"]


def redis_benchmark(port: int, chunk_kb: int, clients: int) -> float:
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
    ap.add_argument("--also-env", metavar="NAME=VALUE", action="append", default=[],
                    help="also measure both adapters with this environment variable set, "
                         "interleaved with the others (repeatable)")
    ap.add_argument("--also-param", metavar="NAME=VALUE", action="append", default=[],
                    help="also measure kvshelf with this adapter parameter (e.g. fanout=4; "
                         "an integer), interleaved with the others (repeatable)")
    args = ap.parse_args()
    for e in args.also_env + args.also_param:
        if "=" not in e:
            ap.error(f"--also-env and --also-param want NAME=VALUE, not {e!r}")

    # An adapter's variant: "" (as the user runs it), "before" or one --also-env setting.
    # "param:NAME=VALUE" (--also-param) is kvshelf alone, like "before".
    params = [f"param:{p}" for p in args.also_param]
    variants = [""] + (["before"] if args.before else []) + args.also_env + params
    kvshelf_only = {"before", *params}

    def env_of(variant: str) -> dict | None:
        if variant == "":
            return None
        if variant == "before":
            return {**os.environ, "PYTHONPATH": args.before}
        if variant.startswith("param:"):
            return None
        name, value = variant.split("=", 1)
        return {**os.environ, name: value}

    proc, port = start_redis()
    rows, raw = [], []
    try:
        for chunk_kb in [int(c) for c in args.chunks_kb.split(",")]:
            for in_flight in [int(f) for f in args.in_flight.split(",")]:
                kinds = [(a, v) for v in variants for a in ("resp", "kvshelf")
                         if not (v in kvshelf_only and a == "resp")] + [("ceiling", "")]
                per: dict[tuple[str, str], list[dict[str, float]]] = {k: [] for k in kinds}
                for run in range(args.runs):
                    # Each run in another order (ABBA for two), so drift favours none.
                    order = kinds[run % len(kinds):] + kinds[:run % len(kinds)]
                    if run % 2 == 1:
                        order.reverse()
                    for kind, variant in order:
                        flushall("127.0.0.1", port)
                        if kind == "ceiling":
                            m = {"load": ceiling(port, chunk_kb, args.num_keys * in_flight)}
                        else:
                            extra = None
                            if variant.startswith("param:"):
                                name, value = variant[len("param:"):].split("=", 1)
                                extra = {name: int(value)}
                            report = bench_l2(args.lmcache,
                                              adapter_json(kind, port, chunk_kb, extra),
                                              args, chunk_kb, in_flight, env_of(variant))
                            m = metrics(report)
                        per[(kind, variant)].append(m)
                        raw.append({"chunk_kb": chunk_kb, "in_flight": in_flight, "run": run,
                                    "adapter": kind, "variant": variant, **m})
                        print(f"chunk {chunk_kb} KiB in-flight {in_flight} run {run} "
                              f"{kind:8} {variant:22} {m}", file=sys.stderr, flush=True)
                flushall("127.0.0.1", port)
                rb8 = redis_benchmark(port, chunk_kb, 8)
                flushall("127.0.0.1", port)
                med = {k: {f: statistics.median(r[f] for r in v) for f in v[0]}
                       for k, v in per.items()}
                rows.append((chunk_kb, in_flight, med, rb8))
    finally:
        proc.kill()

    print(f"`lmcache bench l2`, {args.num_keys} keys per submit, {args.rounds} rounds, "
          f"verification on; medians of {args.runs} interleaved runs; load average "
          f"{os.getloadavg()[0]:.2f}")
    for variant in variants:
        print()
        if variant == "before":
            print("kvshelf as installed in --before, against the same runs' resp:")
        elif variant.startswith("param:"):
            print(f"kvshelf with `{variant[len('param:'):]}`, against the same runs' resp:")
        elif variant:
            print(f"Both adapters with `{variant}`:")
        print("| chunk | in-flight | load MiB/s kvshelf / resp | ratio | store MiB/s kvshelf / "
              "resp | ratio | lookup p50 ms kvshelf / resp | ceiling MiB/s | load / ceiling "
              "kvshelf / resp | redis-benchmark GET MiB/s (8 conns) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for chunk_kb, in_flight, med, rb8 in rows:
            k = med[("kvshelf", variant)]
            r = med[("resp", "" if variant in kvshelf_only else variant)]
            c = med[("ceiling", "")]["load"]
            print(f"| {chunk_kb // 1024} MiB | {in_flight} "
                  f"| {k['load']:.0f} / {r['load']:.0f} | **{k['load'] / r['load']:.2f}×** "
                  f"| {k['store']:.0f} / {r['store']:.0f} | **{k['store'] / r['store']:.2f}×** "
                  f"| {k['lookup_p50_ms']:.3f} / {r['lookup_p50_ms']:.3f} | {c:.0f} "
                  f"| {k['load'] / c:.2f} / {r['load'] / c:.2f} | {rb8:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": raw, "time": time.time()}, indent=1))


if __name__ == "__main__":
    main()
