"""End to end: `python -m sglang.launch_server --enable-lmcache` on CPU, a tiny random Llama.

One scenario, run in order on real servers (they take about a minute each to
start on two cores, so the module shares them):

  phase 1  server L1 (our tiers; 1024-token device pool, a 30-chunk host tier, a disk dir;
           save_policy write_through: each prefill's chunks also go to the host tier)
           A: device hits; traffic evicts A; B (A's prefix): host hits;
           a flood overflows the host; B: disk hits; /flush_cache persists the rest
  phase 2  perturb prompt C's chunk files (valid checksums), corrupt prompt D's
  phase 3  server L2 on the same dir: B gets disk hits after a restart, D is a
           logged miss, C loads the perturbed KV
  phase 4  server S0 without the extension: the same requests give the same
           greedy tokens as L1/L2, except C (the negative control)

Cached-token counts per tier come from SGLang's own `meta_info`
(`cached_tokens_details`: device / host / storage, where storage is our disk).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import requests
import torch

from conftest import require

require("sglang")

from lmcache_sgl.adapters.sglang.local_server import LocalServer  # noqa: E402
from lmcache_sgl.models import build_tiny_llama  # noqa: E402
from lmcache_sgl.storage.chunk_file import decode_chunk, encode_chunk, read_header  # noqa: E402
from lmcache_sgl.storage.disk_tier import iter_chunk_files  # noqa: E402

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

CHUNK = 64  # tokens per chunk; a multiple of --page-size 16
PREFIX = 512  # 8 chunks
CHUNK_BYTES = 2 * 2 * CHUNK * 2 * 16 * 4  # layers * K/V * tokens * kv heads * head dim * fp32
HOST_CHUNKS = 30  # holds A (8 chunks) and the 18 written through by the first traffic


class Server(LocalServer):
    """The tests' server: greedy /generate on token ids, with per-tier cached tokens."""

    def generate(self, ids: list[int], max_new_tokens: int = 8) -> dict:
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}}
        r = requests.post(self.url("/generate"), json=body, timeout=120)
        r.raise_for_status()
        out = r.json()
        meta = out["meta_info"]
        details = meta.get("cached_tokens_details") or {}
        return {"tokens": out["output_ids"], "cached": meta["cached_tokens"],
                "device": details.get("device", meta["cached_tokens"]), "host": details.get("host", 0),
                "disk": details.get("storage", 0)}


def prompt(seed: int, n: int) -> list[int]:
    rnd = random.Random(seed)
    return [rnd.randrange(3, 500) for _ in range(n)]


A = prompt(1, PREFIX)
C = prompt(2, PREFIX)  # negative control: its chunk files get perturbed
D = prompt(3, PREFIX)  # its chunk files get corrupted
OTHERS = [prompt(100 + i, 400) for i in range(12)]  # 6 full chunks each; no shared prefix


def traffic(server: Server, others) -> None:
    for ids in others:
        server.generate(ids, max_new_tokens=1)


def lmcache_args(tmp: Path, disk: Path, host_gib: float = (HOST_CHUNKS + 0.5) * CHUNK_BYTES / 2**30
                 ) -> tuple[list[str], dict]:
    cfg = tmp / "lmcache.yaml"
    cfg.write_text(f"chunk_size: {CHUNK}\nlocal_cpu: true\nmax_local_cpu_size: {host_gib!r}\n"
                   f"local_disk: {disk}\nmax_local_disk_size: 1\n"
                   "prefetch_policy: wait_complete\n")  # exact tier counts: never a timed-out partial hit
    return ["--enable-lmcache", "--lmcache-config-file", str(cfg)], {}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sglang-e2e")


