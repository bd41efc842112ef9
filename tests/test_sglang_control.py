"""The control API on one real CPU SGLang server (tiny random Llama, --enable-lmcache): /lmcache/* and the CLI.

The scheduler-side combination of TP ranks' answers is checked without a
server (``combine``); the server runs TP 1.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import require

CHUNK = 64
CHUNK_BYTES = 2 * 2 * CHUNK * 2 * 16 * 4  # layers * K/V * tokens * kv heads * head dim * fp32
HOST_CHUNKS = 8
PREFIX = 4 * CHUNK


def prompt(seed: int, n: int) -> list[int]:
    rnd = np.random.default_rng(seed)
    return [int(t) for t in rnd.integers(3, 500, n)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require("sglang")
    from lmcache_sgl.adapters.sglang.local_server import LocalServer
    from lmcache_sgl.models import build_tiny_llama

    tmp = tmp_path_factory.mktemp("control")
    model = build_tiny_llama(tmp / "tiny-llama")
    cfg = tmp / "lmcache.yaml"
    cfg.write_text(f"chunk_size: {CHUNK}\nlocal_cpu: true\n"
                   f"max_local_cpu_size: {(HOST_CHUNKS + 0.5) * CHUNK_BYTES / 2**30!r}\n")
    srv = LocalServer(model, tmp / "server.log", ["--enable-lmcache", "--lmcache-config-file", str(cfg)])
    yield srv
    srv.stop()


def call(server, op: str, body: dict | None = None, expect: int = 200) -> dict:
    import requests

    if body is None:
        r = requests.get(server.url(f"/lmcache/{op}"), timeout=120)
    else:
        r = requests.post(server.url(f"/lmcache/{op}"), json=body, timeout=120)
    assert r.status_code == expect, (r.status_code, r.text, server.log_tail())
    return r.json()


def generate(server, ids: list[int]) -> None:
    import requests

    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
    requests.post(server.url("/generate"), json=body, timeout=300).raise_for_status()


@pytest.mark.sglang
@pytest.mark.slow
def test_lookup_pin_pressure_clear(server):
    """A served prefix is found on the device; pinned, it stays in the host tier through pressure that evicts
    an unpinned prefix; clear keeps it while pinned and removes it once unpinned."""
    a, b = prompt(1, PREFIX), prompt(2, PREFIX)
    assert call(server, "lookup", {"tokens": a})["cached_tokens"] == 0
    generate(server, a + [7, 8, 9])
    r = call(server, "lookup", {"tokens": a + [1]})
    assert (r["device"], r["cached_tokens"], r["prompt_tokens"]) == (PREFIX, PREFIX, PREFIX + 1)
    pin = call(server, "pin", {"tokens": a})
    assert (pin["chunks"], pin["host_chunks"], pin["tokens"]) == (4, 4, PREFIX), pin
    generate(server, b + [7, 8, 9])
    for i in range(5):  # 2000 tokens through a 1024-token device pool and an 8-chunk host tier
        generate(server, prompt(100 + i, 400))
    a_now, b_now = call(server, "lookup", {"tokens": a}), call(server, "lookup", {"tokens": b})
    assert a_now["device"] == 0 and a_now["host"] == PREFIX, a_now
    assert b_now["cached_tokens"] < PREFIX, b_now  # the unpinned prefix lost chunks to the same pressure
    generate(server, a + [10, 11])  # a host hit: served from the pinned chunks

    cleared = call(server, "clear", {})
    assert cleared["pinned_kept"] == 4 and cleared["tiers"] == ["host", "disk", "remote"]
    assert call(server, "lookup", {"tokens": a})["cached_tokens"] == PREFIX
    stats = call(server, "stats")
    assert stats["ranks"][0]["pinned_chunks"] == 4 and stats["ranks"][0]["store"]["hit_chunks"]["host"] >= 4
    assert call(server, "unpin", {"tokens": a})["chunks"] == 4
    assert call(server, "clear", {"tier": "host"})["host_removed"] >= 4
    gone = call(server, "lookup", {"tokens": a})
    assert gone["host"] == 0 and call(server, "stats")["ranks"][0]["store"]["host_entries"] == 0


@pytest.mark.sglang
@pytest.mark.slow
@pytest.mark.parametrize("op, body, reason", [
    ("lookup", {}, "exactly one of 'tokens'"),
    ("lookup", {"tokens": [1, -2]}, "token id -2"),
    ("lookup", {"tokens": "1,2"}, "list of token ids"),
    ("lookup", {"tokens": [1], "text": "x"}, "exactly one"),
    ("pin", {"tokens": [1], "extra": 1}, "unknown field"),
    ("clear", {"tier": "gpu"}, "tier='gpu'"),
    ("clear", {"tier": "remote", "model": "m"}, "Redis"),
    ("clear", [1, 2], "JSON object"),
])
def test_bad_requests_get_400_with_a_reason(server, op, body, reason):
    assert reason in call(server, op, body, expect=400)["error"]


@pytest.mark.sglang
@pytest.mark.slow
def test_unparsable_body_and_wrong_method(server):
    import requests

    r = requests.post(server.url("/lmcache/lookup"), data=b"{not json", timeout=30)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    assert requests.get(server.url("/lmcache/lookup"), timeout=30).status_code == 405


@pytest.mark.sglang
@pytest.mark.slow
def test_health_and_server_info_still_answer(server):
    """Our hook answers only our requests: SGLang's /server_info keeps working next to /lmcache/health."""
    import requests

    h = call(server, "health")
    assert h["ok"] and [t["tier"] for t in h["ranks"][0]["tiers"]] == ["host", "disk", "remote"]
    info = requests.get(server.url("/server_info"), timeout=60)
    assert info.status_code == 200 and info.json()["internal_states"]


