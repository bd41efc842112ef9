"""The AROUND hook on ``LlamaModel.forward`` that blends, and the segment saves after a prefill.

Per forward of the served model (``BlendRuntime.model``), in a plain EXTEND batch:

  no request of the batch is a blend request  -> SGLang's own forward, unchanged; then
                                                 the segments of every request whose
                                                 prefill completed are saved (fresh KV)
  at least one is                             -> the WHOLE batch runs through the blend
                                                 loop; rows of non-blend requests are
                                                 never "reused", so they are always
                                                 selected: exact for them

Running a mixed batch through one loop keeps the scheduler unchanged (no batch
splitting); its cost for the non-blend rows is our mask attention instead of the
backend's kernel. Any failure in the blend path is logged and the batch is re-run
by SGLang's forward, which rewrites every extend row's KV: a failed blend is an
exact prefill. Decode, MIXED (chunked prefill mixed with decode), speculative and
embedding inputs always take SGLang's forward.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from ...blend.forward import InjectedKV, blend_forward
from ...blend.rope import apply_cos_sin, cos_sin, rerotate_into
from ...blend.store_io import load_matches, save_segments
from .blend_layers import BatchRows, SGLangBlendLayers
from .blend_runtime import BlendRuntime, BlendStats, PromptBlend, active

log = logging.getLogger(__name__)

FORWARD_TARGET = "sglang.srt.models.llama.LlamaModel.forward"
GRAPH_TARGET = "sglang.srt.model_executor.runner.prefill_cuda_graph_runner.PrefillCudaGraphRunner.can_run_graph"


FUSED_POOLS = ("MHATokenToKVPool",)  # K/V planes [slots, H, D] indexed by out_cache_loc, stored as their dtype


class Injection(NamedTuple):
    """Stored K/V of a batch's reused rows, re-rotated to their prompt positions."""

    injected: InjectedKV  # rows [R]: ascending batch rows
    per_request: dict[int, torch.Tensor]  # request index -> its batch rows among `injected.rows`


class SegmentRows(NamedTuple):
    """One matched segment's reused rows of a request, as stored."""

    rows: torch.Tensor  # [m] batch rows
    local: torch.Tensor  # [m] segment-local positions of those rows (their stored K's positions)
    k: torch.Tensor  # [L, m, H, D]
    v: torch.Tensor  # [L, m, H, D]
    shift: int  # prompt position of the segment's first token: prompt position = local + shift


def around_llama_forward(original, model, input_ids, positions, forward_batch, *args, **kwargs):
    runtime = active()
    if (runtime is None or model is not runtime.model or model.layers_to_capture
            or not _plain_extend(forward_batch, args, kwargs)):
        return original(model, input_ids, positions, forward_batch, *args, **kwargs)
    batch = BatchRows.of(forward_batch)
    prompts = [runtime.prompt(rid) for rid in batch.rids]
    injection = _inject_quietly(runtime, batch, prompts, forward_batch.out_cache_loc)
    hidden = None
    if injection is not None:
        hidden = _blend_quietly(runtime, model, input_ids, positions, forward_batch, batch, prompts, injection)
    if hidden is None:
        hidden = original(model, input_ids, positions, forward_batch, *args, **kwargs)
        injection = None  # SGLang's forward rewrote every extend row: all of it is exact
    _save_segments(runtime, batch, prompts, injection)
    _forget_completed(runtime, batch, prompts)
    return hidden


def around_can_run_graph(original, runner, forward_batch, *args, **kwargs):
    """A batch holding a blend request runs eagerly: the captured graph would skip the hook."""
    runtime = active()
    if runtime is not None and forward_batch.rids and any(
            (p := runtime.prompt(rid)) is not None and p.is_blend for rid in forward_batch.rids):
        return False
    return original(runner, forward_batch, *args, **kwargs)


def _plain_extend(forward_batch, args, kwargs) -> bool:
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    extra = [a for a in args if a is not None] + [v for v in kwargs.values() if v is not None]
    return forward_batch.forward_mode == ForwardMode.EXTEND and not extra and bool(forward_batch.rids)


def _completes(batch: BatchRows, r: int, prompt: PromptBlend | None) -> bool:
    """The request's prefill ends in this batch (its last chunk)."""
    return prompt is not None and batch.prefix_len[r] + batch.extend_len[r] == len(prompt.token_ids)


# ---- injected KV -------------------------------------------------------------------