@pytest.fixture(scope="module")
def results(model, workdir) -> dict:
    """Run phases 1-3 once; every test reads the recorded responses."""
    disk = workdir / "disk"
    args, env = lmcache_args(workdir, disk)
    out: dict = {}
    l1 = Server(model, workdir / "l1.log", args, env)
    try:
        out["A"] = l1.generate(A + [7, 8, 9])
        out["A_again"] = l1.generate(A + [10, 11, 12])
        traffic(l1, OTHERS[:3])  # 1200 tokens: A leaves the 1024-token device pool for the host tier
        out["B_host"] = l1.generate(A + [13, 14, 15])
        l1.generate(C + [7, 8, 9])
        l1.generate(D + [7, 8, 9])
        traffic(l1, OTHERS[3:])  # 54 chunks through a 30-chunk host tier: A, C, D go down to disk
        out["B_disk"] = l1.generate(A + [13, 14, 15])
        l1.flush()  # device tree dropped; host chunks written down
        out["l1_log"] = l1.log_tail(200_000)
    finally:
        l1.stop()
    out["perturbed"] = rewrite_chunks(disk, C[:PREFIX], perturb=True)
    out["corrupted"] = rewrite_chunks(disk, D[:PREFIX], perturb=False)
    l2 = Server(model, workdir / "l2.log", args, env)
    try:
        out["B_restart"] = l2.generate(A + [13, 14, 15])
        out["C"] = l2.generate(C + [7, 8, 9], max_new_tokens=16)
        out["D"] = l2.generate(D + [7, 8, 9])
        out["after_bad"] = l2.generate(A + [16, 17, 18])
        out["l2_log"] = l2.log_tail(200_000)
    finally:
        l2.stop()
    out["quarantined"] = sorted(p.name for p in (disk / "quarantine").glob("*"))  # empty if the dir is absent
    return out


@pytest.fixture(scope="module")
def baseline(model, workdir) -> dict:
    """The same requests on a server without the extension."""
    s0 = Server(model, workdir / "s0.log")
    try:
        out = {"A": s0.generate(A + [7, 8, 9]), "A_again": s0.generate(A + [10, 11, 12])}
        traffic(s0, OTHERS[:3])
        out["B"] = s0.generate(A + [13, 14, 15])
        s0.generate(C + [7, 8, 9])
        s0.generate(D + [7, 8, 9])
        out["C"] = s0.generate(C + [7, 8, 9], max_new_tokens=16)
        out["D"] = s0.generate(D + [7, 8, 9])
        out["A_tail"] = s0.generate(A + [16, 17, 18])
    finally:
        s0.stop()
    return out


def rewrite_chunks(disk: Path, tokens: list[int], perturb: bool) -> int:
    """Perturb (valid checksum) or corrupt (bad payload) the chunk files holding ``tokens``' chunks."""
    wanted = {bytes(torch.tensor(tokens[i:i + CHUNK], dtype=torch.int32).numpy().astype("<i4").tobytes())
              for i in range(0, len(tokens), CHUNK)}
    done = 0
    for f in iter_chunk_files(disk):
        blob = f.path.read_bytes()
        header, _ = read_header(blob)
        if header.token_ids not in wanted:
            continue
        if perturb:
            _, kv = decode_chunk(blob, key=header.key)
            noisy = kv + 3.0 * torch.randn(kv.shape, generator=torch.Generator().manual_seed(done))
            blob = encode_chunk(header.key, header.fingerprint, header.token_ids, noisy.to(kv.dtype),
                                codec=header.codec, byte_shuffle=header.shuffle > 1, start_pos=header.start_pos)
        else:
            blob = blob[:-64] + bytes(64)  # payload garbled; the header still parses
        f.path.write_bytes(blob)
        done += 1
    return done


def test_device_hits_before_eviction(results):
    """A second request on A's prefix is served from the device pool."""
    assert results["A"]["cached"] == 0
    assert (results["A_again"]["device"], results["A_again"]["host"], results["A_again"]["disk"]) == (PREFIX, 0, 0)


def test_evicted_prefix_comes_back_from_host(results):
    """After other traffic evicts A from the device, B (A's prefix) loads all of it from the host tier."""
    b = results["B_host"]
    assert (b["cached"], b["device"], b["host"], b["disk"]) == (PREFIX, 0, PREFIX, 0)


def test_host_overflow_goes_to_disk(results):
    """Once the host tier overflows, A's chunks are on disk and B loads them from there."""
    b = results["B_disk"]
    assert (b["cached"], b["device"], b["host"], b["disk"]) == (PREFIX, 0, 0, PREFIX)


def test_restart_finds_prefix_on_disk(results):
    """A new server on the same directory finds A's prefix through its chained keys alone."""
    b = results["B_restart"]
    assert (b["cached"], b["device"], b["host"], b["disk"]) == (PREFIX, 0, 0, PREFIX)


def test_greedy_output_equals_server_without_extension(results, baseline):
    """Tokens from device, host, disk and restart loads equal a stock server's, in fp32."""
    assert results["A"]["tokens"] == baseline["A"]["tokens"]
    assert results["A_again"]["tokens"] == baseline["A_again"]["tokens"]
    for name in ("B_host", "B_disk", "B_restart"):
        assert results[name]["tokens"] == baseline["B"]["tokens"], name
    assert results["D"]["tokens"] == baseline["D"]["tokens"]
    assert results["after_bad"]["tokens"] == baseline["A_tail"]["tokens"]


