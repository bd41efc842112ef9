"""Gather (pool slots -> chunk) and scatter (chunk -> pool slots): kernel, launcher, torch reference.

One kernel serves every pool layout in ``pools.py``: a pool is L x P planes of
``[num_blocks, page_size, H, D]`` strided views, found through a device table
of per-plane base addresses, so all layers move in one launch. The chunk is the
canonical contiguous ``[L, P, T, H, D]`` buffer; on CUDA it may live in pinned
host memory, which the kernel reads or writes directly (zero-copy over UVA).

Grid: (token blocks, head blocks, L*P planes). Program (i, j, plane) copies
tokens [i*BLOCK_T, (i+1)*BLOCK_T) x heads [j*BLOCK_H, (j+1)*BLOCK_H) x all of
head_dim for one plane. Data moves as an integer view of the KV dtype's width,
so bf16, fp16, fp32 and both fp8 formats copy bit for bit.
"""

from __future__ import annotations

import contextlib

import torch

from ._triton_compat import tl, triton
from .pools import PoolView

# Bytes one program moves: 16 KiB. At NUM_WARPS=4 that is 128 bytes a thread,
# eight 16-byte vectors in flight, which is what keeps zero-copy PCIe writes
# busy. Chosen by reasoning about the H100 (DESIGN.md section 7), not tuned
# here (no GPU); retune with scripts/bench_kernels.py.
TILE_BYTES = 16384
NUM_WARPS = 4
# One program holds at least one whole head row of head_dim elements.
MAX_HEAD_DIM = 4096
# CUDA caps grid dims y and z (head blocks, planes) at 65535.
MAX_GRID_YZ = 65535


