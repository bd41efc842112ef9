"""Nothing cached is lost on a normal stop: save the device tree, flush, and stop in bounded time.

What really happens when an SGLang 0.5.23 server stops (read from the wheel):

  * ``/flush_cache``: the scheduler thread calls ``tree_cache.reset()``; the
    device tree is still whole when our ``reset`` starts.
  * SIGTERM to the launcher only (``kill PID``, docker's PID 1): the tokenizer
    drains requests, sends ``ShutdownReq``; the scheduler leaves its loop and
    calls ``release_host_resources``; 15 s later the launcher SIGKILLs it.
  * SIGTERM or SIGINT to the whole process group (Ctrl-C, systemd's
    control-group kill, ``kill -TERM -PGID``): stock schedulers and the
    detokenizer die at once; the launcher's child watchdog then SIGKILLs
    everything that is left (``kill_process_tree``) within about a second.

So in the scheduler we catch SIGTERM/SIGINT and only set SGLang's own
``gracefully_exit`` flag: the handler may run while the scheduler thread holds
the store's or the tree's locks, so it does no work itself. The loop ends at
the next step boundary and ``release_host_resources`` saves and flushes on the
scheduler thread, holding nothing; then the signal is chained to the previous
handler (by default the process dies of it, which tells the launcher to tear
the server down). A watchdog thread exits the process anyway once
``shutdown_flush_timeout_s`` (plus a margin) has passed, so a stop never hangs.
The detokenizer outlives a group SIGTERM for the same bound, so that the
launcher does not SIGKILL the scheduler while it flushes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import NamedTuple

from .tier_link import token_array

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_MARGIN_S = 5.0  # beyond shutdown_flush_timeout_s, for the tree walk and SGLang's own teardown


class PersistReport(NamedTuple):
    saved_chunks: int  # device-resident chunks put into the store now (the rest were there already)
    written: int  # chunks written to disk/Redis meanwhile (write-throughs and the flush)
    unwritten: int  # chunks still only in memory when the flush ended: lost if the process exits
    timed_out: bool
    seconds: float


def device_leaves(tree_core) -> list:
    """Ids of the tree's leaves (nodes without children), root excluded."""
    leaves, stack = [], [tree_core.root_node]
    while stack:
        node = stack.pop()
        children = list(node.children.values())
        if not children and node is not tree_core.root_node:
            leaves.append(node.id)
        stack.extend(children)
    return leaves


def save_device_tree(cache) -> int:
    """Put every full chunk of every device-resident root-to-leaf path into the store; returns how many."""
    core, saved = cache.tree_core, 0
    for leaf_id in device_leaves(core):
        node, path = core.node_by_id(leaf_id), []
        while node.parent is not None:  # root-exclusive, leaf -> root
            path.append(node)
            node = node.parent
        if any(n.key is None or n.evicted for n in path):
            continue
        path.reverse()
        tokens = token_array([t for n in path for t in n.key.raw_token_ids()])
        slots = core.collect_full_device_indices(leaf_id, node.id)  # [len(tokens)], root -> leaf
        if len(slots) == len(tokens):
            saved += cache.link.save_completed_chunks(tokens, slots, node_start=0)
    return saved


def persist(cache, why: str, timeout_s: float) -> PersistReport:
    """Save the device tree into the store, then flush it to disk within ``timeout_s``; log the outcome."""
    start, store = time.monotonic(), cache.link.store
    written_before = store.stats().writebacks  # write-throughs of the saved chunks may land before the flush
    try:
        saved = save_device_tree(cache)
    except Exception:  # noqa: BLE001 - engine boundary: a failed save must not stop the flush
        log.exception("lmcache_sgl: %s: saving the device tree failed; flushing what the store holds", why)
        saved = 0
    flushed = store.flush(timeout_s=max(0.0, timeout_s - (time.monotonic() - start)))
    report = PersistReport(saved, store.stats().writebacks - written_before, flushed.unwritten, flushed.timed_out,
                           time.monotonic() - start)
    level = logging.ERROR if report.unwritten else logging.INFO
    log.log(level, "lmcache_sgl: %s: saved %d device chunk(s), wrote %d chunk(s) to disk in %.1f s; "
            "%d chunk(s) dropped (not written%s)", why, report.saved_chunks, report.written, report.seconds,
            report.unwritten, ", flush timed out" if report.timed_out else "")
    return report


class StopSignals:
    """SIGTERM/SIGINT in a scheduler process: leave the loop, persist, then chain the signal."""

    def __init__(self, scheduler, timeout_s: float) -> None:
        self._scheduler = scheduler
        self._timeout_s = timeout_s
        self._previous: dict[int, object] = {}
        self.received: int | None = None

    def install(self) -> bool:
        """Install the handlers; False (nothing changed) off the main thread, where Python cannot."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("lmcache_sgl: scheduler loop is not on the main thread; SIGTERM will not flush the cache")
            return False
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return True

    def _on_signal(self, signum, frame) -> None:
        # Async-signal context: the scheduler thread may hold any lock. Set flags only.
        if self.received is not None:
            return
        self.received = signum
        self._scheduler.gracefully_exit = True
        threading.Thread(target=self._exit_if_stuck, name="lmcache-sgl-stop-watchdog", daemon=True).start()

    def _exit_if_stuck(self) -> None:
        time.sleep(self._timeout_s + EXIT_MARGIN_S)
        log.error("lmcache_sgl: the scheduler did not stop within %.0f s of signal %d; exiting",
                  self._timeout_s + EXIT_MARGIN_S, self.received)
        os._exit(128 + self.received)

    def chain(self) -> None:
        """After persisting (main thread): hand the received signal to the handler we replaced."""
        if self.received is None:
            return
        previous = self._previous.get(self.received, signal.SIG_DFL)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if callable(previous):
            previous(self.received, None)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), self.received)  # dies of it: the launcher sees a stopped child and tears down


def outlive_group_stop(timeout_s: float) -> None:
    """Detokenizer: survive a SIGTERM/SIGINT for ``timeout_s`` + margin, while the scheduler flushes.

    The launcher SIGKILLs the whole tree once the scheduler exits; this is only
    the fallback if nobody does.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def on_signal(signum, frame) -> None:
        def exit_later() -> None:
            time.sleep(timeout_s + EXIT_MARGIN_S)
            os._exit(128 + signum)

        threading.Thread(target=exit_later, name="lmcache-sgl-detok-exit", daemon=True).start()

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
