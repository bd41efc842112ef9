"""Blending in one SGLang scheduler process: startup checks and per-request state.

With ``enable_blending``, the plugin installs one ``BlendRuntime`` per scheduler
process (after the tree and the model exist). The scheduler thread notes each
request when the tree matches it (``note``): its prompt is cut at the separator
and its segments are looked up in the store (index reads only, no file I/O). A
request with at least one stored segment is a blend request: its KV will be an
approximation, so ``skip_radix_cache_insert`` keeps it out of the tree and out of
the store's prefix chunks. The forward hook (``blend_hook``) reads the notes;
``meta_info`` reads the per-request stats.

Lifetime of a note: from the first match until the forward that completes the
request's prefill (or an abort). Both maps are bounded, so a request that
vanishes without either cannot grow them without limit.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import NamedTuple

from ...blend.rope import RopeSpec
from ...blend.segments import Segment, split_segments
from ...blend.store_io import BlendMatch, find_matches

log = logging.getLogger(__name__)

MAX_TRACKED = 4096  # notes and stats kept at most; the oldest go first
LLAMA_CLASSES = ("LlamaForCausalLM",)


class PromptBlend(NamedTuple):
    """What blending knows about one request's prompt."""

    token_ids: list[int]
    segments: list[Segment]  # >= blend_min_tokens each
    matches: list[BlendMatch]  # stored runs of those segments; empty: not a blend request

    @property
    def is_blend(self) -> bool:
        return bool(self.matches)


class BlendStats(NamedTuple):
    reused: int  # prompt tokens whose K/V was loaded from a stored segment
    recomputed: int  # of those, tokens recomputed from the check layer on


class BlendRuntime:
    """Per-process blend state; methods are safe from the scheduler and forward threads."""

    def __init__(self, config, store, fingerprint, sep_ids: list[int], rope: RopeSpec, model, kv_pool,
                 req_to_token, device_kv) -> None:
        self.config = config
        self.store = store
        self.fingerprint = fingerprint
        self.sep_ids = list(sep_ids)
        self.rope = rope
        self.model = model  # the served LlamaModel (not a draft model's)
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token
        self.device_kv = device_kv
        self.ratio = float(config.blend_recompute_ratios[0])
        self.check_layer = int(config.blend_check_layers[0])
        self._lock = threading.Lock()
        self._prompts: OrderedDict[str, PromptBlend] = OrderedDict()
        self._stats: OrderedDict[str, BlendStats] = OrderedDict()
        self._plain: OrderedDict[str, None] = OrderedDict()  # rids noted without segments

    # ---- scheduler thread ---------------------------------------------------

    def note(self, req) -> None:
        """Plan ``req`` once, at its first match; marks a blend request ``skip_radix_cache_insert``."""
        with self._lock:
            if req.rid in self._prompts or req.rid in self._plain:
                return
        plan = self._plan(req)
        if plan is None:
            with self._lock:
                _bounded_set(self._plain, req.rid, None)  # the scheduler matches a waiting request often
            return
        if plan.is_blend:
            req.skip_radix_cache_insert = True  # approximate KV: never a prefix entry
        with self._lock:
            _bounded_set(self._prompts, req.rid, plan)

    def _plan(self, req) -> PromptBlend | None:
        if not _blendable(req):
            return None
        tokens = list(req.origin_input_ids)
        segments = split_segments(tokens, self.sep_ids, self.config.blend_min_tokens)
        if not segments:
            return None
        try:
            matches = find_matches(self.store, self.fingerprint, tokens, self.sep_ids, self.config.blend_min_tokens)
        except Exception:  # noqa: BLE001 - engine boundary: a failed lookup is a miss
            log.exception("lmcache_sgl: blend lookup for %s failed; serving it without blending", req.rid)
            matches = []
        return PromptBlend(tokens, segments, list(matches))

    def forget(self, rid: str) -> None:
        with self._lock:
            self._prompts.pop(rid, None)
            self._plain.pop(rid, None)

    # ---- forward thread -----------------------------------------------------

    def prompt(self, rid: str) -> PromptBlend | None:
        with self._lock:
            return self._prompts.get(rid)

    def record(self, rid: str, stats: BlendStats, prompt_len: int) -> None:
        log.info("lmcache_sgl: blend %s: %d of %d prompt tokens reused from stored segments, %d of them recomputed",
                 rid, stats.reused, prompt_len, stats.recomputed)
        with self._lock:
            _bounded_set(self._stats, rid, stats)

    # ---- output ---------------------------------------------------------------

    def stats(self, rid: str, *, finished: bool) -> BlendStats | None:
        with self._lock:
            return self._stats.pop(rid, None) if finished else self._stats.get(rid)


