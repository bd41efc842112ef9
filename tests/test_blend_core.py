"""Blending's engine-free parts: segments, segment keys, the recompute selection, config, store I/O."""

from __future__ import annotations

import math
import re

import pytest
import torch

from lmcache_sgl.blend.rope import RopeSpec, rotate
from lmcache_sgl.blend.segment_keys import segment_chunk_keys
from lmcache_sgl.blend.segments import Segment, separator_ids, split_segments
from lmcache_sgl.blend.selection import kv_deviation, recompute_count, select_recompute
from lmcache_sgl.blend.store_io import find_matches, injected_kv, load_matches, save_segments
from lmcache_sgl.config import CacheConfig, ConfigError
from lmcache_sgl.keys import ModelFingerprint, content_key, prefix_keys
from lmcache_sgl.layout import ChunkLayout
from lmcache_sgl.storage.disk_tier import chunk_path
from lmcache_sgl.tiered_store import TieredStore

SEP = [7, 8]
FP = ModelFingerprint("blend-test", "float32", num_layers=2, num_kv_heads=2, head_dim=16)
CHUNK = 8


# ---------------------------------------------------------------- segments

def test_segments_between_separators_including_first_and_last():
    """Text before the first and after the last separator are segments; separator tokens belong to none."""
    toks = [1, 2, 3, 7, 8, 4, 5, 7, 8, 6]
    assert split_segments(toks, SEP, 1) == [Segment(0, 3), Segment(5, 7), Segment(9, 10)]


def test_separators_at_start_end_and_adjacent_leave_no_empty_segments():
    """A separator at either end, or two in a row, gives no empty segment."""
    toks = [7, 8, 1, 2, 7, 8, 7, 8, 3, 7, 8]
    assert split_segments(toks, SEP, 1) == [Segment(2, 4), Segment(8, 9)]


def test_min_tokens_drops_short_segments_and_no_separator_gives_none():
    """Segments under min_tokens are dropped; a prompt without the separator, or an empty separator, has none."""
    toks = [1, 2, 3, 7, 8, 4, 7, 8, 5, 6]
    assert split_segments(toks, SEP, 2) == [Segment(0, 3), Segment(8, 10)]
    assert split_segments([1, 2, 3, 4], SEP, 1) == []
    assert split_segments(toks, [], 1) == []
    assert split_segments([7, 7, 8, 1], SEP, 1) == [Segment(0, 1), Segment(3, 4)]  # a near-miss is text
    with pytest.raises(ValueError, match="min_tokens=0"):
        split_segments(toks, SEP, 0)


def _bpe_like_encode(text: str) -> list[int]:
    """Byte-level-BPE-like pre-tokenization: a space joins the word after it (" # # The" -> " #", " #", " The")."""
    return [sum(map(ord, piece)) * 31 + len(piece) for piece in re.findall(r" ?\S+|\s+", text)]


def test_separator_ids_match_inside_a_prompt_where_the_trailing_space_merges():
    """The separator's trailing space joins the next word in context, so its ids are taken without it."""
    prompt = _bpe_like_encode("Intro text. # # The first document. # # Question?")
    assert split_segments(prompt, _bpe_like_encode(" # # "), 1) == []  # the naive ids never occur
    sep = separator_ids(_bpe_like_encode, " # # ")
    assert sep == _bpe_like_encode(" # #")
    assert split_segments(prompt, sep, 1) == [Segment(0, 2), Segment(4, 7), Segment(9, 10)]
    with pytest.raises(ValueError, match="tokenizes to no tokens"):
        separator_ids(lambda text: [], " # # ")


# ---------------------------------------------------------------- segment keys

