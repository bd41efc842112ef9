"""A stop loses nothing cached: `/flush_cache` and SIGTERM save device-resident KV to disk.

Two real CPU servers (tiny random Llama, fp32), in order:

  server 1  P1 prefilled (stays on the device: no eviction), then /flush_cache;
            P2 prefilled (no eviction), then SIGTERM to the whole process group
            while other requests decode
  offline   every chunk file verifies (`cache_admin.verify`)
  server 2  same disk dir: P1 and P2 come from disk, with server 1's uncached greedy tokens
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import require

require("sglang")

from lmcache_sgl.cache_admin import verify  # noqa: E402
from lmcache_sgl.models import build_tiny_llama  # noqa: E402
from test_sglang_e2e import CHUNK, PREFIX, Server, prompt  # noqa: E402

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

FLUSH_TIMEOUT_S = 20
P1, P2 = prompt(11, PREFIX) + [7, 8, 9], prompt(12, PREFIX) + [7, 8, 9]
TRAFFIC = [prompt(200 + i, 100) for i in range(3)]  # small: P2 stays on the device


def _config(tmp: Path, disk: Path) -> list[str]:
    cfg = tmp / "lmcache.yaml"
    cfg.write_text(f"chunk_size: {CHUNK}\nlocal_cpu: true\nmax_local_cpu_size: 0.05\nlocal_disk: {disk}\n"
                   f"max_local_disk_size: 1\nshutdown_flush_timeout_s: {FLUSH_TIMEOUT_S}\n"
                   "prefetch_policy: wait_complete\n")
    return ["--enable-lmcache", "--lmcache-config-file", str(cfg)]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _sigterm_during_traffic(server: Server) -> float:
    """SIGTERM the server's process group while requests decode; seconds until every process is gone."""
    def decode(ids):
        try:
            server.generate(ids, max_new_tokens=400)
        except requests.RequestException:
            pass  # cut off by the stop

    threads = [threading.Thread(target=decode, args=(ids,), daemon=True) for ids in TRAFFIC]
    for t in threads:
        t.start()
    time.sleep(1.0)
    start = time.monotonic()
    os.killpg(server.proc.pid, signal.SIGTERM)
    deadline = start + FLUSH_TIMEOUT_S + 30
    while _group_alive(server.proc.pid) and time.monotonic() < deadline:
        server.proc.poll()  # reap the launcher
        time.sleep(0.2)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def outcome(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("sglang-persist")
    model = build_tiny_llama(work / "model")
    disk = work / "disk"
    args = _config(work, disk)
    out: dict = {}
    s1 = Server(model, work / "s1.log", args, pool_tokens=2048)
    try:
        out["P1"] = s1.generate(P1)
        s1.flush()
        out["files_after_flush"] = len(list(disk.rglob("*.kv")))
        out["P2"] = s1.generate(P2)
        out["stop_s"] = _sigterm_during_traffic(s1)
        out["s1_log"] = s1.log_tail(400_000)
    finally:
        s1.stop()
    out["verify"] = verify(disk)
    s2 = Server(model, work / "s2.log", args, pool_tokens=2048)
    try:
        out["P1_restart"] = s2.generate(P1)
        out["P2_restart"] = s2.generate(P2)
    finally:
        s2.stop()
    return out


def test_flush_cache_writes_device_resident_prefix_to_disk(outcome):
    """/flush_cache saves a prefix that never left the device: its chunk files exist at once."""
    assert outcome["P1"]["cached"] == 0
    assert outcome["files_after_flush"] >= PREFIX // CHUNK
    assert "/flush_cache: saved" in outcome["s1_log"]


def test_sigterm_during_traffic_exits_in_time_after_saving(outcome):
    """SIGTERM to the group: the server saves the device tree and every process exits within the bound."""
    assert outcome["stop_s"] < FLUSH_TIMEOUT_S + 10, outcome["s1_log"][-4000:]
    assert "shutdown: saved" in outcome["s1_log"], outcome["s1_log"][-4000:]


def test_every_file_verifies_after_the_stop(outcome):
    """No torn or corrupt chunk file is left behind by the stop."""
    report = outcome["verify"]
    assert report.checked >= 2 * PREFIX // CHUNK and not report.bad, report


def test_restart_serves_both_prefixes_from_disk_with_the_uncached_answer(outcome):
    """After /flush_cache and after SIGTERM, a restarted server loads the prefixes from disk; same tokens."""
    for name in ("P1", "P2"):
        again = outcome[f"{name}_restart"]
        assert (again["cached"], again["disk"]) == (PREFIX, PREFIX), (name, again)
        assert again["tokens"] == outcome[name]["tokens"], name
