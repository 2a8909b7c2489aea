#!/usr/bin/env python3
"""Invalidation traffic a sidecar's L1 follower receives under heavy puts, by tracking mode.

kvshelf keeps each sidecar's L1 coherent with Redis's client-side-caching invalidations
(`CLIENT TRACKING`, docs/api.md §10.1). The modes compared:

- ``bcast``: one RESP3 connection with ``CLIENT TRACKING ON BCAST PREFIX kvshelf:v1:`` (what
  kvshelf does today). Redis reports every write to any block key, by anyone: every new
  block put anywhere in the fleet, every eviction, every TTL slide.
- ``default``: per-key tracking. Redis remembers which keys each client read and reports
  only those, once per read. A sidecar reads on its data connections, so each of them
  needs ``CLIENT TRACKING ON REDIRECT <id of the RESP3 tracking connection>`` and the
  working set must be read through them (here: ``GET`` of every key, spread over them).
- ``bcast-l1``: BCAST, but the follower checks only the reported keys its L1 holds (what
  ``l1_follower`` could do instead of checking every reported key).
- ``off``: no tracking at all, the baseline for the writer's throughput and Redis's CPU.

One cell: a Redis holding a working set of ``--l1-bytes / value size`` keys (what one
sidecar's L1 holds, 1 GiB by default), ``--sidecars`` simulated sidecars that follow
invalidations, and ``--writers`` writer processes putting NEW blocks for ``--seconds``.
A simulated sidecar does what ``l1_follower`` does: takes whatever invalidations have
arrived (a batch), and checks which keys still exist with one ``EXISTS`` pipeline on a
data connection (which, in ``default`` mode, also re-arms tracking of those keys, since
``EXISTS`` is a read). The writer's mix, per new block (``SET key value NX PX``, in
pipelines of ``--batch``): ``--touches`` TTL slides (``PEXPIRE … XX``, what other
sidecars' reads and L1 hits do) and ``--churn`` deletes-or-re-puts of working-set keys.
Redis runs with ``maxmemory`` and ``volatile-ttl``: the working set has a 1 h TTL and new
blocks 10 min, so once Redis is full each new block evicts an older new block (as a full
shelf does) and the working set stays.

Counted per cell: the writer's puts and payload MB/s; per sidecar, invalidation push
messages, keys named in them and bytes received by the tracking connection, and EXISTS
checks sent; Redis CPU (``INFO cpu``, user + sys) over the measured window; evictions;
Redis's tracking table (``tracking_total_keys``/``_items``/``_prefixes``); and whether
every working-set key the writer deleted or re-put was reported (``ws changed /
reported``: how many it changed, and how many of those the sidecar that heard of the
fewest was told about). Also: Redis CPU per put (all of Redis's work in the window over
the puts), the simulated followers' own CPU, and in ``default`` mode how long enabling
REDIRECT on a sidecar's connections and reading its working set took. The end of a cell
is exact: a fence key, read by every sidecar, is written
after the writers stop, and a sidecar stops counting when its invalidation arrives.

Plain Python 3.11 stdlib; RESP is spoken over sockets by hand. Point it only at a Redis
on this machine: it floods it with writes and FLUSHALLs it before each cell.

    python3 benches/tracking_traffic.py --seconds 15 --sizes 2097152,65536 \\
        --modes off,bcast,bcast-l1,default --sidecars 1

BENCHMARKS.md has the runs and what they decided.
"""

import argparse
import hashlib
import multiprocessing as mp
import os
import random
import resource
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse

PREFIX = "kvshelf:v1:"
LABEL = "trackbench"
WS_TTL_MS = 3_600_000
NEW_TTL_MS = 600_000
FENCE = f"{PREFIX}{LABEL}:fence"


class Push(list):
    """A RESP3 push frame (``>``): kept apart from replies."""


class RedisError(Exception):
    pass


