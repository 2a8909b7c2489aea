"""kvshelf as the secondary tier of vLLM's real ``Scheduler`` and ``OffloadingConnector``
(``TieringOffloadingSpec``), on CPU (``instance.py`` plays the GPU worker): a request's
blocks go to Redis, a second vLLM instance in a second process finds and loads them byte
for byte, and a Redis that is stopped or SIGSTOPped mid-run never stops a scheduler."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import sigstop
from instance import Instance, model_dir
from vllm_support import guard  # noqa: F401 (autouse)

HERE = Path(__file__).resolve().parent
BLOCK = 16


def prompt(seed: int, blocks: int = 5, tail: int = 4) -> list[int]:
    return [1 + (seed * 7919 + i) % 997 for i in range(blocks * BLOCK + tail)]


def tier(url: str, label: str, **extra) -> dict:
    return {"type": "KvshelfTier", "module_path": "kvshelf.vllm", "url": url,
            "namespace": label, "timeout": 1.0, **extra}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return model_dir(tmp_path_factory.mktemp("model"))


class Remote:
    """A vLLM instance in a process of its own (``instance.py`` as a script)."""

    def __init__(self, model: Path, tier_cfg: dict) -> None:
        args = json.dumps({"model": str(model), "tier": tier_cfg})
        self.proc = subprocess.Popen([sys.executable, str(HERE / "instance.py"), args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self._line()) == {"ready": True}

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        assert line, f"the instance exited ({self.proc.poll()})"
        return line

    def serve(self, tokens: list[int]) -> dict:
        self.proc.stdin.write(json.dumps(tokens) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def close(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0


def test_a_second_instance_in_a_second_process_loads_the_blocks(model, redis, label):
    a = Instance(model, tier(redis.url, label))
    try:
        got = a.serve(prompt(1))
        assert (got["loaded_blocks"], got["computed_blocks"]) == (0, 5)
        keys = redis.cli("KEYS", f"kvshelf:v1:{label}:*").split()
        assert len(keys) == 5
    finally:
        a.shutdown()
    b = Remote(model, tier(redis.url, label))
    try:
        # Every full block comes from Redis (and is checked byte for byte on load).
        got = b.serve(prompt(1))
        assert (got["loaded_blocks"], got["computed_blocks"]) == (5, 0)
        # A prompt sharing the first three blocks loads those and computes the rest.
        shared = prompt(1)[: 3 * BLOCK] + prompt(2)[: 2 * BLOCK + 4]
        got = b.serve(shared)
        assert (got["loaded_blocks"], got["computed_blocks"]) == (0, 2)  # 3 in its GPU cache
        got = b.serve(prompt(3))
        assert (got["loaded_blocks"], got["computed_blocks"]) == (0, 5)
    finally:
        b.close()
    # Another model's instance never sees these blocks.
    c = Instance(model, tier(redis.url, label, model="another/model"))
    try:
        got = c.serve(prompt(1))
        assert (got["loaded_blocks"], got["computed_blocks"]) == (0, 5)
    finally:
        c.shutdown()


def test_redis_stopped_or_sigstopped_mid_run_never_stops_the_scheduler(model, own_redis, label):
    a = Instance(model, tier(own_redis.url, label))
    b = Instance(model, tier(own_redis.url, label))
    try:
        for s in (1, 3, 5):
            assert a.serve(prompt(s))["computed_blocks"] == 5

        sigstop(own_redis.proc)
        try:
            t0 = time.monotonic()
            # Lookups time out as misses and stores as failed jobs: both keep stepping.
            got = b.serve(prompt(1), deadline_s=30)
            assert (got["loaded_blocks"], got["computed_blocks"]) == (0, 5)
            assert a.serve(prompt(2), deadline_s=30)["computed_blocks"] == 5
            assert time.monotonic() - t0 < 30
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        # Redis answers again: hits resume.
        got = b.serve(prompt(3))
        assert (got["loaded_blocks"], got["computed_blocks"]) == (5, 0)

        own_redis.stop()
        got = b.serve(prompt(5), deadline_s=30)
        assert (got["loaded_blocks"], got["computed_blocks"]) == (0, 5)
        own_redis.start()  # empty again
        assert a.serve(prompt(6))["computed_blocks"] == 5
        got = b.serve(prompt(6))
        assert (got["loaded_blocks"], got["computed_blocks"]) == (5, 0)
    finally:
        a.shutdown()
        b.shutdown()


def test_blocks_stored_on_the_shelf_are_published_as_storage_events(model, redis, label):
    """vLLM's own KV event path (the scheduler's publisher): every block the tier stored is
    a ``BlockStored`` with ``medium="STORAGE"``, the same block hashes vLLM publishes for
    the GPU, so a router sees what the shelf holds."""
    a = Instance(model, tier(redis.url, label, enable_kv_events=True), events=True)
    try:
        got = a.serve(prompt(21))
        assert (got["loaded_blocks"], got["computed_blocks"]) == (0, 5)
        by_medium: dict[str, list] = {}
        for batch in a.events.published:
            for e in batch.events:
                if type(e).__name__ == "BlockStored":
                    by_medium.setdefault(e.medium, []).extend(e.block_hashes)
        assert len(by_medium["STORAGE"]) == 5
        assert sorted(by_medium["STORAGE"]) == sorted(by_medium["GPU"])
    finally:
        a.shutdown()


def test_tier_metrics_reach_vllms_prometheus_metrics(model, redis, label):
    """vLLM's stats path: the scheduler puts the connector's stats (the tier's counters
    among them) into the engine core's outputs; vLLM's own ``OffloadPromMetrics``, as
    the frontend builds it from the tier's metric definitions, turns them into series."""
    import functools

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector import (
        OffloadingConnector,
    )

    a = Instance(model, tier(redis.url, label))
    b = Instance(model, tier(redis.url, label))
    try:
        a.serve(prompt(31, blocks=3))
        got = b.serve(prompt(31, blocks=3))
        assert got["loaded_blocks"] == 3
        registry = CollectorRegistry()
        types = {t: functools.partial(t, registry=registry) for t in (Counter, Gauge, Histogram)}
        prom = OffloadingConnector.build_prom_metrics(b.config, types, ["engine"], {0: ["0"]})
        for stats in a.connector_stats + b.connector_stats:
            prom.observe(stats if isinstance(stats, dict) else stats.data, 0)
        text = generate_latest(registry).decode()
        for series in ('kvshelf:tier_jobs_total{engine="0",op="store",result="ok"} 1.0',
                       'kvshelf:tier_jobs_total{engine="0",op="load",result="ok"} 1.0',
                       f'kvshelf:tier_bytes_total{{engine="0",op="load"}} {3 * a.chunk_bytes}.0',
                       'kvshelf:tier_lookup_keys_total{engine="0",result="hit"} 3.0',
                       'kvshelf:tier_lookup_keys_total{engine="0",result="miss"} 3.0'):
            assert series in text, text
    finally:
        a.shutdown()
        b.shutdown()
