"""Let stock sglang 0.5.23 serve on a CPU-only torch (CI, laptops), and make its prefix hits pay off.

Only applied when torch has no CUDA, so GPU servers are untouched. The plugin
loads in every SGLang process of the venv, so a server started without
``--enable-lmcache`` gets these shims too.

- Rotary embedding: ``layers/rotary_embedding/base.py`` picks
  ``vllm._custom_ops.rotary_embedding`` unless its module-level ``_is_cpu`` is
  set, and ``_is_cpu`` is only true under ``SGLANG_USE_CPU_ENGINE=1``, which
  needs a CPU sgl-kernel that PyPI lacks. Setting the flag selects the torch
  path (``forward_native``).
- Extend attention (``LMCACHE_SGL_CPU_EXTEND_ATTN``, on unless ``0``):
  ``TorchNativeAttnBackend._run_sdpa_forward_extend`` pads each request's
  queries to the whole sequence, so a cached prefix still costs a full
  seq_len x seq_len attention whose prefix rows are thrown away. The shim
  computes only the new rows, as GPU backends do; a prefix hit (SGLang's radix
  cache or ours) then saves its attention as well as its projections.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Mapping, NamedTuple

import torch
from torch.nn.functional import scaled_dot_product_attention

log = logging.getLogger(__name__)

EXTEND_ATTN_ENV = "LMCACHE_SGL_CPU_EXTEND_ATTN"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_ANNOUNCED = threading.Event()  # set once this process has logged that the shim runs


class AppliedShims(NamedTuple):
    rotary: bool
    extend_attention: bool


def extend_attention_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """``LMCACHE_SGL_CPU_EXTEND_ATTN``: unset or empty means on; raises ValueError on anything unknown."""
    raw = (os.environ if environ is None else environ).get(EXTEND_ATTN_ENV, "").strip().lower()
    if raw == "" or raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{EXTEND_ATTN_ENV}={raw!r} is invalid; allowed: one of {_TRUE + _FALSE} (unset = on)")


def apply(environ: Mapping[str, str] | None = None) -> AppliedShims:
    """Apply the shims when torch has no CUDA (idempotent per process).

    The rotary shim goes first: it is what lets the server run at all, so a
    bad ``LMCACHE_SGL_CPU_EXTEND_ATTN`` (ValueError) cannot take it away.
    """
    if torch.cuda.is_available():
        return AppliedShims(False, False)
    from sglang.srt.layers.rotary_embedding import base as rotary_base

    rotary_base._is_cpu = True
    if not extend_attention_enabled(environ):
        # WARNING: SGLang loads plugins before it configures logging, and only WARNING reaches stderr then.
        log.warning("lmcache_sgl: CPU extend-attention shim off (%s=0): cached prefix tokens still cost "
                    "full-sequence attention in torch_native extends", EXTEND_ATTN_ENV)
        return AppliedShims(True, False)
    install_extend_attention()
    return AppliedShims(True, True)


def install_extend_attention() -> bool:
    """Route ``TorchNativeAttnBackend._run_sdpa_forward_extend`` through the shim; False if already done."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    original = TorchNativeAttnBackend._run_sdpa_forward_extend
    if getattr(original, "__wrapped__", None) is not None:
        return False
    TorchNativeAttnBackend._run_sdpa_forward_extend = _make_extend_shim(original)
    return True


def _make_extend_shim(original):
    """SGLang's signature; calls the shim supports go to ``suffix_extend_attention``, the rest to ``original``."""

    def run_sdpa_forward_extend(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices,
                                seq_lens, extend_prefix_lens, extend_seq_lens, encoder_lens=None, scaling=None,
                                enable_gqa=False, causal=False, is_cross_attn=False, sliding_window_size=None):
        sliding = sliding_window_size is not None and sliding_window_size > -1
        if encoder_lens is not None or is_cross_attn or not causal or sliding:
            return original(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                            extend_prefix_lens, extend_seq_lens, encoder_lens, scaling=scaling,
                            enable_gqa=enable_gqa, causal=causal, is_cross_attn=is_cross_attn,
                            sliding_window_size=sliding_window_size)
        _announce_once()
        return suffix_extend_attention(query, output, k_cache, v_cache, req_to_token, req_pool_indices,
                                       seq_lens, extend_prefix_lens, extend_seq_lens, scaling, enable_gqa)

    run_sdpa_forward_extend.__wrapped__ = original
    run_sdpa_forward_extend.__doc__ = original.__doc__
    return run_sdpa_forward_extend


def _announce_once() -> None:
    """INFO on the first shimmed call: by then SGLang has configured logging (not yet when plugins load)."""
    if not _ANNOUNCED.is_set():
        _ANNOUNCED.set()
        log.info("lmcache_sgl: CPU extend-attention shim active: torch_native extends attend only the new "
                 "query rows; cached prefix rows are not recomputed (%s=0 turns it off)", EXTEND_ATTN_ENV)


