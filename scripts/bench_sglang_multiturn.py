#!/usr/bin/env python
"""Multi-turn chat benchmark: stock SGLang versus `--enable-lmcache`, one run, same flags otherwise.

Shaped like LMCache's multi-round QA and SGLang's bench_multiturn: N users
share a system prompt, each brings their own document in the first turn and
then asks R questions; the history (with the model's answers) grows every
round. Users are concurrent clients (one thread each). The device KV pool
(--max-total-tokens) is smaller than the users' histories together, so the
stock server's radix cache evicts them and recomputes, while the lmcache server
finds them again in its host tier (or on disk).

The script starts one server per arm, one after the other (never at the same
time: they would share the CPU), with identical flags except:

  stock         stock SGLang (with our CPU extend-attention shim: the plugin loads in every SGLang
                process of this venv)
  lmcache       the same plus `--enable-lmcache --lmcache-config-file`
  stock-noshim  stock with LMCACHE_SGL_CPU_EXTEND_ATTN=0: SGLang's own CPU attention, for
                what the shim alone gives a stock SGLang CPU user (opt in with --arms)

Each arm runs `--repeats` times, the arm order alternating between repeats. For
each run it reports mean / p90 TTFT (time to the first streamed chunk of
/generate), mean TTFT of rounds 2.. (the warm rounds), throughput, and the
cached tokens per tier from SGLang's `meta_info`; per repeat, the round-1
(cold) ratio, which should be ~1. The SUMMARY lines give median and min-max
over the repeats of each ratio; `--json` writes everything.

    .venv/bin/python scripts/bench_sglang_multiturn.py [--users 4] [--rounds 3] [--doc-tokens 300]
    .venv/bin/python scripts/bench_sglang_multiturn.py --long --arms stock-noshim,stock,lmcache --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sglang_chat_demo import CHUNK, Server, lmcache_args, model_path  # noqa: E402

from lmcache_sgl.adapters.sglang.cpu_shims import EXTEND_ATTN_ENV  # noqa: E402

SHIM_LOG_LINE = "extend-attention shim active"  # logged by the scheduler on the shim's first call


class Arm(NamedTuple):
    lmcache: bool  # --enable-lmcache
    shim: bool  # the CPU extend-attention shim (cpu_shims.py)


ARMS = {"stock-noshim": Arm(lmcache=False, shim=False), "stock": Arm(lmcache=False, shim=True),
        "lmcache": Arm(lmcache=True, shim=True)}
# Presets fill the flags left unset. --long: documents long enough that the prefill a cache saves
# stands out above per-step overhead (3 users x ~1,300-token first turns on a 2,048-token pool).
PRESETS = {"default": {"users": 4, "doc_tokens": 300, "max_total_tokens": 1024},
           "long": {"users": 3, "doc_tokens": 1200, "max_total_tokens": 2048}}

SYSTEM = (
    "You are a careful analyst. Read the report the user pastes, answer each question in one or two "
    "sentences, quote the numbers you rely on, and say so when the report does not contain the answer. "
    "Do not speculate about causes the report does not mention. Keep units as written in the report."
)

PLACES = ["Lyon", "Porto", "Gdansk", "Tunis", "Bilbao", "Turin", "Ghent", "Aarhus", "Split", "Brno", "Cork", "Graz"]
ITEMS = ["pumps", "valves", "cables", "sensors", "panels", "filters", "motors", "bearings", "gaskets", "relays"]
QUESTIONS = ["Which site had the highest output?", "What was the total number of defects reported?",
             "Which item appears most often?", "Summarise the report in one sentence.",
             "Which site should be audited first, and why?", "Were there any delays?",
             "What is the average output per site?", "Which numbers look inconsistent?"]


def document(tok, user: int, n_tokens: int) -> str:
    """A synthetic plant report of about n_tokens tokens, different for every user."""
    rnd = random.Random(1000 + user)
    lines = [f"Quarterly report {user + 1} of the northern division."]
    while len(tok.encode(" ".join(lines), add_special_tokens=False)) < n_tokens:
        lines.append(f"Site {rnd.choice(PLACES)} produced {rnd.randrange(100, 9999)} {rnd.choice(ITEMS)} in week "
                     f"{rnd.randrange(1, 53)}, with {rnd.randrange(0, 90)} defects and a delay of "
                     f"{rnd.randrange(0, 12)} days.")
    return " ".join(lines)


def run_load(server: Server, tok, args) -> dict:
    """All users concurrently, each doing its rounds in order; returns per-request records and wall time."""
    docs = [document(tok, u, args.doc_tokens) for u in range(args.users)]
    records: list[dict] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(u: int) -> None:
        try:
            time.sleep(u * args.stagger)
            messages = [{"role": "system", "content": SYSTEM}]
            for r in range(args.rounds):
                q = QUESTIONS[(u + r) % len(QUESTIONS)]
                messages.append({"role": "user", "content": f"{docs[u]}\n\n{q}" if r == 0 else q})
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                out = server.generate(text, args.max_new_tokens)
                messages.append({"role": "assistant", "content": out["text"].strip()})
                with lock:
                    records.append({"user": u, "round": r, **out})
                if args.verbose:
                    print(f"  user {u} round {r}: prompt {out['prompt']} cached {out['cached']} "
                          f"(dev {out['device']} host {out['host']} disk {out['disk']}) ttft {out['ttft']:.2f}s",
                          flush=True)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(u,)) for u in range(args.users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return {"records": records, "wall": wall}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(name: str, res: dict) -> dict:
    recs = res["records"]
    ttft = [r["ttft"] for r in recs]
    warm = [r["ttft"] for r in recs if r["round"] > 0]
    s = {"name": name, "n": len(recs), "mean": sum(ttft) / len(ttft), "p90": pct(ttft, 0.9),
         "warm_mean": sum(warm) / len(warm) if warm else float("nan"), "wall": res["wall"],
         "prompt": sum(r["prompt"] for r in recs), "completion": sum(r["completion"] for r in recs),
         "cached": sum(r["cached"] for r in recs), "device": sum(r["device"] for r in recs),
         "host": sum(r["host"] for r in recs), "disk": sum(r["disk"] for r in recs)}
    rounds = sorted({r["round"] for r in recs})
    s["by_round"] = [sum(r["ttft"] for r in recs if r["round"] == k) / sum(1 for r in recs if r["round"] == k)
                     for k in rounds]
    s["rps"] = s["n"] / s["wall"]
    s["out_tps"] = s["completion"] / s["wall"]
    s["in_tps"] = s["prompt"] / s["wall"]
    return s


def report(s: dict, startup: float) -> None:
    print(f"[{s['name']}] server start {startup:.0f} s; {s['n']} requests in {s['wall']:.1f} s")
    print(f"[{s['name']}] TTFT mean {s['mean']:.3f} s, p90 {s['p90']:.3f} s, mean of rounds 2.. "
          f"{s['warm_mean']:.3f} s; by round: {', '.join(f'{x:.2f}' for x in s['by_round'])} s")
    print(f"[{s['name']}] throughput {s['rps']:.3f} req/s, {s['out_tps']:.1f} output tok/s, "
          f"{s['in_tps']:.1f} prompt tok/s")
    print(f"[{s['name']}] prompt tokens {s['prompt']}, cached {s['cached']} "
          f"(device {s['device']}, host {s['host']}, disk {s['disk']}) = {s['cached'] / max(s['prompt'], 1):.0%}",
          flush=True)


class Spread(NamedTuple):
    median: float
    lo: float
    hi: float


def spread(xs: list[float]) -> Spread:
    return Spread(statistics.median(xs), min(xs), max(xs))


def ratio_pairs(arms: list[str]) -> list[tuple[str, str]]:
    """(numerator, denominator) arms: each other arm over lmcache, and no-shim stock over stock."""
    pairs = [(a, "lmcache") for a in arms if a != "lmcache" and "lmcache" in arms]
    if "stock-noshim" in arms and "stock" in arms:
        pairs.append(("stock-noshim", "stock"))
    return pairs


def pair_ratios(res: dict, num: str, den: str) -> dict:
    """TTFT ratios num / den of one repeat: all rounds, rounds 2.., and round 1 (cold, ~1 expected)."""
    a, b = res[num], res[den]
    return {"mean": a["mean"] / b["mean"], "warm": a["warm_mean"] / b["warm_mean"],
            "cold": a["by_round"][0] / b["by_round"][0]}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=None, help="concurrent users (default 4; --long: 3)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--doc-tokens", type=int, default=None,
                    help="tokens of each user's first-turn document (default 300; --long: 1200)")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="answer length per round")
    ap.add_argument("--max-total-tokens", type=int, default=None,
                    help="device KV pool of every server, smaller than the users' histories together "
                         "(default 1024; --long: 2048)")
    ap.add_argument("--long", action="store_true", help="preset: 3 users, ~1,200-token documents, 2,048-token pool")
    ap.add_argument("--arms", default="stock,lmcache",
                    help=f"comma-separated arms, in the first repeat's order; from {sorted(ARMS)}")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each arm; the order alternates")
    ap.add_argument("--host-gib", type=float, default=0.5, help="lmcache host tier in GiB")
    ap.add_argument("--stagger", type=float, default=0.5, help="seconds between the users' first requests")
    ap.add_argument("--order", choices=["stock-first", "lmcache-first"], default="stock-first",
                    help="lmcache-first reverses --arms for the first repeat")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="lmcache disk dir, one fresh subdir per repeat (default: a temp dir, removed)")
    ap.add_argument("--json", type=Path, default=None, help="write the config, every run and the summary here")
    ap.add_argument("--verbose", action="store_true", help="print every request")
    args = ap.parse_args(argv)
    for key, value in PRESETS["long" if args.long else "default"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown or len(set(args.arms)) != len(args.arms) or len(args.arms) < 2:
        ap.error(f"--arms {','.join(args.arms)}: need two or more distinct arms from {sorted(ARMS)}")
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: must be >= 1")
    if EXTEND_ATTN_ENV in os.environ:
        ap.error(f"unset {EXTEND_ATTN_ENV}: each arm sets it (use --arms stock-noshim for the shim off)")
    return args


def run_arm(name: str, rep: int, model: Path, tok, args, work: Path, disk_root: Path) -> dict:
    """One server for one arm: start, load, summarize, stop."""
    arm = ARMS[name]
    extra = []
    if arm.lmcache:
        rep_dir = work / f"lmcache-r{rep}"
        rep_dir.mkdir()
        extra = lmcache_args(rep_dir, disk_root / f"r{rep}", host_gib=args.host_gib)  # a fresh, empty disk tier
    env = {} if arm.shim else {EXTEND_ATTN_ENV: "0"}
    log = work / f"{name}-r{rep}.log"
    print(f"starting {name} server ({'shim on' if arm.shim else 'shim off'}) ...", flush=True)
    server = Server(model, log, extra, env=env, pool_tokens=args.max_total_tokens)
    try:
        s = summarize(name, run_load(server, tok, args))
        report(s, server.startup_s)
    finally:
        server.stop()
    s["startup"] = server.startup_s
    s["shim_active"] = SHIM_LOG_LINE in log.read_text(errors="replace")
    if s["shim_active"] != arm.shim:
        print(f"WARNING: {name} was meant to run with the shim {'on' if arm.shim else 'off'}, but its log "
              f"says {'on' if s['shim_active'] else 'off'}", flush=True)
    return s


def print_repeat(rep: int, res: dict, pairs) -> dict:
    out = {}
    for num, den in pairs:
        r = out[f"{num}/{den}"] = pair_ratios(res, num, den)
        print(f"repeat {rep + 1}: mean TTFT {num} / {den} = {r['mean']:.2f}x, rounds 2..: {r['warm']:.2f}x; "
              f"check: cold round 1 = {r['cold']:.2f} (same work on both; ~1 expected, else the load changed "
              f"between phases)", flush=True)
    return out


def print_summary(runs: list[dict], pairs) -> dict:
    summary = {}
    for name in runs[0]["arms"]:
        m, w, rps = (spread([run["arms"][name][k] for run in runs]) for k in ("mean", "warm_mean", "rps"))
        summary[name] = {"mean_s": m._asdict(), "warm_mean_s": w._asdict(), "rps": rps._asdict()}
        print(f"SUMMARY [{name}] mean TTFT {m.median:.3f} s ({m.lo:.3f}-{m.hi:.3f}), rounds 2.. {w.median:.3f} s "
              f"({w.lo:.3f}-{w.hi:.3f}), throughput {rps.median:.3f} req/s (medians of {len(runs)})")
    for num, den in pairs:
        key = f"{num}/{den}"
        rs = [run["ratios"][key] for run in runs]
        m, w = spread([r["mean"] for r in rs]), spread([r["warm"] for r in rs])
        cold = [round(r["cold"], 3) for r in rs]
        summary[key] = {"mean": m._asdict(), "warm": w._asdict(), "cold": cold}
        goal = f" (goal >= 3x on the median: {'met' if m.median >= 3 else 'NOT met'})" if (num, den) == ("stock", "lmcache") else ""
        print(f"SUMMARY mean TTFT {num} / {den} = {m.median:.2f}x median of {len(rs)} (min {m.lo:.2f}x, "
              f"max {m.hi:.2f}x){goal}; rounds 2..: {w.median:.2f}x ({w.lo:.2f}-{w.hi:.2f}x); "
              f"cold-round checks {', '.join(f'{c:.2f}' for c in cold)}")
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    model = model_path()
    tok = AutoTokenizer.from_pretrained(str(model))
    work = Path(tempfile.mkdtemp(prefix="bench-sglang-mt-"))
    disk_root = args.cache_dir or work / "disk"
    disk_root.mkdir(parents=True, exist_ok=True)
    print(f"model {model}; {args.users} users x {args.rounds} rounds, document ~{args.doc_tokens} tokens, "
          f"{args.max_new_tokens} new tokens/answer; device pool {args.max_total_tokens} tokens; lmcache "
          f"chunk {CHUNK}, host {args.host_gib} GiB, disk {disk_root}; logs in {work}", flush=True)
    shims = ", ".join(f"{a} (attention shim {'on' if ARMS[a].shim else 'off'})" for a in args.arms)
    print(f"note: arms {shims}; "
          f"the lmcache_sgl plugin loads in every SGLang process of this venv, so stock runs with the CPU "
          f"extend-attention shim too (stock-noshim sets {EXTEND_ATTN_ENV}=0)", flush=True)
    first = args.arms if args.order == "stock-first" else args.arms[::-1]
    pairs = ratio_pairs(args.arms)
    runs = []
    try:
        for rep in range(args.repeats):
            order = first if rep % 2 == 0 else first[::-1]
            print(f"== repeat {rep + 1}/{args.repeats}: {', '.join(order)}", flush=True)
            res = {name: run_arm(name, rep, model, tok, args, work, disk_root) for name in order}
            runs.append({"order": order, "arms": res, "ratios": print_repeat(rep, res, pairs)})
    finally:
        if args.cache_dir is None:
            shutil.rmtree(disk_root, ignore_errors=True)
    summary = print_summary(runs, pairs)
    if args.json:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        shim = {a: ARMS[a].shim for a in args.arms}
        args.json.write_text(json.dumps({"config": config, "attention_shim": shim, "runs": runs,
                                         "summary": summary}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