def _inject_quietly(runtime: BlendRuntime, batch: BatchRows, prompts, write_loc: torch.Tensor) -> Injection | None:
    try:
        return _inject(runtime, batch, prompts, write_loc)
    except Exception:  # noqa: BLE001 - engine boundary: a failed load is a miss
        log.exception("lmcache_sgl: loading stored segments for %s failed; prefilling instead", batch.rids)
        return None


def _inject(runtime: BlendRuntime, batch: BatchRows, prompts, write_loc: torch.Tensor,
            backend: str | None = None) -> Injection | None:
    """The batch's stored segment K/V, re-rotated to its rows.

    ``backend`` None: on a CUDA pool of ``FUSED_POOLS`` the K is turned and written into
    the request's slots by the fused Triton ``rerotate_into`` (V copied) before the loop,
    elsewhere it is turned in torch and the loop writes it through ``set_kv_buffer``.
    ``"triton"``/``"torch"``: prewrite with that ``rerotate_into`` backend.
    """
    parts, per_request = [], {}
    for r, prompt in enumerate(prompts):
        if prompt is None or not prompt.is_blend or not _completes(batch, r, prompt):
            continue
        got = _request_rows(runtime, batch, r, prompt)
        if got:
            per_request[r] = torch.cat([g.rows for g in got])
            parts += got
    if not parts:
        return None
    backend = backend or ("triton" if _fused_pool(runtime.kv_pool) else None)
    if backend is None:
        return Injection(_turned_in_torch(runtime, parts), per_request)
    return Injection(_prewrite(runtime, parts, write_loc, backend), per_request)


def _fused_pool(pool) -> bool:
    return (type(pool).__name__ in FUSED_POOLS and str(getattr(pool, "device", "cpu")).startswith("cuda")
            and getattr(pool, "store_dtype", None) == getattr(pool, "dtype", None))


def _turned_in_torch(runtime: BlendRuntime, parts: list[SegmentRows]) -> InjectedKV:
    device = runtime.device_kv.device
    k = torch.cat([_rerotate_layers(p.k, p.shift, runtime) for p in parts], dim=1).to(device)  # [L, R, H, D]
    v = torch.cat([p.v for p in parts], dim=1).to(device)
    return InjectedKV(torch.cat([p.rows for p in parts]).to(device), list(k.unbind(0)), list(v.unbind(0)))


def _prewrite(runtime: BlendRuntime, parts: list[SegmentRows], write_loc: torch.Tensor, backend: str) -> InjectedKV:
    """Every layer's injected K/V put into the rows' slots now; the loop then only reads the check layer's."""
    pool = runtime.kv_pool
    rows = torch.cat([p.rows for p in parts]).to(write_loc.device)
    slots = write_loc[rows]  # [R]
    local = torch.cat([p.local for p in parts])
    shift = torch.cat([torch.full_like(p.local, p.shift) for p in parts])
    k_all, v_all = torch.cat([p.k for p in parts], dim=1), torch.cat([p.v for p in parts], dim=1)  # [L, R, H, D]
    layer_ids = [layer.self_attn.attn.layer_id for layer in runtime.model.layers]
    for layer, layer_id in enumerate(layer_ids):
        k_plane, v_plane = pool.get_key_buffer(layer_id), pool.get_value_buffer(layer_id)  # [slots, H, D]
        rerotate_into(k_plane, slots, k_all[layer], local, local + shift, runtime.rope, backend=backend)
        v_plane[slots.to(v_plane.device).long()] = v_all[layer].to(v_plane.device, v_plane.dtype)

    def read(layer: int) -> tuple[torch.Tensor, torch.Tensor]:  # valid until the loop writes this layer
        at = slots.to(pool.get_key_buffer(layer_ids[layer]).device).long()
        return pool.get_key_buffer(layer_ids[layer])[at], pool.get_value_buffer(layer_ids[layer])[at]

    return InjectedKV(rows, loader=read, prewritten=True)


def _request_rows(runtime: BlendRuntime, batch: BatchRows, r: int, prompt: PromptBlend) -> list[SegmentRows]:
    """Request r's reused rows, one entry per matched segment still loadable."""
    prefix = batch.prefix_len[r]
    out = []
    # A chunk gone or corrupt since the match shortens that segment's run: its tokens are prefilled.
    for seg in load_matches(runtime.store, prompt.matches, prompt.token_ids):
        start = seg.match.segment.start
        kv = seg.kv  # [L, 2, loaded, H, D], K at segment-local positions 0..loaded-1
        lo, hi = max(start, prefix), start + seg.loaded  # rows in the extend (the last prompt row is never matched)
        if lo >= hi:
            continue
        local = torch.arange(lo - start, hi - start)
        rows = batch.row_start[r] + (local + start - prefix)
        out.append(SegmentRows(rows, local, kv[:, 0, lo - start:hi - start], kv[:, 1, lo - start:hi - start], start))
    return out


