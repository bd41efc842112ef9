"""The Redis tier on a real redis-server on loopback: shared by two stores, failures are misses."""

import shutil
import socket
import subprocess
import time

import pytest
import torch

from conftest import prompt_chunks, store_config
from lmcache_sgl import Tier, TieredStore

pytest.importorskip("redis")
pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url():
    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    import redis
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
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


def test_unreachable_server_is_a_miss(layout):
    keys, toks, kvs = prompt_chunks(layout, 1, seed=13)
    url = f"redis://127.0.0.1:{_free_port()}"  # nothing listens there
    with TieredStore(store_config(layout, host_chunks=0, remote_url=url), layout) as store:
        assert store.put(keys[0], toks[0], kvs[0])  # queued; the write fails in the background
        store.flush_pending()
        assert store.lookup(keys).num_hits == 0 and store.get(keys, toks) == []
        assert store.stats().remote_errors >= 2
