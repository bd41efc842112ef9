"""The SGLang plugin's flag handling, version gate and config checks (no server runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from conftest import require

require("sglang")

from lmcache_sgl.adapters.sglang import plugin  # noqa: E402
from lmcache_sgl.config import ConfigError  # noqa: E402

pytestmark = pytest.mark.sglang
STUB_DIR = Path(__file__).resolve().parents[1] / "scripts" / "cpu_stubs"


def server_args(*flags: str):
    from sglang.srt.server_args import prepare_server_args

    return prepare_server_args(["--model-path", "/nonexistent-model", *flags])


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("LMCACHE_"):
            monkeypatch.delenv(name)
    path = tmp_path / "lmcache.yaml"
    path.write_text("chunk_size: 64\nlocal_disk: null\n")
    return path


def test_entry_point_is_registered():
    """pip-installing the package registers load() in SGLang's plugin group."""
    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("lmcache_sgl") == "lmcache_sgl.adapters.sglang.plugin:load"


def test_enable_lmcache_becomes_our_radix_backend(config_file):
    """--enable-lmcache is rewritten so SGLang never imports the real lmcache package."""
    args = server_args("--enable-lmcache", "--lmcache-config-file", str(config_file))
    plugin.before_resolve_once(args)
    assert args.enable_lmcache is False
    assert args.radix_cache_backend == plugin.BACKEND_NAME
    assert args.lmcache_config_file == str(config_file)


def test_without_the_flag_nothing_changes(config_file):
    """A server started without --enable-lmcache runs stock SGLang."""
    args = server_args()
    plugin.before_resolve_once(args)
    assert args.radix_cache_backend is None and args.enable_lmcache is False


def test_bad_config_is_refused_before_launch(config_file, monkeypatch):
    """A bad LMCACHE_* value stops resolution with an error naming the key."""
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "0")
    args = server_args("--enable-lmcache", "--lmcache-config-file", str(config_file))
    with pytest.raises(ConfigError, match="chunk_size"):
        plugin.before_resolve_once(args)


def test_conflicting_flags_are_refused(config_file):
    """The tiered cache replaces HiCache; asking for both is an error, not a silent choice."""
    args = server_args("--enable-lmcache", "--enable-hierarchical-cache")
    with pytest.raises(ValueError, match="enable-hierarchical-cache"):
        plugin.before_resolve_once(args)


def test_other_sglang_versions_are_refused(config_file, monkeypatch):
    """Only sglang==0.5.23 is supported; another version fails with a message saying so."""
    monkeypatch.setattr(plugin, "sglang_version", lambda: "0.6.0")
    args = server_args("--enable-lmcache", "--lmcache-config-file", str(config_file))
    with pytest.raises(plugin.UnsupportedSGLang, match=r"sglang==0\.5\.23 only, but sglang==0\.6\.0"):
        plugin.before_resolve_once(args)
    assert args.enable_lmcache is True  # nothing was rewritten


def test_launcher_exits_on_bad_config_file(tmp_path):
    """`launch_server --enable-lmcache` with a bad YAML exits non-zero with the key in the message (no hang)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("chunk_size: 0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(STUB_DIR), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--model-path", str(tmp_path),
                           "--device", "cpu", "--enable-lmcache", "--lmcache-config-file", str(bad)],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode != 0
    assert "chunk_size=0 is invalid" in proc.stdout + proc.stderr
