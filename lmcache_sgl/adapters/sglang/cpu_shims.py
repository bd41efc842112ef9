"""Let stock sglang 0.5.23 serve on a CPU-only torch (CI, laptops).

Only applied when torch has no CUDA, so GPU servers are untouched.

- Rotary embedding: ``layers/rotary_embedding/base.py`` picks
  ``vllm._custom_ops.rotary_embedding`` unless its module-level ``_is_cpu`` is
  set, and ``_is_cpu`` is only true under ``SGLANG_USE_CPU_ENGINE=1``, which
  needs a CPU sgl-kernel that PyPI lacks. Setting the flag selects the torch
  path (``forward_native``).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def apply() -> bool:
    """Apply the shims when torch has no CUDA; True if applied."""
    if torch.cuda.is_available():
        return False
    from sglang.srt.layers.rotary_embedding import base as rotary_base

    rotary_base._is_cpu = True
    return True
