"""A vLLM instance on CPU, for the scheduler tests: vLLM's real ``Scheduler`` with its real
``OffloadingConnector`` (scheduler role, ``TieringOffloadingSpec``, kvshelf as the secondary
tier), built from vLLM's real configuration classes over a local model config (no weights,
no download).

What vLLM runs on a GPU worker is played here, in the order vLLM's worker runs it each
step: the connector's loads (CPU tier chunk -> "GPU" block), the forward pass (each block
whose tokens are computed this step gets its KV: bytes derived from the block's vLLM hash,
so two instances compute the same bytes for the same prefix), the connector's stores
("GPU" block -> CPU tier chunk), then the completions, reported back through vLLM's own
``KVConnectorOutput`` / ``OffloadingWorkerMetadata``. Every block a load brings in is
checked against the bytes its prefix must have.

Run as a script (``python instance.py <json>``), it serves one prompt per line of stdin and
prints one JSON line per prompt: how many of its blocks were loaded (and verified) and how
many were computed.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from vllm import SamplingParams
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVEventsConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_events import EventPublisher
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.common import (
    OffloadingConnectorMetadata,
    OffloadingWorkerMetadata,
)
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

BLOCK = 16  # tokens per block (and per offloaded chunk)


class Recorder(EventPublisher):
    """An event publisher (vLLM's interface) that keeps every batch the scheduler
    publishes, where vLLM's ZMQ publisher would send it to a router."""

    def __init__(self) -> None:
        super().__init__(0)
        self.published: list[Any] = []

    def publish(self, events: Any) -> None:
        self.published.append(events)

    def shutdown(self) -> None:
        return
LAYERS = ("model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn")
EOS = 0


def model_dir(root: Path) -> Path:
    """A local Hugging Face config of a tiny Llama: vLLM reads it; nothing is downloaded
    and no weights exist (the scheduler needs none)."""
    d = root / "tiny-llama"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "vocab_size": 1000, "max_position_embeddings": 4096,
        "torch_dtype": "bfloat16", "rms_norm_eps": 1e-6,
    }))
    return d


def kv_of(block_hash: bytes, n: int) -> bytes:
    """The KV bytes of the block whose vLLM hash is ``block_hash`` (prefix-determined)."""
    return hashlib.shake_256(block_hash).digest(n)


