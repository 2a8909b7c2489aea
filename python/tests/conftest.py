"""Fixtures: real redis-server processes on free ports (never a mock)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

import kvshelf

REPO = Path(__file__).resolve().parents[2]


def sigstop(proc: subprocess.Popen, within: float = 10.0) -> None:
    """SIGSTOPs `proc` and returns once every one of its threads is stopped. The signal
    only asks: a thread running on another core (a tokio worker spinning before it parks)
    stops when the kernel next interrupts it, which on a loaded VM can be milliseconds
    later — time enough to answer one more request."""
    import signal

    proc.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + within
    tasks = Path(f"/proc/{proc.pid}/task")
    while time.monotonic() < deadline:
        states = []
        for t in tasks.iterdir():
            try:
                # The state follows the ")" that ends the command name.
                states.append((t / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except (FileNotFoundError, IndexError):
                continue
        if states and all(s in ("T", "t") for s in states):
            return
        time.sleep(0.001)
    raise AssertionError(f"process {proc.pid} did not stop within {within} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process; stop() and start() again on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="kvshelf-py-redis-")
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)  # the server is starting: nothing to wait on but the port
        raise RuntimeError(f"redis-server did not start on {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def cli(self, *args: str) -> bytes:
        exe = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        return subprocess.run(
            [exe, "-p", str(self.port), *args], check=True, capture_output=True
        ).stdout


class SidecarProcess:
    """`kvshelf serve` (the binary of this repository: ``$KVSHELF_BIN``, else
    target/debug/kvshelf) with the configuration ``config`` (TOML text), on a port it picks
    itself, read back from its startup line; ``url`` is its HTTP and gRPC address."""

    def __init__(self, config: str, prefix: str = "kvshelf-py-sidecar-") -> None:
        exe = os.environ.get("KVSHELF_BIN") or str(REPO / "target" / "debug" / "kvshelf")
        if not Path(exe).exists():
            pytest.fail(f"no kvshelf binary at {exe}: `cargo build --bin kvshelf` "
                        "(python/ci.sh does)")
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        path = self.dir / "kvshelf.toml"
        path.write_text(config)
        self.log = self.dir / "server.log"
        self.proc = subprocess.Popen(
            [exe, "--config", str(path), "serve", "--listen", "127.0.0.1:0"],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        self.url: str | None = None
        while time.monotonic() < deadline and self.url is None:
            log = re.sub(r"\x1b\[[0-9;]*m", "", self.log.read_text())  # colours, if any
            m = re.search(r"serving HTTP and gRPC.*addr=(\S+)", log)
            if m:
                self.url = f"http://{m.group(1)}"
            elif self.proc.poll() is not None:
                break
            else:
                time.sleep(0.05)  # the process is starting: nothing to wait on but its log
        if self.url is None:
            self.stop()
            raise RuntimeError(f"kvshelf serve did not start:\n{self.log.read_text()}")
        with urllib.request.urlopen(f"{self.url}/healthz", timeout=5) as r:
            assert r.status == 200

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=15)


@pytest.fixture(scope="session")
def redis():
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture()
def own_redis():
    """A Redis of the test's own, for tests that stop and restart it."""
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture()
def label() -> str:
    return f"py-{uuid.uuid4().hex[:12]}"


@pytest.fixture()
def ns(label: str) -> kvshelf.Namespace:
    return kvshelf.Namespace(
        label=label, model_id="kvshelf/test-model", kv_dtype="float16",
        num_layers=2, num_kv_heads=2, head_dim=8, block_size=4,
    )


@pytest.fixture()
def store(redis) -> kvshelf.Store:
    return kvshelf.Store(redis.url)


def pytest_sessionstart(session):
    os.environ.setdefault("KVSHELF_THREADS", "2")