def suffix_causal_mask(new_len: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """(new_len, seq_len) bool, lower-right aligned: query i (position seq_len - new_len + i) sees keys <= it.

    SDPA's ``is_causal`` is top-left aligned when the lengths differ, which is
    why SGLang pads; this mask is the aligned one.
    """
    prefix_len = seq_len - new_len
    return torch.ones(new_len, seq_len, dtype=torch.bool, device=device).tril(diagonal=prefix_len)


def suffix_extend_attention(query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                            extend_prefix_lens, extend_seq_lens, scaling=None, enable_gqa=False) -> torch.Tensor:
    """Causal self-attention of each request's new tokens over its whole sequence.

    query: (num_new_tokens, H, D), requests back to back; output: (num_new_tokens, H, Dv), written in place.
    k_cache, v_cache: (pool_tokens, H_kv, D|Dv); req_to_token[req_pool_indices[r], :seq_lens[r]] are
    request r's slots. Per request:
      # [0, prefix_len)        cached keys: attended to, never queried
      # [prefix_len, seq_len)  the new tokens: query rows and keys
    """
    prefix_lens, new_lens = extend_prefix_lens.tolist(), extend_seq_lens.tolist()
    total_lens, pool_rows = seq_lens.tolist(), req_pool_indices.tolist()
    if not len(prefix_lens) == len(new_lens) == len(total_lens) == len(pool_rows):
        raise ValueError(f"batch fields disagree: {len(prefix_lens)} prefix lens, {len(new_lens)} extend lens, "
                         f"{len(total_lens)} seq lens, {len(pool_rows)} pool indices")
    q_heads = query.movedim(0, 1)  # (H, num_new_tokens, D)
    start = 0
    for prefix_len, new_len, seq_len, row in zip(prefix_lens, new_lens, total_lens, pool_rows):
        if prefix_len + new_len != seq_len:
            raise ValueError(f"extend of {new_len} tokens after a {prefix_len}-token prefix "
                             f"does not add up to seq_len {seq_len}")
        end = start + new_len
        if new_len > 0:
            slots = req_to_token[row, :seq_len]
            out = _attend_suffix(q_heads[:, start:end], k_cache[slots].movedim(0, 1), v_cache[slots].movedim(0, 1),
                                 scaling, enable_gqa)
            output[start:end] = out.movedim(0, 1)
        start = end
    return output


def _attend_suffix(q, k, v, scaling, enable_gqa) -> torch.Tensor:
    """q: (H, new_len, D) for the last new_len positions; k, v: (H_kv, seq_len, D|Dv) -> (H, new_len, Dv)."""
    if k.dtype != q.dtype:  # SDPA needs one dtype (e.g. an fp8 KV pool)
        k, v = k.to(q.dtype), v.to(q.dtype)
    new_len, seq_len = q.shape[1], k.shape[1]
    prefix_len = seq_len - new_len
    if prefix_len == 0:  # no prefix: plain causal, the very call SGLang makes
        return scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), is_causal=True,
                                            scale=scaling, enable_gqa=enable_gqa).squeeze(0)
    if _FLASH_CPU is not None and v.shape[-1] == q.shape[-1] and q.dtype in _FLASH_DTYPES:
        return _prefix_plus_causal(q, k, v, scaling, prefix_len)
    mask = suffix_causal_mask(new_len, seq_len, q.device)
    return scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask,
                                        scale=scaling, enable_gqa=enable_gqa).squeeze(0)


# torch's CPU flash kernel, which also returns the log-sum-exp. SDPA with an explicit mask falls back to
# the math kernel, which on CPU was slower than SGLang's padded causal call (45 vs 31 ms for 1,300 new
# tokens after a 512-token prefix, 9/3 heads of 64, 2 cores); splitting the keys keeps the flash kernel.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _prefix_plus_causal(q, k, v, scaling, prefix_len: int) -> torch.Tensor:
    """Attention of the new rows as two flash calls merged by their log-sum-exp:

      # keys [0, prefix_len)        every new row sees all of them: no mask
      # keys [prefix_len, seq_len)  square new_len x new_len: is_causal is aligned

    out = (e^lse1 * out1 + e^lse2 * out2) / (e^lse1 + e^lse2), computed in float32.
    """
    group = q.shape[0] // k.shape[0]
    if group > 1:  # the flash op has no GQA: one K/V head per query head
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    out_p, lse_p = _FLASH_CPU(q, k[:, :, :prefix_len], v[:, :, :prefix_len], 0.0, False, scale=scaling)[:2]
    out_n, lse_n = _FLASH_CPU(q, k[:, :, prefix_len:], v[:, :, prefix_len:], 0.0, True, scale=scaling)[:2]
    top = torch.maximum(lse_p, lse_n)
    w_p, w_n = (lse_p - top).exp().unsqueeze(-1), (lse_n - top).exp().unsqueeze(-1)  # (1, H, new_len, 1)
    out = (out_p.float() * w_p + out_n.float() * w_n) / (w_p + w_n)
    return out.to(q.dtype).squeeze(0)
