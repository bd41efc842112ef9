"""A prompt's documents in the ``TieredStore``: find stored ones, load them as ``InjectedKV``, save new ones.

Entries use the canonical chunk layout ``[L, 2, T, H, D]`` (layout.py) with K
de-rotated to segment-local positions (chunk tokens [s, e) of a segment hold K
rotated at positions s..e-1), under segment keys (``segment_chunk_keys``). They
go through ``TieredStore.put``/``get`` like prefix chunks, so files, headers,
checksums and quarantine are the same; a corrupt or colliding chunk ends a
match there (a shorter match, never wrong KV).

Request rows are the prompt's token indices; RoPE positions are the rows
(position i at row i), as in an ordinary prefill of the whole prompt.
"""

from __future__ import annotations

import logging
from typing import Callable, NamedTuple, Sequence

import torch

from ..keys import ModelFingerprint
from ..tiered_store import TieredStore
from .forward import InjectedKV
from .rope import RopeSpec, apply_cos_sin, cos_sin
from .segment_keys import SegmentChunk, segment_chunk_keys
from .segments import Segment, split_segments

log = logging.getLogger(__name__)

# The prompt's K/V [L, 2, N, H, D], or (start, end) -> its rows [L, 2, end - start, H, D].
KVSource = torch.Tensor | Callable[[int, int], torch.Tensor]


class BlendMatch(NamedTuple):
    """Stored KV for the segment's leading ``matched_tokens`` tokens, in chunks ``keys``."""

    segment: Segment  # prompt rows [start, end)
    matched_tokens: int  # <= the chunks' tokens: capped so the prompt's last row is never reused
    keys: tuple[SegmentChunk, ...]  # the leading chunks found, segment-local spans


class LoadedSegment(NamedTuple):
    match: BlendMatch
    kv: torch.Tensor  # [L, 2, loaded, H, D] CPU, K at segment-local positions 0..loaded-1
    loaded: int  # tokens loaded (< matched_tokens when a chunk turned out corrupt or missing)


def find_matches(store: TieredStore, fingerprint: ModelFingerprint, token_ids: Sequence[int],
                 sep_ids: Sequence[int], min_tokens: int) -> list[BlendMatch]:
    """Each segment's longest stored leading chunk run (one presence check per segment)."""
    _check_mha(store)
    chunk_size = store.layout.chunk_size
    last_row = len(token_ids) - 1
    matches = []
    for seg in split_segments(token_ids, sep_ids, min_tokens):
        chunks = segment_chunk_keys(fingerprint, token_ids[seg.start:seg.end], chunk_size)
        missing = store.missing([c.key for c in chunks])
        found = chunks[:missing[0]] if missing else chunks
        matched = min(found[-1].end, last_row - seg.start) if found else 0
        if matched > 0:
            matches.append(BlendMatch(seg, matched, tuple(found)))
    return matches


def load_matches(store: TieredStore, matches: Sequence[BlendMatch], token_ids: Sequence[int]) -> list[LoadedSegment]:
    """Read each match's chunks; a chunk that is gone, corrupt or for other tokens ends that match."""
    loaded = []
    for m in matches:
        seg_tokens = token_ids[m.segment.start:m.segment.end]
        chunks = store.get([c.key for c in m.keys], [seg_tokens[c.start:c.end] for c in m.keys])
        if len(chunks) < len(m.keys):
            log.info("blend: segment at %d: %d of %d chunks loaded", m.segment.start, len(chunks), len(m.keys))
        if not chunks:
            continue
        kv = torch.cat(chunks, dim=2)[:, :, :m.matched_tokens]  # [L, 2, n, H, D]
        loaded.append(LoadedSegment(m, kv, kv.shape[2]))
    return loaded


def injected_kv(loaded: Sequence[LoadedSegment], spec: RopeSpec, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None) -> InjectedKV:
    """The loaded segments as ``InjectedKV``: rows at their prompt positions, K re-rotated there per layer."""
    if not loaded:
        raise ValueError("injected_kv needs at least one loaded segment; without one, run an ordinary prefill")
    rows = torch.cat([torch.arange(s.match.segment.start, s.match.segment.start + s.loaded) for s in loaded])
    local = torch.cat([torch.arange(s.loaded) for s in loaded])
    cos, sin = cos_sin(rows - local, spec)  # every layer turns by the same per-row delta
    planes = torch.cat([s.kv for s in loaded], dim=2)  # [L, 2, R, H, D]

    def load(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = planes[layer, 0].to(device)
        v = planes[layer, 1].to(device)
        k = apply_cos_sin(k.float(), cos.to(device), sin.to(device), spec).to(dtype or k.dtype)
        return k, v.to(dtype or v.dtype)

    return InjectedKV(rows.to(device), loader=load)


def save_segments(store: TieredStore, fingerprint: ModelFingerprint, token_ids: Sequence[int], kv: KVSource,
                  spec: RopeSpec, sep_ids: Sequence[int], min_tokens: int,
                  exclude_rows: torch.Tensor | None = None) -> int:
    """Store the chunks of the prompt's segments that no tier holds yet; the number stored.

    ``kv``: the prompt's K/V computed at every layer (K rotated at positions = rows),
    in the store's layout and dtype. ``exclude_rows``: bool [N], True at rows whose
    K/V is not computed (a blend's injected rows); a chunk holding any of them is
    never stored, nor any later chunk of its segment (a match needs the leading run),
    so fused K/V never becomes a segment entry.
    """
    _check_mha(store)
    if exclude_rows is not None and tuple(exclude_rows.shape) != (len(token_ids),):
        raise ValueError(f"exclude_rows must be a bool mask [{len(token_ids)}], got {tuple(exclude_rows.shape)}")
    excluded = None if exclude_rows is None else exclude_rows.bool().cpu()
    chunk_size = store.layout.chunk_size
    stored = 0
    for seg in split_segments(token_ids, sep_ids, min_tokens):
        seg_tokens = token_ids[seg.start:seg.end]
        chunks = segment_chunk_keys(fingerprint, seg_tokens, chunk_size)
        for i in store.missing([c.key for c in chunks]):
            c = chunks[i]
            if excluded is not None and bool(excluded[seg.start + c.start:seg.start + c.end].any()):
                break  # keys chain: a later chunk of this segment could never be matched without this one
            part = _rows(kv, seg.start + c.start, seg.start + c.end)
            stored += store.put(c.key, seg_tokens[c.start:c.end], derotate(part, seg.start, spec), start_pos=c.start,
                                presence_checked=True)
    return stored


def derotate(kv: torch.Tensor, offset: int, spec: RopeSpec) -> torch.Tensor:
    """A copy of ``kv`` [L, 2, T, H, D] with K moved back by ``offset`` positions (V unchanged)."""
    num_layers, _, t, h, d = kv.shape
    cos, sin = cos_sin(torch.full((t,), -offset, dtype=torch.long), spec)
    k = kv[:, 0].permute(1, 0, 2, 3).reshape(t, num_layers * h, d)  # [T, L*H, D]: one turn per token
    turned = apply_cos_sin(k.float(), cos.to(kv.device), sin.to(kv.device), spec)
    out = kv.clone()
    out[:, 0] = turned.reshape(t, num_layers, h, d).permute(1, 0, 2, 3).to(kv.dtype)
    return out


def _check_mha(store: TieredStore) -> None:
    if store.layout.planes != 2:
        raise ValueError("blending needs separate K and V planes (MHA/GQA); MLA caches are not supported")


def _rows(kv: KVSource, start: int, end: int) -> torch.Tensor:
    part = kv(start, end) if callable(kv) else kv[:, :, start:end]
    return part.contiguous()