def test_negative_control_perturbed_chunks_change_the_output(results, baseline):
    """The equivalence check can fail: KV perturbed on disk (valid checksums) is loaded and changes the tokens."""
    assert results["perturbed"] == PREFIX // CHUNK
    assert results["C"]["disk"] == PREFIX
    assert results["C"]["tokens"] != baseline["C"]["tokens"]


def test_corrupt_chunk_is_a_logged_miss(results):
    """D's garbled chunk files are quarantined; D is prefilled and the server keeps serving."""
    assert results["corrupted"] == PREFIX // CHUNK
    assert (results["D"]["host"], results["D"]["disk"]) == (0, 0)
    assert results["quarantined"], "the corrupt file was not moved to quarantine/"
    assert results["after_bad"]["cached"] == PREFIX


def test_unreadable_cache_dir_keeps_serving(model, workdir):
    """A disk directory that cannot be created disables the disk tier; the host tier still serves."""
    blocker = workdir / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    (workdir / "bad").mkdir()
    args, env = lmcache_args(workdir / "bad", blocker / "cache")
    server = Server(model, workdir / "bad.log", args, env)
    try:
        server.generate(A + [7, 8, 9])
        traffic(server, OTHERS[:3])
        again = server.generate(A + [13, 14, 15])
        log = server.log_tail(200_000)
    finally:
        server.stop()
    assert (again["cached"], again["host"]) == (PREFIX, PREFIX)
    assert "disk tier disabled" in log


# ---- a real trained model: SmolLM2-135M-Instruct, natural multi-turn chat ----

QUESTIONS = ("Summarize the text above in one sentence.", "Which statement does it describe first?")


@pytest.fixture(scope="module")
def smollm2() -> Path:
    # About 5-10 min on two cores (two servers, 30 fp32 layers): opt in.
    if os.environ.get("LMCACHE_SGL_SMOLLM2_E2E") != "1":
        pytest.skip("set LMCACHE_SGL_SMOLLM2_E2E=1 to run the SmolLM2 chat test (5-10 min on 2 cores)")
    from lmcache_sgl.models import ensure_smollm2

    try:
        return ensure_smollm2()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"SmolLM2 is not available: {e}")


def chat_session(server: Server, model_dir: Path) -> list[dict]:
    """Three users share nothing but the format; user 0 comes back for a second turn after the others."""
    from transformers import AutoTokenizer

    from lmcache_sgl.models import sample_text

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = sample_text(6000)
    systems = [text[i * 2000:(i + 1) * 2000] for i in range(3)]  # about 450 tokens each

    def ask(messages):
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                         add_special_tokens=False)
        out = server.generate(ids, max_new_tokens=16)
        out["text"] = tok.decode(out["tokens"], skip_special_tokens=True)
        return out

    first = [ask([{"role": "system", "content": s}, {"role": "user", "content": QUESTIONS[0]}]) for s in systems]
    history = [{"role": "system", "content": systems[0]}, {"role": "user", "content": QUESTIONS[0]},
               {"role": "assistant", "content": first[0]["text"]}, {"role": "user", "content": QUESTIONS[1]}]
    return first + [ask(history)]


def test_smollm2_chat_reuses_evicted_history_with_identical_answers(smollm2, workdir):
    """Natural chat on a trained model: the returning user's history comes back from the host tier,
    and every greedy answer equals a stock server's."""
    (workdir / "smol").mkdir()
    args, env = lmcache_args(workdir / "smol", workdir / "smol" / "disk", host_gib=0.5)
    ours = Server(smollm2, workdir / "smol-l.log", args, env, pool_tokens=1024)
    try:
        with_ext = chat_session(ours, smollm2)
    finally:
        ours.stop()
    stock = Server(smollm2, workdir / "smol-s0.log", pool_tokens=1024)
    try:
        without = chat_session(stock, smollm2)
    finally:
        stock.stop()
    returning = with_ext[-1]
    assert returning["host"] >= 6 * CHUNK, returning
    assert returning["cached"] == returning["device"] + returning["host"] + returning["disk"]
    assert [r["text"] for r in with_ext] == [r["text"] for r in without]
    assert all(r["text"].strip() for r in with_ext)
