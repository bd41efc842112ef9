"""Private by default (issue #13): what the cache creates is 0700/0600 under any umask, or
2770/0660 owned by ``shared_dir_group``; ``verify`` warns about what others can read."""

from __future__ import annotations

import grp
import json
import logging
import os
import stat
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import prompt_chunks, store_config
from lmcache_sgl import ConfigError, TieredStore
from lmcache_sgl.cache_admin import export_archive, import_archive, verify
from lmcache_sgl.cli import main as cli_main
from lmcache_sgl.config import CacheConfig
from lmcache_sgl.storage import disk_tier as disk_tier_mod
from lmcache_sgl.storage.disk_tier import USAGE_FILE, DiskTier, chunk_path

KEYS = ["ab" + "1" * 30, "ab" + "2" * 30, "cd" + "3" * 30]
BLOB = bytes(range(1, 251)) * 40  # 10,000 non-zero bytes; DiskTier does not decode


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def umask():
    """Set a umask for one test; the process's own is restored after it."""
    saved = os.umask(0o022)
    yield os.umask
    os.umask(saved)


@pytest.fixture
def shared_group():
    """(name, gid) of a group the current user may give files to: a fresh one as root, else the primary group."""
    if os.geteuid() != 0:
        gid = os.getgid()
        yield grp.getgrgid(gid).gr_name, gid
        return
    name = f"lmcsgl{uuid.uuid4().hex[:8]}"
    subprocess.run(["groupadd", name], check=True)
    try:
        yield name, grp.getgrnam(name).gr_gid
    finally:
        subprocess.run(["groupdel", name], check=False)


def all_paths(root: Path) -> list[Path]:
    return [root, *root.rglob("*")]


def fill(tier: DiskTier) -> None:
    """Two chunks, one quarantined: every kind of path the tier creates."""
    for key in KEYS:
        assert tier.write(key, BLOB)
    tier.quarantine(KEYS[2], "test")


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o002])
def test_disk_tier_creates_only_private_paths_under_any_umask(tmp_path, umask, mask):
    """Root, <xx>/, quarantine/, .usage.lock and chunk files are 0700/0600 whatever the umask."""
    umask(mask)
    root = tmp_path / "parent" / "cache"
    fill(DiskTier(root, 1 << 20, "LRU"))
    paths = all_paths(root)
    kinds = {p.relative_to(root).as_posix() for p in paths}
    assert {".", "ab", "cd", "quarantine", USAGE_FILE, f"ab/{KEYS[0]}.kv"} <= kinds
    assert any(p.parent.name == "quarantine" for p in paths)
    for p in paths:
        assert mode(p) == (0o700 if p.is_dir() else 0o600), p


def test_temporary_files_are_private_from_their_creation(tmp_path, umask, monkeypatch):
    """A chunk file is never readable by others, not even as a temporary file before its rename."""
    umask(0o000)
    tier = DiskTier(tmp_path / "c", 1 << 20, "LRU")
    seen = {}
    real_replace = os.replace

    def spy(src, dst):
        if ".tmp." in str(src):
            seen[str(src)] = mode(Path(src))
        return real_replace(src, dst)

    monkeypatch.setattr(disk_tier_mod.os, "replace", spy)
    assert tier.write(KEYS[0], BLOB)
    assert list(seen.values()) == [0o600]


def test_a_restricting_umask_still_leaves_the_owner_full_access(tmp_path, umask):
    """umask 0o277 would strip the owner's write bit; the tier still writes and reads its files."""
    umask(0o277)
    tier = DiskTier(tmp_path / "c", 1 << 20, "LRU")
    assert tier.write(KEYS[0], BLOB) and tier.read(KEYS[0]) == BLOB
    assert mode(tmp_path / "c") == 0o700 and mode(tier.path(KEYS[0])) == 0o600


@pytest.mark.parametrize("mask", [0o000, 0o077])
def test_shared_group_gives_the_group_and_no_one_else(tmp_path, umask, shared_group, mask):
    """shared_dir_group: dirs 2770 and files 0660, all owned by that group, whatever the umask."""
    name, gid = shared_group
    umask(mask)
    root = tmp_path / "shared"
    fill(DiskTier(root, 1 << 20, "LRU", shared_group=name))
    for p in all_paths(root):
        assert mode(p) == (0o2770 if p.is_dir() else 0o660), p
        assert p.lstat().st_gid == gid, p


def test_store_config_key_reaches_the_disk_tier(tmp_path, layout, umask, shared_group):
    """``shared_dir_group`` in the config (as a gid string) is what the store's files get."""
    name, gid = shared_group
    umask(0o000)
    keys, toks, kvs = prompt_chunks(layout, 2, seed=3)
    cfg = store_config(layout, host_chunks=0, disk_dir=tmp_path / "d", disk_chunks=8, shared_dir_group=str(gid))
    with TieredStore(cfg, layout) as store:
        for k, t, kv in zip(keys, toks, kvs):
            store.put(k, t, kv)
    files = [chunk_path(tmp_path / "d", k) for k in keys]
    assert all(mode(f) == 0o660 and f.stat().st_gid == gid for f in files)


