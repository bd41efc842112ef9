"""SGLang's prefill timings for the cost model, so ``load_policy: auto`` can refuse slow loads.

The cost model compares a hit's load time with the time to recompute its
tokens; the recompute side needs the engine's prefill rate. ``PrefillClock``
wraps a model runner's ``forward`` and reports each extend (prefill) forward
as (extend tokens, seconds) to ``TieredStore.record_prefill``. Decode,
speculative-verify and idle forwards are not prefills and are not timed.

On CUDA a forward returns before the device finishes (SGLang overlaps
scheduling with it), so the clock records a pair of timing events on the
forward's stream and reads them later, once they have completed, without
ever blocking the scheduler. On CPU the forward is synchronous and the wall
time around the call is the forward's time.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from typing import Callable, NamedTuple

import torch

log = logging.getLogger(__name__)

_MAX_PENDING = 64  # CUDA timings not read yet; older ones are dropped beyond this


class _Pending(NamedTuple):
    tokens: int
    start: object  # torch.cuda.Event, recorded before the forward
    end: object  # ... and after it, on the same stream


class PrefillClock:
    """Times the prefill forwards of one model runner and reports them to ``record(tokens, seconds)``."""

    def __init__(self, record: Callable[[int, float], None], tokens_of: Callable[[object], int],
                 device: torch.device) -> None:
        self._record = record
        self._tokens_of = tokens_of  # forward batch -> tokens it prefills; 0 for any other forward
        self._on_cuda = torch.device(device).type == "cuda"
        self._pending: deque[_Pending] = deque(maxlen=_MAX_PENDING)
        self._lock = threading.Lock()
        self.timed = 0  # prefills reported so far

    def wrap(self, forward: Callable) -> Callable:
        """``forward(forward_batch, ...)`` timed when the batch is a prefill; same arguments and result."""

        @functools.wraps(forward)
        def timed_forward(forward_batch, *args, **kwargs):
            tokens = self._tokens_quietly(forward_batch)
            if tokens <= 0:
                return forward(forward_batch, *args, **kwargs)
            if self._on_cuda:
                return self._time_cuda(tokens, forward, forward_batch, *args, **kwargs)
            start = time.perf_counter()
            out = forward(forward_batch, *args, **kwargs)
            self._report(tokens, time.perf_counter() - start)
            return out

        return timed_forward

    def _time_cuda(self, tokens: int, forward: Callable, *args, **kwargs):
        self.poll()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()  # the current stream: the one the forward is launched on
        out = forward(*args, **kwargs)
        end.record()
        with self._lock:
            self._pending.append(_Pending(tokens, start, end))
        return out

    def poll(self) -> None:
        """Report the CUDA timings whose forwards have finished, oldest first; never waits."""
        while True:
            with self._lock:
                if not self._pending or not self._pending[0].end.query():
                    return
                done = self._pending.popleft()
            self._report(done.tokens, done.start.elapsed_time(done.end) / 1e3)

    def _tokens_quietly(self, forward_batch) -> int:
        try:
            return int(self._tokens_of(forward_batch) or 0)
        except Exception:  # noqa: BLE001 - never break a forward for a timing
            log.debug("lmcache_sgl: could not count a forward's prefill tokens", exc_info=True)
            return 0

    def _report(self, tokens: int, seconds: float) -> None:
        try:
            self._record(tokens, seconds)
        except Exception:  # noqa: BLE001 - never break a forward for a timing
            log.exception("lmcache_sgl: recording a prefill timing failed")
            return
        self.timed += 1


def extend_tokens(forward_batch) -> int:
    """The tokens an SGLang forward batch prefills: its extend tokens for EXTEND and MIXED, else 0."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    if forward_batch.forward_mode not in (ForwardMode.EXTEND, ForwardMode.MIXED):
        return 0
    return int(forward_batch.extend_num_tokens or 0)


def install(model_runner, record: Callable[[int, float], None], device: torch.device) -> PrefillClock:
    """Time ``model_runner``'s prefill forwards from now on (an instance attribute shadows the method)."""
    clock = PrefillClock(record, extend_tokens, device)
    model_runner.forward = clock.wrap(model_runner.forward)
    return clock