def test_segment_keys_do_not_depend_on_the_position_in_the_prompt():
    """The same document at two offsets of two prompts gets the same chunk keys."""
    doc = list(range(100, 120))
    a = [1, 2] + SEP + doc + SEP + [3]
    b = [4, 5, 6, 9, 9] + SEP + [10, 11, 12] + SEP + doc
    seg_a = next(s for s in split_segments(a, SEP, 20) if a[s.start:s.end] == doc)
    seg_b = next(s for s in split_segments(b, SEP, 20) if b[s.start:s.end] == doc)
    assert seg_a.start != seg_b.start
    keys_a = segment_chunk_keys(FP, a[seg_a.start:seg_a.end], CHUNK)
    assert keys_a == segment_chunk_keys(FP, b[seg_b.start:seg_b.end], CHUNK)


def test_segment_keys_cover_full_chunks_then_the_partial_one_and_chain():
    """20 tokens at chunk 8: spans [0,8) [8,16) [16,20); key i names tokens [0, end_i)."""
    doc = list(range(100, 120))
    chunks = segment_chunk_keys(FP, doc, CHUNK)
    assert [(c.start, c.end) for c in chunks] == [(0, 8), (8, 16), (16, 20)]
    longer = segment_chunk_keys(FP, doc + [5, 6, 7, 8], CHUNK)  # 24 tokens: the third chunk is now full
    assert [c.key for c in longer[:2]] == [c.key for c in chunks[:2]] and longer[2].key != chunks[2].key
    changed = segment_chunk_keys(FP, [99] + doc[1:], CHUNK)
    assert all(x.key != y.key for x, y in zip(changed, chunks))  # a change in chunk 0 changes every key
    assert len({c.key for c in chunks}) == 3


def test_segment_keys_never_equal_prefix_or_content_keys():
    """Segment entries live in their own key domain: they never satisfy a prefix lookup."""
    doc = list(range(100, 124))
    seg = {c.key for c in segment_chunk_keys(FP, doc, CHUNK)}
    pre = set(prefix_keys(FP, doc, CHUNK, include_partial=True))
    con = {content_key(FP, doc[i:i + CHUNK]) for i in range(0, 24, CHUNK)}
    assert len(seg) == 3 and not seg & pre and not seg & con


# ---------------------------------------------------------------- selection

def _kv(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 2, 4, generator=torch.Generator().manual_seed(seed))


def test_selection_keeps_every_new_row_and_the_most_deviating_reused_rows():
    """Rows without stored KV are always recomputed; of the reused ones, ceil(ratio * R) by deviation."""
    k, v = _kv(10, 0), _kv(10, 1)
    old_k, old_v = k.clone(), v.clone()
    mask = torch.tensor([False, True, True, True, True, True, True, True, True, False])
    for row, size in ((3, 5.0), (6, 3.0), (2, 1.0)):
        old_k[row] += size
    assert select_recompute(k, v, old_k, old_v, mask, 0.25).tolist() == [0, 3, 6, 9]  # ceil(0.25 * 8) = 2
    assert select_recompute(k, v, old_k, old_v, mask, 0.0).tolist() == [0, 9]
    assert select_recompute(k, v, old_k, old_v, mask, 1.0).tolist() == list(range(10))


def test_deviation_reduce_decides_the_choice():
    """The hook sees the [R] deviations and its result is what top-k uses (TP: summed across ranks)."""
    k, v = _kv(6, 2), _kv(6, 3)
    old_k = k.clone()
    old_k[1] += 4.0
    mask = torch.tensor([True, True, True, True, True, False])
    seen = []

    def flip(dev: torch.Tensor) -> torch.Tensor:
        seen.append(dev.clone())
        return -dev
    assert select_recompute(k, v, old_k, v, mask, 0.2).tolist() == [1, 5]
    chosen = select_recompute(k, v, old_k, v, mask, 0.2, deviation_reduce=flip).tolist()
    assert chosen != [1, 5] and len(chosen) == 2 and chosen[-1] == 5
    assert seen[0].shape == (5,) and seen[0].dtype == torch.float32
    torch.testing.assert_close(seen[0], kv_deviation(k[:5], v[:5], old_k[:5], v[:5]))


