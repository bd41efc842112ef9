"""Redis security (issue #13): credentials and TLS in the URL, a password never logged, TTL on writes."""

from __future__ import annotations

import logging

import pytest

from conftest import free_port, prompt_chunks, require, require_binary, start_redis, store_config
from lmcache_sgl import ConfigError, TieredStore
from lmcache_sgl.config import CacheConfig
from lmcache_sgl.storage.remote_tier import RemoteTier, redact_url

redis = require("redis")
require_binary("redis-server")

PASSWORD = "s3cr3t-Pa55word"
KEY = "ab" + "7" * 30
BLOB = bytes(range(1, 200)) * 10


@pytest.fixture(scope="module")
def server():
    """(port, admin client) of a redis-server with an ACL user ``alice`` whose password is PASSWORD."""
    port = free_port()
    proc = start_redis(port)
    admin = redis.Redis(port=port)
    admin.acl_setuser("alice", enabled=True, passwords=[f"+{PASSWORD}"], keys=["lmcsgl:*"], commands=["+@all"])
    yield port, admin
    proc.terminate()
    proc.wait(10)


@pytest.mark.parametrize("url, shown", [
    (f"redis://alice:{PASSWORD}@10.0.0.1:6379/2", "redis://alice:***@10.0.0.1:6379/2"),
    (f"rediss://:{PASSWORD}@cache.internal:6380", "rediss://***@cache.internal:6380"),
    (f"rediss://alice:{PASSWORD}@h:1/0?ssl_cert_reqs=required", "rediss://alice:***@h:1/0?ssl_cert_reqs=required"),
    (f"redis://h:1/0?password={PASSWORD}&db=3", "redis://h:1/0?password=***&db=3"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
])
def test_redact_url_hides_only_the_password(url, shown):
    assert redact_url(url) == shown


def test_credentials_in_the_url_authenticate(server):
    port, admin = server
    tier = RemoteTier(f"redis://alice:{PASSWORD}@127.0.0.1:{port}/0")
    assert tier.write(KEY, BLOB) and tier.read(KEY) == BLOB
    assert admin.get("lmcsgl:" + KEY) == BLOB and tier.errors == 0
    assert tier.url == f"redis://alice:***@127.0.0.1:{port}/0"
    tier.remove(KEY)
    tier.close()


def test_password_never_logged_on_a_refused_connection(layout, caplog):
    """A server that is down: every warning names the redacted URL, never the password."""
    url = f"redis://alice:{PASSWORD}@127.0.0.1:{free_port()}/0"
    keys, toks, kvs = prompt_chunks(layout, 2, seed=21)
    with caplog.at_level(logging.DEBUG):
        with TieredStore(store_config(layout, host_chunks=0, remote_url=url), layout) as store:
            store.put(keys[0], toks[0], kvs[0])
            store.flush()
            assert store.lookup(keys[1:]).num_hits == 0  # never stored; Redis is down: a miss
        logged = caplog.text + " ".join(repr(r.args) for r in caplog.records)
    assert "redis://alice:***@127.0.0.1" in caplog.text  # the failure was logged
    assert PASSWORD not in logged


def test_password_never_logged_on_a_wrong_password(server, caplog):
    port, _ = server
    wrong = PASSWORD[::-1]
    tier = RemoteTier(f"redis://alice:{wrong}@127.0.0.1:{port}/0")
    with caplog.at_level(logging.DEBUG):
        assert tier.read(KEY) is None and tier.errors == 1
    assert "alice:***@" in caplog.text and wrong not in caplog.text
    tier.close()


def test_config_errors_and_repr_show_the_url_redacted():
    with pytest.raises(ConfigError) as err:
        CacheConfig(remote_url=f"http://alice:{PASSWORD}@h:1")
    assert "http://alice:***@h:1" in str(err.value) and PASSWORD not in str(err.value)
    cfg = CacheConfig(remote_url=f"redis://alice:{PASSWORD}@h:1/0")
    assert "redis://alice:***@h:1/0" in repr(cfg) and PASSWORD not in repr(cfg)
    assert cfg.remote_url.endswith(f"{PASSWORD}@h:1/0")  # the real URL is kept for connecting


def test_rediss_url_is_accepted_and_uses_tls():
    cfg = CacheConfig.load(environ={"LMCACHE_REMOTE_URL": f"rediss://alice:{PASSWORD}@cache.example:6380/1"})
    tier = RemoteTier(cfg.remote_url)
    pool = tier._client.connection_pool
    assert pool.connection_class is redis.SSLConnection
    assert pool.connection_kwargs["password"] == PASSWORD and pool.connection_kwargs["username"] == "alice"
    assert RemoteTier("redis://h:1")._client.connection_pool.connection_class is redis.Connection


@pytest.mark.parametrize("bad", ["0", "-5", "1.5", "soon"])
def test_remote_ttl_must_be_whole_positive_seconds(bad):
    with pytest.raises(ConfigError, match="remote_ttl_s"):
        CacheConfig.load(environ={"LMCACHE_REMOTE_TTL_S": bad})
    assert CacheConfig.load(environ={"LMCACHE_REMOTE_TTL_S": "90"}).remote_ttl_s == 90


def test_writes_expire_after_remote_ttl_s(server, layout):
    """With remote_ttl_s, every write is SET ... EX; without it, entries have no expiry."""
    port, admin = server
    url = f"redis://alice:{PASSWORD}@127.0.0.1:{port}/0"
    keys, toks, kvs = prompt_chunks(layout, 2, seed=22)
    with TieredStore(store_config(layout, host_chunks=0, remote_url=url, remote_ttl_s=120), layout) as store:
        store.put(keys[0], toks[0], kvs[0])
    with TieredStore(store_config(layout, host_chunks=0, remote_url=url), layout) as store:
        store.put(keys[1], toks[1], kvs[1])
    assert 0 < admin.ttl("lmcsgl:" + keys[0]) <= 120
    assert admin.ttl("lmcsgl:" + keys[1]) == -1  # exists, no expiry
    admin.delete(*("lmcsgl:" + k for k in keys))
