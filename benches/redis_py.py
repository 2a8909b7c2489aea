#!/usr/bin/env python3
"""The redis-py baseline: what most Python inference workers use today.

Stores distinct random values of N bytes, then measures two paths with C independent
client processes (one `redis.Redis` connection each, like a fleet of workers), R requests
in all, split across the clients:

- ``redis-py-get``: one request is a pipeline (``transaction=False``) of B ``GET`` s;
- ``redis-py-set``: one request is a pipeline of B ``SET ... PX`` of N-byte values.

GB/s is payload bytes (10^9) over the wall time of the measured phase only: every client
connects and makes one warm-up request, then all wait on a start barrier. Latency is per
request (per pipeline of B commands), nearest-rank percentiles as in ``kvshelf bench``.

``--json`` prints ``{"paths": [...]}`` in the shape of ``kvshelf bench --json`` (plus which
redis-py, parser and protocol were used), so ``benches/matrix.sh`` can merge the two.

This measures the plain ``pip install redis`` most users have: the pure-Python parser.
``pip install hiredis`` (or ``redis[hiredis]``) swaps in a C parser, which helps most with
many small replies; whichever is installed is reported as ``parser``.

    python benches/redis_py.py --port 6390 --value-bytes 2097152 --batch 8 \\
        --concurrency 4 --requests 200
"""

import argparse
import json
import multiprocessing
import os
import queue
import sys
import time

import redis

# Keys stored for the GET path are capped at this many bytes in all (but at least one batch).
MAX_STORED_BYTES = 1 << 30
TTL_MS = 600_000
# redis-py 8 defaults to a 5 s socket timeout; a pipeline of 32 × 32 MiB on a busy 2-core
# machine can take longer than that, and a timeout would only abort the run.
SOCKET_TIMEOUT_S = 300
# Storing keys before the run: pipelines of at most this many bytes.
STORE_CHUNK_BYTES = 64 << 20
# Distinct values without generating N random bytes per key (os.urandom runs at a few
# hundred MB/s): value i is a window of one random buffer, starting STRIDE × i bytes in.
STRIDE = 64


def key(n, i):
    return f"bench:redis-py:{n}:{i}"


def windows(n, count):
    """`count` distinct, random-looking N-byte values, as zero-copy memoryviews."""
    buf = memoryview(os.urandom(n + STRIDE * count))
    return [buf[i * STRIDE : i * STRIDE + n] for i in range(count)]


def parser_name():
    try:
        from redis.utils import HIREDIS_AVAILABLE
    except ImportError:  # very old redis-py
        HIREDIS_AVAILABLE = False
    return "hiredis" if HIREDIS_AVAILABLE else "python"


def protocol(r):
    """The RESP version the client speaks (redis-py 8 defaults to RESP3, older to RESP2)."""
    pool = r.connection_pool
    try:
        conn = pool.get_connection()
    except TypeError:  # redis-py < 5.1 takes a command name
        conn = pool.get_connection("PING")
    try:
        return int(getattr(conn, "protocol", None) or 2)
    finally:
        pool.release(conn)


def connect(args):
    return redis.Redis(
        host=args.host,
        port=args.port,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=SOCKET_TIMEOUT_S,
    )


def one_get(r, keys, n):
    pipe = r.pipeline(transaction=False)
    for k in keys:
        pipe.get(k)
    got = pipe.execute()
    for k, v in zip(keys, got):
        if v is None or len(v) != n:
            size = "nothing" if v is None else f"{len(v)} bytes"
            raise RuntimeError(f"GET {k} returned {size}, expected {n} bytes")
    return n * len(keys)


def one_set(r, keys, values, n):
    pipe = r.pipeline(transaction=False)
    for k, v in zip(keys, values):
        pipe.set(k, v, px=TTL_MS)
    got = pipe.execute()
    if not all(got):
        raise RuntimeError(f"SET pipeline did not succeed: {got!r}")
    return n * len(keys)


def client(args, op, n_keys, client_id, barrier, results):
    """One worker process: its own connection, a warm-up request, the barrier, the loop."""
    try:
        n, batch, conc = args.value_bytes, args.batch, args.concurrency
        r = connect(args)

        def keys_for(i):
            start = i * batch
            return [key(n, (start + j) % n_keys) for j in range(batch)]

        if op == "get":
            def request(i):
                return one_get(r, keys_for(i), n)
        else:
            values = windows(n, batch)

            def request(i):
                return one_set(r, keys_for(i), values, n)

        request(client_id)  # warm-up: connection set up, buffers grown
        barrier.wait()
        started = time.monotonic()
        lat = []
        moved = 0
        for i in range(client_id, args.requests, conc):
            t = time.monotonic()
            moved += request(i)
            lat.append(time.monotonic() - t)
        results.put((client_id, None, started, time.monotonic(), lat, moved))
        r.close()
    except BaseException as e:  # report every failure; the parent fails loudly
        barrier.abort()
        results.put((client_id, f"{type(e).__name__}: {e}", 0, 0, [], 0))


