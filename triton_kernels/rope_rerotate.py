"""Re-rotate K by per-token RoPE angles while scattering it into pool slots: kernel, launcher, torch reference.

Blended reuse loads a document's K stored at segment-local positions and must
place it at its prompt positions. RoPE turns each rotary pair by
``position * inv_freq[i]``, so moving K by ``delta`` positions is one more turn
by ``delta * inv_freq[i]``: the caller passes ``cos``/``sin`` [T, R/2] of those
angles (``lmcache_sgl.blend.rope.cos_sin``), and the kernel turns and stores in
one pass, with no intermediate K.

Pairs are ``(i, i + R/2)`` in neox order, ``(2i, 2i + 1)`` in GPT-J order;
elements ``R..D-1`` are copied unturned. The pool is one layer's K plane seen
as ``[num_slots, H, D]`` (SGLang's ``k_buffer[layer]``; a vLLM
``[num_blocks, block_size, H, D]`` plane viewed flat), any strides with D
contiguous. Math is float32; the result is cast to the pool's dtype.

Grid: (token blocks, heads). Program (i, h) turns tokens [i*BLOCK_T, (i+1)*BLOCK_T)
of head h across all of head_dim.
"""

from __future__ import annotations

import contextlib

import torch

from ._triton_compat import HAVE_TRITON, is_interpreted, tl, triton

# Elements one program holds per token block: 4096 fp32 (16 KiB), the same tile budget
# as paged_copy.py. Not tuned on a GPU; retune with scripts/bench_kernels.py.
TILE_ELEMS = 4096
NUM_WARPS = 4
MAX_HEAD_DIM = 4096


