"""Config: defaults, YAML and LMCACHE_* sources, and errors that name the key."""

import pytest

from lmcache_sgl.config import CacheConfig, ConfigError


def test_defaults_follow_lmcache():
    cfg = CacheConfig.load(environ={})
    assert cfg.chunk_size == 256 and cfg.local_cpu and cfg.local_disk is None
    assert cfg.cache_policy == "LRU" and cfg.disk_codec == "lz4"


def test_env_overrides_yaml(tmp_path):
    f = tmp_path / "cfg.yaml"
    f.write_text("chunk_size: 64\nlocal_disk: file:///tmp/x\nmax_local_cpu_size: 0.5\n")
    cfg = CacheConfig.load(environ={"LMCACHE_CONFIG_FILE": str(f), "LMCACHE_CHUNK_SIZE": "128",
                                    "LMCACHE_LOCAL_CPU": "false"})
    assert cfg.chunk_size == 128  # env wins over the file
    assert cfg.local_disk == "/tmp/x"  # file:// prefix stripped
    assert cfg.max_local_cpu_size == 0.5 and cfg.local_cpu is False
    assert cfg.host_bytes == 0  # local_cpu off


def test_explicit_overrides_win(tmp_path):
    cfg = CacheConfig.load(environ={"LMCACHE_CHUNK_SIZE": "128"}, overrides={"chunk_size": 32})
    assert cfg.chunk_size == 32


@pytest.mark.parametrize("source, message", [
    ({"LMCACHE_CHUNK_SIZE": "zero"}, "chunk_size='zero'"),
    ({"LMCACHE_CHUNK_SIZE": "0"}, "chunk_size=0"),
    ({"LMCACHE_CACHE_POLICY": "random"}, "one of ('LRU', 'FIFO', 'LFU')"),
    ({"LMCACHE_DISK_CODEC": "gzip"}, "disk_codec='gzip'"),
    ({"LMCACHE_LOCAL_CPU": "maybe"}, "not a boolean"),
    ({"LMCACHE_REMOTE_URL": "http://x"}, "redis://host:port"),
    ({"LMCACHE_NOT_A_KEY": "1"}, "LMCACHE_NOT_A_KEY"),
])
def test_bad_values_name_the_key(source, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CacheConfig.load(environ=source)


def test_unknown_yaml_key_lists_allowed(tmp_path):
    f = tmp_path / "cfg.yaml"
    f.write_text("chunk_sise: 64\n")
    with pytest.raises(ConfigError, match="unknown config key 'chunk_sise'.*chunk_size"):
        CacheConfig.load(path=f, environ={})


def test_unreadable_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        CacheConfig.load(path=tmp_path / "missing.yaml", environ={})
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        CacheConfig.load(path=f, environ={})


def test_policy_is_case_insensitive():
    assert CacheConfig(cache_policy="lru").cache_policy == "LRU"


def test_replace_revalidates():
    cfg = CacheConfig()
    assert cfg.replace(chunk_size=64).chunk_size == 64
    with pytest.raises(ConfigError):
        cfg.replace(chunk_size=-1)


def test_project_tool_variables_are_not_config_keys():
    """LMCACHE_SGL_* switch shims and tools; an unknown LMCACHE_* is still an error."""
    cfg = CacheConfig.load(environ={"LMCACHE_SGL_CPU_EXTEND_ATTN": "0", "LMCACHE_SGL_MODEL_CACHE": "/tmp/m",
                                    "LMCACHE_CHUNK_SIZE": "64"})
    assert cfg.chunk_size == 64
    with pytest.raises(ConfigError, match="LMCACHE_CHUNK_SIZ"):
        CacheConfig.load(environ={"LMCACHE_CHUNK_SIZ": "64"})
