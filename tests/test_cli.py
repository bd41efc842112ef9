"""lmcache-sgl stats/inspect/verify/prune/export/import on a cache built by the store."""

import json
import os
import tarfile
import time

import pytest

from conftest import prompt_chunks, store_config
from lmcache_sgl import ChunkLayout, ModelFingerprint, TieredStore
from lmcache_sgl.cli import main, parse_duration, parse_size


@pytest.fixture
def cache(layout, tmp_path):
    """A directory with 8 chunks of model 'tiny-test' and 2 of model 'other'."""
    root = tmp_path / "cache"
    keys, toks, kvs = prompt_chunks(layout, 8)
    with TieredStore(store_config(layout, host_chunks=0, disk_dir=root, disk_chunks=100), layout) as store:
        for k, t, kv in zip(keys, toks, kvs):
            store.put(k, t, kv)
    other = ChunkLayout(ModelFingerprint("other", "bfloat16", 2, 2, 16), layout.chunk_size)
    okeys, otoks, okvs = prompt_chunks(other, 2, seed=5)
    with TieredStore(store_config(other, host_chunks=0, disk_dir=root, disk_chunks=100), other) as store:
        for k, t, kv in zip(okeys, otoks, okvs):
            store.put(k, t, kv)
    return root, keys, toks, okeys


def _json(capsys, argv):
    rc = main(["--json", *argv])
    return rc, json.loads(capsys.readouterr().out)


def test_stats_counts_entries_and_models(cache, capsys):
    root, *_ = cache
    rc, s = _json(capsys, ["stats", str(root)])
    assert rc == 0 and s["entries"] == 10 and s["unreadable"] == 0
    assert sorted(v["entries"] for v in s["models"].values()) == [2, 8]
    assert s["raw_bytes"] == 10 * (2 * 2 * 16 * 2 * 16) * 2  # 10 chunks of [2, 2, 16, 2, 16] bf16
    assert s["compression_ratio"] == pytest.approx(s["raw_bytes"] / s["bytes"])
    assert s["age"]["<1h"] == 10


def test_inspect_shows_the_header(cache, capsys):
    root, keys, toks, _ = cache
    rc, h = _json(capsys, ["inspect", str(root), keys[3]])
    assert rc == 0 and h["key"] == keys[3] and h["token_ids"] == toks[3]
    assert h["fingerprint"]["model_name"] == "tiny-test" and h["shape"] == [2, 2, 16, 2, 16]
    assert main(["inspect", str(root), "nothex"]) == 2


def test_verify_reports_exactly_the_corrupted_files(cache, capsys):
    root, keys, _, okeys = cache
    damaged = {keys[1], keys[5], okeys[0]}
    for i, key in enumerate(sorted(damaged)):
        path = root / key[:2] / f"{key}.kv"
        blob = bytearray(path.read_bytes())
        if i == 0:
            blob = blob[: len(blob) // 3]  # truncated
        else:
            blob[-(i * 7)] ^= 0xFF  # a flipped payload byte
        path.write_bytes(bytes(blob))
    rc, report = _json(capsys, ["verify", str(root)])
    assert rc == 1 and report["checked"] == 10 and set(report["bad"]) == damaged
    assert len(list((root / "quarantine").iterdir())) == 3
    rc, report = _json(capsys, ["verify", str(root)])
    assert rc == 0 and report["checked"] == 7 and report["bad"] == {}


def test_prune_by_model_size_and_age(cache, capsys, layout):
    root, keys, _, okeys = cache
    old = time.time() - 10 * 86400
    for key in keys[:2]:
        os.utime(root / key[:2] / f"{key}.kv", (old, old))
    rc, r = _json(capsys, ["prune", str(root), "--older-than", "7d", "--dry-run"])
    assert rc == 0 and set(r["removed"]) == set(keys[:2]) and r["dry_run"]
    assert (root / keys[0][:2] / f"{keys[0]}.kv").exists()  # dry run removed nothing
    rc, r = _json(capsys, ["prune", str(root), "--model", "other"])
    assert set(r["removed"]) == set(okeys) and r["kept_entries"] == 8
    hottest = sum((root / k[:2] / f"{k}.kv").stat().st_size for k in keys[5:])
    rc, r = _json(capsys, ["prune", str(root), "--max-size", str(hottest)])
    assert r["kept_entries"] == 3 and set(r["removed"]) == set(keys[:5])  # coldest go first
    assert main(["prune", str(root)]) == 2  # needs a criterion


def test_export_import_round_trip(cache, capsys, layout, tmp_path):
    root, keys, toks, _ = cache
    archive = tmp_path / "warm.tar"
    rc, r = _json(capsys, ["export", str(root), str(archive)])
    assert rc == 0 and r["exported"] == 10
    dest = tmp_path / "other-host"
    rc, r = _json(capsys, ["import", str(archive), str(dest)])
    assert rc == 0 and r["imported"] == 10 and r["rejected"] == {}
    with TieredStore(store_config(layout, host_chunks=0, disk_dir=dest, disk_chunks=100), layout) as store:
        assert len(store.get(keys, toks)) == 8
    rc, r = _json(capsys, ["import", str(archive), str(dest)])
    assert r["skipped_existing"] == 10


def test_import_rejects_bad_members(tmp_path, capsys):
    archive = tmp_path / "evil.tar"
    bad = tmp_path / "x.kv"
    bad.write_bytes(b"LMCSGLKV garbage")
    with tarfile.open(archive, "w") as tar:
        tar.add(bad, arcname="../escape.kv")
        tar.add(bad, arcname="ab/ab" + "0" * 30 + ".kv")
    rc, r = _json(capsys, ["import", str(archive), str(tmp_path / "dest")])
    assert rc == 1 and len(r["rejected"]) == 2 and r["imported"] == 0
    assert not (tmp_path / "escape.kv").exists()


def test_missing_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["stats", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_size_and_duration_parsing():
    assert parse_size("10GiB") == 10 << 30 and parse_size("512M") == 512 << 20 and parse_size("4096") == 4096
    assert parse_duration("7d") == 7 * 86400 and parse_duration("30s") == 30
    for bad in ("ten", "5X"):
        with pytest.raises(Exception, match="is not like"):
            parse_size(bad)
