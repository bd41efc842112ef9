"""Run KV copies on a side stream and tell consumers when they are done.

Contract (who records, who waits)::

    ts = TransferStream(pool.device)
    with ts.launch(slots) as done:    # 1. side stream waits for the caller's stream
        gather(pool, slots, host_chunk)   # 2. the copy runs on the side stream
                                      # 3. on exit: done's event is recorded on the side stream
    done.synchronize()                # 4a. host consumer (LZ4, disk) blocks until the copy is done
    done.wait()                       # 4b. GPU consumer: its stream waits, the host does not block

1. Producer side: on entry ``launch`` makes the side stream wait for everything
   already queued on the caller's current stream, so a copy sees the forward
   pass that wrote the KV. The caller records nothing itself.
2. Only work issued inside the ``with`` block runs on the side stream.
3. ``launch`` records the handle's event on exit, also when the block raises.
4. Consumers wait on the handle before touching the destination: a CUDA stream
   with ``wait()`` (e.g. attention reading scattered KV), the host with
   ``synchronize()`` or by polling ``query()`` (e.g. reading a pinned chunk).
5. Reuse: until the event completes, the source must not be overwritten and
   neither buffer may be freed. For pool slots the engine reuses on its own
   stream, ``done.wait()`` on that stream before the reuse is enough; for a
   host buffer only ``synchronize()`` or a ``query()`` that returned True is.
   CUDA tensors passed to ``launch(*tensors)`` are recorded on the side stream,
   so the caching allocator does not hand out their memory early; the handle
   also keeps them (and host buffers, which no allocator tracks) alive until it
   completes. Pass the slot tensor if the caller may drop it right away.
   Host slots lent by ``TieredStore.borrow``: hand the handle to
   ``loan.release(after=done)``; the store keeps the slots pinned (no put can
   overwrite them) until ``done.query()`` is True.

On a CPU device there is no stream: copies run synchronously, ``launch``
yields a handle that is already complete, and every method is a no-op.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class TransferHandle:
    """Completion of the copies issued in one ``TransferStream.launch`` block."""

    __slots__ = ("_event", "_device", "_keep_alive")

    def __init__(self, event: torch.cuda.Event | None, device: torch.device, keep_alive: tuple) -> None:
        self._event = event  # None on CPU: complete from the start
        self._device = device
        self._keep_alive = keep_alive  # tensors the copies use, released on completion

    def wait(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make ``stream`` (default: the current stream) wait for the copies; the host does not block."""
        if self._event is not None:
            (stream or torch.cuda.current_stream(self._device)).wait_event(self._event)

    def synchronize(self) -> None:
        """Block the host until the copies finished; then both buffers may be reused."""
        if self._event is not None:
            self._event.synchronize()
        self._keep_alive = ()

    def query(self) -> bool:
        """True once the copies finished (never blocks)."""
        done = self._event is None or self._event.query()
        if done:
            self._keep_alive = ()
        return done


class TransferStream:
    """A side CUDA stream for KV copies (see the module docstring for the contract)."""

    def __init__(self, device: torch.device | str | int = "cuda", *, priority: int = 0) -> None:
        self.device = _normalize(device)
        is_cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device, priority=priority) if is_cuda else None

    @property
    def stream(self) -> torch.cuda.Stream | None:
        """The side stream, or None on CPU."""
        return self._stream

    @contextlib.contextmanager
    def launch(self, *tensors: torch.Tensor) -> Iterator[TransferHandle]:
        """Run the block's copies on the side stream; yield the handle that completes with them."""
        if self._stream is None:
            yield TransferHandle(None, self.device, ())
            return
        event = torch.cuda.Event()
        handle = TransferHandle(event, self.device, tensors)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        for t in tensors:
            if t.is_cuda:
                t.record_stream(self._stream)
        try:
            with torch.cuda.stream(self._stream):
                yield handle
        finally:
            event.record(self._stream)


def _normalize(device: torch.device | str | int) -> torch.device:
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"TransferStream device {device} is not supported; allowed: cuda or cpu")
    return device
