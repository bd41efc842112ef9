"""scripts/workload_multiturn.py: the chat workload both engine benchmarks send (no server here).

Uses SmolLM2's real tokenizer and chat template (skipped locally without the
converted model, an error under CI=true).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from conftest import require

require("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import workload_multiturn as wl  # noqa: E402

SPEC = wl.WorkloadSpec(users=3, rounds=3, doc_tokens=120, seed=0)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from lmcache_sgl.models import default_model_cache
    from conftest import _missing

    path = default_model_cache()
    if not (path / "config.json").is_file():
        _missing(f"the converted SmolLM2 at {path} (scripts/prepare_models.py)")
    return AutoTokenizer.from_pretrained(str(path))


def test_same_seed_gives_identical_token_streams(tok) -> None:
    """Two independent builds of the same spec give the same texts and token ids, turn by turn."""
    a, b = wl.scripted_turns(tok, SPEC), wl.scripted_turns(tok, SPEC)
    assert [t.token_ids for t in a] == [t.token_ids for t in b]
    assert [t.text for t in a] == [t.text for t in b]
    assert [(t.user, t.round) for t in a] == wl.turn_order(SPEC)


def test_seeds_and_users_differ(tok) -> None:
    """Another seed changes the documents; within a seed every user has their own document."""
    docs0 = [c.doc for c in wl.conversations(tok, SPEC)]
    docs1 = [c.doc for c in wl.conversations(tok, SPEC._replace(seed=1))]
    assert len(set(docs0)) == SPEC.users
    assert not set(docs0) & set(docs1)
    assert all(len(tok.encode(d, add_special_tokens=False)) >= SPEC.doc_tokens for d in docs0)


def test_histories_grow_and_extend_the_previous_prompt(tok) -> None:
    """Round r+1's token ids start with round r's (the cacheable prefix) and are strictly longer."""
    turns = wl.scripted_turns(tok, SPEC)
    for u in range(SPEC.users):
        mine = [t for t in turns if t.user == u]
        assert [t.round for t in mine] == list(range(SPEC.rounds))
        for prev, nxt in zip(mine, mine[1:]):
            assert len(nxt.token_ids) > len(prev.token_ids)
            assert nxt.token_ids[:len(prev.token_ids)] == prev.token_ids
            assert len(nxt.messages) == len(prev.messages) + 2  # the answer, then the next question


def test_all_users_share_the_system_prompt_prefix(tok) -> None:
    """Every user's first prompt starts with the same system-prompt tokens, then diverges at the document."""
    first = [t for t in wl.scripted_turns(tok, SPEC) if t.round == 0]
    sys_ids = wl.render(tok, [{"role": "system", "content": wl.SYSTEM}])[1]
    common = len(sys_ids) // 2  # the generation prompt at the end of sys_ids is not part of the shared prefix
    assert all(t.token_ids[:common] == sys_ids[:common] for t in first)
    assert len({t.token_ids for t in first}) == SPEC.users


def test_turns_must_alternate_with_answers(tok) -> None:
    """A second next_turn without an answer, an answer without a turn, or a round past the end raises."""
    conv = wl.conversations(tok, SPEC._replace(rounds=1))[0]
    with pytest.raises(RuntimeError, match="without a pending turn"):
        conv.answer("x")
    conv.next_turn(tok)
    with pytest.raises(RuntimeError, match="answer"):
        conv.next_turn(tok)
    conv.answer("fine")
    assert conv.done
    with pytest.raises(RuntimeError, match="rounds done"):
        conv.next_turn(tok)


@pytest.mark.parametrize("field", ["users", "rounds", "doc_tokens"])
def test_bad_spec_names_the_field(tok, field) -> None:
    with pytest.raises(ValueError, match=field):
        wl.conversations(tok, SPEC._replace(**{field: 0}))


