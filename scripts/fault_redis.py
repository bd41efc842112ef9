"""The fault campaign's Redis case (see fault_campaign.py), against a real redis-server.

A store with no host and no disk tier, so every hit after a write comes from
Redis. Phases, with puts and checked gets running throughout and each call
timed: warm (hits from Redis), slow (``DEBUG SLEEP`` on another connection),
killed (``kill -9``), and restarted on the same port (empty: no persistence).
While Redis is slow or dead every call returns within ``BOUND_S`` (a miss, or a
hit from the write queue's memory); once it answers again, new chunks are
written to it and read back from it (``recovered in``).
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time

from lmcache_sgl import Tier, TieredStore

TIMEOUT_MS = 100
BACKOFF_MAX_S = 1.0
BOUND_S = 2 * TIMEOUT_MS / 1000 + 0.8  # a connect or read timeout per call, and scheduling on a busy 2-core host
RECOVER_LIMIT_S = 3 * BACKOFF_MAX_S + 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis(port: int) -> subprocess.Popen:
    import redis
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--enable-debug-command", "yes"], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server did not answer on port {port}")


class Traffic:
    """Puts of new keys and checked gets of every key put so far, each call timed."""

    def __init__(self, store: TieredStore, ref, res) -> None:
        self.store, self.ref, self.res = store, ref, res
        self.next = 0
        self.slowest = 0.0

    def _timed(self, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.slowest = max(self.slowest, time.perf_counter() - start)
        return out

    def step(self, phase: str) -> bool:
        """One put and one get of an earlier key; True when that get hit."""
        i, self.next = self.next, self.next + 1
        self._timed(self.ref.put, self.store, i % self.ref.size)
        j = (i * 7) % max(i, 1)
        hit = self._timed(self.ref.get, self.store, j % self.ref.size, self.res)
        self.res.tries += 1
        self.res.outcomes[f"{phase}: {'hits' if hit else 'misses'}"] += 1
        return hit

    def run_for(self, phase: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.step(phase)
        self.res.outcomes[f"{phase}: slowest call (ms)"] = round(self.slowest * 1000)
        self.res.check(self.slowest <= BOUND_S, f"{phase}: a call took {self.slowest:.2f} s, over {BOUND_S:.2f} s")
        self.slowest = 0.0


def _remote_hits(store: TieredStore) -> int:
    return store.stats().hit_chunks[Tier.REMOTE.value]


def _wait_for_remote(traffic: Traffic, phase: str) -> None:
    """Run traffic until a new chunk is written to Redis and read back from it; count the time."""
    store, start = traffic.store, time.monotonic()
    while time.monotonic() - start < RECOVER_LIMIT_S:
        i = traffic.next
        traffic.step(phase)
        store.flush_pending()
        before = _remote_hits(store)
        if traffic.ref.get(store, i % traffic.ref.size, traffic.res) and _remote_hits(store) > before:
            traffic.res.outcomes[f"{phase}: recovered in (s)"] = round(time.monotonic() - start, 2)
            return
        time.sleep(0.05)
    traffic.res.failures.append(f"{phase}: Redis not used again within {RECOVER_LIMIT_S} s")


def _debug_sleep(port: int, seconds: float) -> None:
    """Make the server unresponsive for ``seconds`` (on its own connection, which waits it out)."""
    import redis
    redis.Redis(port=port, socket_timeout=seconds + 30).execute_command("DEBUG", "SLEEP", seconds)


def _planted_values(store: TieredStore, traffic: Traffic, client) -> None:
    """Garbage, truncated and swapped values under chunk keys: misses, and deleted from Redis."""
    ref, res, first = traffic.ref, traffic.res, traffic.next
    ref.put_all(store, range(first, first + 30))
    store.flush_pending()
    names = [f"lmcsgl:{ref.key(first + i)}" for i in range(30)]
    good = [client.get(name) for name in names]
    for i, name in enumerate(names):
        bad = (good[i][:len(good[i]) // 2], good[(i + 1) % 30], b"LMCSGLKV" + bytes(40))[i % 3]
        client.set(name, bad)
    hits = sum(ref.get(store, first + i, res) for i in range(30))
    deleted = sum(not client.exists(name) for name in names)
    traffic.next += 30
    res.outcomes["planted bad values: hits"] = hits
    res.outcomes["planted bad values: deleted"] = deleted
    res.check(hits == 0 and deleted == 30, f"planted bad values: {hits} of 30 served, {deleted} deleted")


def redis_faults(res, ref, config, layout, quick: bool) -> None:
    import redis
    seconds = 2.0 if quick else 10.0
    port = _free_port()
    proc = _start_redis(port)
    store = TieredStore(config(remote_url=f"redis://127.0.0.1:{port}/0", remote_timeout_ms=TIMEOUT_MS,
                               remote_backoff_max_s=BACKOFF_MAX_S), layout)
    traffic = Traffic(store, ref, res)
    try:
        traffic.run_for("warm", seconds)
        store.flush_pending()
        _wait_for_remote(traffic, "warm")
        sleeper = threading.Thread(target=_debug_sleep, args=(port, seconds))
        sleeper.start()
        time.sleep(0.1)
        traffic.run_for("slow", seconds - 0.3)
        sleeper.join()
        _wait_for_remote(traffic, "after slow")
        proc.kill()
        proc.wait()
        traffic.run_for("killed", seconds)
        proc = _start_redis(port)
        _wait_for_remote(traffic, "restarted")
        _planted_values(store, traffic, redis.Redis(port=port))
        res.outcomes["remote errors"] = store.stats().remote_errors
        res.outcomes["breaker trips"] = store.stats().remote_breaker_trips
        res.check(res.outcomes["killed: misses"] > 0, "no get missed while Redis was dead")
    finally:
        store.close(timeout_s=10)
        proc.kill()
        proc.wait()
