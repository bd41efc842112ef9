"""Failed loads under vLLM's real Scheduler: no wrong KV is saved, and the right KV is saved after recompute.

The harness's fake model attends (see test_vllm_harness.py): a token computed
over a prefix that holds wrong KV gets wrong KV itself, so a chunk saved from
such a step differs from the KV of a clean recompute (``canonical``).
"""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import require

require("vllm")

from test_vllm_connector import CHUNK, canonical, random_prompt, store_extra  # noqa: E402
from test_vllm_harness import Harness, token_kv, write_model_dir  # noqa: E402

from lmcache_sgl import prefix_keys  # noqa: E402
from lmcache_sgl.adapters.vllm import cache_config_from  # noqa: E402
from lmcache_sgl.adapters.vllm_scheduler import LMCacheSGLMetadata, TransferSpec  # noqa: E402
from lmcache_sgl.adapters.vllm_worker import WorkerSide  # noqa: E402

BLOCK = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama-vllm")


def stored_prompt_with_corrupt_chunk(model_dir, disk, prompt: list[int], bad_index: int) -> list[str]:
    """Save ``prompt``'s chunks to ``disk`` through one engine, then corrupt chunk ``bad_index``'s file."""
    first = Harness(model_dir, store_extra(disk))
    first.add(prompt)
    first.run()
    keys = prefix_keys(first.store.layout.fingerprint, prompt, CHUNK)
    first.shutdown()  # flushes the host tier to disk
    path = disk / keys[bad_index][:2] / f"{keys[bad_index]}.kv"
    blob = bytearray(path.read_bytes())
    blob[-100:-90] = bytes(10)
    path.write_bytes(bytes(blob))
    return keys


def stored_chunks(h: Harness, prompt: list[int]) -> dict[int, torch.Tensor]:
    """Chunk index -> the KV the store holds for it, each chunk asked alone (a gap ends ``get``)."""
    keys = prefix_keys(h.store.layout.fingerprint, prompt, CHUNK)
    found = {i: h.store.get([key], [prompt[i * CHUNK:(i + 1) * CHUNK]]) for i, key in enumerate(keys)}
    return {i: chunks[0] for i, chunks in found.items() if chunks}


def assert_right_or_absent(h: Harness, prompt: list[int], indices) -> None:
    chunks = stored_chunks(h, prompt)
    for i in indices:
        if i in chunks:
            assert torch.equal(chunks[i], canonical(prompt, i * CHUNK, (i + 1) * CHUNK)), f"chunk {i} holds wrong KV"


def test_neighbour_sharing_a_failed_load_saves_no_wrong_kv(model_dir, tmp_path):
    """B reuses A's blocks in the step whose load of them fails: B's chunks are never saved wrong.

    A (100 tokens) loads [0, 96) with chunk 1 corrupt; B = A[:96] + 64 tokens
    hits A's blocks in vLLM's prefix cache in the same step and computes
    [96, 160) over the unloaded blocks. After vLLM's rollback and recompute,
    every chunk of both prompts is in the store with the clean KV.
    """
    disk = tmp_path / "kv"
    a_prompt = random_prompt(100, seed=3)
    stored_prompt_with_corrupt_chunk(model_dir, disk, a_prompt, bad_index=1)
    b_prompt = a_prompt[:96] + random_prompt(64, seed=9)

    h = Harness(model_dir, store_extra(disk))
    a, b = h.add(a_prompt), h.add(b_prompt)
    out = h.step()
    assert [(s.req_id, s.start, s.end) for s in out.kv_connector_metadata.loads] == [(a.request_id, 0, 96)]
    assert h.block_ids[b.request_id][:6] == h.block_ids[a.request_id][:6]  # B shares A's blocks
    assert h.outputs[-1][1] == set(h.block_ids[a.request_id][2:6])  # blocks of [32, 96) failed
    assert_right_or_absent(h, b_prompt, range(5))

    h.run()
    assert torch.equal(h.slots(a, 0, 100), token_kv(a_prompt, 0, 100))
    assert torch.equal(h.slots(b, 0, 160), token_kv(b_prompt, 0, 160))
    for prompt, num_chunks in ((a_prompt, 3), (b_prompt, 5)):
        chunks = stored_chunks(h, prompt)
        assert sorted(chunks) == list(range(num_chunks))
        for i, chunk in chunks.items():
            assert torch.equal(chunk, canonical(prompt, i * CHUNK, (i + 1) * CHUNK)), f"chunk {i}"
    h.shutdown()


