"""Test support for kvshelf's vLLM tier: vLLM's real offloading configuration and spec, the
CPU tier's memory as a torch CPU tensor, and helpers that step the tier until its answers
arrive (with deadlines that fail instead of hanging)."""

from __future__ import annotations

import faulthandler
import hashlib
import time
import uuid
from typing import Any, Callable, Optional

import pytest
import torch
from vllm.v1.kv_offload.base import (
    LookupResult,
    OffloadKey,
    ReqContext,
    ScheduleEndContext,
    make_offload_key,
)
from vllm.v1.kv_offload.config import (
    OffloadingCacheConfig,
    OffloadingConfig,
    OffloadingGroupConfig,
    OffloadingModelConfig,
    OffloadingParallelConfig,
)
from vllm.v1.kv_offload.tiering.base import JobResult, TransferJob
from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec

from conftest import SidecarProcess
from kvshelf.vllm import KvshelfTier

GUARD = 120.0  # seconds a test may take before the process dumps its stacks and exits
CHUNK = 64 * 1024  # bytes of one CPU-tier chunk in these tests (a multiple of the page)


@pytest.fixture(autouse=True)
def guard():
    """A test-level timeout that works while a thread is stuck in native code: a hang fails
    the run, with every thread's stack."""
    faulthandler.dump_traceback_later(GUARD, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def offloading_config(
    *,
    model: str = "kvshelf/test-model",
    dtype: str = "bfloat16",
    chunk_bytes: int = CHUNK,
    tp_size: int = 1,
    rank: int = 0,
    tiers: Optional[list[dict[str, Any]]] = None,
    cpu_chunks: int = 16,
    events: bool = True,
) -> OffloadingConfig:
    """vLLM's normalized offloading configuration of a one-group model whose worker
    block is ``chunk_bytes`` (one block per chunk)."""
    return OffloadingConfig(
        groups=(OffloadingGroupConfig(tokens_per_block=16, layer_names=("layer.0",), group_id=0),),
        worker_kv_bytes_per_block=chunk_bytes,
        enable_kv_cache_events=events,
        extra_config={"cpu_bytes_to_use": cpu_chunks * chunk_bytes, "secondary_tiers": tiers or []},
        engine_id=f"kvshelf-test-{uuid.uuid4().hex[:8]}",
        model=OffloadingModelConfig(name=model, dtype=dtype),
        cache=OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=1),
        parallel=OffloadingParallelConfig(
            rank=rank, world_size=1, tp_size=tp_size, pp_size=1, pcp_size=1, dcp_size=1,
            data_parallel_index=0, data_parallel_size=1, data_parallel_rank_local=None,
            is_parallelism_agnostic=False,
        ),
    )


class Harness:
    """vLLM's tier harness: the CPU tier's memory (a torch CPU tensor, one row per chunk,
    viewed as vLLM views it) and a ``KvshelfTier`` over it, built from vLLM's real
    ``TieringOffloadingSpec``."""

    def __init__(self, url: str, label: str, chunks: int = 8, **params: Any) -> None:
        cfg_kw = {k: params.pop(k) for k in ("model", "dtype", "tp_size", "rank") if k in params}
        self.spec = TieringOffloadingSpec(offloading_config(**cfg_kw))
        self.kv = torch.zeros(chunks, CHUNK, dtype=torch.int8)
        self.view = memoryview(self.kv.numpy())
        params.setdefault("timeout", 2.0)
        self.tier = KvshelfTier(self.spec, self.view, "KvshelfTier", url=url, namespace=label,
                                **params)
        self.next_job = 1
        self.step_no = 0

    def fill(self, chunk: int, seed: int) -> bytes:
        g = torch.Generator().manual_seed(seed)
        self.kv[chunk] = torch.randint(-128, 128, (CHUNK,), dtype=torch.int8, generator=g)
        return self.chunk(chunk)

    def chunk(self, chunk: int) -> bytes:
        return self.kv[chunk].numpy().tobytes()

    def job(self, keys: list[OffloadKey], chunk_ids: list[int], promotion: bool,
            req: str = "r") -> TransferJob:
        j = TransferJob(self.next_job, keys, torch.tensor(chunk_ids).numpy(), promotion,
                        ReqContext(req))
        self.next_job += 1
        return j

    def store(self, keys, chunk_ids, within: float = 10.0) -> JobResult:
        j = self.job(keys, chunk_ids, False)
        self.tier.submit_store(j)
        return self.finish(j.job_id, within)

    def load(self, keys, chunk_ids, within: float = 10.0) -> JobResult:
        j = self.job(keys, chunk_ids, True)
        self.tier.submit_load(j)
        return self.finish(j.job_id, within)

    def finish(self, job_id: int, within: float) -> JobResult:
        """Polls get_finished_jobs, as the tiering manager does each step, until the job
        is reported; fails past ``within`` seconds."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for r in self.tier.get_finished_jobs():
                assert r.job_id == job_id, r
                return r
            time.sleep(0.002)
        raise AssertionError(f"job {job_id} not reported within {within} s")

    def end_step(self) -> None:
        self.step_no += 1
        self.tier.on_schedule_end(ScheduleEndContext((), ()))

    def lookup(self, keys: list[OffloadKey], req: str = "r", within: float = 10.0,
               on_step: Optional[Callable[[], None]] = None) -> list[LookupResult]:
        """Asks about ``keys`` each step, as the connector's prefix lookup does (it keeps
        asking past a RETRY), until no answer is RETRY; fails past ``within`` seconds."""
        ctx = ReqContext(req)
        self.tier.on_new_request(ctx)
        deadline = time.monotonic() + within
        while True:
            got = [self.tier.lookup(k, ctx) for k in keys]
            if LookupResult.RETRY not in got:
                return got
            assert time.monotonic() < deadline, f"lookups still RETRY after {within} s: {got}"
            self.end_step()
            if on_step is not None:
                on_step()
            time.sleep(0.002)

    def close(self) -> None:
        self.tier.shutdown()


def keys_of(n: int, tag: str = "") -> list[OffloadKey]:
    """``n`` vLLM offload keys: a sha256 block hash and group 0, as vLLM builds them."""
    return [make_offload_key(hashlib.sha256(f"{tag}{uuid.uuid4()}:{i}".encode()).digest(), 0)
            for i in range(n)]


class Sidecar(SidecarProcess):
    """``kvshelf serve`` (the binary of this repository) in front of a real Redis, with
    one namespace whose block is exactly ``chunk_bytes``: the shape the tier's sidecar
    backend needs (``docs/vllm.md``)."""

    def __init__(self, redis_url: str, label: str, chunk_bytes: int = CHUNK) -> None:
        super().__init__(f"""
[store]
url = "{redis_url}"

[[namespaces]]
label = "{label}"
model_id = "kvshelf/test-model"
kv_dtype = "uint8"
block_size = 1
layout = {{ num_layers = 1, num_kv_heads = 1, head_dim = {chunk_bytes // 2} }}
""", prefix="kvshelf-py-vllm-sidecar-")