@pytest.mark.sglang
@pytest.mark.slow
def test_cli_against_the_server(server, capsys):
    from lmcache_sgl.cli import main

    tokens = prompt(3, 2 * CHUNK)
    generate(server, tokens + [5])
    assert main(["--json", "lookup", "--server", server.url(""), "--tokens", ",".join(map(str, tokens))]) == 0
    assert json.loads(capsys.readouterr().out)["device"] == 2 * CHUNK
    assert main(["--json", "lookup", "--server", server.url(""), "--text", "hello world"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] > 0
    assert main(["health", "--server", server.url("")]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["--json", "stats", "--server", server.url("")]) == 0
    assert "ranks" in json.loads(capsys.readouterr().out)
    assert main(["clear", "--server", server.url(""), "--tier", "disk"]) == 0
    with pytest.raises(SystemExit):  # argparse refuses the token list
        main(["lookup", "--server", server.url(""), "--tokens", "1,x"])
    capsys.readouterr()
    assert main(["clear", "--server", server.url(""), "--model", ""]) == 2
    assert "model=''" in capsys.readouterr().err


def _gather_in_rank(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    from lmcache_sgl.adapters.sglang.control_http import combine, gather

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        report = dict(prompt_tokens=9, cached_tokens=8 - 4 * rank, device=0, host=8 - 8 * rank, disk=4 * rank,
                      remote=0)
        answers = gather([dist.group.WORLD], {"result": report})  # what answer() gathers, per rank
        out.put((rank, combine("lookup", [a["result"] for a in answers])))
    finally:
        dist.destroy_process_group()


def test_every_tp_rank_gets_every_answer():
    """Over a real gloo group of 2 ranks, each rank gathers both answers and combines them the same way."""
    from conftest import free_port, run_in_processes

    port = free_port()
    got = dict(run_in_processes(_gather_in_rank, [(0, port), (1, port)], timeout_s=120))
    assert got[0] == got[1]
    assert got[0]["cached_tokens"] == 4 and [r["host"] for r in got[0]["ranks"]] == [8, 0]


def test_tp_ranks_combine():
    """lookup and pin report what every rank holds (MIN); clear sums; health needs every rank ok."""
    from lmcache_sgl.adapters.sglang.control_http import combine

    look = [dict(prompt_tokens=9, cached_tokens=8, device=0, host=8, disk=0, remote=0),
            dict(prompt_tokens=9, cached_tokens=4, device=0, host=0, disk=4, remote=0)]
    got = combine("lookup", look)
    assert (got["cached_tokens"], got["host"], got["disk"]) == (4, 0, 0) and got["ranks"] == look
    assert combine("pin", [dict(chunks=2, tokens=8, host_chunks=2, disk_chunks=0),
                           dict(chunks=1, tokens=4, host_chunks=1, disk_chunks=1)])["chunks"] == 1
    clear = [dict(tiers=["host"], model=None, host_removed=2, disk_removed=0, pinned_kept=1)] * 2
    assert combine("clear", clear)["host_removed"] == 4
    assert not combine("health", [{"ok": True}, {"ok": False}])["ok"]
