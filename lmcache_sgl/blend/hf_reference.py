"""A reference ``BlendLayers`` over a transformers Llama, with a dense per-request cache.

For tests and for measuring blend quality offline (``scripts/bench_blend.py``):
the same ``blend_forward`` as the engine, on HF's modules. transformers is
imported lazily, by the caller building the model.

Teacher forcing: blend ``prompt + answer`` in one pass with the answer rows not
reused. Answer rows are always selected and come after the prompt, so the
prompt rows' selection and K/V are the same as blending the prompt alone and
then decoding the answer over its cache; the answer rows' logits are the
teacher-forced next-token distributions.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .forward import BlendOutput, InjectedKV, blend_forward
from .rope import RopeSpec


class HFBlendLayers:
    """``BlendLayers`` for one prompt of ``num_tokens`` rows over ``model.model`` (a HF LlamaModel).

    ``k_cache``/``v_cache`` [L, N, Hkv, D] start as NaN, so a read of a row that no
    layer wrote poisons the output instead of passing silently.
    """

    def __init__(self, model: Any, num_tokens: int) -> None:
        cfg = model.config
        self.model = model
        self.inner = model.model
        self.num_layers = cfg.num_hidden_layers
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        shape = (self.num_layers, num_tokens, self.num_kv_heads, self.head_dim)
        self.k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
        self.v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)

    def qkv(self, layer, hidden, residual, positions):
        block = self.inner.layers[layer]
        attn = block.self_attn
        x = block.input_layernorm(hidden)  # [n, hidden]
        n = x.shape[0]
        q = attn.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = attn.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = attn.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        cos, sin = self.inner.rotary_emb(x, positions[None, :])  # [1, n, D]
        q, k = _rope(q, cos[0], sin[0]), _rope(k, cos[0], sin[0])
        return q, k, v, hidden  # HF style: the residual is the layer input

    def write_kv(self, layer, rows, k, v):
        self.k_cache[layer, rows] = k.to(self.k_cache.dtype)
        self.v_cache[layer, rows] = v.to(self.v_cache.dtype)

    def attend(self, layer, q, q_rows):
        n_rows = self.k_cache.shape[1]
        group = self.num_heads // self.num_kv_heads
        k = self.k_cache[layer].repeat_interleave(group, dim=1)  # [N, Hq, D]
        v = self.v_cache[layer].repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * self.head_dim ** -0.5  # [Hq, n, N]
        visible = torch.arange(n_rows, device=q.device)[None, :] <= q_rows[:, None]  # [n, N], rows in position order
        # The last row is always a query and sees every row, so a row left unwritten (NaN) poisons the output.
        weights = torch.softmax(scores.masked_fill(~visible[None], float("-inf")), dim=-1, dtype=torch.float32)
        out = torch.einsum("hqk,khd->qhd", weights.to(q.dtype), v)
        return out.reshape(q.shape[0], -1)

    def post(self, layer, attn_out, residual):
        block = self.inner.layers[layer]
        hidden = residual + block.self_attn.o_proj(attn_out)
        return hidden + block.mlp(block.post_attention_layernorm(hidden)), None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[m, vocab] next-token logits of the final hidden rows."""
        return self.model.lm_head(self.inner.norm(hidden))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's neox-order rotation of x [n, H, D] by cos/sin [n, D]."""
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + turned * sin[:, None, :]


class BlendRun(NamedTuple):
    logits: torch.Tensor  # [m, vocab] for out.rows, or [len(logit_rows), vocab] when hf_blend was given them
    out: BlendOutput
    layers: HFBlendLayers


@torch.no_grad()
def hf_blend(model: Any, token_ids: torch.Tensor, injected: InjectedKV, check_layer: int, ratio: float,
             method: str = "hkvd", generator: torch.Generator | None = None,
             logit_rows: torch.Tensor | None = None) -> BlendRun:
    """Blend ``token_ids`` [N] (positions 0..N-1) with ``injected`` K/V over a HF Llama.

    ``logit_rows``: request rows (each among the selected ones; rows that are never
    reused always are) whose logits to compute; None: every selected row.
    """
    layers = HFBlendLayers(model, token_ids.numel())
    hidden = model.model.embed_tokens(token_ids)  # [N, hidden]
    positions = torch.arange(token_ids.numel(), device=token_ids.device)
    out = blend_forward(layers, hidden, None, positions, injected, check_layer, ratio, method, generator=generator)
    if logit_rows is None:
        return BlendRun(layers.logits(out.hidden), out, layers)
    at = torch.searchsorted(out.rows, logit_rows.to(out.rows.device))  # out.rows is ascending
    if not bool((out.rows[at.clamp(max=out.rows.numel() - 1)] == logit_rows).all()):
        raise ValueError("logit_rows must be rows that ran every layer (selected); a reused row was asked for")
    return BlendRun(layers.logits(out.hidden[at]), out, layers)


@torch.no_grad()
def hf_prompt_kv(model: Any, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [L, N, Hkv, D] of HF's own prefill of ``token_ids`` [N] at positions 0..N-1 (K rotated)."""
    cache = model.model(token_ids[None], use_cache=True).past_key_values  # the decoder only: no logits
    k = torch.stack([layer.keys[0].transpose(0, 1) for layer in cache.layers])  # [L, N, Hkv, D]
    v = torch.stack([layer.values[0].transpose(0, 1) for layer in cache.layers])
    return k, v


def rope_spec_of(model: Any) -> RopeSpec:
    """The ``RopeSpec`` of a HF Llama's config (neox order, as HF and SGLang run Llama)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return RopeSpec.from_hf_config(cfg, head_dim)
