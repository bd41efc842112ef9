"""Applies `hicache_cpu_shims.py` to SGLang's HiCache modules as they are imported (this directory on PYTHONPATH).

Only the benchmark's `hicache` arm puts this directory on its server's
PYTHONPATH; the spawned scheduler processes inherit it, so every process of
that server is patched and no other process is.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

# The modules to patch (hicache_cpu_shims.COMMON / BASE / MHA); named here so that finding
# them imports nothing (an import inside find_spec would come back to find_spec).
TARGETS = ("sglang.srt.mem_cache.pool_host.common", "sglang.srt.mem_cache.pool_host.base",
           "sglang.srt.mem_cache.pool_host.mha")


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of each target so the patch runs right after its import."""

    def find_spec(self, name, path, target=None):
        if name not in TARGETS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            from hicache_cpu_shims import patch

            patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


sys.meta_path.insert(0, _PatchAfterImport())
