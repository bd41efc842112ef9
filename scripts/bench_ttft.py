#!/usr/bin/env python
"""TTFT with the prefix restored from our tiers versus a full prefill (issue 7).

A transformers LlamaForCausalLM with random weights (sdpa) serves prompts of
prefix + suffix random tokens. For each prefix length, in one run:

  full       no cache: prefill of the whole prompt
  miss       cache on, 100% miss: keys + lookup + full prefill, interleaved with `full`;
             the save of the new chunks (our gather kernel + store.put) timed apart
  host       keys, lookup, store.get (host tier), staging in pinned memory, our scatter
             kernel into an SGLang MHA pool (per layer K, V [slots, H, D]), an HF cache
             built from views of the pool, forward of the suffix only
  disk       the same from the disk tier (host tier off), the chunk files dropped from
             the page cache (posix_fadvise DONTNEED) before every run
  disk_auto  `disk` with load_policy=auto, the store's CostModel fed this run's prefill
             and load times: on "recompute" lookup returns 0 hits, a full prefill

TTFT runs from the keys to the last token's logits (CUDA synchronized), median of --repeats
after --warmup; each hit's logits are compared with the full prefill's. Goals: host hit
>= 5x faster than full prefill at 16k, miss overhead <= 2%, disk_auto never slower.

CPU (SmolLM2-135M shape with 4 layers, fp32, prefixes 256/512/1024, suffix 64):
  .venv/bin/python scripts/bench_ttft.py
GPU (Llama-3-8B shape, bf16, prefixes 4k/16k/32k, suffix 512). The H100 has torch,
triton, transformers, numpy, msgpack, xxhash, pyyaml (KINDS.md); lz4, zstandard and
lmcache_sgl travel as wheels. Here, in the repo root (/.whl/ is git-ignored):
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl lz4==4.4.5 zstandard==0.25.0
  .venv/bin/pip wheel --no-deps --no-build-isolation -w .whl .     # lmcache_sgl, pure Python
then the device tool's `run`, carry [".whl"], timeout_s 600 (a few minutes):
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 scripts/bench_ttft.py \
    --json $OUT/ttft.json 2>&1 | tee $OUT/ttft.log
If `pip show msgpack xxhash pyyaml transformers` there lacks one, carry its wheel too.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from lmcache_sgl import CacheConfig, ChunkLayout, Tier, TieredStore, prefix_keys
from lmcache_sgl.config import GiB
from lmcache_sgl.prepopulate import fingerprint_of
from lmcache_sgl.storage.disk_tier import chunk_path
from lmcache_sgl.triton_kernels import PoolView, gather, scatter, sglang_mha_pool

SHAPES = {  # LlamaConfig fields; head_dim = hidden / heads
    "llama3-8b": dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
    "smollm2-135m": dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True),
}
DEFAULTS = {  # per device: shape, layers (None: the shape's), dtype, prefixes, suffix
    "cuda": ("llama3-8b", None, "bfloat16", "4096,16384,32768", 512),
    "cpu": ("smollm2-135m", 4, "float32", "256,512,1024", 64),
}
GOAL_HOST_SPEEDUP, GOAL_PREFIX = 5.0, 16384  # DESIGN.md section 7 predicts about 6x
GOAL_MISS_OVERHEAD_PCT = 2.0
AUTO_SLACK = 0.02  # disk_auto may exceed full prefill by the lookup and timer noise
EMA_FEEDS = 40  # CostModel averages with weight 0.2: 40 equal feeds leave 0.8**40 < 1e-3 of its prior


@dataclass
class Bench:
    args: argparse.Namespace
    model: torch.nn.Module
    layout: ChunkLayout  # chunk [L, 2, C, H, D]
    k_pool: list[torch.Tensor]  # per layer [max prefix, H, D]: an SGLang MHA pool on the device
    v_pool: list[torch.Tensor]
    pool: PoolView  # over k_pool, v_pool
    slots: torch.Tensor  # [max prompt] int64 arange on the device
    bufs: list[torch.Tensor]  # one [L, 2, C, H, D] per chunk of a prompt, pinned on CUDA
    device: torch.device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), help="default: llama3-8b on cuda, else smollm2-135m")
    p.add_argument("--layers", type=int, help="override the shape's layer count (CPU default 4)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--prefixes", help="comma-separated prefix lengths, multiples of --chunk-size")
    p.add_argument("--suffix", type=int, help="new tokens after each prefix")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before each case")
    p.add_argument("--disk-dir", help="parent of the disk tier's directory (default /var/tmp)")
    p.add_argument("--disk-write-policy", choices=["write_through", "write_back"], default="write_through",
                   help="the stores' disk_write_policy: write_through compresses every put on a background "
                        "thread while the next forward runs (the default, what servers use)")
    p.add_argument("--io-threads", type=int, default=CacheConfig().io_threads,
                   help="the stores' io_threads: disk chunks of one request are read and decoded this many at once")
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    shape, layers, dtype, prefixes, suffix = DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"]
    args.layers = args.layers or (layers if args.shape in (None, shape) else None)
    args.shape, args.dtype, args.suffix = args.shape or shape, args.dtype or dtype, args.suffix or suffix
    args.prefixes = [int(x) for x in (args.prefixes or prefixes).split(",")]
    if args.repeats < 1 or args.warmup < 0 or any(n <= 0 or n % args.chunk_size for n in args.prefixes):
        p.error("need --repeats >= 1, --warmup >= 0, --prefixes positive multiples of --chunk-size")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_bench(args: argparse.Namespace) -> Bench:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    fields = {**SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers else {})}
    cfg = LlamaConfig(**fields, max_position_embeddings=max(args.prefixes) + args.suffix, attn_implementation="sdpa")
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # weights born in dtype: no fp32 copy of 8B parameters
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    fp = fingerprint_of(model.config, f"bench-ttft-{args.shape}", args.dtype)
    layout, max_prompt = ChunkLayout(fp, args.chunk_size), max(args.prefixes) + args.suffix
    k_pool = [torch.empty(max(args.prefixes), fp.num_kv_heads, fp.head_dim, dtype=dtype, device=device)
              for _ in range(fp.num_layers)]  # [slots, H, D] each
    v_pool = [torch.empty_like(k) for k in k_pool]
    bufs = [torch.empty(layout.shape(args.chunk_size), dtype=dtype, pin_memory=device.type == "cuda")
            for _ in range(max_prompt // args.chunk_size)]
    return Bench(args, model, layout, k_pool, v_pool, sglang_mha_pool(k_pool, v_pool),
                 torch.arange(max_prompt, device=device), bufs, device)


def cache_from_pool(b: Bench, n: int):
    """An HF DynamicCache whose layer l holds pool slots [0, n) (torch.cat in it copies them once)."""
    if n == 0:
        return None
    cache = DynamicCache(config=b.model.config)
    for layer, (k, v) in enumerate(zip(b.k_pool, b.v_pool)):
        cache.update(k[:n].transpose(0, 1)[None], v[:n].transpose(0, 1)[None], layer)  # [1, H, n, D] views
    return cache


def run_request(b: Bench, store: TieredStore | None, ids: np.ndarray):
    """One request; ``store=None`` is a plain full prefill. Returns (phases, logits [1, 1, V], HF cache).

    # [0, n)         chunks loaded from the store into pool slots [0, n), n = hits * C
    # [n, len(ids))  computed by the forward (the whole prompt on a miss)
    """
    c, ids_dev = b.layout.chunk_size, torch.as_tensor(ids[None], device=b.device)  # [1, T]
    sync(b.device)
    t0 = time.perf_counter()
    keys = prefix_keys(b.layout.fingerprint, ids, c) if store is not None else []
    hits = store.lookup(keys).num_hits if store is not None else 0
    # borrow: host hits are lent as views of their (pinned on CUDA) slots, no copy;
    # disk hits are decoded and promoted into the host tier first.
    with store.borrow(keys[:hits], [ids[i * c:(i + 1) * c] for i in range(hits)]) if hits \
            else contextlib.nullcontext([]) as chunks:
        t1 = time.perf_counter()
        for i, kv in enumerate(chunks):  # on CUDA the kernel reads pinned host memory zero-copy
            src = kv if b.device.type != "cuda" or kv.is_pinned() else b.bufs[i].copy_(kv)
            scatter(b.pool, b.slots[i * c:(i + 1) * c], src, check_slots=False)
        sync(b.device)  # the slots stay lent until the copies are done
    sync(b.device)
    t2 = time.perf_counter()
    n = len(chunks) * c
    out = b.model(input_ids=ids_dev[:, n:], past_key_values=cache_from_pool(b, n), use_cache=True,
                  logits_to_keep=1)  # the first new token's logits: what TTFT waits for
    sync(b.device)
    t3 = time.perf_counter()
    phases = {"ttft_s": t3 - t0, "get_s": t1 - t0, "copy_s": t2 - t1, "forward_s": t3 - t2, "hits": len(chunks)}
    return phases, out.logits, out.past_key_values


def save_chunks(b: Bench, store: TieredStore, cache, ids: np.ndarray) -> float:
    """Gather each full chunk from a forward's HF cache with our kernel and put it; returns seconds."""
    c = b.layout.chunk_size
    sync(b.device)
    t0 = time.perf_counter()
    keys = prefix_keys(b.layout.fingerprint, ids, c)
    k, v = ([getattr(layer, a)[0].transpose(0, 1) for layer in cache.layers] for a in ("keys", "values"))
    pool = sglang_mha_pool(k, v)  # the HF cache seen as slots: [T, H, D] views, strides (D, T*D, 1)
    for i in range(len(keys)):
        gather(pool, b.slots[i * c:(i + 1) * c], b.bufs[i], check_slots=False)
    sync(b.device)
    for i, key in enumerate(keys):
        while not store.put(key, ids[i * c:(i + 1) * c], b.bufs[i], start_pos=i * c):
            store.flush_pending()  # the write queue is full: let it drain
    return time.perf_counter() - t0