class Instance:
    """One vLLM instance: its scheduler, its connector, its "GPU" blocks."""

    @staticmethod
    def chunk_bytes_of() -> int:
        """Bytes of one CPU-tier chunk of this model: one block of both layers, rounded up
        to the page."""
        spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=16,
                                 dtype=torch.bfloat16)
        return (spec.page_size_bytes * len(LAYERS) + 4095) // 4096 * 4096

    def __init__(self, model: Path, tier: dict[str, Any], gpu_blocks: int = 64,
                 cpu_chunks: int = 32, events: bool = False) -> None:
        spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=16,
                                 dtype=torch.bfloat16)
        self.page = spec.page_size_bytes * len(LAYERS)
        kv = KVTransferConfig(
            kv_connector="OffloadingConnector", kv_role="kv_both",
            engine_id=f"kvshelf-{uuid.uuid4().hex[:8]}",
            kv_connector_extra_config={
                "spec_name": "TieringOffloadingSpec",
                "cpu_bytes_to_use": cpu_chunks * 4096 * ((self.page + 4095) // 4096),
                "secondary_tiers": [tier],
            },
        )
        config = VllmConfig(
            model_config=ModelConfig(model=str(model), skip_tokenizer_init=True,
                                     dtype="bfloat16", seed=0, max_model_len=4096),
            cache_config=CacheConfig(block_size=BLOCK, gpu_memory_utilization=0.9,
                                     cache_dtype="auto", enable_prefix_caching=True),
            scheduler_config=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=1024,
                                             max_model_len=4096, enable_chunked_prefill=True,
                                             is_encoder_decoder=False),
            kv_transfer_config=kv,
            device_config=DeviceConfig("cpu"),
        )
        if events:
            config.kv_events_config = KVEventsConfig(enable_kv_cache_events=True,
                                                     publisher="null")
        config.cache_config.num_gpu_blocks = gpu_blocks
        kv_cache_config = KVCacheConfig(
            num_blocks=gpu_blocks, kv_cache_tensors=[],
            kv_cache_groups=[KVCacheGroupSpec(list(LAYERS), spec)],
        )
        self.scheduler = Scheduler(
            vllm_config=config, kv_cache_config=kv_cache_config,
            structured_output_manager=StructuredOutputManager(config), block_size=BLOCK,
            log_stats=True,
        )
        self.events = Recorder()
        if events:
            self.scheduler.kv_event_publisher = self.events
        connector = self.scheduler.connector
        self.manager = connector.connector_scheduler.manager
        self.tier = self.manager.secondary_tiers[0]
        view = self.manager.primary_tier.get_kv_memoryview()
        self.chunk_bytes = view.strides[0]
        self.cpu = view.cast("B")  # chunk c: [c * chunk_bytes, (c + 1) * chunk_bytes)
        init_none_hash(sha256)
        self._hasher = get_request_block_hasher(BLOCK, sha256)
        self.gpu: dict[int, bytes] = {}
        self.loaded_blocks = 0
        self.computed_blocks = 0
        self.connector_stats: list[Any] = []
        self.config = config
        self.steps = 0
        self._next_req = 0

    # -- the "worker" --------------------------------------------------------------------

    def _block_owner(self) -> dict[int, tuple[str, int]]:
        owners = {}
        for req_id, blocks in self.scheduler.kv_cache_manager.coordinator \
                .single_type_managers[0].req_to_blocks.items():
            for i, b in enumerate(blocks):
                owners[b.block_id] = (req_id, i)
        return owners

    def step(self) -> ModelRunnerOutput:
        """One engine step: schedule, run the "worker", update the scheduler."""
        self.steps += 1
        out = self.scheduler.schedule()
        meta = out.kv_connector_metadata
        assert isinstance(meta, OffloadingConnectorMetadata)
        owners = self._block_owner()
        done = OffloadingWorkerMetadata()
        recving = set()
        for job_id, job in meta.load_jobs.items():
            for chunk, block in zip(job.src_spec.chunk_ids, job.dst_spec.block_ids):
                at = int(chunk) * self.chunk_bytes
                data = self.cpu[at : at + self.page].tobytes()
                req_id, i = owners[int(block)]
                want = kv_of(self.scheduler.requests[req_id].block_hashes[i], self.page)
                assert data == want, f"block {i} of {req_id} loaded with wrong bytes"
                self.gpu[int(block)] = data
                self.loaded_blocks += 1
            done.mark_completed(job_id)
            if not job.sync:
                recving.add(job.req_id)
        # The forward pass: blocks completed by this step's tokens get their KV.
        for req_id, n in out.num_scheduled_tokens.items():
            req = self.scheduler.requests[req_id]
            # schedule() has already counted this step's tokens as computed.
            end = req.num_computed_tokens
            blocks = self.scheduler.kv_cache_manager.coordinator.single_type_managers[0] \
                .req_to_blocks[req_id]
            for i in range((end - n) // BLOCK, min(end // BLOCK, len(blocks))):
                if i < len(req.block_hashes):
                    self.gpu[blocks[i].block_id] = kv_of(req.block_hashes[i], self.page)
                    self.computed_blocks += 1
        for job_id, job in meta.store_jobs.items():
            for block, chunk in zip(job.src_spec.block_ids, job.dst_spec.chunk_ids):
                at = int(chunk) * self.chunk_bytes
                self.cpu[at : at + self.page] = self.gpu[int(block)]
            done.mark_completed(job_id)
        req_ids = [r.request_id for r in self.scheduler.running]
        sampled = []
        for r in req_ids:
            req = self.scheduler.requests[r]
            n = out.num_scheduled_tokens.get(r, 0)
            sampled.append([EOS] if n and req.num_computed_tokens >= req.num_tokens else [])
        mro = ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
            kv_connector_output=KVConnectorOutput(
                finished_recving=recving or None,
                kv_connector_worker_meta=done if done.completed_jobs else None,
            ),
        )
        outputs = self.scheduler.update_from_output(out, mro)
        # What the engine core sends its frontend: the connector's stats of the step,
        # which the frontend's Prometheus logger observes.
        for eco in outputs.values():
            stats = eco.scheduler_stats
            if stats is not None and stats.kv_connector_stats:
                self.connector_stats.append(stats.kv_connector_stats)
        return mro

    # -- requests ------------------------------------------------------------------------

    def serve(self, tokens: list[int], max_steps: int = 2000,
              deadline_s: float = 60.0) -> dict[str, Any]:
        """Runs one prompt (one generated token, EOS) to completion and until its stores
        have reached the tier; returns how many of its blocks were loaded and computed."""
        self._next_req += 1
        params = SamplingParams(max_tokens=1)
        params.update_from_generation_config({}, EOS)
        req = Request(request_id=f"req-{self._next_req}", prompt_token_ids=tokens,
                      sampling_params=params, pooling_params=None, block_hasher=self._hasher)
        loaded_before, computed_before = self.loaded_blocks, self.computed_blocks
        self.scheduler.add_request(req)
        deadline = time.monotonic() + deadline_s
        steps = 0
        while self.scheduler.requests or self.manager.has_pending_work() \
                or self.tier.has_pending_work():
            assert time.monotonic() < deadline and steps < max_steps, (
                f"request not done after {steps} steps")
            self.step()
            steps += 1
            time.sleep(0.001)
        return {
            "loaded_blocks": self.loaded_blocks - loaded_before,
            "computed_blocks": self.computed_blocks - computed_before,
            "steps": steps,
        }

    def shutdown(self) -> None:
        self.cpu.release()  # this "worker"'s view; the tier releases its own
        self.scheduler.shutdown()


def main() -> None:
    args = json.loads(sys.argv[1])
    inst = Instance(Path(args["model"]), args["tier"])
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        tokens = json.loads(line)
        print(json.dumps(inst.serve(tokens)), flush=True)
    inst.shutdown()


if __name__ == "__main__":
    main()