def test_random_selection_is_reproducible_and_counts_like_hkvd():
    """Random picks the same number of rows as HKVD, reproducibly for one generator seed."""
    k, v = _kv(40, 4), _kv(40, 5)
    mask = torch.ones(40, dtype=torch.bool)
    mask[-1] = False
    pick = [select_recompute(k, v, k + 1, v, mask, 0.15, method="random",
                             generator=torch.Generator().manual_seed(s)).tolist() for s in (0, 0, 1)]
    assert pick[0] == pick[1] != pick[2] and len(pick[0]) == 1 + math.ceil(0.15 * 39)
    assert recompute_count(0.15, 39) == 6 and recompute_count(1.0, 39) == 39 and recompute_count(0.1, 10) == 1


def test_selection_refuses_bad_arguments():
    """An unknown method, a ratio outside [0, 1] or a non-bool mask is a ValueError naming it."""
    k = _kv(4, 6)
    mask = torch.tensor([True, True, False, False])
    with pytest.raises(ValueError, match="method 'top'"):
        select_recompute(k, k, k, k, mask, 0.5, method="top")
    with pytest.raises(ValueError, match="ratio=1.5"):
        select_recompute(k, k, k, k, mask, 1.5)
    with pytest.raises(ValueError, match="reused_mask"):
        select_recompute(k, k, k, k, mask.long(), 0.5)


# ---------------------------------------------------------------- config

def test_blend_config_defaults_and_sources():
    """Defaults follow LMCache; lists come from YAML lists or comma-separated variables."""
    cfg = CacheConfig()
    assert (cfg.enable_blending, cfg.blend_special_str, cfg.blend_recompute_ratios, cfg.blend_check_layers,
            cfg.blend_min_tokens) == (False, " # # ", (0.15,), (1,), 256)
    env = {"LMCACHE_ENABLE_BLENDING": "true", "LMCACHE_BLEND_RECOMPUTE_RATIOS": "0.3, 0.1",
           "LMCACHE_BLEND_CHECK_LAYERS": "[2]"}
    cfg = CacheConfig.load(environ=env, overrides={"blend_min_tokens": 64})
    assert (cfg.enable_blending, cfg.blend_recompute_ratios, cfg.blend_check_layers, cfg.blend_min_tokens) == \
        (True, (0.3, 0.1), (2,), 64)
    assert CacheConfig.load(environ={}, overrides={"blend_recompute_ratios": [0, 1]}).blend_recompute_ratios == (0, 1)


@pytest.mark.parametrize("key,value", [
    ("blend_recompute_ratios", [1.5]), ("blend_recompute_ratios", []), ("blend_recompute_ratios", "x"),
    ("blend_check_layers", [-1]), ("blend_check_layers", [1.5]), ("blend_min_tokens", 0),
    ("blend_special_str", ""), ("enable_blending", "maybe"),
])
def test_bad_blend_values_are_config_errors_naming_the_key(key, value):
    """Every bad blend value is refused when the config is built, naming the key."""
    with pytest.raises(ConfigError, match=key):
        CacheConfig.load(environ={}, overrides={key: value})


# ---------------------------------------------------------------- store I/O

SPEC = RopeSpec(16, 16, 10000.0)


def _raw_k(tokens: list[int]) -> torch.Tensor:
    """Un-rotated K [L, T, H, D] that depends on the token alone, like layer 0 of a real model."""
    rows = [torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(t)) for t in tokens]
    return torch.stack(rows, dim=1)


def _prompt_kv(tokens: list[int]) -> torch.Tensor:
    """[L, 2, N, H, D]: K rotated at positions 0..N-1, V a function of the token."""
    raw = _raw_k(tokens)
    pos = torch.arange(len(tokens))
    k = torch.stack([rotate(raw[layer], pos, SPEC) for layer in range(2)])
    return torch.stack([k, raw * 0.5 + 1.0], dim=1)