class Conn:
    """One Redis connection: write commands, read RESP2/RESP3 frames."""

    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.pos = 0
        self.received = 0

    @staticmethod
    def encode(args):
        """The parts of one command; big values are passed through, not copied."""
        parts = [b"*%d\r\n" % len(args)]
        for a in args:
            if isinstance(a, str):
                a = a.encode()
            elif isinstance(a, int):
                a = str(a).encode()
            parts.append(b"$%d\r\n" % len(a))
            parts.append(a)
            parts.append(b"\r\n")
        return parts

    def send(self, commands):
        parts = []
        for c in commands:
            parts.extend(self.encode(c))
        # sendmsg takes at most IOV_MAX (1024) buffers per call and may send part of them.
        bufs = [memoryview(p) for p in parts]
        while bufs:
            sent = self.sock.sendmsg(bufs[:1000])
            while sent:
                if sent >= len(bufs[0]):
                    sent -= len(bufs[0])
                    bufs.pop(0)
                else:
                    bufs[0] = bufs[0][sent:]
                    sent = 0

    def _fill(self):
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("Redis closed the connection")
        self.received += len(data)
        if self.pos > (1 << 20) and self.pos * 2 > len(self.buf):
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += data

    def _line(self, pos):
        end = self.buf.find(b"\r\n", pos)
        if end < 0:
            raise IndexError
        return bytes(self.buf[pos:end]), end + 2

    def _parse(self, pos):
        """(frame, next position); IndexError when the frame is not complete yet."""
        if pos >= len(self.buf):
            raise IndexError
        t = self.buf[pos]
        line, pos = self._line(pos + 1)
        if t in b"+":
            return line.decode(), pos
        if t in b"-!":
            if t in b"!":
                n = int(line)
                if pos + n + 2 > len(self.buf):
                    raise IndexError
                line, pos = bytes(self.buf[pos : pos + n]), pos + n + 2
            return RedisError(line.decode(errors="replace")), pos
        if t in b":(":
            return int(line), pos
        if t in b",":
            return float(line), pos
        if t in b"#":
            return line == b"t", pos
        if t in b"_":
            return None, pos
        if t in b"$=":
            n = int(line)
            if n < 0:
                return None, pos
            if pos + n + 2 > len(self.buf):
                raise IndexError
            return bytes(self.buf[pos : pos + n]), pos + n + 2
        if t in b"*~>%|":
            n = int(line)
            if n < 0:
                return None, pos
            if t in b"%|":
                n *= 2
            items = []
            for _ in range(n):
                v, pos = self._parse(pos)
                items.append(v)
            if t in b"|":  # an attribute precedes the frame it describes
                return self._parse(pos)
            return (Push(items) if t in b">" else items), pos
        raise ValueError(f"unknown RESP type {chr(t)!r}")

    def frame(self, block=True):
        """The next frame; None when `block` is false and none is complete."""
        while True:
            try:
                v, self.pos = self._parse(self.pos)
                return v
            except IndexError:
                if not block:
                    return None
                self._fill()

    def ready(self):
        """Whether bytes are waiting on the socket (never blocks)."""
        self.sock.setblocking(False)
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return False
        finally:
            self.sock.setblocking(True)
        if not data:
            raise ConnectionError("Redis closed the connection")
        self.received += len(data)
        self.buf += data
        return True

    def replies(self, n):
        """The next `n` replies (pushes that arrive in between are skipped)."""
        out = []
        while len(out) < n:
            v = self.frame()
            if not isinstance(v, Push):
                out.append(v)
        return out

    def call(self, *args):
        self.send([args])
        (v,) = self.replies(1)
        if isinstance(v, RedisError):
            raise v
        return v


def ws_key(i):
    return f"{PREFIX}{LABEL}:{hashlib.sha256(b'ws%d' % i).hexdigest()}"


def values(size, count=64):
    """Distinct random-looking values as windows of one random buffer (no per-put copy)."""
    buf = memoryview(os.urandom(size + 64 * count))
    return [buf[i * 64 : i * 64 + size] for i in range(count)]


def info(conn, section):
    text = conn.call("INFO", section).decode()
    out = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith("#"):
            k, v = line.split(":", 1)
            out[k] = v
    return out


def cpu_seconds(conn):
    i = info(conn, "cpu")
    return float(i["used_cpu_user"]) + float(i["used_cpu_sys"])


