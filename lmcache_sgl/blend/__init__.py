"""Blended reuse (CacheBlend): documents' KV reused at any position in a prompt.

Engine-agnostic: segments and their keys, RoPE re-rotation, the recompute
selection, the layer loop over a ``BlendLayers`` adapter, and the store I/O.
Imports torch, never an engine. See docs/blending.md.
"""

from .forward import BlendLayers, BlendOutput, InjectedKV, blend_forward
from .rope import RopeSpec, rerotate, rotate
from .segment_keys import SegmentChunk, segment_chunk_keys
from .segments import Segment, split_segments
from .selection import select_recompute

__all__ = ["BlendLayers", "BlendOutput", "InjectedKV", "RopeSpec", "Segment", "SegmentChunk", "blend_forward",
           "rerotate", "rotate", "segment_chunk_keys", "select_recompute", "split_segments"]