def test_fillers_cover_the_budget_with_distinct_prompts(tok) -> None:
    """Fillers reach the requested token total, and no two share their first 32 tokens beyond the template."""
    texts = wl.filler_prompts(tok, total_tokens=600, each_tokens=120)
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    assert sum(map(len, ids)) >= 600
    assert all(120 <= len(i) < 120 + 40 for i in ids)  # each fits a pool sized for it
    assert len({tuple(i[:32]) for i in ids}) == len(ids)
    assert texts == wl.filler_prompts(tok, total_tokens=600, each_tokens=120)
    with pytest.raises(ValueError, match="each_tokens"):
        wl.filler_prompts(tok, total_tokens=600, each_tokens=4)


# -- scripts/multiturn_phases.py with a fake engine client (no server) --

import threading  # noqa: E402
import time  # noqa: E402

import multiturn_phases as ph  # noqa: E402


class FakeClient:
    """Answers instantly; streams chunks every `gap` s, and every `slow_gap` s while a user request is in flight."""

    def __init__(self, gap: float = 0.001, slow_gap: float = 0.06) -> None:
        self.gap, self.slow_gap = gap, slow_gap
        self.busy = threading.Event()
        self.log: list[tuple[str, float]] = []

    def generate(self, text: str, max_new_tokens: int) -> dict:
        self.log.append(("generate", time.perf_counter()))
        if max_new_tokens > 1:  # a returning user, not a filler
            self.busy.set()
            time.sleep(0.1)
            self.busy.clear()
        return {"text": "ok", "ttft": 0.01, "latency": 0.01, "prompt": 10, "completion": 1, "cached": 6,
                "device": 0, "host": 0, "disk": 6}

    def stream(self, text: str, max_new_tokens: int) -> list[float]:
        self.log.append(("stream", time.perf_counter()))
        out = []
        for _ in range(max_new_tokens):
            time.sleep(self.slow_gap if self.busy.is_set() else self.gap)
            out.append(time.perf_counter())
        return out


