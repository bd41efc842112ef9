#!/usr/bin/env python
"""Gather/scatter kernel bandwidth against a plain pinned copy of the same bytes (needs a CUDA GPU).

Shape: Llama-3-8B KV (32 layers, 8 KV heads, head dim 128, bf16) for 16k random
slots of an SGLang token-indexed MHA pool, so 2 GiB per copy.

    gather   GPU pool -> pinned host chunk, written zero-copy by the kernel
    scatter  pinned host chunk -> GPU pool, read zero-copy by the kernel
    baseline contiguous pinned ``copy_`` of the same byte count, D2H and H2D

All four are timed in this process with CUDA events (median of --iters runs).
The last line prints gather/D2H and scatter/H2D; the goal is >= 0.92
(DESIGN.md section 7 measured 0.94 on an H100).

    pip install -e .   # makes lmcache_sgl.triton_kernels importable
    python scripts/bench_kernels.py [--tokens 16384] [--iters 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Callable

import torch

GOAL = 0.92


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384, help="slots per copy (default 16384)")
    p.add_argument("--pool-slots", type=int, default=0, help="pool size in slots (default 4x tokens)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=8, help="KV heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=20, help="timed runs per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def require_cuda() -> None:
    if not torch.cuda.is_available():
        sys.exit(f"bench_kernels.py needs a CUDA GPU, and torch {torch.__version__} sees none "
                 "(torch.cuda.is_available() is False). Run it on a GPU machine.")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("bench_kernels.py measures compiled kernels; unset TRITON_INTERPRET and run it again.")


def time_gbps(fn: Callable[[], object], nbytes: int, iters: int, warmup: int) -> float:
    """Median bandwidth of ``fn`` in GB/s (1e9 bytes), timed with CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    seconds = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)
    return nbytes / statistics.median(seconds) / 1e9


def build_pool(args: argparse.Namespace, kernels):
    """Random bf16 K and V per layer, each [pool_slots, heads, head_dim] on the GPU."""
    shape = (args.pool_slots, args.heads, args.head_dim)
    k = [torch.randn(shape, dtype=torch.bfloat16, device="cuda") for _ in range(args.layers)]
    v = [torch.randn(shape, dtype=torch.bfloat16, device="cuda") for _ in range(args.layers)]
    return k, v, kernels.sglang_mha_pool(k, v)


def check_gather(k, v, slots, chunk) -> None:
    """The gathered chunk equals torch indexing of the pool, first and last layer."""
    for layer in (0, len(k) - 1):
        for plane, src in enumerate((k, v)):
            want = src[layer][slots].cpu()  # [T, H, D]
            if not torch.equal(chunk[layer, plane].view(torch.int16), want.view(torch.int16)):
                sys.exit(f"gather is wrong at layer {layer}, plane {plane}: not timing a broken kernel")


def main() -> None:
    args = parse_args()
    require_cuda()
    try:
        from lmcache_sgl import triton_kernels as kernels
    except ImportError as err:
        sys.exit(f"cannot import lmcache_sgl.triton_kernels ({err}); run `pip install -e .` in the repo first")
    args.pool_slots = args.pool_slots or 4 * args.tokens
    torch.manual_seed(args.seed)
    k, v, pool = build_pool(args, kernels)
    slots = torch.randperm(args.pool_slots, device="cuda")[: args.tokens]  # [T] distinct, random order
    chunk = pool.empty_chunk(args.tokens, device="cpu", pin_memory=True)  # [L, 2, T, H, D] pinned host
    nbytes = chunk.numel() * chunk.element_size()
    dev_bytes = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host_bytes = chunk.view(-1).view(torch.uint8)  # the same pinned bytes, for the plain copies

    def gather() -> None:
        kernels.gather(pool, slots, chunk, backend="triton", check_slots=False)

    def scatter() -> None:
        kernels.scatter(pool, slots, chunk, backend="triton", check_slots=False)

    gather()
    torch.cuda.synchronize()
    check_gather(k, v, slots, chunk)

    runs = [
        ("pinned copy_ D2H", lambda: host_bytes.copy_(dev_bytes, non_blocking=True)),
        ("triton gather, GPU pool -> pinned host (zero-copy)", gather),
        ("pinned copy_ H2D", lambda: dev_bytes.copy_(host_bytes, non_blocking=True)),
        ("triton scatter, pinned host -> GPU pool (zero-copy)", scatter),
    ]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {_triton_version()}")
    print(f"shape: {args.layers} layers x 2 x {args.tokens} tokens x {args.heads} heads x {args.head_dim} "
          f"bf16 = {nbytes / 2**20:.1f} MiB per copy; pool {args.pool_slots} slots; {args.iters} runs, median")
    gbps = {}
    for name, fn in runs:
        gbps[name] = time_gbps(fn, nbytes, args.iters, args.warmup)
        print(f"  {name:52s} {gbps[name]:7.2f} GB/s")
    gather_ratio = gbps[runs[1][0]] / gbps[runs[0][0]]
    scatter_ratio = gbps[runs[3][0]] / gbps[runs[2][0]]
    print(f"ratios: gather/D2H = {gather_ratio:.3f}, scatter/H2D = {scatter_ratio:.3f} (goal >= {GOAL})")


def _triton_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    main()