@triton.jit
def _rerotate_scatter_kernel(
    src_ptr,       # [T, H, D] contiguous K, rotated at its old positions
    cos_ptr,       # [T, R/2] float32 contiguous: cos of each token's turn angle per pair
    sin_ptr,       # [T, R/2] float32 contiguous: sin of the same angles
    pool_ptr,      # one layer's K plane [num_slots, H, D], D contiguous
    slots_ptr,     # [T] int32/int64: destination slot of each token
    num_tokens,    # T
    stride_slot,   # pool elements between consecutive slots
    stride_head,   # pool elements between consecutive heads
    NUM_HEADS: tl.constexpr,   # H
    HEAD_DIM: tl.constexpr,    # D
    ROTARY_DIM: tl.constexpr,  # R (even, <= D): elements turned
    NEOX: tl.constexpr,        # True: pairs (i, i + R/2); False: pairs (2i, 2i + 1)
    BLOCK_T: tl.constexpr,     # tokens per program (power of 2)
    BLOCK_D: tl.constexpr,     # next power of 2 >= D
):
    h = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    half = ROTARY_DIM // 2
    t_mask = t < num_tokens
    mask = t_mask[:, None] & (d < HEAD_DIM)[None, :]  # [BLOCK_T, BLOCK_D]
    turned = d < ROTARY_DIM
    if NEOX:
        partner = tl.where(d < half, d + half, d - half)
        sign = tl.where(d < half, -1.0, 1.0)
        pair = tl.where(d < half, d, d - half)
    else:
        partner = d ^ 1
        sign = tl.where(d % 2 == 0, -1.0, 1.0)
        pair = d // 2
    partner = tl.where(turned, partner, d)  # unturned elements read themselves (and ignore it)
    pair = tl.where(turned, pair, 0)
    src_row = (t.to(tl.int64) * NUM_HEADS + h) * HEAD_DIM  # [BLOCK_T]
    x = tl.load(src_ptr + src_row[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(src_ptr + src_row[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    rot_mask = mask & turned[None, :]
    cs_off = t.to(tl.int64)[:, None] * half + pair[None, :]
    c = tl.load(cos_ptr + cs_off, mask=rot_mask, other=1.0)
    s = tl.load(sin_ptr + cs_off, mask=rot_mask, other=0.0)
    out = x * c + sign[None, :] * y * s  # unturned: c = 1, s = 0
    slot = tl.load(slots_ptr + t, mask=t_mask, other=0).to(tl.int64)  # [BLOCK_T]
    dst = pool_ptr + slot[:, None] * stride_slot + h.to(tl.int64) * stride_head + d[None, :]
    tl.store(dst, out.to(pool_ptr.dtype.element_ty), mask=mask)


def check_args(src: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor,
               rotary_dim: int) -> None:
    """Raise ValueError unless the arguments fit together (shapes, dtypes, devices, strides)."""
    if pool.dim() != 3 or pool.stride(2) != 1:
        raise ValueError(f"pool must be one layer's K plane [num_slots, H, D] with D contiguous, "
                         f"got shape {tuple(pool.shape)} strides {pool.stride()}")
    num_heads, head_dim = pool.shape[1:]
    if not (0 < rotary_dim <= head_dim and rotary_dim % 2 == 0):
        raise ValueError(f"rotary_dim={rotary_dim} is invalid; allowed: an even number in [2, {head_dim}]")
    if src.dim() != 3 or tuple(src.shape[1:]) != (num_heads, head_dim) or not src.is_contiguous():
        raise ValueError(f"src must be a contiguous K [T, {num_heads}, {head_dim}], got {tuple(src.shape)}")
    num_tokens = src.shape[0]
    if slots.dim() != 1 or slots.numel() != num_tokens or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be an int32/int64 tensor [{num_tokens}], got {slots.dtype} {tuple(slots.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32 or tuple(t.shape) != (num_tokens, rotary_dim // 2) or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 [{num_tokens}, {rotary_dim // 2}], "
                             f"got {t.dtype} {tuple(t.shape)}")
    for name, t in (("src", src), ("cos", cos), ("sin", sin), ("slots", slots)):
        if t.device != pool.device:
            raise ValueError(f"{name} is on {t.device}; it must be on the pool device {pool.device}")


def rerotate_scatter_triton(src: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pool: torch.Tensor,
                            slots: torch.Tensor, *, rotary_dim: int, neox: bool) -> None:
    """``pool[slots] = turn(src, cos, sin)`` with the Triton kernel."""
    check_args(src, cos, sin, pool, slots, rotary_dim)
    num_tokens, num_heads, head_dim = src.shape
    if num_tokens == 0:
        return
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} is too large for the kernel; allowed: <= {MAX_HEAD_DIM}")
    block_d = 1 << max(0, head_dim - 1).bit_length()
    block_t = max(1, TILE_ELEMS // block_d)
    grid = (-(-num_tokens // block_t), num_heads)
    ctx = torch.cuda.device(pool.device) if pool.device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        _rerotate_scatter_kernel[grid](
            src, cos, sin, pool, slots, num_tokens, pool.stride(0), pool.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, ROTARY_DIM=rotary_dim, NEOX=neox,
            BLOCK_T=block_t, BLOCK_D=block_d, num_warps=NUM_WARPS,
        )


def turn_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, rotary_dim: int, neox: bool) -> torch.Tensor:
    """x [T, H, D] turned per token by cos/sin [T, R/2], in float32 (the formula the kernel runs)."""
    x = x.float()
    rot = x[..., :rotary_dim]
    c, s = cos[:, None, :], sin[:, None, :]  # [T, 1, R/2]
    if neox:
        a, b = rot[..., :rotary_dim // 2], rot[..., rotary_dim // 2:]
        turned = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]
        turned = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    return torch.cat((turned, x[..., rotary_dim:]), dim=-1)


def rerotate_scatter_torch(src: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pool: torch.Tensor,
                           slots: torch.Tensor, *, rotary_dim: int, neox: bool) -> None:
    """Reference: same checks and result as ``rerotate_scatter_triton``."""
    check_args(src, cos, sin, pool, slots, rotary_dim)
    pool[slots.long()] = turn_torch(src, cos, sin, rotary_dim=rotary_dim, neox=neox).to(pool.dtype)


def rerotate_scatter(src: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pool: torch.Tensor,
                     slots: torch.Tensor, *, rotary_dim: int, neox: bool, backend: str = "auto") -> None:
    """Triton on CUDA pools (or on CPU under TRITON_INTERPRET=1 when asked), else the torch reference."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend {backend!r} is not known; allowed: ['auto', 'triton', 'torch']")
    runs_here = HAVE_TRITON and (pool.device.type == "cuda") != is_interpreted(_rerotate_scatter_kernel)
    if backend == "triton" and not runs_here:
        raise ValueError(f"the Triton backend cannot run on a {pool.device.type} pool here "
                         f"(triton installed: {HAVE_TRITON}; CPU pools need TRITON_INTERPRET=1)")
    use_triton = backend == "triton" or (backend == "auto" and runs_here and pool.device.type == "cuda")
    fn = rerotate_scatter_triton if use_triton else rerotate_scatter_torch
    fn(src, cos, sin, pool, slots, rotary_dim=rotary_dim, neox=neox)
