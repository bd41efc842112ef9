"""Import triton when it is installed; otherwise a stand-in so kernel files still import.

Torch-only installs (CPU wheels without triton) keep the torch reference path.
The stand-in's ``jit`` returns the function unchanged; it is never launched,
because the dispatch layer refuses the Triton backend when ``HAVE_TRITON`` is False.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only on installs without triton
    HAVE_TRITON = False

    class tl:  # noqa: N801 - mirrors the module name used in kernel annotations
        constexpr = object

    class triton:  # noqa: N801
        @staticmethod
        def jit(fn):
            return fn


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` runs in Triton's CPU interpreter (TRITON_INTERPRET=1 at import time)."""
    return type(kernel).__name__ == "InterpretedFunction"


__all__ = ["HAVE_TRITON", "is_interpreted", "tl", "triton"]