def _bounded_set(table: OrderedDict, key, value) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > MAX_TRACKED:
        table.popitem(last=False)


def _blendable(req) -> bool:
    """Requests whose KV is a function of the token ids alone, and whose output reads only the last row."""
    return not (getattr(req, "extra_key", None) or getattr(req, "cache_salt", None)
                or getattr(req, "lora_id", None) or getattr(req, "multimodal_inputs", None)
                or getattr(req, "input_embeds", None) is not None or getattr(req, "return_logprob", False)
                or getattr(req, "positional_embed_overrides", None) is not None)


# ---- startup -------------------------------------------------------------------

def check_blend_model(model_runner, config, tp_size: int) -> RopeSpec:
    """The model's RoPE spec; ValueError naming what blending cannot serve (raised at scheduler startup)."""
    causal_lm = model_runner.model
    name = type(causal_lm).__name__
    if name not in LLAMA_CLASSES or not hasattr(causal_lm, "model"):
        raise ValueError(f"enable_blending supports the Llama model family ({', '.join(LLAMA_CLASSES)}); "
                         f"the served model is {name}. Start with enable_blending: false")
    if tp_size > 1:
        raise ValueError(f"enable_blending serves --tp-size 1 only (got {tp_size}); "
                         "start with enable_blending: false or --tp-size 1")
    hf_config = model_runner.model_config.hf_config
    attn = causal_lm.model.layers[0].self_attn
    spec = RopeSpec.from_hf_config(hf_config, attn.head_dim,
                                   is_neox_style=getattr(hf_config, "rope_is_neox_style", True))
    num_layers = len(causal_lm.model.layers)
    check = config.blend_check_layers[0]
    if check >= num_layers:
        raise ValueError(f"blend_check_layers={list(config.blend_check_layers)}: layer {check} is invalid for "
                         f"a {num_layers}-layer model; allowed: 0..{num_layers - 1}")
    return spec


def separator_ids(tokenizer, text: str) -> list[int]:
    """The separator's token ids with the served tokenizer (no BOS/EOS); ValueError if it has none."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise ValueError(f"blend_special_str={text!r} tokenizes to no tokens; allowed: a string with tokens")
    return ids


_ACTIVE: BlendRuntime | None = None


def install(runtime: BlendRuntime | None) -> None:
    global _ACTIVE
    _ACTIVE = runtime


def active() -> BlendRuntime | None:
    return _ACTIVE


def install_for_scheduler(scheduler, tree) -> BlendRuntime:
    """Check the served model, tokenize the separator and make blending active in this scheduler process."""
    runner = scheduler.tp_worker.model_runner
    config = tree.link.store.config
    spec = check_blend_model(runner, config, int(getattr(scheduler, "tp_size", 1)))
    sep = separator_ids(_tokenizer(scheduler), config.blend_special_str)
    runtime = BlendRuntime(config, tree.link.store, tree.link.fingerprint, sep, spec, runner.model.model,
                           runner.token_to_kv_pool, runner.req_to_token_pool.req_to_token, tree.link.device_kv)
    install(runtime)
    log.info("lmcache_sgl: blending on: separator %r = token ids %s, recompute ratio %.3f at layer %d, "
             "segments of >= %d tokens", config.blend_special_str, sep, runtime.ratio, runtime.check_layer,
             config.blend_min_tokens)
    return runtime


def _tokenizer(scheduler):
    tokenizer = getattr(scheduler, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer  # --skip-tokenizer-init: the scheduler holds none

    args = scheduler.server_args
    return AutoTokenizer.from_pretrained(args.tokenizer_path or args.model_path)