def _rerotate_layers(k: torch.Tensor, shift: int, runtime: BlendRuntime) -> torch.Tensor:
    """K [L, m, H, D] moved ``shift`` positions later (one cos/sin for all layers)."""
    cos, sin = cos_sin(torch.full((k.shape[1],), shift, dtype=torch.long), runtime.rope)
    return torch.stack([apply_cos_sin(layer_k, cos, sin, runtime.rope) for layer_k in k.unbind(0)])


# ---- the blend forward -------------------------------------------------------------------

def _blend_quietly(runtime, model, input_ids, positions, forward_batch, batch, prompts, injection):
    try:
        return _blend(runtime, model, input_ids, positions, forward_batch, batch, prompts, injection)
    except Exception:  # noqa: BLE001 - SGLang's forward re-runs the batch and rewrites every extend row
        log.exception("lmcache_sgl: blend forward of %s failed; prefilling instead", batch.rids)
        return None


def _blend(runtime, model, input_ids, positions, forward_batch, batch, prompts, injection) -> torch.Tensor:
    layers = SGLangBlendLayers(model, forward_batch, runtime.kv_pool, runtime.req_to_token, batch)
    injected = injection.injected
    hidden = model.embed_tokens(input_ids)  # [N, hidden]
    out = blend_forward(layers, hidden, None, positions, injected, runtime.check_layer, runtime.ratio)
    final = model.norm(out.hidden, out.residual)[0] if out.residual is not None else model.norm(out.hidden)
    full = final.new_zeros(hidden.shape[0], final.shape[-1])  # unselected rows never reach a sampler
    full[out.rows] = final
    _record(runtime, batch, prompts, injection, out.rows)
    return full


def _record(runtime, batch, prompts, injection: Injection, selected: torch.Tensor) -> None:
    for r, rows in injection.per_request.items():
        recomputed = int(torch.isin(rows, selected.to(rows.device)).sum())
        runtime.record(batch.rids[r], BlendStats(int(rows.numel()), recomputed), len(prompts[r].token_ids))


# ---- after a plain prefill -----------------------------------------------------------------

def _save_segments(runtime: BlendRuntime, batch: BatchRows, prompts, injection: Injection | None) -> None:
    """Store the segments of each request whose prefill completed, from the KV in its slots.

    After a blend (``injection``), a request's injected rows hold stored or fused K/V:
    chunks holding them are left out (``exclude_rows``). Its other rows were computed
    at every layer (attending to the blended context), so their chunks are stored.
    """
    for r, prompt in enumerate(prompts):
        if prompt is None or not _completes(batch, r, prompt):
            continue
        injected = None if injection is None else injection.per_request.get(r)
        try:
            _save_request(runtime, batch, r, prompt, injected)
        except Exception:  # noqa: BLE001 - engine boundary: a failed save is a later miss
            log.exception("lmcache_sgl: saving the segments of %s failed", batch.rids[r])


def _save_request(runtime: BlendRuntime, batch: BatchRows, r: int, prompt: PromptBlend,
                  injected: torch.Tensor | None) -> None:
    """``injected``: request r's injected batch rows, or None."""
    slots = runtime.req_to_token[batch.pool_row[r]]  # the prompt's slots, positions 0..N-1
    exclude = None
    if injected is not None:
        exclude = torch.zeros(len(prompt.token_ids), dtype=torch.bool)
        exclude[injected.cpu() - batch.row_start[r] + batch.prefix_len[r]] = True  # batch rows -> prompt rows

    def prompt_kv(start: int, end: int) -> torch.Tensor:  # [L, 2, end - start, H, D], K at prompt positions
        return runtime.device_kv.gather(slots[start:end])

    save_segments(runtime.store, runtime.fingerprint, prompt.token_ids, prompt_kv, runtime.rope, runtime.sep_ids,
                  runtime.config.blend_min_tokens, exclude_rows=exclude)


def _forget_completed(runtime: BlendRuntime, batch: BatchRows, prompts) -> None:
    for r, prompt in enumerate(prompts):
        if _completes(batch, r, prompt):
            runtime.forget(batch.rids[r])
