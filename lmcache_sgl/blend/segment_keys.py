"""Position-free keys of a segment's chunks (blended reuse).

A segment of T tokens is cut into chunks of ``chunk_size`` (full ones plus the
last partial one). Chunk i's key covers the segment's tokens [0, end_i), chained
like a prefix key but from a segment-domain seed (``keys.segment_keys``), so it
names "this text from the segment start" whatever the segment's offset in a
prompt, and can never equal a prefix key or a ``content_key``.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from ..keys import ModelFingerprint, chunk_spans, segment_keys


class SegmentChunk(NamedTuple):
    """Chunk stored under ``key``: segment-local token positions [start, end)."""

    key: str
    start: int
    end: int


def segment_chunk_keys(fingerprint: ModelFingerprint, seg_token_ids: Sequence[int] | np.ndarray,
                       chunk_size: int) -> list[SegmentChunk]:
    """The segment's chunks, full ones then the partial last one, with their chained keys."""
    keys = segment_keys(fingerprint, seg_token_ids, chunk_size)
    spans = chunk_spans(len(seg_token_ids), chunk_size, include_partial=True)
    return [SegmentChunk(k, s.start, s.end) for k, s in zip(keys, spans)]