def cpu_self():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def sidecar(addr, mode, ws_count, data_conns, ready, go, out):
    """One simulated sidecar's L1 follower (see the module doc)."""
    tracker = Conn(*addr)
    tracker.call("HELLO", "3")
    tracker_id = tracker.call("CLIENT", "ID")
    checker = Conn(*addr)
    datas = [Conn(*addr) for _ in range(data_conns)]
    setup = {}
    held = {ws_key(i) for i in range(ws_count)} if mode == "bcast-l1" else None
    if mode.startswith("bcast"):
        tracker.call("CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", PREFIX)
    else:
        t0 = time.perf_counter()
        for c in datas + [checker]:
            c.call("CLIENT", "TRACKING", "ON", "REDIRECT", tracker_id)
        setup["redirect_ms"] = (time.perf_counter() - t0) * 1e3
        # The working set enters L1 through reads on the data connections: that is what
        # makes Redis remember the keys for this sidecar.
        t0 = time.perf_counter()
        per = [[] for _ in datas]
        for i in range(ws_count):
            per[i % len(datas)].append(ws_key(i))
        per[0].append(FENCE)
        for c, keys in zip(datas, per):
            for at in range(0, len(keys), 16):
                chunk = keys[at : at + 16]
                c.send([("GET", k) for k in chunk])
                c.replies(len(chunk))
        setup["read_ws_ms"] = (time.perf_counter() - t0) * 1e3
    ready.set()
    go.wait()
    tracker.received = 0
    cpu0 = cpu_self()
    msgs = keys = checks = flushes = 0
    reported = set()
    fenced = False
    while not fenced:
        batch = [tracker.frame()]
        while (f := tracker.frame(block=False)) is not None or tracker.ready():
            if f is not None:
                batch.append(f)
        named = []
        for push in batch:
            if not (isinstance(push, Push) and push and push[0] == b"invalidate"):
                continue
            msgs += 1
            if push[1] is None:
                flushes += 1
                continue
            for k in push[1]:
                k = k.decode()
                if k == FENCE:
                    fenced = True
                else:
                    named.append(k)
                    if k.startswith(f"{PREFIX}{LABEL}:"):
                        reported.add(k)
        keys += len(named)
        if held is not None:
            named = [k for k in named if k in held]
        if named:
            # l1_follower's check: which reported keys are gone (`bcast-l1`: only those
            # of them that L1 holds).
            for at in range(0, len(named), 256):
                chunk = named[at : at + 256]
                checker.send([("EXISTS", k) for k in chunk])
                checker.replies(len(chunk))
            checks += len(named)
    out.put(
        {
            "msgs": msgs,
            "keys": keys,
            "bytes": tracker.received,
            "checks": checks,
            "flushes": flushes,
            "reported": reported,
            "setup": setup,
            "cpu": cpu_self() - cpu0,
        }
    )


def writer(addr, wid, size, args, ws_count, go, out):
    """Puts NEW blocks for `seconds`, with TTL slides and churn of the working set."""
    batch, touches, churn, seconds, rate = (
        args.batch, args.touches, args.churn, args.seconds, args.rate
    )
    rng = random.Random(wid)
    conn = Conn(*addr)
    vals = values(size)
    nonce = os.urandom(8).hex()
    puts = stored = n = 0
    changed = set()
    go.wait()
    t0 = time.perf_counter()
    end = t0 + seconds
    while (now := time.perf_counter()) < end:
        if rate and n > rate * (now - t0):
            time.sleep(min(n / rate - (now - t0), end - now))
            continue
        cmds = []
        for _ in range(batch):
            key = f"{PREFIX}{LABEL}:{hashlib.sha256(f'{nonce}:{wid}:{n}'.encode()).hexdigest()}"
            cmds.append(("SET", key, vals[n % len(vals)], "NX", "PX", NEW_TTL_MS))
            n += 1
            if ws_count and rng.random() < touches:
                cmds.append(("PEXPIRE", ws_key(rng.randrange(ws_count)), WS_TTL_MS, "XX"))
            if ws_count and rng.random() < churn:
                i = rng.randrange(ws_count)
                changed.add(ws_key(i))
                # A block deleted (by another sidecar, an operator, eviction) and put
                # again later; both are changes every mode must report.
                if rng.random() < 0.5:
                    cmds.append(("UNLINK", ws_key(i)))
                else:
                    cmds.append(("SET", ws_key(i), vals[i % len(vals)], "PX", WS_TTL_MS))
        conn.send(cmds)
        for c, r in zip(cmds, conn.replies(len(cmds))):
            if isinstance(r, RedisError):
                raise r
            if c[0] == "SET" and len(c) == 6:
                puts += 1
                stored += r == "OK"
    elapsed = time.perf_counter() - t0
    # `changed`: the working-set keys deleted or re-put, each of which every mode must
    # report (a TTL slide needs no L1 change, so touched keys are not checked).
    out.put({"puts": puts, "stored": stored, "elapsed": elapsed, "changed": changed})


