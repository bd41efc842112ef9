#!/usr/bin/env python
"""Multi-turn chat benchmark: stock SGLang versus `--enable-lmcache`, one run, same flags otherwise.

Shaped like LMCache's multi-round QA and SGLang's bench_multiturn: N users
share a system prompt, each brings their own document in the first turn and
then asks R questions; the history (with the model's answers) grows every
round. Users are concurrent clients (one thread each). The device KV pool
(--max-total-tokens) is smaller than the users' histories together, so the
stock server's radix cache evicts them and recomputes, while the lmcache server
finds them again in its host tier (or on disk).

The script starts the two servers one after the other (never at the same time:
they would share the CPU) with identical flags except `--enable-lmcache
--lmcache-config-file`. For each it reports mean / p90 TTFT (time to the
first streamed chunk of /generate), mean TTFT of rounds 2.. (the warm rounds),
throughput, and the cached tokens per tier from SGLang's `meta_info`. The last
line is the SUMMARY with the stock / lmcache mean-TTFT ratio.

    .venv/bin/python scripts/bench_sglang_multiturn.py [--users 4] [--rounds 3] [--doc-tokens 300]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sglang_chat_demo import CHUNK, Server, lmcache_args, model_path  # noqa: E402

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--doc-tokens", type=int, default=300, help="tokens of each user's first-turn document")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="answer length per round")
    ap.add_argument("--max-total-tokens", type=int, default=1024,
                    help="device KV pool of both servers (smaller than the users' histories together)")
    ap.add_argument("--host-gib", type=float, default=0.5, help="lmcache host tier in GiB")
    ap.add_argument("--stagger", type=float, default=0.5, help="seconds between the users' first requests")
    ap.add_argument("--order", choices=["stock-first", "lmcache-first"], default="stock-first")
    ap.add_argument("--cache-dir", type=Path, default=None, help="lmcache disk dir (default: a temp dir, removed)")
    ap.add_argument("--verbose", action="store_true", help="print every request")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    model = model_path()
    tok = AutoTokenizer.from_pretrained(str(model))
    work = Path(tempfile.mkdtemp(prefix="bench-sglang-mt-"))
    disk = args.cache_dir or work / "disk"
    disk.mkdir(parents=True, exist_ok=True)
    lm = lmcache_args(work, disk, host_gib=args.host_gib)
    print(f"model {model}; {args.users} users x {args.rounds} rounds, document ~{args.doc_tokens} tokens, "
          f"{args.max_new_tokens} new tokens/answer; device pool {args.max_total_tokens} tokens; lmcache "
          f"chunk {CHUNK}, host {args.host_gib} GiB, disk {disk}; logs in {work}", flush=True)

    plan = [("stock", []), ("lmcache", lm)]
    if args.order == "lmcache-first":
        plan.reverse()
    results = {}
    try:
        for name, extra in plan:
            server = None
            try:
                print(f"starting {name} server ...", flush=True)
                server = Server(model, work / f"{name}.log", extra, pool_tokens=args.max_total_tokens)
                res = run_load(server, tok, args)
                results[name] = summarize(name, res)
                report(results[name], server.startup_s)
            finally:
                if server is not None:
                    server.stop()
    finally:
        if args.cache_dir is None:
            shutil.rmtree(disk, ignore_errors=True)

    st, lc = results["stock"], results["lmcache"]
    ratio = st["mean"] / lc["mean"]
    warm_ratio = st["warm_mean"] / lc["warm_mean"]
    verdict = "met" if ratio >= 3 else "NOT met"
    # Round 1 is a cold prefill on both servers: its ratio should be ~1. Far from 1 means the machine's load
    # changed between the two phases, and the other ratios are not trustworthy.
    cold_ratio = st["by_round"][0] / lc["by_round"][0]
    print(f"check: cold round 1 TTFT stock / lmcache = {cold_ratio:.2f} (same work on both; ~1 expected, "
          f"else the load changed between phases)")
    print(f"SUMMARY mean TTFT stock {st['mean']:.3f} s / lmcache {lc['mean']:.3f} s = {ratio:.2f}x "
          f"(goal >= 3x: {verdict}); rounds 2..: {st['warm_mean']:.3f} / {lc['warm_mean']:.3f} s = "
          f"{warm_ratio:.2f}x; throughput {st['rps']:.3f} -> {lc['rps']:.3f} req/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