def repeat(b: Bench, fn) -> tuple[dict, torch.Tensor]:
    """Median of each phase over --repeats runs of ``fn`` after --warmup untimed ones; the last logits."""
    runs = []
    for r in range(b.args.warmup + b.args.repeats):
        phases, logits = fn()
        if r >= b.args.warmup:
            runs.append(phases)
    med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    for k in ("ttft_s", "full", "miss"):  # the spread of what the tables compare
        if k in runs[0]:
            med[f"{k}_range"] = [min(run[k] for run in runs), max(run[k] for run in runs)]
    return med, logits


def drop_page_cache(root: str, keys: list[str]) -> str:
    """Evict the chunk files from the page cache, so the next read comes from the device."""
    try:
        for key in keys:
            with open(chunk_path(Path(root), key), "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    except (OSError, AttributeError) as e:  # AttributeError: no posix_fadvise on this OS
        return f"failed: {e!r}"
    return f"ok ({len(keys)} files)"


def fs_type(path: str) -> str:
    """Filesystem of ``path`` from /proc/mounts: on tmpfs the disk case never reads a disk."""
    path, found = os.path.realpath(path) + "/", (0, "unknown")
    with open("/proc/mounts") as f:
        for dev, mnt, typ, *_ in (line.split() for line in f):
            if path.startswith(mnt.rstrip("/") + "/") and len(mnt) >= found[0]:
                found = (len(mnt), f"{typ} ({dev} on {mnt})")
    return found[1]


def hit_case(b: Bench, store: TieredStore, ids: np.ndarray, ref: torch.Tensor, drop_dir: str | None = None) -> dict:
    """A hit case: median phases, load GB/s, and how far its logits are from the full prefill's."""
    keys, status = prefix_keys(b.layout.fingerprint, ids, b.layout.chunk_size), {}

    def once():
        if drop_dir is not None:
            status["page_cache_drop"] = drop_page_cache(drop_dir, [k for k in keys if store.contains(k)])
        phases, logits, _ = run_request(b, store, ids)
        return phases, logits

    med, logits = repeat(b, once)
    nbytes = b.layout.nbytes(int(med["hits"]) * b.layout.chunk_size)
    med["load_gbps"] = nbytes / (med["get_s"] + med["copy_s"]) / 1e9  # keys to data in the pool
    med["get_gbps"] = nbytes / med["get_s"] / 1e9  # keys to store.get returned
    med["max_abs_logit_diff"] = (logits.float() - ref.float()).abs().max().item()
    med["first_token_match"] = bool((logits[0, -1].argmax() == ref[0, -1].argmax()).item())
    return {**med, **status}


def full_and_miss(b: Bench, store: TieredStore, ids: np.ndarray, rng: np.random.Generator):
    """`full` and `miss` interleaved, each first in every other run, so drift and position in the pair hit
    both alike; a fresh prompt per miss. Returns (full, miss, ref)."""
    turn = iter(range(1 << 30))

    def once():
        miss_ids = rng.integers(0, b.model.config.vocab_size, len(ids))
        miss_first = next(turn) % 2 == 1
        if miss_first:
            miss, _, cache = run_request(b, store, miss_ids)
        full, logits, _ = run_request(b, None, ids)
        if not miss_first:
            miss, _, cache = run_request(b, store, miss_ids)
        save_s = save_chunks(b, store, cache, miss_ids)
        store.clear()
        return {"full": full["ttft_s"], "miss": miss["ttft_s"], "lookup": miss["get_s"], "save": save_s}, logits

    med, ref = repeat(b, once)
    saved = b.layout.nbytes(len(ids) // b.layout.chunk_size * b.layout.chunk_size)
    miss = {"ttft_s": med["miss"], "ttft_s_range": med["miss_range"], "lookup_s": med["lookup"],
            "overhead_pct": 100 * (med["miss"] / med["full"] - 1),
            "save_s": med["save"], "save_gbps": saved / med["save"] / 1e9}
    return {"ttft_s": med["full"], "ttft_s_range": med["full_range"]}, miss, ref


def calibrate(cost, prompt_tokens: int, full: dict, loads: dict[Tier, dict], nbytes: int, prefix: int) -> dict:
    """Feed a CostModel this run's prefill and load times (keys to pool); its decision per tier for the prefix."""
    cost.record_prefill(prompt_tokens, full["ttft_s"])
    table = {}
    for tier, case in loads.items():
        for _ in range(EMA_FEEDS):
            cost.record_load(tier, nbytes, case["get_s"] + case["copy_s"])
        est = cost.estimate(tier, nbytes, prefix)
        table[tier.value] = {"est_load_s": est.load_s, "est_recompute_s": est.recompute_s,
                             "decision": "load" if est.load_wins else "recompute"}
    return table


def bench_prefix(b: Bench, prefix: int, root: str) -> dict:
    """Every case for one prefix length; the disk tiers live under ``root``."""
    rng = np.random.default_rng(prefix)
    ids = rng.integers(0, b.model.config.vocab_size, prefix + b.args.suffix)  # [P + S]
    c, nbytes = b.layout.chunk_size, b.layout.nbytes(prefix)
    host_cfg = CacheConfig(chunk_size=c, max_local_cpu_size=(len(ids) // c + 1) * b.layout.chunk_bytes / GiB,
                           load_policy="always", disk_write_policy=b.args.disk_write_policy,
                           io_threads=b.args.io_threads)
    disk_cfg = CacheConfig(chunk_size=c, local_cpu=False, local_disk=os.path.join(root, f"p{prefix}"),
                           io_threads=b.args.io_threads,
                           max_local_disk_size=4 * nbytes / GiB + 1, load_policy="always")
    with TieredStore(host_cfg.replace(local_disk=os.path.join(root, f"miss{prefix}")), b.layout) as store:
        full, miss, ref = full_and_miss(b, store, ids, rng)
    _, _, cache = run_request(b, None, ids[:prefix])  # the prefix's KV, to fill both tiers
    with TieredStore(host_cfg, b.layout) as host_store, TieredStore(disk_cfg, b.layout) as disk_store:
        for store in (host_store, disk_store):
            save_chunks(b, store, cache, ids[:prefix])
        del cache
        disk_store.flush()
        host = hit_case(b, host_store, ids, ref)
        disk = hit_case(b, disk_store, ids, ref, drop_dir=disk_cfg.local_disk)
    with TieredStore(disk_cfg.replace(load_policy="auto"), b.layout) as store:
        table = calibrate(store.cost, len(ids), full, {Tier.HOST: host, Tier.DISK: disk}, nbytes, prefix)
        auto = hit_case(b, store, ids, ref, drop_dir=disk_cfg.local_disk)
        store.clear()
    auto["not_slower"] = auto["ttft_s"] <= full["ttft_s"] * (1 + AUTO_SLACK)
    miss["lookup_pct"] = 100 * miss["lookup_s"] / full["ttft_s"]  # the miss's own work, free of prefill noise
    for case in (host, disk, auto):
        case["x_vs_full"] = full["ttft_s"] / case["ttft_s"]
    return {"prefix": prefix, "suffix": b.args.suffix, "kv_bytes": nbytes, "decisions": table,
            "cases": {"full": full, "miss": miss, "host": host, "disk": disk, "disk_auto": auto}}


def goals(lengths: list[dict]) -> dict:
    by_prefix = {r["prefix"]: r for r in lengths}
    at = GOAL_PREFIX if GOAL_PREFIX in by_prefix else sorted(by_prefix)[len(by_prefix) // 2]
    speedup = by_prefix[at]["cases"]["host"]["x_vs_full"]
    worst_miss = max(r["cases"]["miss"]["overhead_pct"] for r in lengths)
    return {"host_speedup_prefix": at, "host_speedup": speedup, "host_speedup_ok": speedup >= GOAL_HOST_SPEEDUP,
            "miss_overhead_pct_max": worst_miss, "miss_overhead_ok": worst_miss <= GOAL_MISS_OVERHEAD_PCT,
            "auto_never_slower": all(r["cases"]["disk_auto"]["not_slower"] for r in lengths)}


def environment(b: Bench, root: str) -> dict:
    a, fp = b.args, b.layout.fingerprint
    name = torch.cuda.get_device_name(b.device) if b.device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return {"device": name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "triton": getattr(sys.modules.get("triton"), "__version__", "none"),
            "transformers": sys.modules["transformers"].__version__, "shape": a.shape,
            "layers": fp.num_layers, "kv_heads": fp.num_kv_heads, "head_dim": fp.head_dim, "dtype": a.dtype,
            "chunk_size": a.chunk_size, "repeats": a.repeats,
            "disk_write_policy": a.disk_write_policy, "io_threads": a.io_threads,
            "torch_threads": torch.get_num_threads(),
            "disk_dir": root, "disk_fs": fs_type(root)}


def run(args: argparse.Namespace) -> dict:
    parent = args.disk_dir or ("/var/tmp" if os.path.isdir("/var/tmp") else None)
    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="bench_ttft_", dir=parent) as root:
        b = build_bench(args)
        report = {"env": environment(b, root), "lengths": [bench_prefix(b, n, root) for n in args.prefixes]}
    report["goals"] = goals(report["lengths"])
    return report


COLUMNS = [  # (header, key, scale, format) of the per-case table
    ("TTFT ms", "ttft_s", 1e3, ".1f"), ("x full", "x_vs_full", 1, ".2f"), ("get ms", "get_s", 1e3, ".1f"),
    ("copy ms", "copy_s", 1e3, ".1f"), ("fwd ms", "forward_s", 1e3, ".1f"), ("load GB/s", "load_gbps", 1, ".2f"),
    ("get GB/s", "get_gbps", 1, ".2f"), ("hits", "hits", 1, ".0f"), ("logit diff", "max_abs_logit_diff", 1, ".1e")]


def _note(name: str, m: dict, r: dict) -> str:
    if name == "miss":
        return (f"overhead {m['overhead_pct']:+.2f}%, lookup {1e3 * m['lookup_s']:.2f} ms = {m['lookup_pct']:.3f}%, "
                f"save {1e3 * m['save_s']:.1f} ms ({m['save_gbps']:.2f} GB/s)")
    if name == "disk":
        return f"page cache drop {m['page_cache_drop']}"
    if name == "disk_auto":
        return f"{r['decisions']['disk']['decision']}; not slower than full: {m['not_slower']}"
    return ""


def print_report(report: dict) -> None:
    print(" ".join(f"{k}={v}" for k, v in report["env"].items()))
    print(f"{'prefix':>6} {'case':9}" + "".join(f"{h:>11}" for h, *_ in COLUMNS) + "  note")
    for r in report["lengths"]:
        for name, m in r["cases"].items():
            cells = "".join(f"{format(m[k] * sc, f) if k in m else '':>11}" for _, k, sc, f in COLUMNS)
            lo, hi = m["ttft_s_range"]
            spread = f"TTFT {1e3 * lo:.1f}-{1e3 * hi:.1f} ms; "
            print(f"{r['prefix']:>6} {name:9}{cells}  {spread}{_note(name, m, r)}")
    print("cost model fed this run's prefill and load times: est. load ms / est. recompute ms -> decision")
    for r in report["lengths"]:
        print(f"{r['prefix']:>6}  " + "   ".join(f"{t}: {1e3 * d['est_load_s']:.1f} / "
                                              f"{1e3 * (d['est_recompute_s'] or 0):.1f} -> {d['decision']}"
                                              for t, d in r["decisions"].items()))
    g, verdict = report["goals"], {True: "PASS", False: "FAIL"}
    print(f"goal: host hit >= {GOAL_HOST_SPEEDUP:.0f}x faster than full prefill at {g['host_speedup_prefix']}: "
          f"{g['host_speedup']:.2f}x {verdict[g['host_speedup_ok']]}")
    print(f"goal: miss overhead <= {GOAL_MISS_OVERHEAD_PCT:.0f}%: worst {g['miss_overhead_pct_max']:+.2f}% "
          f"{verdict[g['miss_overhead_ok']]}")
    print(f"goal: load_policy=auto disk never slower than full prefill: {verdict[g['auto_never_slower']]}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = run(args)
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