def start_redis(args):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    log = tempfile.NamedTemporaryFile(prefix="tracking-traffic-redis-", suffix=".log", delete=False)
    cmd = [
        "redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
        "--appendonly", "no", "--maxmemory", str(args.maxmemory),
        "--maxmemory-policy", "volatile-ttl", "--logfile", log.name,
    ]
    proc = subprocess.Popen(cmd)
    for _ in range(100):
        try:
            Conn("127.0.0.1", port).call("PING")
            return proc, ("127.0.0.1", port), cmd, log.name
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit(f"redis-server did not start; see {log.name}")


def prefill(conn, size, ws_count):
    vals = values(size)
    for at in range(0, ws_count, 16):
        idx = range(at, min(at + 16, ws_count))
        conn.send([("SET", ws_key(i), vals[i % len(vals)], "PX", WS_TTL_MS) for i in idx])
        for r in conn.replies(len(idx)):
            if isinstance(r, RedisError):
                raise r
    conn.call("SET", FENCE, b"0", "PX", WS_TTL_MS)


def run_cell(addr, args, size, mode):
    ctl = Conn(*addr)
    ctl.call("FLUSHALL")
    ws_count = args.l1_bytes // size
    prefill(ctl, size, ws_count)
    ctx = mp.get_context("fork")
    go = ctx.Event()
    out = ctx.Queue()
    sidecars = []
    if mode != "off":
        for _ in range(args.sidecars):
            ready = ctx.Event()
            p = ctx.Process(
                target=sidecar, args=(addr, mode, ws_count, args.data_conns, ready, go, out)
            )
            p.start()
            sidecars.append((p, ready))
        for p, ready in sidecars:
            while not ready.wait(1):
                if not p.is_alive():
                    sys.exit("a sidecar process died during setup")
    wout = ctx.Queue()
    writers = [
        ctx.Process(
            target=writer,
            args=(addr, w, size, args, ws_count, go, wout),
        )
        for w in range(args.writers)
    ]
    for w in writers:
        w.start()
    time.sleep(0.2)  # writers connected and waiting on `go`
    stats0 = info(ctl, "stats")
    cpu0, t0 = cpu_seconds(ctl), time.perf_counter()
    go.set()
    wres = [wout.get(timeout=args.seconds + 120) for _ in writers]
    for w in writers:
        w.join()
    # Before the sidecars leave: Redis drops a client's tracked keys lazily, not at once.
    stats1 = info(ctl, "stats")
    ctl.call("SET", FENCE, b"1", "PX", WS_TTL_MS)
    sres = [out.get(timeout=120) for _ in sidecars]
    cpu1, t1 = cpu_seconds(ctl), time.perf_counter()
    for p, _ in sidecars:
        p.join()
    window = max(w["elapsed"] for w in wres)
    changed = set().union(*(w["changed"] for w in wres))
    row = {
        "size": size,
        "mode": mode,
        "sidecars": len(sidecars),
        "ws": ws_count,
        "puts/s": sum(w["puts"] for w in wres) / window,
        "MB/s": sum(w["puts"] for w in wres) * size / window / 1e6,
        "cpu%": (cpu1 - cpu0) / (t1 - t0) * 100,
        "evicted/s": (int(stats1["evicted_keys"]) - int(stats0["evicted_keys"])) / window,
        "tracked_keys": int(stats1["tracking_total_keys"]),
        "tracked_items": int(stats1["tracking_total_items"]),
        "prefixes": int(stats1["tracking_total_prefixes"]),
        "changed": len(changed),
    }
    if sres:
        n = len(sres)
        row["msgs/s"] = sum(s["msgs"] for s in sres) / n / window
        row["keys/s"] = sum(s["keys"] for s in sres) / n / window
        row["KB/s"] = sum(s["bytes"] for s in sres) / n / window / 1e3
        row["EXISTS/s"] = sum(s["checks"] for s in sres) / window
        row["reported"] = min(len(s["reported"] & changed) for s in sres)
        row["setup"] = sres[0]["setup"]
        row["sidecar_cpu%"] = sum(s["cpu"] for s in sres) / n / window * 100
    return row


