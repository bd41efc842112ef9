"""Shared fixtures: a small model fingerprint, its chunk layout, random chunks.

Also ``require`` / ``require_binary`` (and the ``requires_binary(name)`` mark for
single tests): a test's dependencies. Locally a missing one skips; under
``CI=true`` it is an error, so a broken venv can never give a green run.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import time
from types import ModuleType

import pytest
import torch

from lmcache_sgl import CacheConfig, ChunkLayout, ModelFingerprint, prefix_keys

CHUNK = 16


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def require(module: str, reason: str | None = None) -> ModuleType:
    """Import ``module`` for a test module: skip without it, but fail under CI=true."""
    if not in_ci():
        return pytest.importorskip(module, reason=reason)
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"CI=true and the test dependency {module!r} cannot be imported: {e}", pytrace=False)


def require_binary(name: str) -> str:
    """The path of executable ``name`` on PATH: skip the module without it, but fail under CI=true."""
    path = shutil.which(name)
    if path is None:
        _missing(f"{name!r} is not on PATH")
    return path


def _missing(what: str) -> None:
    if in_ci():
        pytest.fail(f"CI=true and the test dependency {what}", pytrace=False)
    pytest.skip(what, allow_module_level=True)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "requires_binary(name): needs executable `name` on PATH; "
                                       "skipped without it, failed under CI=true")


def pytest_runtest_setup(item) -> None:
    for mark in item.iter_markers("requires_binary"):
        require_binary(mark.args[0])


@pytest.fixture
def fingerprint() -> ModelFingerprint:
    return ModelFingerprint("tiny-test", "bfloat16", num_layers=2, num_kv_heads=2, head_dim=16)


@pytest.fixture
def layout(fingerprint) -> ChunkLayout:
    return ChunkLayout(fingerprint, CHUNK)


def random_chunk(layout: ChunkLayout, num_tokens: int | None = None, seed: int = 0) -> torch.Tensor:
    """A chunk of random normal values (never all zeros)."""
    gen = torch.Generator().manual_seed(seed)
    shape = layout.shape(num_tokens or layout.chunk_size)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(layout.dtype)


def prompt_chunks(layout: ChunkLayout, num_chunks: int, seed: int = 0):
    """(keys, token ids per chunk, chunk tensors) of a random prompt."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50_000, (num_chunks * layout.chunk_size,), generator=gen).tolist()
    keys = prefix_keys(layout.fingerprint, tokens, layout.chunk_size)
    per_chunk = [tokens[i * layout.chunk_size:(i + 1) * layout.chunk_size] for i in range(num_chunks)]
    kvs = [random_chunk(layout, seed=seed * 1000 + i) for i in range(num_chunks)]
    return keys, per_chunk, kvs


def store_config(layout: ChunkLayout, host_chunks: int, disk_dir=None, disk_chunks: float = 0, **kw) -> CacheConfig:
    """A config whose host tier holds exactly ``host_chunks`` full chunks."""
    gib = float(1 << 30)
    return CacheConfig(chunk_size=layout.chunk_size, local_cpu=host_chunks > 0,
                       max_local_cpu_size=host_chunks * layout.chunk_bytes / gib,
                       local_disk=str(disk_dir) if disk_dir else None,
                       max_local_disk_size=disk_chunks * layout.chunk_bytes / gib, **kw)


def free_port() -> int:
    """A loopback TCP port nothing listens on (yet)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(port: int) -> subprocess.Popen:
    """A throwaway redis-server on 127.0.0.1:port (no persistence), answering PING when this returns."""
    import redis
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server did not answer on port {port}")


def run_in_processes(target, args_per_process: list[tuple], timeout_s: float = 120) -> list:
    """Run ``target(*args, out_queue)`` in one spawned process per args; return what each put, in any order."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, out)) for args in args_per_process]
    for p in procs:
        p.start()
    results = [out.get(timeout=timeout_s) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return results
