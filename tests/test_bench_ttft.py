"""scripts/bench_ttft.py end to end on CPU at tiny sizes: the report's shape, and a restored prefix is exact.

One run of the script's main path (tiny Llama, fp32, prefixes 128 and 256,
chunk 32, one repeat) is shared by the tests. Speed is not checked here.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from conftest import require

require("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_ttft.py"
PREFIXES, SUFFIX, CHUNK = (128, 256), 16, 32
CASES = {"full", "miss", "host", "disk", "disk_auto"}
HIT_CASES = ("host", "disk", "disk_auto")
FP32_ATOL = 1e-4  # logits of a restored prefix against a full prefill, both fp32


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_ttft", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_ttft"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_ttft")
    argv = ["--device", "cpu", "--shape", "tiny", "--prefixes", ",".join(map(str, PREFIXES)),
            "--suffix", str(SUFFIX), "--chunk-size", str(CHUNK), "--repeats", "1", "--warmup", "0",
            "--disk-dir", str(out), "--json", str(out / "report.json")]
    report = _load_script().main(argv)
    return report, out


def test_report_has_every_case_for_every_prefix(run):
    """Each prefix length reports all five cases with a positive TTFT, and the goals are evaluated."""
    report, _ = run
    assert [r["prefix"] for r in report["lengths"]] == list(PREFIXES)
    for r in report["lengths"]:
        assert set(r["cases"]) == CASES
        assert all(case["ttft_s"] > 0 for case in r["cases"].values())
        assert r["kv_bytes"] == 2 * 2 * r["prefix"] * 2 * 16 * 4  # layers x K/V x tokens x heads x dim x fp32
    assert report["env"]["device"].startswith("CPU") and report["env"]["dtype"] == "float32"
    assert {"host_speedup", "miss_overhead_pct_max", "auto_never_slower"} <= set(report["goals"])


def test_restored_prefix_gives_the_full_prefill_logits(run):
    """Host and disk hits load every prefix chunk, and their last-token logits equal a full prefill's (fp32)."""
    report, _ = run
    for r in report["lengths"]:
        for name in ("host", "disk"):
            case = r["cases"][name]
            assert case["hits"] == r["prefix"] // CHUNK, name
            assert case["max_abs_logit_diff"] <= FP32_ATOL, name
            assert case["first_token_match"], name
            assert case["load_gbps"] > 0 and case["forward_s"] > 0


def test_disk_case_reads_after_dropping_the_page_cache(run):
    """Before each disk load the script evicts the chunk files and says whether that worked."""
    report, _ = run
    for r in report["lengths"]:
        assert r["cases"]["disk"]["page_cache_drop"] == f"ok ({r['prefix'] // CHUNK} files)"


def test_auto_policy_follows_the_cost_model(run):
    """With load_policy=auto, a 'load' decision loads the whole prefix and 'recompute' loads nothing."""
    report, _ = run
    for r in report["lengths"]:
        auto, decision = r["cases"]["disk_auto"], r["decisions"]["disk"]
        assert decision["decision"] in ("load", "recompute")
        assert decision["est_load_s"] > 0 and decision["est_recompute_s"] > 0
        assert auto["hits"] == (r["prefix"] // CHUNK if decision["decision"] == "load" else 0)
        assert auto["max_abs_logit_diff"] <= FP32_ATOL


def test_miss_case_misses_then_saves(run):
    """The miss case reports its overhead against no cache and a timed save of the new chunks."""
    report, _ = run
    for r in report["lengths"]:
        miss = r["cases"]["miss"]
        assert miss["lookup_s"] >= 0 and miss["save_s"] > 0 and miss["save_gbps"] > 0
        assert miss["overhead_pct"] == pytest.approx(100 * (miss["ttft_s"] / r["cases"]["full"]["ttft_s"] - 1))


def test_json_report_matches_the_returned_one(run):
    """--json writes the same report that main returns, and the disk tiers' temporary directory is gone."""
    report, out = run
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert [p.name for p in out.iterdir()] == ["report.json"]
