"""Store demo: write a cache, reuse it, restart, reuse it again; print hits per tier.

    python -m lmcache_sgl.demo [--cache-dir DIR] [--chunk-size N]

Runs with torch alone (no engine, no GPU). The KV is random, shaped like
SmolLM2-135M's (30 layers, 3 KV heads, head dim 64, bf16). Three prompts of
eight chunks go through a host tier that holds eight chunks, so the older
prompts are written back to disk; then a fresh store on the same directory
(a restart) finds everything on disk. Every loaded chunk is checked byte for
byte against what was stored.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from .config import GiB, CacheConfig
from .keys import ModelFingerprint, prefix_keys
from .layout import ChunkLayout
from .tiered_store import TieredStore

FINGERPRINT = ModelFingerprint("SmolLM2-135M-Instruct(demo)", "bfloat16", num_layers=30, num_kv_heads=3, head_dim=64)


def _prompts(layout: ChunkLayout, count: int, chunks: int):
    gen = torch.Generator().manual_seed(0)
    for _ in range(count):
        tokens = torch.randint(0, 49152, (chunks * layout.chunk_size,), generator=gen).tolist()
        keys = prefix_keys(layout.fingerprint, tokens, layout.chunk_size)
        toks = [tokens[i * layout.chunk_size:(i + 1) * layout.chunk_size] for i in range(chunks)]
        kvs = [torch.randn(layout.shape(layout.chunk_size), generator=gen).to(layout.dtype) for _ in range(chunks)]
        yield keys, toks, kvs


def _reuse(store: TieredStore, prompts, label: str) -> bool:
    """Load every prompt, newest first, and check the bytes."""
    ok = True
    for n, (keys, toks, kvs) in reversed(list(enumerate(prompts))):
        found = store.lookup(keys)
        start = time.perf_counter()
        got = store.get(keys, toks)
        ms = (time.perf_counter() - start) * 1e3
        ok &= len(got) == len(kvs) and all(torch.equal(a.view(torch.int16), b.view(torch.int16))
                                           for a, b in zip(got, kvs))
        tiers = dict(Counter(t.value for t in found.tiers))
        print(f"  {label} prompt {n}: {found.num_hits}/{len(keys)} chunks hit {tiers}, loaded in {ms:.1f} ms")
    return ok


def run(cache_dir: Path, chunk_size: int) -> bool:
    layout = ChunkLayout(FINGERPRINT, chunk_size)
    config = CacheConfig(chunk_size=chunk_size, max_local_cpu_size=8 * layout.chunk_bytes / GiB,
                         local_disk=str(cache_dir), max_local_disk_size=1.0)
    prompts = list(_prompts(layout, count=3, chunks=8))
    print(f"cache dir {cache_dir}; chunk {chunk_size} tokens = {layout.chunk_bytes / 2**20:.1f} MiB; "
          f"host tier holds {config.host_bytes // layout.chunk_bytes} chunks")
    with TieredStore(config, layout) as store:
        for keys, toks, kvs in prompts:
            for k, t, kv in zip(keys, toks, kvs):
                store.put(k, t, kv)
        store.flush_pending()
        ok = _reuse(store, prompts, "same process")
        stats = store.stats()
    print(f"  wrote {stats.writebacks} chunks to disk, compression {stats.compression_ratio:.2f}x")
    print("restart: a new store on the same directory")
    with TieredStore(config, layout) as store:
        ok &= _reuse(store, prompts, "after restart")
        print(f"  hits per tier: {store.stats().hit_chunks}")
    print("all loaded KV equals what was stored" if ok else "MISMATCH in loaded KV")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, help="disk tier directory (default: a new temporary one)")
    parser.add_argument("--chunk-size", type=int, default=256)
    args = parser.parse_args(argv)
    if args.cache_dir:
        return 0 if run(args.cache_dir, args.chunk_size) else 1
    with tempfile.TemporaryDirectory(prefix="lmcache-sgl-demo-") as tmp:
        return 0 if run(Path(tmp), args.chunk_size) else 1


if __name__ == "__main__":
    raise SystemExit(main())