def measure(args, op, n_keys):
    # fork: workers start in milliseconds and share nothing but the arguments; each opens
    # its own connection after the fork.
    ctx = multiprocessing.get_context("fork")
    conc = args.concurrency
    barrier = ctx.Barrier(conc)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=client, args=(args, op, n_keys, c, barrier, results), daemon=True)
        for c in range(conc)
    ]
    for p in procs:
        p.start()
    got = []
    try:
        while len(got) < conc:
            try:
                got.append(results.get(timeout=1))
            except queue.Empty:  # check the workers are still there
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"redis-py {op} worker died (exit {dead[0].exitcode})")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    # A worker that fails breaks the barrier for the others: report the first cause.
    errors = sorted((e for (_, e, *_rest) in got if e), key=lambda e: "BrokenBarrier" in e)
    if errors:
        raise RuntimeError(f"redis-py {op}: {errors[0]}")
    started = min(g[2] for g in got)
    ended = max(g[3] for g in got)
    lat = sorted(x for g in got for x in g[4])
    moved = sum(g[5] for g in got)

    def pct(p):
        return lat[min(int(len(lat) * p), len(lat) - 1)] * 1e3

    return {
        "path": f"redis-py-{op}",
        "value_bytes": args.value_bytes,
        "batch": args.batch,
        "concurrency": conc,
        "requests": len(lat),
        "gbps": moved / (ended - started) / 1e9,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "p999_ms": pct(0.999),
    }


def store(args, n_keys):
    n = args.value_bytes
    r = connect(args)
    per_pipe = max(1, STORE_CHUNK_BYTES // n)
    values = windows(n, n_keys)
    for lo in range(0, n_keys, per_pipe):
        pipe = r.pipeline(transaction=False)
        for i in range(lo, min(lo + per_pipe, n_keys)):
            pipe.set(key(n, i), values[i], px=TTL_MS)
        pipe.execute()
    r.close()


def delete(args, n_keys):
    r = connect(args)
    for lo in range(0, n_keys, 1000):
        r.unlink(*[key(args.value_bytes, i) for i in range(lo, min(lo + 1000, n_keys))])
    r.close()


def table(paths, info):
    out = [
        f"redis-py {info['redis_py']} ({info['parser']} parser, RESP{info['protocol']})",
        f"{'path':<14} {'size':>10} {'batch':>5} {'conc':>4} {'reqs':>6} "
        f"{'GB/s':>8} {'p50 ms':>9} {'p99 ms':>9} {'p99.9 ms':>9}",
    ]
    for p in paths:
        out.append(
            f"{p['path']:<14} {p['value_bytes']:>10} {p['batch']:>5} {p['concurrency']:>4} "
            f"{p['requests']:>6} {p['gbps']:>8.3f} {p['p50_ms']:>9.2f} {p['p99_ms']:>9.2f} "
            f"{p['p999_ms']:>9.2f}"
        )
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=6379)
    ap.add_argument("--value-bytes", type=int, required=True, help="bytes per value")
    ap.add_argument("--batch", type=int, default=8, help="values per request (pipeline)")
    ap.add_argument("--concurrency", type=int, default=4, help="client processes")
    ap.add_argument("--requests", type=int, default=200, help="requests per path, in all")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    for name in ("value_bytes", "batch", "concurrency", "requests"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")

    # Enough distinct keys that concurrent requests read different ones, within 1 GiB.
    n_keys = max(
        args.batch, min(args.batch * args.concurrency, MAX_STORED_BYTES // args.value_bytes)
    )
    r = connect(args)
    r.ping()
    info = {"redis_py": redis.__version__, "parser": parser_name(), "protocol": protocol(r)}
    r.close()
    print(f"redis-py: storing {n_keys} × {args.value_bytes} bytes", file=sys.stderr)
    try:
        store(args, n_keys)
        paths = []
        for op in ("get", "set"):
            print(f"redis-py: {op} × {args.requests} requests", file=sys.stderr)
            paths.append(measure(args, op, n_keys))
    finally:
        delete(args, n_keys)
    if args.json:
        print(json.dumps({"paths": paths, **info}, indent=2))
    else:
        print(table(paths, info))


if __name__ == "__main__":
    main()
