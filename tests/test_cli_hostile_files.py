"""The offline CLI must not hang or crash on a FIFO or a directory planted under a chunk's name."""

import json
import os
import subprocess
import sys

import pytest

from conftest import prompt_chunks, store_config
from lmcache_sgl import TieredStore


@pytest.fixture
def planted(layout, tmp_path):
    """Three good chunks, one key replaced by a FIFO and one by a directory."""
    root = tmp_path / "cache"
    keys, toks, kvs = prompt_chunks(layout, 5)
    with TieredStore(store_config(layout, host_chunks=0, disk_dir=root, disk_chunks=100), layout) as store:
        for k, t, kv in zip(keys, toks, kvs):
            store.put(k, t, kv)
    fifo, directory = (root / k[:2] / f"{k}.kv" for k in keys[:2])
    fifo.unlink()
    os.mkfifo(fifo)
    directory.unlink()
    directory.mkdir()
    return root, keys


def _cli(*argv):
    # A subprocess with a timeout: a blocking open() of the FIFO would hang this test forever otherwise.
    out = subprocess.run([sys.executable, "-m", "lmcache_sgl.cli", "--json", *argv],
                         capture_output=True, text=True, timeout=60)
    return out.returncode, out.stdout


def test_verify_reports_a_fifo_and_a_directory_without_hanging(planted):
    root, keys = planted
    rc, out = _cli("verify", str(root))
    report = json.loads(out)
    assert rc == 1 and keys[0] in report["bad"] and keys[1] not in report.get("ok", [])
    assert report["checked"] >= 4


def test_inspect_of_a_fifo_is_an_error_not_a_hang(planted):
    root, keys = planted
    rc, _ = _cli("inspect", str(root), keys[0])
    assert rc != 0
    rc, out = _cli("inspect", str(root), keys[2])
    assert rc == 0 and json.loads(out)["key"] == keys[2]
