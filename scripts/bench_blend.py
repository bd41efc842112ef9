#!/usr/bin/env python
"""Blended reuse (CacheBlend, issue #12) on SmolLM2-135M-Instruct: TTFT and quality against full prefill.

Prompts are RAG-style: a system line, k documents of 256-512 tokens, shuffled, and
a question, joined by the separator (`blend_special_str`, " # # "). Documents are
cut from real English text available offline: the package descriptions (README
bodies) in the `*.dist-info/METADATA` files of this interpreter's site-packages.

(a) TTFT, through a real CPU SGLang server (`--enable-lmcache`, enable_blending,
    ratio 0.15, check layer 1): each document set is first served once in another
    order (which stores its segments), then the shuffled prompt is timed (a blend),
    against the same prompt with the separator replaced by a blank line (no
    segments: a full prefill of the same length), each with a fresh system line so
    the prefix cache never hits. TTFT is the latency of a 1-token /generate.
(b) Quality, teacher-forced on the full prefill's greedy answer: the engine's blend
    loop (`blend_forward`, the same algorithm the server runs) over transformers'
    modules (`lmcache_sgl.blend.hf_reference`), each document's KV computed alone at
    positions 0..T-1 and re-rotated to its place. Per configuration: mean KL(full ||
    blend) of the next-token distributions over the answer, top-1 agreement, and
    the share of prompts whose every answer token is the blend's argmax (greedy
    exact match). Configurations: HKVD at ratios 0, 0.05, 0.15, 0.30, 1.0; random at
    0.05, 0.15, 0.30; and a negative control, HKVD 0.15 with K rotated one position
    off.

  .venv/bin/python scripts/bench_blend.py --quick --json /tmp/blend.json
Full run: quality on 30 prompts of k = 4 documents x 32 answer tokens (k = 4 is enough for the quality
figures), TTFT at k = 4 and 8; `--prompts N` picks the quality prompts. Per quality prompt: one generate
(its per-step logits are the full prefill's), each document's KV once, and per configuration logits of the
answer rows only.
Plot: scripts/plot_blend.py writes an SVG of the quality figures from the JSON (no matplotlib needed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests
import torch

from lmcache_sgl.blend.forward import InjectedKV
from lmcache_sgl.blend.hf_reference import hf_blend, hf_prompt_kv, rope_spec_of
from lmcache_sgl.blend.rope import rerotate
from lmcache_sgl.models import ensure_smollm2

SEP = " # # "
SYSTEM = "You are a helpful assistant. Answer using the documents below."
QUESTIONS = ["What is the main purpose of the software described above?",
             "Which features do the documents mention?", "How do you install the package?",
             "Summarize the first document in one sentence.", "What license or requirements are mentioned?"]
CONFIGS = [("hkvd", 0.0), ("hkvd", 0.05), ("hkvd", 0.15), ("hkvd", 0.30), ("hkvd", 1.0),
           ("random", 0.05), ("random", 0.15), ("random", 0.30), ("off_by_one", 0.15)]
CHECK_LAYER = 1


# ---- documents --------------------------------------------------------------------------------

def document_pool(tokenizer, rnd: random.Random, count: int) -> list[list[int]]:
    """``count`` token runs of 256-512 tokens cut from package descriptions (paragraph-aligned)."""
    site = Path(requests.__file__).resolve().parents[1]
    paragraphs = []
    for meta in sorted(site.glob("*.dist-info/METADATA")):
        body = meta.read_text(errors="replace").split("\n\n", 1)[-1]
        body = re.sub(r"```.*?```", " ", body, flags=re.S)
        paragraphs += [p.strip() for p in body.split("\n\n") if len(p.split()) >= 20 and "#" not in p]
    docs, current = [], []
    target = rnd.randrange(256, 513)
    for p in paragraphs:
        current += tokenizer.encode(p + "\n", add_special_tokens=False)
        if len(current) >= target:
            docs.append(current[:target])
            current, target = [], rnd.randrange(256, 513)
            if len(docs) == count:
                return docs
    raise RuntimeError(f"only {len(docs)} documents of 256-512 tokens in {site}; asked for {count}")


def build_prompt(tokenizer, docs, question: str, system: str, sep_text: str) -> tuple[list[int], list[tuple]]:
    """Token ids and each document's (start, end) in them."""
    sep = tokenizer.encode(sep_text, add_special_tokens=False)
    ids = tokenizer.encode(system, add_special_tokens=False)
    spans = []
    for doc in docs:
        ids += sep
        spans.append((len(ids), len(ids) + len(doc)))
        ids += doc
    return ids + sep + tokenizer.encode(question, add_special_tokens=False), spans


