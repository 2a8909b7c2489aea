#!/usr/bin/env python3
"""The most a client can load from one Redis over loopback TCP: the ceiling that
`benches/lmcache_bench_l2.py` holds both LMCache adapters against.

Each round fetches `--keys` values of `--size` bytes with one `GET` each, spread over
`--conns` blocking connections (one thread each, as LMCache's `resp` adapter spreads keys
over its workers); a thread sends its key's `GET`, reads the `$<len>` line and receives the
value with one `recv_into(MSG_WAITALL)` straight into a buffer allocated once. No parsing
beyond the length line, no checksum, no copy, no Python on the byte path (the GIL is
released in the receive): what is left is Redis's work, the kernel's copy and loopback. The
threads start each round together and the round ends when the last value has landed, as a
round of `lmcache bench l2` does. Prints MiB/s (LMCache's unit) over `--rounds` rounds after
one warm-up, and with `--json` the per-round figures.

    python3 benches/redis_get_ceiling.py --port 6379 --size 2097152 --keys 8 --conns 8

Seeds its own keys (`kvshelf-ceiling:<i>`, deleted at the end).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time


def command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out += [b"$%d\r\n" % len(p), p, b"\r\n"]
    return b"".join(out)


def read_line(sock: socket.socket) -> bytes:
    line = bytearray()
    while not line.endswith(b"\r\n"):
        b = sock.recv(1)
        if not b:
            raise ConnectionError("Redis closed the connection")
        line += b
    return bytes(line[:-2])


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def get_into(sock: socket.socket, key: bytes, buf: memoryview) -> None:
    sock.sendall(command(b"GET", key))
    head = read_line(sock)
    if not head.startswith(b"$") or int(head[1:]) != len(buf):
        raise RuntimeError(f"unexpected reply {head[:40]!r} for {key!r}")
    got = sock.recv_into(buf, len(buf), socket.MSG_WAITALL)
    if got != len(buf):
        raise ConnectionError(f"short value: {got} of {len(buf)} bytes")
    if sock.recv(2, socket.MSG_WAITALL) != b"\r\n":
        raise RuntimeError("value not followed by CRLF")


def measure(port: int, size: int, keys: int, conns: int, rounds: int) -> list[float]:
    """Seconds per measured round."""
    names = [b"kvshelf-ceiling:%d" % i for i in range(keys)]
    seed = connect(port)
    value = bytes(range(256)) * (size // 256) + bytes(size % 256)
    for k in names:
        seed.sendall(command(b"SET", k, value))
        if read_line(seed) != b"+OK":
            raise RuntimeError("SET refused")
    conns = min(conns, keys)
    shares = [names[i::conns] for i in range(conns)]
    socks = [connect(port) for _ in range(conns)]
    bufs = [memoryview(bytearray(size)) for _ in range(conns)]
    start = threading.Barrier(conns + 1)
    end = threading.Barrier(conns + 1)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        for _ in range(rounds + 1):
            start.wait()
            try:
                for k in shares[i]:
                    get_into(socks[i], k, bufs[i])
            except BaseException as e:  # reported by the main thread
                errors.append(e)
            end.wait()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(conns)]
    for t in threads:
        t.start()
    took = []
    for r in range(rounds + 1):
        start.wait()
        t0 = time.perf_counter()
        end.wait()
        if r:  # the first round warms up
            took.append(time.perf_counter() - t0)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    seed.sendall(command(b"DEL", *names))
    read_line(seed)
    for s in socks + [seed]:
        s.close()
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--size", type=int, required=True, help="bytes per value")
    ap.add_argument("--keys", type=int, default=8, help="values per round")
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", action="store_true", help="print a JSON object, not a line")
    a = ap.parse_args()
    took = measure(a.port, a.size, a.keys, a.conns, a.rounds)
    mib = a.size * a.keys / (1 << 20)
    mean = mib * len(took) / sum(took)
    if a.json:
        print(json.dumps({"mib_s": mean, "median_round_mib_s": mib / statistics.median(took),
                          "rounds": took}))
    else:
        print(f"{mean:.0f} MiB/s ({a.keys} x {a.size} B over {a.conns} connections, "
              f"{a.rounds} rounds)")


if __name__ == "__main__":
    main()
