"""What the LMCache benches (lmcache_plugin.py, lmcache_compare.py) share: the chunk geometry,
a throwaway redis-server and the random fill of a chunk. Imports neither LMCache nor kvshelf,
so each bench pulls in only what it drives."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

import torch

LAYERS, HEADS, DIM = 32, 8, 128  # a Llama-3-8B-class model: 128 KiB per token in bf16
BATCH = 8  # chunks per batched call
# Tokens per chunk, by the name `kvshelf bench --size` gives the same number of bytes:
# 16 tokens are 2 MiB, 256 are 32 MiB.
TOKENS = {"2MiB": 16, "32MiB": 256}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(maxmemory: str | None = None) -> tuple[subprocess.Popen, int]:
    """A redis-server on a free loopback port, no persistence; the caller kills it."""
    port = free_port()
    args = [shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1",
            "--port", str(port), "--save", "", "--appendonly", "no",
            "--dir", tempfile.mkdtemp()]
    if maxmemory:
        args += ["--maxmemory", maxmemory]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, port
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def flushall(host: str, port: int) -> None:
    subprocess.run(["redis-cli", "-h", host, "-p", str(port), "FLUSHALL"], check=True,
                   capture_output=True)


def fill_random(tensor: torch.Tensor) -> None:
    """Random bytes in place: incompressible, and every page touched before any clock starts."""
    raw = tensor.view(torch.uint8)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8))