@triton.jit
def _paged_copy_kernel(
    chunk_ptr,      # [L, P, T, H, D] contiguous chunk buffer (integer view), device or pinned host
    ptr_table,      # [L*P] int64: address of element [0, 0, 0, 0] of each plane view, index l*P + p
    slots_ptr,      # [T] int32/int64: pool slot of each chunk token
    num_tokens,     # T
    stride_block,   # elements between consecutive blocks (pages) of a plane view
    stride_offset,  # elements between consecutive slots inside a block (unused unless PAGED)
    stride_head,    # elements between consecutive heads
    page_size,      # slots per block (unused unless PAGED)
    NUM_HEADS: tl.constexpr,  # H
    HEAD_DIM: tl.constexpr,   # D (contiguous in pool and chunk)
    PAGED: tl.constexpr,      # page_size > 1: split a slot into (block, offset)
    GATHER: tl.constexpr,     # True: pool -> chunk; False: chunk -> pool
    ALIGNED: tl.constexpr,    # every table address is 16-byte aligned (vectorization hint)
    BLOCK_T: tl.constexpr,    # tokens per program (power of 2)
    BLOCK_H: tl.constexpr,    # heads per program (power of 2)
    BLOCK_D: tl.constexpr,    # next power of 2 >= HEAD_DIM
):
    plane = tl.program_id(2)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    t_mask = t < num_tokens
    slot = tl.load(slots_ptr + t, mask=t_mask, other=0).to(tl.int64)  # [BLOCK_T]
    if PAGED:
        pool_row = (slot // page_size) * stride_block + (slot % page_size) * stride_offset
    else:
        pool_row = slot * stride_block  # [BLOCK_T] int64 element offsets
    base = tl.load(ptr_table + plane).to(tl.pointer_type(chunk_ptr.dtype.element_ty))
    if ALIGNED:
        base = tl.multiple_of(base, 16)
    head_off = h.to(tl.int64) * stride_head  # [BLOCK_H]; int64: heads-major pools have huge head strides
    pool_ptrs = base + pool_row[:, None, None] + head_off[None, :, None] + d[None, None, :]
    chunk_row = (plane.to(tl.int64) * num_tokens + t) * (NUM_HEADS * HEAD_DIM)  # [BLOCK_T] int64
    chunk_ptrs = chunk_ptr + chunk_row[:, None, None] + (h * HEAD_DIM)[None, :, None] + d[None, None, :]
    mask = t_mask[:, None, None] & (h < NUM_HEADS)[None, :, None] & (d < HEAD_DIM)[None, None, :]
    if GATHER:
        tl.store(chunk_ptrs, tl.load(pool_ptrs, mask=mask), mask=mask)
    else:
        tl.store(pool_ptrs, tl.load(chunk_ptrs, mask=mask), mask=mask)


def tile_shape(num_heads: int, head_dim: int, itemsize: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_H, BLOCK_D) for a program of about ``TILE_BYTES``; all powers of 2."""
    tile_elems = TILE_BYTES // itemsize
    block_d = _next_pow2(head_dim)
    block_h = min(_next_pow2(num_heads), max(1, tile_elems // block_d))
    block_t = max(1, tile_elems // (block_h * block_d))
    return block_t, block_h, block_d


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def check_copy_args(pool: PoolView, slots: torch.Tensor, chunk: torch.Tensor, *,
                    scatter: bool, check_slots: bool) -> None:
    """Raise ValueError unless ``pool``, ``slots`` and ``chunk`` fit together.

    ``check_slots`` also checks bounds (and, for scatter, distinct slots); on a
    CUDA slot tensor that reads it back, which synchronizes the current stream.
    """
    if not isinstance(pool, PoolView):
        raise ValueError(f"pool must be a PoolView (see sglang_mha_pool, vllm_pool), got {type(pool).__name__}")
    _check_slots_tensor(pool, slots)
    _check_chunk(pool, chunk, slots.numel())
    if check_slots and slots.numel() > 0:
        _check_slot_values(pool, slots, scatter)


def _check_slots_tensor(pool: PoolView, slots: torch.Tensor) -> None:
    if not isinstance(slots, torch.Tensor) or slots.dim() != 1:
        got = tuple(slots.shape) if isinstance(slots, torch.Tensor) else type(slots).__name__
        raise ValueError(f"slots must be a 1-D tensor [T], got {got}")
    if slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots dtype {slots.dtype} is not allowed; use torch.int32 or torch.int64")
    if slots.device != pool.device:
        raise ValueError(f"slots are on {slots.device}; they must be on the pool device {pool.device}")
    if slots.stride(0) != 1 and slots.numel() > 1:
        raise ValueError(f"slots must be contiguous, got stride {slots.stride(0)}")


def _check_chunk(pool: PoolView, chunk: torch.Tensor, num_tokens: int) -> None:
    if not isinstance(chunk, torch.Tensor):
        raise ValueError(f"chunk must be a tensor {pool.chunk_shape(num_tokens)}, got {type(chunk).__name__}")
    if chunk.dtype != pool.dtype:
        raise ValueError(f"chunk dtype {chunk.dtype} does not match the pool dtype {pool.dtype}")
    if tuple(chunk.shape) != pool.chunk_shape(num_tokens):
        raise ValueError(f"chunk shape {tuple(chunk.shape)} is wrong; expected [L, P, T, H, D] = "
                         f"{pool.chunk_shape(num_tokens)} for {num_tokens} slots")
    if not chunk.is_contiguous():
        raise ValueError(f"chunk must be contiguous, got strides {chunk.stride()}")
    pinned_host = pool.device.type == "cuda" and chunk.device.type == "cpu" and chunk.is_pinned()
    if chunk.device != pool.device and not pinned_host:
        raise ValueError(f"chunk is on {chunk.device}; allowed: the pool device {pool.device}, "
                         f"or pinned host memory when the pool is on CUDA")


def _check_slot_values(pool: PoolView, slots: torch.Tensor, scatter: bool) -> None:
    lo, hi = (int(v) for v in torch.aminmax(slots))
    if lo < 0 or hi >= pool.num_slots:
        bad = lo if lo < 0 else hi
        raise ValueError(f"slot {bad} is out of range; allowed: [0, {pool.num_slots})")
    if scatter:
        ordered = torch.sort(slots).values
        dup = ordered[1:][ordered[1:] == ordered[:-1]]
        if dup.numel() > 0:
            raise ValueError(f"slot {int(dup[0])} appears more than once; scatter needs distinct slots")


# --------------------------------------------------------------------------- Triton launchers

def gather_triton(pool: PoolView, slots: torch.Tensor, out: torch.Tensor, *, check_slots: bool = True) -> torch.Tensor:
    """Copy pool ``slots`` into ``out`` [L, P, T, H, D] with the Triton kernel; returns ``out``."""
    check_copy_args(pool, slots, out, scatter=False, check_slots=check_slots)
    _launch(pool, slots, out, gather=True)
    return out


def scatter_triton(pool: PoolView, slots: torch.Tensor, chunk: torch.Tensor, *, check_slots: bool = True) -> None:
    """Copy ``chunk`` [L, P, T, H, D] into pool ``slots`` with the Triton kernel."""
    check_copy_args(pool, slots, chunk, scatter=True, check_slots=check_slots)
    _launch(pool, slots, chunk, gather=False)


def _launch(pool: PoolView, slots: torch.Tensor, chunk: torch.Tensor, *, gather: bool) -> None:
    num_tokens = slots.numel()
    if num_tokens == 0:
        return
    if pool.head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {pool.head_dim} is too large for the kernel; allowed: <= {MAX_HEAD_DIM}")
    block_t, block_h, block_d = tile_shape(pool.num_heads, pool.head_dim, pool.raw_dtype.itemsize)
    grid = (-(-num_tokens // block_t), -(-pool.num_heads // block_h), len(pool.planes))  # ceil divisions
    if max(grid[1:]) > MAX_GRID_YZ:
        raise ValueError(f"{len(pool.planes)} planes x {grid[1]} head blocks exceed the grid limit {MAX_GRID_YZ}")
    view = pool.planes[0]  # [num_blocks, page_size, H, D]; all planes share these strides
    with _on_device(pool.device):
        _paged_copy_kernel[grid](
            chunk.view(pool.raw_dtype), pool.ptr_table, slots, num_tokens,
            view.stride(0), view.stride(1), view.stride(2), pool.page_size,
            NUM_HEADS=pool.num_heads, HEAD_DIM=pool.head_dim, PAGED=pool.page_size > 1, GATHER=gather,
            ALIGNED=pool.aligned, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=NUM_WARPS,
        )


def _on_device(device: torch.device):
    """Make ``device`` current while launching (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------- torch reference (CPU path, test oracle)

def gather_torch(pool: PoolView, slots: torch.Tensor, out: torch.Tensor, *, check_slots: bool = True) -> torch.Tensor:
    """Reference gather with torch indexing; same checks and result as ``gather_triton``."""
    check_copy_args(pool, slots, out, scatter=False, check_slots=check_slots)
    blocks, offsets = _split_slots(pool, slots)
    flat = out.view(pool.raw_dtype).view(len(pool.planes), slots.numel(), pool.num_heads, pool.head_dim)
    for i, plane in enumerate(pool.planes):
        flat[i].copy_(plane[blocks, offsets])  # [T, H, D]
    return out


def scatter_torch(pool: PoolView, slots: torch.Tensor, chunk: torch.Tensor, *, check_slots: bool = True) -> None:
    """Reference scatter with torch indexing; same checks and result as ``scatter_triton``."""
    check_copy_args(pool, slots, chunk, scatter=True, check_slots=check_slots)
    blocks, offsets = _split_slots(pool, slots)
    flat = chunk.view(pool.raw_dtype).view(len(pool.planes), slots.numel(), pool.num_heads, pool.head_dim)
    for i, plane in enumerate(pool.planes):
        plane[blocks, offsets] = flat[i].to(plane.device)  # writes through the strided view into the pool


def _split_slots(pool: PoolView, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    slots = slots.long()  # [T]
    return slots // pool.page_size, slots % pool.page_size
