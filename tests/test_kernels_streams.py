"""TransferStream: the CPU no-op interface, and on CUDA the cross-stream ordering it promises.

The GPU tests delay one stream with ``torch.cuda._sleep`` so that a missing
wait shows up as stale data: a copy that did not wait for the producer reads
the old pool, and a consumer that did not wait reads the pool before the copy.
The controls repeat each scenario without the wait and see the stale data,
which proves the scenario can catch the bug.
"""

from __future__ import annotations

import pytest
import torch

from lmcache_sgl.triton_kernels import TransferHandle, TransferStream, gather, scatter, sglang_mha_pool

L, H, D, SLOTS, T = 2, 2, 64, 4096, 1024
# About 0.1-0.2 s at H100 clocks: long enough that an unordered copy surely runs first.
SLEEP_CYCLES = 200_000_000

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cpu_stream_is_a_synchronous_no_op():
    """On CPU, launch runs the copy in place and yields a handle that is already complete."""
    ts = TransferStream("cpu")
    assert ts.stream is None and ts.device == torch.device("cpu")
    k = [torch.randn(SLOTS, H, D).to(torch.bfloat16) for _ in range(L)]
    pool, slots = sglang_mha_pool(k, k), torch.tensor([3, 1, 4])
    with ts.launch(slots) as done:
        chunk = gather(pool, slots)
    assert isinstance(done, TransferHandle)
    assert done.query() is True
    done.wait()
    done.synchronize()
    assert torch.equal(chunk[1, 0], k[1][slots])


def test_cpu_launch_propagates_errors():
    """An error inside the block reaches the caller; the handle stays usable."""
    ts = TransferStream(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="boom"):
        with ts.launch() as done:
            raise RuntimeError("boom")
    assert done.query()


def test_stream_device_must_be_cpu_or_cuda():
    with pytest.raises(ValueError, match="TransferStream device meta is not supported; allowed: cuda or cpu"):
        TransferStream("meta")


def _cuda_pool(value: float):
    k = [torch.full((SLOTS, H, D), value, dtype=torch.bfloat16, device="cuda") for _ in range(L)]
    v = [torch.full((SLOTS, H, D), value, dtype=torch.bfloat16, device="cuda") for _ in range(L)]
    slots = torch.randperm(SLOTS, device="cuda")[:T]
    return k + v, sglang_mha_pool(k, v), slots


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("guarded", [True, False], ids=["launch", "control_no_wait"])
def test_copy_waits_for_the_producer(guarded):
    """A gather in launch() sees what the current stream wrote before it, even if that is still queued."""
    tensors, pool, slots = _cuda_pool(0.0)
    out = pool.empty_chunk(T, device="cpu", pin_memory=True)
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)  # the producer is slow...
    for t in tensors:
        t.fill_(7.0)  # ...and writes the KV after the sleep
    ts = TransferStream("cuda")
    if guarded:
        with ts.launch(slots) as done:
            gather(pool, slots, out, check_slots=False)
        done.synchronize()
    else:
        with torch.cuda.stream(ts.stream):  # the bug: no wait for the producer
            gather(pool, slots, out, check_slots=False)
        ts.stream.synchronize()
    torch.cuda.synchronize()
    assert bool((out == 7.0).all()) is guarded


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("guarded", [True, False], ids=["wait", "control_no_wait"])
def test_consumer_waits_for_the_copy(guarded):
    """A stream that calls handle.wait() reads the scattered KV, not the pool from before the copy."""
    tensors, pool, slots = _cuda_pool(0.0)
    # A device chunk keeps every backend asynchronous (the torch path syncs the host on pinned H2D).
    chunk = torch.full(pool.chunk_shape(T), 5.0, dtype=torch.bfloat16, device="cuda")
    ts = TransferStream("cuda")
    torch.cuda.synchronize()
    with ts.launch(slots, chunk) as done:
        torch.cuda._sleep(SLEEP_CYCLES)  # the copy is slow
        scatter(pool, slots, chunk, check_slots=False)
    if guarded:
        done.wait()
    seen = tensors[0][slots].clone()  # the consumer, on the current stream
    torch.cuda.synchronize()
    assert bool((seen == 5.0).all()) is guarded


@pytest.mark.gpu
@needs_cuda
def test_handle_query_and_synchronize_on_cuda():
    """query() turns True once the copy ran; synchronize() blocks until then."""
    _, pool, slots = _cuda_pool(1.0)
    ts = TransferStream(torch.cuda.current_device())
    with ts.launch(slots) as done:
        torch.cuda._sleep(SLEEP_CYCLES // 4)
        out = gather(pool, slots, check_slots=False)
    done.synchronize()
    assert done.query()
    assert bool((out == 1.0).all())
