"""A CPU `python -m sglang.launch_server` on loopback, for the demo, the benchmarks and the tests.

The server runs in its own process group (launcher, scheduler, detokenizer);
``stop()`` kills the whole group, so no scheduler is left spinning. Engine-side
callers add their own request helpers (``generate``) in a subclass.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

START_TIMEOUT_S = 600  # a cold start on 2 busy cores took up to ~90 s; leave a wide margin
_STUB_DIR = Path(__file__).resolve().parents[3] / "scripts" / "cpu_stubs"  # torchvision stand-in (checkout only)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """Start the server with the CPU flags plus ``extra_args``; the constructor returns once /health answers."""

    def __init__(self, model: Path, log: Path, extra_args=(), env: dict[str, str] | None = None,
                 port: int | None = None, pool_tokens: int = 1024) -> None:
        """``env`` adds variables to the server's environment (e.g. LMCACHE_* keys)."""
        self.port = port or free_port()
        self.log_path = log
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--device", "cpu",
               "--attention-backend", "torch_native", "--skip-server-warmup", "--max-total-tokens", str(pool_tokens),
               "--page-size", "16", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(self.port),
               "--random-seed", "0", *extra_args]
        full_env = {**os.environ, **(env or {})}
        if _STUB_DIR.is_dir():
            full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_STUB_DIR), full_env.get("PYTHONPATH")]))
        self._log = open(log, "w")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url("/health"), timeout=2).status_code == 200:
                    return
            except requests.RequestException:  # not listening yet, or too busy starting to answer
                pass
            time.sleep(1)
        raise RuntimeError(f"server not ready after {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def flush(self, wait_s: float = 10.0) -> None:
        """``/flush_cache``: drop the device tree; the tiered store writes its host chunks to disk.

        SGLang answers 400 while a request is still finishing (its last step may trail the
        response): retried for up to ``wait_s``, then the 400 is raised.
        """
        deadline = time.monotonic() + wait_s
        while True:
            r = requests.post(self.url("/flush_cache"), timeout=120)
            if r.status_code != 400 or time.monotonic() > deadline:
                r.raise_for_status()
                return
            time.sleep(0.25)

    def log_tail(self, n: int = 4000) -> str:
        try:
            self._log.flush()
            return self.log_path.read_text()[-n:]
        except (OSError, ValueError):
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 15)
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(30)
            except ProcessLookupError:
                pass
        try:  # children can outlive the launcher
            os.killpg(self.proc.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass
        if not self._log.closed:
            self._log.close()
