"""Layer-wise load-back on CUDA: the forward of layer i waits only for layer i's copy.

SGLang's KV pool already has the hook HiCache uses: with a
``layer_transfer_counter`` registered, ``get_key_buffer``/``get_value_buffer``
(and ``get_kv_buffer``, through them) call ``counter.wait_until(layer)`` before
an attention backend reads a layer. ``LayerCounter`` is our counter:

    loader.load(slots, kv)        # scheduler: layer 0, 1, ... L-1 copies queued on the side stream,
                                  #   one TransferHandle (CUDA event) per layer; the host does not wait
    pool.get_key_buffer(i)        # forward, layer i: counter.wait_until(i) -> the reading stream waits
                                  #   for layer i's event only; layers > i may still be copying

Invariants:
  * ``pending[i]`` is the event of the latest layer-i copy. The side stream runs
    copies in issue order, so it also covers every copy issued before it
    (earlier loads, all their layers). A newer load replaces it.
  * ``pending[i]`` is dropped once it has completed (``query()``), never merely
    because someone waited: any stream that reads layer i before then waits.
  * Before queuing, the device is synchronized (as ``DeviceKV.scatter`` does), so
    a copy never lands in slots a running forward still uses.
  * A load that fails part-way waits for the copies it queued (the caller then
    frees the slots) and arms nothing: the request is prefilled, no KV is half-read.

On CPU there is no stream: ``LayerLoader.for_pool`` returns None and the whole
load runs before the forward, as ``DeviceKV.scatter``.
"""

from __future__ import annotations

import logging
import threading

import torch

from ...triton_kernels import TransferStream
from .device_kv import DeviceKV

log = logging.getLogger(__name__)


class LayerCounter:
    """SGLang's ``layer_transfer_counter`` protocol: ``wait_until(layer)`` before a layer's KV is read."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self._lock = threading.Lock()
        self._pending: list = [None] * num_layers  # [L] TransferHandle of the latest layer-i copy, or None

    def arm(self, handles: list) -> None:
        """Make readers of layer i wait for ``handles[i]`` (one per layer, in layer order)."""
        if len(handles) != self.num_layers:
            raise ValueError(f"arm() needs one handle per layer ({self.num_layers}), got {len(handles)}")
        with self._lock:
            self._pending = list(handles)

    def wait_until(self, layer: int) -> None:
        """The current stream waits for layer ``layer``'s pending copy (the host never blocks)."""
        with self._lock:
            handle = self._pending[layer]
            if handle is not None and handle.query():
                self._pending[layer] = handle = None  # done: later readers need not wait
        if handle is not None:
            handle.wait()

    def pending_layers(self) -> tuple[int, ...]:
        with self._lock:
            return tuple(i for i, h in enumerate(self._pending) if h is not None)

    def reset(self) -> None:
        with self._lock:
            self._pending = [None] * self.num_layers


class LayerLoader:
    """Scatter a loaded prefix into device slots one layer at a time, on a side stream."""

    def __init__(self, device_kv: DeviceKV, stream, counter: LayerCounter) -> None:
        self.device_kv = device_kv
        self.stream = stream  # TransferStream (or a test double with the same launch() contract)
        self.counter = counter

    @classmethod
    def for_pool(cls, kvcache, device_kv: DeviceKV) -> LayerLoader | None:
        """On a CUDA pool: a loader whose counter is registered on ``kvcache``; None on CPU."""
        if device_kv.device.type != "cuda":
            return None
        counter = LayerCounter(device_kv.num_layers)
        kvcache.register_layer_transfer_counter(counter)
        return cls(device_kv, TransferStream(device_kv.device), counter)

    def load(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Queue ``kv`` [L, 2, T, H, D] (host) into ``slots`` [T], layer by layer; arm the counter.

        Returns once every copy is queued, not done. Raises after waiting for
        the queued copies if any layer could not be queued.
        """
        if kv.shape[0] != self.counter.num_layers:
            raise ValueError(f"load of {kv.shape[0]} layers into a pool of {self.counter.num_layers}")
        if kv.device.type == "cpu" and torch.cuda.is_available() and not kv.is_pinned():
            kv = kv.pin_memory()  # pageable memory would make each copy synchronous
        self.device_kv.sync()  # fence: the slots may have been freed by a forward still running
        handles = []
        try:
            for layer in range(kv.shape[0]):
                with self.stream.launch(slots, kv) as done:
                    handles.append(done)  # recorded on exit, also when the copy raises
                    self.device_kv.scatter_layer(layer, slots, kv[layer:layer + 1])  # [1, 2, T, H, D]
        except BaseException:
            for handle in handles:
                handle.synchronize()  # the caller frees the slots next: no copy may still write them
            raise
        self.counter.arm(handles)