def test_gaps_window_keeps_only_gaps_ending_inside() -> None:
    arrivals = [[0.0, 1.0, 2.0, 3.0], [0.5, 2.5]]
    assert sorted(ph.gaps(arrivals)) == [1.0, 1.0, 1.0, 2.0]
    assert sorted(ph.gaps(arrivals, (1.5, 2.6))) == [1.0, 2.0]
    assert ph.pct([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5


def test_noisy_neighbour_sees_the_slowdown_and_tags_returning_users(tok) -> None:
    """Fillers go first, the control decoders stream alone, and only the noisy phase's window is slowed."""
    client = FakeClient()
    convs = wl.conversations(tok, SPEC)
    for c in convs:  # the users' main phase, so the noisy phase sends round 1
        c.next_turn(tok)
        c.answer("fine")
    out = ph.noisy_neighbour(client, tok, convs[:2], ["f1", "f2"], decoders=2, decode_tokens=60,
                             max_new_tokens=4, lead_s=0.03)
    kinds = [k for k, _ in client.log]
    assert kinds[:2] == ["generate", "generate"] and kinds[2:4] == ["stream", "stream"]
    assert [r["round"] for r in out["returning"]] == [1, 1]
    assert out["itl_noisy"]["n"] > 0 and out["itl_control"]["n"] == 2 * 59
    assert out["p99_ratio"] > 2  # 60 ms gaps in the window against 1 ms alone (wide margin for a busy CPU)


# -- scripts/hicache_cpu: the benchmark-only HiCache shims --

import subprocess  # noqa: E402

import torch  # noqa: E402

HICACHE_CPU = Path(__file__).resolve().parents[1] / "scripts" / "hicache_cpu"
sys.path.insert(0, str(HICACHE_CPU))
import hicache_cpu_shims as hs  # noqa: E402


def test_transfer_kv_direct_matches_a_row_gather_per_layer() -> None:
    """Every layer's destination rows get the source rows, the others stay; byte-exact for fp32 and bf16."""
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        src = [torch.randn(40, 3, 8, generator=gen).to(dtype) for _ in range(4)]
        dst = [torch.randn(24, 3, 8, generator=gen).to(dtype) for _ in range(4)]
        before = [d.clone() for d in dst]
        si, di = torch.arange(16, 32), torch.tensor(list(range(8, 24)))
        hs.transfer_kv_direct(src, dst, si, di, page_size=16)
        for s, d, b in zip(src, dst, before):
            assert torch.equal(d[8:24], s[16:32]) and torch.equal(d[:8], b[:8])


def test_transfer_kv_direct_refuses_what_it_cannot_copy() -> None:
    a, b = torch.randn(8, 4), torch.randn(4, 8).t()  # b is a non-contiguous view
    with pytest.raises(ValueError, match="non-contiguous"):
        hs.transfer_kv_direct([a], [b], torch.arange(2), torch.arange(2), page_size=1)
    with pytest.raises(ValueError, match="layers"):
        hs.transfer_kv_direct([a, a], [a], torch.arange(2), torch.arange(2), page_size=1)


def _probe(pythonpath: str) -> str:
    code = ("import sglang.srt.mem_cache.pool_host.mha as m, sglang.srt.mem_cache.pool_host.common as c; "
            "from sglang.srt.mem_cache.pool_host.base import HostKVCache as h; "
            "print(getattr(m, 'transfer_kv_direct', None).__module__ if hasattr(m, 'transfer_kv_direct') else None, "
            "c.ALLOC_MEMORY_FUNCS['cpu'].__name__, h.__init__.__module__)")
    env = {**os.environ, "PYTHONPATH": pythonpath}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_shims_patch_only_processes_that_put_them_on_pythonpath() -> None:
    """With scripts/hicache_cpu on PYTHONPATH SGLang's host pool gets our copy and allocator; without, it does not."""
    require("sglang")
    if torch.cuda.is_available():
        pytest.skip("the shims are a no-op with CUDA")
    assert _probe(str(HICACHE_CPU)) == ["hicache_cpu_shims", "_alloc_unpinned", "hicache_cpu_shims"]
    assert _probe("") == ["None", "alloc_with_host_register", "sglang.srt.mem_cache.pool_host.base"]


# -- scripts/bench_sglang_multiturn.py: the arms' flags (no server) --


def test_hicache_arm_gets_the_host_bytes_of_the_lmcache_tier(tok, tmp_path) -> None:
    """HiCache's host ratio times the device pool equals lmcache's host tier in tokens; only hicache gets the shims."""
    import bench_sglang_multiturn as bench
    from lmcache_sgl.models import default_model_cache

    model = default_model_cache()
    args = bench.parse_args(["--host-gib", "0.25", "--max-total-tokens", "1024"])
    assert args.arms == ["stock", "hicache", "lmcache"]
    flags, env = bench.server_flags("hicache", tmp_path, args, model)
    ratio = float(flags[flags.index("--hicache-ratio") + 1])
    host_bytes = ratio * args.max_total_tokens * bench.kv_bytes_per_token(model)
    assert host_bytes == pytest.approx(0.25 * (1 << 30), rel=1e-3)
    assert env["PYTHONPATH"] == str(HICACHE_CPU) and "file_storage_path" in flags[-1]
    lm_flags, lm_env = bench.server_flags("lmcache", tmp_path, args, model)
    assert "--enable-lmcache" in lm_flags and "PYTHONPATH" not in lm_env
    assert "max_local_cpu_size: 0.25" in (tmp_path / "lmcache.yaml").read_text()
    assert bench.server_flags("stock", tmp_path, args, model) == ([], {})


@pytest.mark.parametrize("argv, wrong", [(["--arms", "stock,nope"], "--arms"), (["--phases", "main,x"], "--phases"),
                                         (["--returning", "9"], "--returning")])
def test_bench_rejects_bad_arguments(argv, wrong, capsys) -> None:
    import bench_sglang_multiturn as bench

    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert wrong in capsys.readouterr().err
