"""The Redis tier on a real redis-server on loopback: shared by two stores, failures are misses."""

import pytest
import torch

from conftest import free_port, prompt_chunks, require, require_binary, start_redis, store_config
from lmcache_sgl import Tier, TieredStore

require("redis")
require_binary("redis-server")


@pytest.fixture(scope="module")
def redis_url():
    port = free_port()
    proc = start_redis(port)
    yield f"redis://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def test_second_store_reads_what_the_first_wrote(layout, redis_url):
    keys, toks, kvs = prompt_chunks(layout, 3, seed=11)
    writer = TieredStore(store_config(layout, host_chunks=0, remote_url=redis_url), layout)
    for k, t, kv in zip(keys, toks, kvs):
        writer.put(k, t, kv)
    writer.close()
    with TieredStore(store_config(layout, host_chunks=4, remote_url=redis_url), layout) as reader:
        assert reader.lookup(keys).tiers == (Tier.REMOTE,) * 3
        got = reader.get(keys, toks)
        assert len(got) == 3 and all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(got, kvs))
        assert reader.stats().hit_chunks["remote"] == 3
        assert reader.lookup(keys).tiers == (Tier.HOST,) * 3  # promoted
        reader.clear()


def test_corrupt_remote_blob_is_removed_and_missed(layout, redis_url):
    import redis
    keys, toks, kvs = prompt_chunks(layout, 1, seed=12)
    with TieredStore(store_config(layout, host_chunks=0, remote_url=redis_url), layout) as store:
        store.put(keys[0], toks[0], kvs[0])
        store.flush_pending()
        redis.Redis.from_url(redis_url).set("lmcsgl:" + keys[0], b"garbage")
        assert store.get(keys, toks) == []
        assert store.stats().corrupt_chunks == 1 and store.contains(keys[0]) is None


def test_oversize_remote_blob_is_refused_with_a_bounded_read(layout, redis_url):
    """A value longer than any chunk of the layout is a miss and is removed; GETRANGE caps the transfer."""
    import redis
    from lmcache_sgl.storage.chunk_file import max_blob_bytes
    keys, toks, kvs = prompt_chunks(layout, 1, seed=14)
    with TieredStore(store_config(layout, host_chunks=0, remote_url=redis_url), layout) as store:
        store.put(keys[0], toks[0], kvs[0])
        store.flush_pending()
        client = redis.Redis.from_url(redis_url)
        client.setrange("lmcsgl:" + keys[0], max_blob_bytes(layout.chunk_bytes), b"x")  # one byte too long
        assert store.get(keys, toks) == []
        assert store.stats().corrupt_chunks == 1 and not client.exists("lmcsgl:" + keys[0])


def test_unreachable_server_is_a_miss(layout):
    keys, toks, kvs = prompt_chunks(layout, 2, seed=13)
    url = f"redis://127.0.0.1:{free_port()}"  # nothing listens there
    with TieredStore(store_config(layout, host_chunks=0, remote_url=url), layout) as store:
        assert store.put(keys[0], toks[0], kvs[0])  # queued; the write fails in the background
        store.flush_pending()
        # keys[1] was never put: a miss, found neither locally nor on the server.
        assert store.lookup(keys[1:]).num_hits == 0 and store.get(keys[1:], toks[1:]) == []
        stats = store.stats()
        # The first refused call trips the breaker; the others are skipped, not retried.
        assert stats.remote_errors >= 1 and stats.remote_breaker_trips == 1


def test_a_save_asks_redis_once_for_all_its_chunks(layout, redis_url):
    """`missing` makes one round trip for every locally absent key; puts after it make none."""
    keys, toks, kvs = prompt_chunks(layout, 4, seed=15)
    with TieredStore(store_config(layout, host_chunks=0, remote_url=redis_url), layout) as writer:
        for k, t, kv in zip(keys[:2], toks[:2], kvs[:2]):
            writer.put(k, t, kv)
    with TieredStore(store_config(layout, host_chunks=8, remote_url=redis_url), layout) as store:
        calls = []
        for name in ("contains", "contains_many"):
            real = getattr(store._remote, name)
            setattr(store._remote, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
        assert store.missing(keys) == [2, 3] and calls == ["contains_many"]
        assert all(store.put(keys[i], toks[i], kvs[i], presence_checked=True) for i in (2, 3))
        assert calls == ["contains_many"] and store.missing(keys) == []
        store.clear()