def _store(tmp_path=None) -> TieredStore:
    cfg = CacheConfig(chunk_size=CHUNK, max_local_cpu_size=0.01 if tmp_path is None else 0, local_cpu=tmp_path is None,
                      local_disk=None if tmp_path is None else str(tmp_path), load_policy="always")
    return TieredStore(cfg, ChunkLayout(FP, CHUNK))


DOC_A, DOC_B = list(range(100, 120)), list(range(200, 213))


def test_a_document_saved_at_one_offset_is_injected_at_another_with_its_k_there():
    """Documents stored from one prompt match in another order; injected K equals K rotated at the new rows."""
    first = [1, 2] + SEP + DOC_A + SEP + DOC_B + SEP + [3, 4]
    second = [5] + SEP + DOC_B + SEP + DOC_A + SEP + [6, 6, 6]
    with _store() as store:
        assert save_segments(store, FP, first, _prompt_kv(first), SPEC, SEP, min_tokens=10) == 3 + 2
        assert save_segments(store, FP, first, _prompt_kv(first), SPEC, SEP, min_tokens=10) == 0  # already held
        matches = find_matches(store, FP, second, SEP, min_tokens=10)
        assert [(m.segment, m.matched_tokens, len(m.keys)) for m in matches] == \
            [(Segment(3, 16), 13, 2), (Segment(18, 38), 20, 3)]
        inj = injected_kv(load_matches(store, matches, second), SPEC)
        want = _prompt_kv(second)
        assert inj.rows.tolist() == list(range(3, 16)) + list(range(18, 38))
        for layer in range(2):
            k, v = inj.kv(layer)
            torch.testing.assert_close(k, want[layer, 0, inj.rows], rtol=0, atol=1e-5)
            assert torch.equal(v, want[layer, 1, inj.rows])
        assert store.lookup(prefix_keys(FP, second, CHUNK)).num_hits == 0  # never a prefix hit


def test_partial_match_at_a_chunk_boundary_and_the_last_row_never_reused():
    """A longer version of a stored document matches its full chunks; a document ending the prompt
    is matched up to the row before the last."""
    with _store() as store:
        save_segments(store, FP, [1] + SEP + DOC_A, _prompt_kv([1] + SEP + DOC_A), SPEC, SEP, 10)
        longer = [2] + SEP + DOC_A[:16] + [9] * 6 + SEP + [3]
        (m,) = find_matches(store, FP, longer, SEP, 10)
        assert (m.matched_tokens, len(m.keys)) == (16, 2)
        ending = [4, 4] + SEP + DOC_A
        (m,) = find_matches(store, FP, ending, SEP, 10)
        assert m.segment == Segment(4, 24) and m.matched_tokens == 19 and len(m.keys) == 3
        assert find_matches(store, FP, ending, SEP, 21) == []  # under min_tokens: not matched


def test_a_corrupt_chunk_shortens_the_match_and_never_gives_wrong_kv(tmp_path):
    """A damaged file on disk is quarantined; the match ends before it and the rest is still exact."""
    prompt = [1] + SEP + DOC_A + SEP + [3]
    with _store(tmp_path) as store:
        save_segments(store, FP, prompt, _prompt_kv(prompt), SPEC, SEP, 10)
    keys = [c.key for c in segment_chunk_keys(FP, DOC_A, CHUNK)]
    victim = chunk_path(tmp_path, keys[1])
    blob = bytearray(victim.read_bytes())
    blob[-5] ^= 0xFF
    victim.write_bytes(bytes(blob))
    other = [7, 7, 1, 1] + SEP + DOC_A + SEP + [2]
    with _store(tmp_path) as store:
        matches = find_matches(store, FP, other, SEP, 10)
        assert matches[0].matched_tokens == 20  # presence only: the damage shows when read
        (loaded,) = load_matches(store, matches, other)
        assert loaded.loaded == CHUNK and store.stats().corrupt_chunks == 1
        inj = injected_kv([loaded], SPEC)
        k, _ = inj.kv(1)
        torch.testing.assert_close(k, _prompt_kv(other)[1, 0, 6:6 + CHUNK], rtol=0, atol=1e-5)