def test_unknown_group_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="shared_dir_group='no-such-group-xyz'"):
        CacheConfig.load(overrides={"shared_dir_group": "no-such-group-xyz"}, environ={})
    with pytest.raises(ConfigError, match="no-such-group-xyz"):
        CacheConfig.load(environ={"LMCACHE_SHARED_DIR_GROUP": "no-such-group-xyz"})
    assert CacheConfig.load(overrides={"shared_dir_group": 4242}, environ={}).shared_dir_group == "4242"


def test_an_existing_open_root_is_kept_but_logged(tmp_path, caplog):
    """A directory the operator made keeps its mode; the server warns that others can read it."""
    root = tmp_path / "open"
    root.mkdir()
    root.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger=disk_tier_mod.__name__):
        DiskTier(root, 1 << 20, "LRU")
    assert mode(root) == 0o755
    assert "readable beyond its owner" in caplog.text and "0755" in caplog.text


def real_cache(root: Path, layout, **cfg) -> list[str]:
    """Two valid chunk files written by a store; their keys."""
    keys, toks, kvs = prompt_chunks(layout, 2, seed=5)
    with TieredStore(store_config(layout, host_chunks=0, disk_dir=root, disk_chunks=8, **cfg), layout) as store:
        for k, t, kv in zip(keys, toks, kvs):
            store.put(k, t, kv)
    return keys


def rel(key: str) -> str:
    return f"{key[:2]}/{key}.kv"


def legacy_cache(root: Path, layout) -> list[str]:
    """A directory as earlier versions left it: 0755 directories, 0644 files."""
    keys = real_cache(root, layout)
    for p in all_paths(root):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return keys


def test_verify_lists_what_others_can_read(tmp_path, layout):
    root = tmp_path / "c"
    keys = legacy_cache(root, layout)
    report = verify(root)
    assert report.readable_by_others and report.bad == {}
    assert {".", keys[0][:2], rel(keys[0]), rel(keys[1]), USAGE_FILE} <= set(report.exposed)
    assert "other users" in report.exposed[rel(keys[0])]


def test_verify_is_quiet_on_a_private_cache_and_flags_a_group_bit(tmp_path, layout):
    root = tmp_path / "c"
    keys = real_cache(root, layout)
    assert verify(root).exposed == {} and not verify(root).readable_by_others
    chunk_path(root, keys[1]).chmod(0o640)
    exposed = verify(root).exposed
    assert list(exposed) == [rel(keys[1])] and "no group is meant to" in exposed[rel(keys[1])]


def test_verify_accepts_the_intended_group_only(tmp_path, layout, shared_group):
    name, gid = shared_group
    root = tmp_path / "c"
    real_cache(root, layout, shared_dir_group=name)
    assert verify(root, shared_group=name).exposed == {}
    assert verify(root).readable_by_others  # group bits that no one said were intended


def test_cli_verify_warns_in_text_and_json(tmp_path, layout, capsys):
    root = tmp_path / "c"
    keys = legacy_cache(root, layout)
    assert cli_main(["verify", str(root)]) == 0  # a warning; the exit code is about corrupt files
    out = capsys.readouterr().out
    assert "WARNING" in out and "other users" in out
    assert cli_main(["--json", "verify", str(root)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["readable_by_others"] is True and rel(keys[0]) in data["exposed"]


def test_export_and_import_create_private_files(tmp_path, layout, umask):
    umask(0o000)
    keys = real_cache(tmp_path / "src", layout)
    archive = tmp_path / "a.tar"
    assert export_archive(tmp_path / "src", archive) == 2
    assert mode(archive) == 0o600
    dst = tmp_path / "new" / "dst"
    assert import_archive(archive, dst).imported == 2
    for p in all_paths(dst):
        assert mode(p) == (0o700 if p.is_dir() else 0o600), p
    assert all(chunk_path(dst, k).exists() for k in keys)


def test_export_and_import_follow_the_shared_group(tmp_path, layout, umask, shared_group):
    name, gid = shared_group
    umask(0o077)
    real_cache(tmp_path / "src", layout)
    archive = tmp_path / "a.tar"
    assert cli_main(["export", str(tmp_path / "src"), str(archive), "--shared-group", name]) == 0
    assert mode(archive) == 0o660 and archive.stat().st_gid == gid
    dst = tmp_path / "dst"
    assert cli_main(["import", str(archive), str(dst), "--shared-group", name]) == 0
    for p in all_paths(dst):
        assert mode(p) == (0o2770 if p.is_dir() else 0o660) and p.stat().st_gid == gid, p