# ---- quality ----------------------------------------------------------------------------------

@torch.inference_mode()
def quality(model, tokenizer, prompts, answer_len: int) -> dict:
    spec = rope_spec_of(model)
    per_config = {f"{m}@{r}": [] for m, r in CONFIGS}
    for i, (ids, spans, docs) in enumerate(prompts):
        t0 = time.perf_counter()
        answer, full = full_prefill_answer(model, ids, answer_len)
        full_ids = torch.cat([torch.tensor(ids), answer])
        answer_rows = torch.arange(len(ids) - 1, len(full_ids) - 1)  # each predicts the next answer token
        stored = [hf_prompt_kv(model, torch.tensor(d)) for d in docs]  # each document alone, positions 0..T-1
        for method, ratio in CONFIGS:
            shift = 1 if method == "off_by_one" else 0
            injected = inject(stored, spans, spec, shift)
            gen = torch.Generator().manual_seed(i)
            run = hf_blend(model, full_ids, injected, CHECK_LAYER, ratio, "random" if method == "random" else "hkvd",
                           generator=gen, logit_rows=answer_rows)
            per_config[f"{method}@{ratio}"].append(compare(full, run.logits, answer))
        print(f"  quality: prompt {i + 1}/{len(prompts)} ({len(ids)} tokens) in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
    return {name: summarize(rows) for name, rows in per_config.items()}


def full_prefill_answer(model, ids: list[int], answer_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy answer [A] of a full prefill and its next-token logits [A, vocab], from one generate.

    The logits of decode step j are those of the full prefill of prompt + answer[:j] at its
    last row, so no second forward over prompt + answer is needed.
    """
    out = model.generate(torch.tensor(ids)[None], max_new_tokens=answer_len, min_new_tokens=answer_len,
                         do_sample=False, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(ids):], torch.cat(out.logits, dim=0).float()  # [A], [A, vocab]


def inject(stored, spans, spec, shift: int) -> InjectedKV:
    rows, ks, vs = [], [], []
    for (k, v), (start, end) in zip(stored, spans):
        local = torch.arange(end - start)
        ks.append(torch.stack([rerotate(layer_k, local, local + start + shift, spec) for layer_k in k]))
        vs.append(v)
        rows.append(local + start)
    k, v = torch.cat(ks, dim=1), torch.cat(vs, dim=1)  # [L, R, H, D]
    return InjectedKV(torch.cat(rows), list(k.unbind(0)), list(v.unbind(0)))


def compare(full_logits, blend_logits, answer) -> dict:
    p, q = full_logits.float().log_softmax(-1), blend_logits.float().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)  # [A]
    top = blend_logits.argmax(-1)
    return {"kl": float(kl.mean()), "top1": float((top == full_logits.argmax(-1)).float().mean()),
            "exact": bool((top == answer).all())}


def summarize(rows) -> dict:
    return {"mean_kl": statistics.fmean(r["kl"] for r in rows),
            "top1_agreement": statistics.fmean(r["top1"] for r in rows),
            "greedy_exact_match": statistics.fmean(float(r["exact"]) for r in rows), "prompts": len(rows)}


# ---- TTFT through a server --------------------------------------------------------------------

def ttft(model_dir: Path, tokenizer, doc_sets, repeats: int, ratio: float) -> dict:
    from lmcache_sgl.adapters.sglang.local_server import LocalServer

    tmp = Path(tempfile.mkdtemp(prefix="bench-blend-"))
    cfg = tmp / "lmcache.yaml"
    cfg.write_text(f"chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 2\nenable_blending: true\n"
                   f"blend_recompute_ratios: [{ratio}]\nblend_check_layers: [{CHECK_LAYER}]\nblend_min_tokens: 128\n")
    # One chunk per prompt (k=8 is about 4,200 tokens); an explicit memory fraction, since SGLang's CPU
    # estimate went negative with a large --chunked-prefill-size.
    flags = ["--enable-lmcache", "--lmcache-config-file", str(cfg), "--chunked-prefill-size", "8192",
             "--mem-fraction-static", "0.3", "--context-length", "8192"]
    server = LocalServer(model_dir, tmp / "server.log", flags, pool_tokens=8192)
    try:
        out = {}
        for k, sets in doc_sets.items():
            blend, full = [], []
            for j, docs in enumerate(sets[:repeats]):
                q = QUESTIONS[j % len(QUESTIONS)]
                seed_ids, _ = build_prompt(tokenizer, list(reversed(docs)), q, f"Seed {k}.{j}. " + SYSTEM, SEP)
                one_token(server, seed_ids)  # stores the documents' segments
                ids, _ = build_prompt(tokenizer, docs, q, f"Run {k}.{j}. " + SYSTEM, SEP)
                t, meta = one_token(server, ids)
                if not meta.get("cached_tokens_details", {}).get("blend"):
                    raise RuntimeError(f"k={k}: the timed prompt was not blended: {meta}")
                blend.append(t)
                plain_ids, _ = build_prompt(tokenizer, docs, q, f"Full {k}.{j}. " + SYSTEM, "\n\n")
                full.append(one_token(server, plain_ids)[0])
            out[f"k={k}"] = {"tokens": len(ids), "blend_ttft_s": statistics.median(blend),
                             "full_ttft_s": statistics.median(full),
                             "speedup": statistics.median(full) / statistics.median(blend), "runs": len(blend),
                             "blend_range_s": [min(blend), max(blend)], "full_range_s": [min(full), max(full)]}
            print(f"  ttft k={k}: {out[f'k={k}']}", file=sys.stderr)
        return out
    finally:
        server.stop()


def one_token(server, ids) -> tuple[float, dict]:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
    t0 = time.perf_counter()
    r = requests.post(server.url("/generate"), json=body, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()["meta_info"]


# ---- main -------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2 quality prompts of k=2 with 8-token answers; TTFT at k=4, once")
    ap.add_argument("--prompts", type=int, default=None, help="quality prompts (default 30; 2 with --quick)")
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed prompts per k")
    ap.add_argument("--skip-ttft", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    prompts_n, answer_len, quality_k = (2, 8, 2) if args.quick else (30, args.answer_tokens, 4)
    prompts_n = args.prompts or prompts_n
    if prompts_n < 1:
        raise ValueError(f"--prompts={prompts_n} is invalid; allowed: >= 1")
    ks = [4] if args.quick else [4, 8]
    repeats = 1 if args.quick else args.repeats
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rnd = random.Random(0)
    pool = document_pool(tokenizer, rnd, 60)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads", "model": str(model_dir), "quick": args.quick,
              "doc_source": "site-packages *.dist-info/METADATA descriptions", "check_layer": CHECK_LAYER}
    if not args.skip_quality:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        prompts = []
        for i in range(prompts_n):
            docs = rnd.sample(pool, quality_k)
            ids, spans = build_prompt(tokenizer, docs, QUESTIONS[i % len(QUESTIONS)], SYSTEM, SEP)
            prompts.append((ids, spans, docs))
        report["quality"] = {"k": quality_k, "answer_tokens": answer_len,
                             **quality(model, tokenizer, prompts, answer_len)}
        write(report, args.json)  # kept if the TTFT part fails
    if not args.skip_ttft:
        doc_sets = {k: [rnd.sample(pool, k) for _ in range(repeats)] for k in ks}
        report["ttft"] = {"ratio": 0.15, "via": "CPU SGLang server, 1-token /generate latency",
                          **ttft(model_dir, tokenizer, doc_sets, repeats, 0.15)}
    print(write(report, args.json))
    return 0


def write(report: dict, path: Path | None) -> str:
    text = json.dumps(report, indent=2)
    if path:
        path.write_text(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
