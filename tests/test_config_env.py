"""Environment variables a user moving from LMCache keeps set must not stop the engine; typos still do."""

import pytest

from lmcache_sgl.config import CacheConfig, ConfigError


@pytest.mark.parametrize("name", ["LMCACHE_TRACK_USAGE", "LMCACHE_LOG_LEVEL"])
def test_lmcache_process_switches_are_ignored(name):
    cfg = CacheConfig.load(environ={name: "false", "LMCACHE_CHUNK_SIZE": "128"})
    assert cfg.chunk_size == 128


def test_an_unknown_lmcache_variable_is_still_refused_by_name():
    with pytest.raises(ConfigError, match="LMCACHE_CHUNK_SZIE"):
        CacheConfig.load(environ={"LMCACHE_CHUNK_SZIE": "128"})
