#!/usr/bin/env python
"""Multi-turn chat benchmark: stock SGLang, `--enable-lmcache` and SGLang's own HiCache, one run, same flags otherwise.

The workload (``workload_multiturn.py``, shared with the vLLM benchmark): N
users share a system prompt, each brings their own document in the first turn
and then asks R questions; the history (with the model's answers) grows every
round. Users are concurrent clients (one thread each). The device KV pool
(--max-total-tokens) is smaller than the users' histories together.

One server per arm, one after the other (never at the same time: they would
share the CPU), with identical flags except:

  stock         stock SGLang (with our CPU extend-attention shim: the plugin loads in every SGLang
                process of this venv)
  lmcache       the same plus `--enable-lmcache --lmcache-config-file` (host tier --host-gib, disk dir)
  hicache       the same as stock plus SGLang's `--enable-hierarchical-cache`: a host pool of the same
                bytes as lmcache's host tier (--hicache-ratio), `--hicache-storage-backend file` on a
                dir, direct io, layer_first, wait_complete prefetch; CPU shims from scripts/hicache_cpu/
                (that arm's PYTHONPATH only)
  stock-noshim  stock with LMCACHE_SGL_CPU_EXTEND_ATTN=0 (opt in with --arms)

Phases of each arm (--phases, default all three; ``multiturn_phases.py``):

  main     every user does --rounds turns: mean / p90 TTFT per round, throughput, cached tokens per tier
  noisy    fillers push the histories out of device and host; control: --decoders users stream
           --decode-tokens tokens alone; noisy: other decoders stream while --returning users send
           their next turn (history from disk). Decoders' p50/p99 inter-token latency in both, ratio.
  restart  the server is stopped (SIGTERM) and started again on the same dirs; every user sends its
           next turn: TTFT and cached tokens per tier

Each arm runs `--repeats` times, the arm order alternating between repeats.
SUMMARY lines give median and min-max over the repeats; `--json` writes everything.

    .venv/bin/python scripts/bench_sglang_multiturn.py [--users 4] [--rounds 3] [--doc-tokens 300]
    .venv/bin/python scripts/bench_sglang_multiturn.py --long --arms stock,hicache,lmcache --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import requests

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))  # scripts/ is not a package
from multiturn_phases import Load, noisy_neighbour, pct, run_users  # noqa: E402
from sglang_chat_demo import CHUNK, Server, lmcache_args, model_path  # noqa: E402
from workload_multiturn import WorkloadSpec, conversations, filler_prompts  # noqa: E402

from lmcache_sgl.adapters.sglang.cpu_shims import EXTEND_ATTN_ENV  # noqa: E402

SHIM_LOG_LINE = "extend-attention shim active"  # logged by the scheduler on the shim's first call
HICACHE_SHIMS = SCRIPTS / "hicache_cpu"
PHASES = ("main", "noisy", "restart")
EXTRA_ROUNDS = 2  # conversations outlive the main phase by one noisy-phase turn and one restart turn


class Arm(NamedTuple):
    kind: str  # stock | lmcache | hicache
    shim: bool  # the CPU extend-attention shim (cpu_shims.py)


ARMS = {"stock-noshim": Arm("stock", shim=False), "stock": Arm("stock", shim=True),
        "lmcache": Arm("lmcache", shim=True), "hicache": Arm("hicache", shim=True)}
# Presets fill the flags left unset. --long: documents long enough that the prefill a cache saves
# stands out above per-step overhead (3 users x ~1,300-token first turns on a 2,048-token pool).
PRESETS = {"default": {"users": 4, "doc_tokens": 300, "max_total_tokens": 1024},
           "long": {"users": 3, "doc_tokens": 1200, "max_total_tokens": 2048}}


class BenchServer(Server):
    """The demo's server plus a streamed request that records when each chunk arrives."""

    def stream(self, text: str, max_new_tokens: int) -> list[float]:
        body = {"text": text, "stream": True,
                "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}
        arrivals = []
        with requests.post(self.url("/generate"), json=body, stream=True, timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                    arrivals.append(time.perf_counter())
        return arrivals


def kv_bytes_per_token(model: Path) -> int:
    """fp32 K and V bytes of one token over all layers (the host tiers are sized from it)."""
    cfg = json.loads((model / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head_dim * 4


def host_tokens(args, model: Path) -> int:
    return int(args.host_gib * (1 << 30)) // kv_bytes_per_token(model)


def server_flags(name: str, arm_dir: Path, args, model: Path) -> tuple[list[str], dict[str, str]]:
    """(extra CLI flags, extra env) of one arm; its dirs live under arm_dir and survive a restart."""
    arm = ARMS[name]
    env = {} if arm.shim else {EXTEND_ATTN_ENV: "0"}
    if arm.kind == "lmcache":
        # The prefetch policy of the hicache arm, so both wait for disk the same way.
        return lmcache_args(arm_dir, arm_dir / "disk", host_gib=args.host_gib,
                            extra={"prefetch_policy": "wait_complete"}), env
    if arm.kind == "hicache":
        (arm_dir / "storage").mkdir(exist_ok=True)
        ratio = host_tokens(args, model) / args.max_total_tokens  # the same host bytes as lmcache's tier
        flags = ["--enable-hierarchical-cache", "--hicache-ratio", f"{ratio:.4f}", "--hicache-io-backend", "direct",
                 "--hicache-mem-layout", "layer_first", "--hicache-storage-prefetch-policy", "wait_complete",
                 "--hicache-storage-backend", "file", "--hicache-storage-backend-extra-config",
                 json.dumps({"file_storage_path": str(arm_dir / "storage")})]
        return flags, {**env, "PYTHONPATH": str(HICACHE_SHIMS)}
    return [], env


def tiers(records: list[dict]) -> dict:
    keys = ("prompt", "completion", "cached", "device", "host", "disk")
    return {k: sum(r[k] for r in records) for k in keys}


def ttft_stats(records: list[dict]) -> dict:
    xs = [r["ttft"] for r in records]
    return {"n": len(xs), "mean": sum(xs) / len(xs) if xs else float("nan"), "p90": pct(xs, 0.9)}


def summarize_main(load: Load) -> dict:
    recs = load.records
    rounds = sorted({r["round"] for r in recs})
    by_round = [ttft_stats([r for r in recs if r["round"] == k]) for k in rounds]
    s = {**ttft_stats(recs), "warm_mean": ttft_stats([r for r in recs if r["round"] > 0])["mean"],
         "by_round": [b["mean"] for b in by_round], "by_round_p90": [b["p90"] for b in by_round],
         "wall": load.wall, **tiers(recs)}
    s["rps"] = s["n"] / s["wall"]
    s["out_tps"] = s["completion"] / s["wall"]
    s["in_tps"] = s["prompt"] / s["wall"]
    return s


def report_main(name: str, s: dict) -> None:
    print(f"[{name}] main: {s['n']} requests in {s['wall']:.1f} s; TTFT mean {s['mean']:.3f} s, p90 {s['p90']:.3f} s, "
          f"rounds 2.. {s['warm_mean']:.3f} s; by round mean {', '.join(f'{x:.2f}' for x in s['by_round'])} s, "
          f"p90 {', '.join(f'{x:.2f}' for x in s['by_round_p90'])} s", flush=True)
    print(f"[{name}] main: throughput {s['rps']:.3f} req/s, {s['out_tps']:.1f} output tok/s, {s['in_tps']:.1f} "
          f"prompt tok/s; prompt tokens {s['prompt']}, cached {s['cached']} (device {s['device']}, host "
          f"{s['host']}, disk {s['disk']})", flush=True)


def report_noisy(name: str, n: dict) -> None:
    c, h, ret = n["itl_control"], n["itl_noisy"], n["returning_summary"]
    print(f"[{name}] noisy: {n['fillers']} fillers in {n['push_out_s']:.1f} s; decoders' ITL control p50 "
          f"{c['p50'] * 1e3:.1f} ms p99 {c['p99'] * 1e3:.1f} ms ({c['n']} gaps); with returning users p50 "
          f"{h['p50'] * 1e3:.1f} ms p99 {h['p99'] * 1e3:.1f} ms ({h['n']} gaps in {n['window_s']:.1f} s); p99 ratio "
          f"{n['p99_ratio']:.2f}x; returning TTFT mean {ret['mean']:.3f} s, cached device {ret['device']} host "
          f"{ret['host']} disk {ret['disk']} of {ret['prompt']}", flush=True)


def report_restart(name: str, r: dict) -> None:
    print(f"[{name}] restart: server up in {r['startup']:.0f} s; returning TTFT mean {r['mean']:.3f} s, p90 "
          f"{r['p90']:.3f} s; cached device {r['device']} host {r['host']} disk {r['disk']} of {r['prompt']}",
          flush=True)


def start(name: str, model: Path, log: Path, arm_dir: Path, args) -> BenchServer:
    extra, env = server_flags(name, arm_dir, args, model)
    return BenchServer(model, log, extra, env=env, pool_tokens=args.max_total_tokens)


def run_arm(name: str, rep: int, model: Path, tok, args, work: Path) -> dict:
    """One arm: a server for the main and noisy phases, then a restart on the same dirs."""
    arm_dir = work / f"{name}-r{rep}"
    arm_dir.mkdir()
    spec = WorkloadSpec(args.users, args.rounds + EXTRA_ROUNDS, args.doc_tokens, args.seed)
    convs = conversations(tok, spec)
    print(f"starting {name} server ...", flush=True)
    server = start(name, model, arm_dir / "server.log", arm_dir, args)
    out = {"startup": server.startup_s}
    try:
        if "main" in args.phases:
            load = run_users(server, tok, convs, args.rounds, args.max_new_tokens, args.stagger, args.verbose)
            out["main"] = summarize_main(load)
            report_main(name, out["main"])
        if "noisy" in args.phases:
            out["noisy"] = run_noisy(server, tok, convs, args, model)
            report_noisy(name, out["noisy"])
    finally:
        server.stop()
    out["shim_active"] = SHIM_LOG_LINE in (arm_dir / "server.log").read_text(errors="replace")
    if out["shim_active"] != ARMS[name].shim:
        print(f"WARNING: {name} was meant to run with the extend shim {'on' if ARMS[name].shim else 'off'}, but "
              f"its log says {'on' if out['shim_active'] else 'off'}", flush=True)
    if "restart" in args.phases:
        out["restart"] = run_restart(name, model, tok, convs, args, arm_dir)
        report_restart(name, out["restart"])
    return out


def run_noisy(server, tok, convs, args, model: Path) -> dict:
    budget = int((args.max_total_tokens + host_tokens(args, model)) * 1.5)  # well beyond device pool + host tier
    fillers = filler_prompts(tok, budget, min(512, args.max_total_tokens // 2), seed=args.seed)
    n = noisy_neighbour(server, tok, convs[:args.returning], fillers, args.decoders, args.decode_tokens,
                        args.max_new_tokens, args.noisy_lead)
    n["returning_summary"] = {**ttft_stats(n["returning"]), **tiers(n["returning"])}
    return n


def run_restart(name: str, model: Path, tok, convs, args, arm_dir: Path) -> dict:
    server = start(name, model, arm_dir / "restart.log", arm_dir, args)
    try:
        load = run_users(server, tok, convs, 1, args.max_new_tokens, args.stagger, args.verbose, "restart ")
    finally:
        server.stop()
    return {"startup": server.startup_s, **ttft_stats(load.records), **tiers(load.records),
            "records": load.records}


class Spread(NamedTuple):
    median: float
    lo: float
    hi: float


def spread(xs: list[float]) -> Spread:
    return Spread(statistics.median(xs), min(xs), max(xs))


# (phase, field) pairs summarised over repeats; absent phases are skipped.
SUMMARY_FIELDS = [("main", "mean"), ("main", "p90"), ("main", "warm_mean"), ("main", "rps"),
                  ("noisy", "itl_control.p99"), ("noisy", "itl_noisy.p99"), ("noisy", "p99_ratio"),
                  ("noisy", "returning_summary.mean"), ("restart", "mean"), ("restart", "disk"),
                  ("restart", "host"), ("restart", "cached")]


def field(run_arm_out: dict, phase: str, path: str):
    v = run_arm_out.get(phase)
    for k in path.split("."):
        if v is None:
            return None
        v = v.get(k)
    return v


def print_summary(runs: list[dict]) -> dict:
    summary: dict = {}
    arms = runs[0]["arms"]
    for name in arms:
        summary[name] = {}
        for phase, path in SUMMARY_FIELDS:
            xs = [field(run["arms"][name], phase, path) for run in runs]
            if all(x is not None for x in xs):
                summary[name][f"{phase}.{path}"] = spread([float(x) for x in xs])._asdict()
        cells = [f"{k} {v['median']:.3f} ({v['lo']:.3f}-{v['hi']:.3f})" for k, v in summary[name].items()]
        print(f"SUMMARY [{name}] medians of {len(runs)}: " + "; ".join(cells), flush=True)
    if "lmcache" in arms and all("main" in run["arms"]["lmcache"] for run in runs):
        for name in (a for a in arms if a != "lmcache"):
            r = spread([run["arms"][name]["main"]["mean"] / run["arms"]["lmcache"]["main"]["mean"] for run in runs])
            summary[f"{name}/lmcache"] = {"main.mean": r._asdict()}
            print(f"SUMMARY mean TTFT {name} / lmcache = {r.median:.2f}x (min {r.lo:.2f}x, max {r.hi:.2f}x)",
                  flush=True)
    return summary


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=None, help="concurrent users (default 4; --long: 3)")
    ap.add_argument("--rounds", type=int, default=3, help="turns per user in the main phase")
    ap.add_argument("--doc-tokens", type=int, default=None,
                    help="tokens of each user's first-turn document (default 300; --long: 1200)")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="answer length per round")
    ap.add_argument("--max-total-tokens", type=int, default=None,
                    help="device KV pool of every server (default 1024; --long: 2048)")
    ap.add_argument("--long", action="store_true", help="preset: 3 users, ~1,200-token documents, 2,048-token pool")
    ap.add_argument("--arms", default="stock,hicache,lmcache",
                    help=f"comma-separated arms, in the first repeat's order; from {sorted(ARMS)}")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, from {list(PHASES)}")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each arm; the order alternates")
    ap.add_argument("--host-gib", type=float, default=0.5,
                    help="lmcache host tier in GiB; HiCache's host pool gets the same bytes")
    ap.add_argument("--stagger", type=float, default=0.5, help="seconds between the users' first requests")
    ap.add_argument("--seed", type=int, default=0, help="workload seed (documents, question order)")
    ap.add_argument("--decoders", type=int, default=2, help="noisy phase: users streaming long answers")
    ap.add_argument("--decode-tokens", type=int, default=96, help="noisy phase: tokens each decoder streams")
    ap.add_argument("--returning", type=int, default=2, help="noisy phase: users returning from disk")
    ap.add_argument("--noisy-lead", type=float, default=1.0,
                    help="noisy phase: seconds the decoders stream before the returning users send")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="server logs and cache dirs, one subdir per arm and repeat (default: a temp dir; "
                         "its cache dirs are removed at the end)")
    ap.add_argument("--json", type=Path, default=None, help="write the config, every run and the summary here")
    ap.add_argument("--verbose", action="store_true", help="print every request")
    return check_args(ap, ap.parse_args(argv))


def check_args(ap, args):
    for key, value in PRESETS["long" if args.long else "default"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown or len(set(args.arms)) != len(args.arms) or not args.arms:
        ap.error(f"--arms {','.join(args.arms)}: need distinct arms from {sorted(ARMS)}")
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not args.phases or any(p not in PHASES for p in args.phases):
        ap.error(f"--phases {','.join(args.phases)}: allowed: one or more of {list(PHASES)}")
    for key in ("repeats", "users", "rounds", "decoders", "decode_tokens"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} {getattr(args, key)}: must be >= 1")
    if not 1 <= args.returning <= args.users:
        ap.error(f"--returning {args.returning}: allowed 1..{args.users} (--users)")
    if EXTEND_ATTN_ENV in os.environ:
        ap.error(f"unset {EXTEND_ATTN_ENV}: each arm sets it (use --arms stock-noshim for the shim off)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    model = model_path()
    tok = AutoTokenizer.from_pretrained(str(model))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-sglang-mt-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"model {model}; {args.users} users x {args.rounds} rounds, document ~{args.doc_tokens} tokens, "
          f"{args.max_new_tokens} new tokens/answer; device pool {args.max_total_tokens} tokens; host tier "
          f"{args.host_gib} GiB = {host_tokens(args, model)} tokens (lmcache chunk {CHUNK}; hicache the same "
          f"bytes); phases {','.join(args.phases)}; logs and cache dirs in {work}", flush=True)
    runs = []
    try:
        for rep in range(args.repeats):
            order = args.arms if rep % 2 == 0 else args.arms[::-1]
            print(f"== repeat {rep + 1}/{args.repeats}: {', '.join(order)}", flush=True)
            runs.append({"order": order, "arms": {name: run_arm(name, rep, model, tok, args, work) for name in order}})
    finally:
        if args.work_dir is None:
            for d in work.glob("*/disk"):
                shutil.rmtree(d, ignore_errors=True)
            for d in work.glob("*/storage"):
                shutil.rmtree(d, ignore_errors=True)
    summary = print_summary(runs)
    if args.json:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        config["host_tokens"] = host_tokens(args, model)
        args.json.write_text(json.dumps({"config": config, "runs": runs, "summary": summary}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