def fmt_size(n):
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--redis", help="host:port or redis://host:port of a Redis to use "
                    "(FLUSHALLed per cell; give it maxmemory and volatile-ttl); "
                    "default: start a private redis-server")
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--sizes", default="2097152,65536", help="value sizes in bytes")
    ap.add_argument("--modes", default="off,bcast,default",
                    help="off, bcast, bcast-l1 (BCAST, EXISTS only for keys L1 holds), default")
    ap.add_argument("--sidecars", type=int, default=1, help="tracking sidecars per cell")
    ap.add_argument("--writers", type=int, default=1)
    ap.add_argument("--rate", type=float, default=0,
                    help="new blocks per second per writer (0: as fast as it can)")
    ap.add_argument("--batch", type=int, default=8, help="new blocks per put pipeline")
    ap.add_argument("--touches", type=float, default=1.0,
                    help="TTL slides of working-set keys per new block")
    ap.add_argument("--churn", type=float, default=0.02,
                    help="deletes or re-puts of working-set keys per new block")
    ap.add_argument("--l1-bytes", type=int, default=1 << 30,
                    help="the working set: what one sidecar's L1 holds")
    ap.add_argument("--data-conns", type=int, default=4,
                    help="data connections per sidecar (default mode: REDIRECT on each)")
    ap.add_argument("--maxmemory", type=int, default=2 << 30)
    args = ap.parse_args()

    proc = None
    if args.redis:
        u = urllib.parse.urlparse(args.redis if "//" in args.redis else "redis://" + args.redis)
        addr = (u.hostname, u.port or 6379)
        redis_cmd = None
    else:
        proc, addr, redis_cmd, log = start_redis(args)
    try:
        rows = []
        for size in (int(s) for s in args.sizes.split(",")):
            for mode in args.modes.split(","):
                row = run_cell(addr, args, size, mode)
                rows.append(row)
                print(f"# done: {fmt_size(size)} {mode}", file=sys.stderr, flush=True)
    finally:
        if proc:
            proc.terminate()
            proc.wait()
            os.unlink(log)

    print("$ " + shlex.join(["python3"] + sys.argv))
    if redis_cmd:
        print("# redis: " + shlex.join(redis_cmd[:4] + ["<free port>"] + redis_cmd[5:-2]))
    rate = f"{args.rate:g}/s" if args.rate else "unbounded"
    print(f"# {args.seconds:g} s per cell; {args.writers} writer(s), puts {rate}, batch "
          f"{args.batch}, {args.touches:g} TTL slide(s) and {args.churn:g} delete/re-put(s) "
          f"of working-set keys per new block; {args.sidecars} tracking sidecar(s), "
          f"working set {args.l1_bytes >> 20} MiB each")
    head = ("| value | mode | ws keys | puts/s | put MB/s | evicted/s | inval msgs/s | keys/s "
            "| KB/s in | EXISTS/s (all sidecars) | Redis CPU % | Redis CPU µs/put "
            "| follower CPU % | Redis tracking table | ws changed / reported | setup |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        mode = r["mode"]
        tracked = (f"{r['tracked_keys']} keys, {r['tracked_items']} items"
                   if mode == "default" else
                   f"{r['prefixes']} prefix" if mode.startswith("bcast") else "-")
        setup = "-"
        if r.get("setup"):
            s = r["setup"]
            setup = f"REDIRECT {s['redirect_ms']:.1f} ms, read ws {s['read_ws_ms']:.0f} ms"
        if "msgs/s" in r:
            t = (f"{r['msgs/s']:.0f} | {r['keys/s']:.0f} | {r['KB/s']:.1f} | {r['EXISTS/s']:.0f}")
            rep = f"{r['changed']} / {r['reported']}"
            fcpu = f"{r['sidecar_cpu%']:.0f}"
        else:
            t, rep, fcpu = "- | - | - | -", f"{r['changed']} / -", "-"
        us = r["cpu%"] * 1e4 / r["puts/s"] if r["puts/s"] else 0
        print(f"| {fmt_size(r['size'])} | {mode} | {r['ws']} | {r['puts/s']:.0f} | "
              f"{r['MB/s']:.0f} | {r['evicted/s']:.0f} | {t} | {r['cpu%']:.0f} | {us:.1f} "
              f"| {fcpu} | {tracked} | {rep} | {setup} |")

if __name__ == "__main__":
    main()
