"""A Redis that stops answering costs an engine thread one timeout, then nothing until it is back.

The black hole is a real TCP server on loopback that accepts and never replies.
"""

import socket
import threading
import time

import pytest
import torch

from conftest import free_port, prompt_chunks, require, start_redis, store_config
from lmcache_sgl import Tier, TieredStore
from lmcache_sgl.config import CacheConfig, ConfigError

redis = require("redis")

TIMEOUT_MS = 200
TIMEOUT_S = TIMEOUT_MS / 1000


class BlackHole:
    """Accepts connections on 127.0.0.1 and never answers; keeps them open until closed."""

    def __init__(self, port: int = 0) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)
        for c in self.conns:
            c.close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"


@pytest.fixture
def black_hole():
    hole = BlackHole()
    yield hole
    if hole.sock.fileno() != -1:
        hole.close()


needs_redis_server = pytest.mark.requires_binary("redis-server")


def _store(layout, url: str, **kw) -> TieredStore:
    return TieredStore(store_config(layout, host_chunks=0, remote_url=url, remote_timeout_ms=TIMEOUT_MS, **kw), layout)


def test_twenty_lookups_against_a_black_hole_cost_one_timeout(layout, black_hole):
    """The first lookup waits one timeout and trips the breaker; the next ones answer a miss at once."""
    keys, _, _ = prompt_chunks(layout, 4, seed=21)
    with _store(layout, black_hole.url) as store:
        start = time.perf_counter()
        results = [store.lookup(keys) for _ in range(20)]
        elapsed = time.perf_counter() - start
        assert all(r.num_hits == 0 for r in results)
        assert elapsed < 2 * TIMEOUT_S, elapsed
        assert store.stats().remote_breaker_trips == 1


def test_writer_does_not_stall_on_a_black_hole(layout, black_hole):
    """Writes fail fast while the breaker is open, so queued puts drain instead of piling up."""
    keys, toks, kvs = prompt_chunks(layout, 6, seed=22)
    with _store(layout, black_hole.url, max_pending_writes=8) as store:
        start = time.perf_counter()
        assert all(store.put(k, t, kv) for k, t, kv in zip(keys, toks, kvs))
        store.flush_pending()
        assert time.perf_counter() - start < 2 * TIMEOUT_S + 1.0  # one timeout, plus encoding on a slow CPU
        assert store.stats().puts_dropped == 0 and store.stats().writebacks == 0


@needs_redis_server
def test_hits_return_after_the_back_off_once_redis_is_back(layout, black_hole):
    """Black hole, then a real redis on the same port: a miss while open, hits after the back-off."""
    keys, toks, kvs = prompt_chunks(layout, 3, seed=23)
    port = black_hole.port
    with _store(layout, black_hole.url, remote_backoff_max_s=0.5) as store:
        assert store.lookup(keys).num_hits == 0  # trips: open for 0.5 s
        tripped = time.perf_counter()
        assert store.lookup(keys).num_hits == 0  # open: no round trip
        assert time.perf_counter() - tripped < TIMEOUT_S / 2
        black_hole.close()
        proc = start_redis(port)
        try:
            with _store(layout, f"redis://127.0.0.1:{port}") as writer:
                for k, t, kv in zip(keys, toks, kvs):
                    writer.put(k, t, kv)
            time.sleep(max(0.0, tripped + 0.6 - time.perf_counter()))
            assert store.lookup(keys).tiers == (Tier.REMOTE,) * 3  # the probe succeeds
            got = store.get(keys, toks)
            assert len(got) == 3 and all(torch.equal(a.view(torch.int16), b.view(torch.int16))
                                         for a, b in zip(got, kvs))
            assert store.stats().remote_breaker_trips == 1
            store.clear()
        finally:
            proc.terminate()
            proc.wait(10)


@needs_redis_server
def test_lookup_makes_one_round_trip(layout, monkeypatch):
    """However many keys a lookup checks, it sends one request to Redis."""
    port = free_port()
    proc = start_redis(port)
    try:
        keys, toks, kvs = prompt_chunks(layout, 8, seed=24)
        with _store(layout, f"redis://127.0.0.1:{port}") as store:
            for k, t, kv in zip(keys[:5], toks[:5], kvs[:5]):
                store.put(k, t, kv)
            store.flush_pending()
            sends = []
            real_send = redis.connection.AbstractConnection.send_packed_command
            monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command",
                                lambda self, *a, **kw: sends.append(1) or real_send(self, *a, **kw))
            assert store.lookup(keys).num_hits == 5
            assert len(sends) == 1
            store.clear()
    finally:
        proc.terminate()
        proc.wait(10)


def test_breaker_backs_off_exponentially_up_to_the_cap():
    """Open for base, 2*base, ... up to the cap; one probe when it ends; a success closes it."""
    from lmcache_sgl.storage.remote_tier import CircuitBreaker
    now = [100.0]
    breaker = CircuitBreaker(base_s=0.5, max_s=3.0, clock=lambda: now[0])
    assert breaker.allow()
    assert breaker.record_failure()  # trips
    periods = []
    for _ in range(5):
        start = now[0]
        while not breaker.allow():
            now[0] += 0.25
        periods.append(now[0] - start)
        assert not breaker.allow()  # only one probe at a time
        breaker.record_failure()
    assert periods == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert breaker.trips == 6
    now[0] += 3.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.allow() and breaker.allow()  # closed: every call passes
    breaker.record_failure()
    start = now[0]
    while not breaker.allow():
        now[0] += 0.25
    assert now[0] - start == 0.5  # the back-off restarted from the base


@pytest.mark.parametrize("key,value", [("remote_timeout_ms", 0), ("remote_backoff_max_s", 0),
                                       ("disk_rescan_interval_s", -1)])
def test_bad_remote_and_rescan_settings_are_refused_by_name(key, value):
    with pytest.raises(ConfigError, match=key):
        CacheConfig(**{key: value})