def test_save_after_a_blend_stores_new_documents_but_no_chunk_with_an_injected_row():
    """Injected rows (``exclude_rows``) hold fused K/V: their chunks, and later chunks of the same
    segment, are never stored; a new document's chunks are stored exactly."""
    with _store() as store:
        first = [1] + SEP + DOC_A + SEP + [3]
        save_segments(store, FP, first, _prompt_kv(first), SPEC, SEP, 10)
        blended = [5] + SEP + DOC_B + SEP + DOC_A + SEP + [6]  # B at rows 3..15 is new, A at 18..37 injected
        kv = _prompt_kv(blended)
        kv[:, :, 18:38] += 100.0  # stands for the fused K/V of injected rows
        injected = torch.zeros(len(blended), dtype=torch.bool)
        injected[18:38] = True
        some_b = injected.clone()
        some_b[3 + CHUNK + 1] = True  # one row of B's second chunk
        assert save_segments(store, FP, blended, kv, SPEC, SEP, 10, exclude_rows=some_b) == 1  # B's first chunk only
        b_keys = [c.key for c in segment_chunk_keys(FP, DOC_B, CHUNK)]
        assert store.missing(b_keys) == [1]
        assert save_segments(store, FP, blended, kv, SPEC, SEP, 10, exclude_rows=injected) == 1  # B's second chunk
        later = [9, 9] + SEP + DOC_B + SEP + [4]
        (m,) = find_matches(store, FP, later, SEP, 10)
        assert m.matched_tokens == len(DOC_B)
        k, v = injected_kv(load_matches(store, [m], later), SPEC).kv(1)
        torch.testing.assert_close(k, _prompt_kv(later)[1, 0, 4:17], rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="exclude_rows"):
            save_segments(store, FP, blended, kv, SPEC, SEP, 10, exclude_rows=injected[:-1])


def test_exclude_rows_over_a_stored_document_changes_nothing_there():
    """Negative control for the filter: without it, the chunks of a segment holding fused rows would be stored."""
    with _store() as store:
        prompt = [5] + SEP + DOC_B + SEP + [6]
        kv = _prompt_kv(prompt)
        mask = torch.zeros(len(prompt), dtype=torch.bool)
        mask[3] = True
        assert save_segments(store, FP, prompt, kv, SPEC, SEP, 10, exclude_rows=mask) == 0
        assert save_segments(store, FP, prompt, kv, SPEC, SEP, 10) == 2


def test_hf_blend_logits_of_chosen_rows_equal_those_rows_of_all_logits():
    """``logit_rows`` (the bench's answer rows) only skips work: the same logits as computing every row;
    a reused, unselected row is refused."""
    transformers = pytest.importorskip("transformers")
    from lmcache_sgl.blend.forward import InjectedKV
    from lmcache_sgl.blend.hf_reference import hf_blend, hf_prompt_kv

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, attn_implementation="eager")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).eval()
    tokens = torch.randint(3, 96, (24,), generator=torch.Generator().manual_seed(2))
    k, v = hf_prompt_kv(model, tokens)
    reused = torch.arange(4, 16)
    injected = InjectedKV(reused, [k[layer, reused] + 0.3 for layer in range(2)],
                          [v[layer, reused] for layer in range(2)])
    every = hf_blend(model, tokens, injected, 1, 0.25)
    chosen = torch.tensor([3, 20, 23])  # never reused: always selected
    part = hf_blend(model, tokens, injected, 1, 0.25, logit_rows=chosen)
    at = torch.searchsorted(every.out.rows, chosen)
    torch.testing.assert_close(part.logits, every.logits[at], rtol=0, atol=1e-6)
    unselected = [r for r in reused.tolist() if r not in every.out.rows.tolist()][0]
    with pytest.raises(ValueError, match="logit_rows"):
        hf_blend(model, tokens, injected, 1, 0.25, logit_rows=torch.tensor([unselected]))