def test_failed_request_resaves_its_chunks_after_recompute(model_dir, tmp_path):
    """A alone, chunk 1 corrupt: rolled back to 32, it recomputes and saves chunk 1 again, right."""
    disk = tmp_path / "kv"
    prompt = random_prompt(100, seed=4)
    keys = stored_prompt_with_corrupt_chunk(model_dir, disk, prompt, bad_index=1)
    h = Harness(model_dir, store_extra(disk))
    h.add(prompt)
    h.run()
    saves = [(s.start, s.end) for out, _ in h.outputs for s in out.kv_connector_metadata.saves]
    assert saves == [(32, 96)]  # planned in the step after the rollback
    assert h.store.lookup(keys).num_hits == 3
    assert torch.equal(stored_chunks(h, prompt)[1], canonical(prompt, CHUNK, 2 * CHUNK))
    h.shutdown()


def test_save_skips_only_chunks_that_attend_to_a_poisoned_block(tmp_path):
    """A block that failed to load in this step poisons every request's chunks ending at or after it.

    Request "a" loads [0, 64) but the store holds only chunk 0, so its blocks
    2-3 stay unloaded. Request "b" has them at the same places in its block
    table: its chunk [0, 32) (blocks 6-7) is saved, its chunk [32, 64) is not.
    (The worker judges by block positions alone; b's tokens differ so that
    its chunk 0 is not already stored.)
    """
    config = cache_config_from(store_extra())
    layers = {f"model.layers.{i}.self_attn.attn": torch.randn(8, 2, BLOCK, 128) for i in range(2)}
    a_prompt = random_prompt(64, seed=11)
    b_prompt = random_prompt(64, seed=12)
    w = WorkerSide(config, "tiny", block_size=BLOCK, tp_rank=0, tp_size=1)
    w.register(layers, backends=set())
    w.save(LMCacheSGLMetadata(saves=[TransferSpec("seed", a_prompt[:32], 0, 32, [0, 1])]))
    step = LMCacheSGLMetadata(loads=[TransferSpec("a", a_prompt, 0, 64, [4, 5, 2, 3])],
                              saves=[TransferSpec("b", b_prompt, 0, 64, [6, 7, 2, 3])])
    w.load(step)
    w.save(step)
    assert w.take_load_errors() == {2, 3}
    keys = prefix_keys(w.fingerprint, b_prompt, CHUNK)
    assert [w.store.contains(k) is not None for k in keys] == [True, False]
    # the next step has no failed loads: the same save goes through
    w.save(LMCacheSGLMetadata(saves=[TransferSpec("b", b_prompt, 32, 64, [6, 7, 2, 3])]))
    assert w.store.contains(keys[1]) is not None
    w.close()


@pytest.mark.parametrize("policy,warns", [("fail", True), ("recompute", False)])
def test_warns_at_start_when_failed_loads_fail_requests(model_dir, caplog, policy, warns):
    """With kv_load_failure_policy "fail", a corrupt chunk ends a request with an error: say so at start."""
    with caplog.at_level(logging.WARNING, logger="lmcache_sgl"):
        h = Harness(model_dir, store_extra(), policy=policy)
    h.shutdown()
    assert ('"kv_load_failure_policy": "recompute"' in caplog.text) == warns
