"""A counted fault campaign against the store (issue #13): what we tried, what happened.

Every case checks every hit's tensor against the bytes stored for its key
(``Reference`` rebuilds them from the key's index), so "wrong KV" counts a hit
that differs from what was stored; it must be 0. Cases:

  kill9        kill -9 of a writing process at random points, then a fresh store on its directory
  corrupt      corrupted, truncated, swapped, foreign and garbage chunk files: all misses, all quarantined
  full_disk    the disk tier on a small tmpfs: writes fail and are counted, the host tier keeps serving
  processes    4 processes on one directory doing random put/get/prune: no errors, within budget at the end
  fuzz         mutated headers and files through the decoder: no crash, no hang, bounded allocation
  redis        a real redis-server killed and made slow (DEBUG SLEEP): bounded misses, then used again
  host_budget  a long random workload: the host tier never exceeds its budget at any step

    python scripts/fault_campaign.py [--quick] [--json] [--cases kill9,fuzz] [--seed N]

Exit status 1 when a case fails (wrong KV, an error, a broken bound); a case that
cannot run here (no tmpfs mount, no redis-server) is skipped with its reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmcache_sgl import CacheConfig, ChunkLayout, ModelFingerprint, TieredStore  # noqa: E402
from lmcache_sgl.storage.disk_tier import iter_chunk_files  # noqa: E402

CHUNK = 16
GIB = float(1 << 30)
FP = ModelFingerprint("fault-campaign", "bfloat16", num_layers=2, num_kv_heads=2, head_dim=16)
LAYOUT = ChunkLayout(FP, CHUNK)


@dataclass
class CaseResult:
    case: str
    tries: int = 0
    outcomes: Counter = field(default_factory=Counter)
    wrong_kv: int = 0
    failures: list[str] = field(default_factory=list)  # broken invariants, each a sentence
    skipped: str | None = None  # why the case could not run here
    seconds: float = 0.0

    @property
    def status(self) -> str:
        if self.skipped:
            return "skipped"
        return "ok" if not self.failures and not self.wrong_kv else "FAIL"

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["outcomes"], d["status"] = dict(self.outcomes), self.status
        return d


class Reference:
    """The bytes stored for each key: key i holds a seeded random chunk (every 7th is partial)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._kv: dict[int, torch.Tensor] = {}

    @staticmethod
    def key(i: int) -> str:
        return hashlib.sha256(f"fault-campaign-{i}".encode()).hexdigest()[:32]

    @staticmethod
    def num_tokens(i: int) -> int:
        return CHUNK if i % 7 else 5

    def tokens(self, i: int) -> list[int]:
        return [(i * 7919 + t) % 50_000 for t in range(self.num_tokens(i))]

    def kv(self, i: int) -> torch.Tensor:
        if i not in self._kv:
            gen = torch.Generator().manual_seed(1_000 + i)
            shape = LAYOUT.shape(self.num_tokens(i))  # [L, P, T, H, D]
            self._kv[i] = torch.randn(shape, generator=gen).to(LAYOUT.dtype)
        return self._kv[i]

    def put(self, store: TieredStore, i: int) -> bool:
        return store.put(self.key(i), self.tokens(i), self.kv(i))

    def put_all(self, store: TieredStore, indices) -> None:
        """Store every chunk, waiting for the write queue when it is full."""
        for i in indices:
            while not self.put(store, i):
                store.flush_pending()

    def get(self, store: TieredStore, i: int, res: CaseResult) -> bool:
        """One checked get: True on a correct hit, False on a miss; a wrong hit is counted."""
        got = store.get([self.key(i)], [self.tokens(i)])
        if not got:
            return False
        return self.verify(got[0], i, res)

    def verify(self, kv: torch.Tensor, i: int, res: CaseResult) -> bool:
        if kv.shape == self.kv(i).shape and torch.equal(kv.view(torch.uint8), self.kv(i).view(torch.uint8)):
            return True
        res.wrong_kv += 1
        return False


def config(root: str | None = None, host_chunks: int = 0, disk_chunks: int = 0, **kw) -> CacheConfig:
    return CacheConfig(chunk_size=CHUNK, local_cpu=host_chunks > 0,
                       max_local_cpu_size=host_chunks * LAYOUT.chunk_bytes / GIB, local_disk=root,
                       max_local_disk_size=disk_chunks * LAYOUT.chunk_bytes / GIB, load_policy="always", **kw)


def chunk_bytes_on_disk(root: Path) -> int:
    return sum(f.size for f in iter_chunk_files(root))


# ---- kill -9 of a writer ----------------------------------------------------

KILL_POOL = 96  # keys the killed writers draw from; the directory outlives every trial


def _writer_child(root: str, seed: int, ready_fd: int, ref: Reference) -> None:
    """Runs in a forked child until killed: random puts and flushes into ``root``."""
    rng = random.Random(seed)
    store = TieredStore(config(root, host_chunks=4, disk_chunks=48, max_pending_writes=8), LAYOUT)
    os.write(ready_fd, b"r")
    while True:
        ref.put(store, rng.randrange(KILL_POOL))
        if rng.random() < 0.05:
            store.flush()


def _fork_and_kill(root: str, rng: random.Random, ref: Reference) -> str:
    """Fork a writer, kill -9 it after a random delay (sometimes before it is ready); its state then."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        try:
            os.close(ready_r)
            _writer_child(root, rng.randrange(2**31), ready_w, ref)
        finally:
            os._exit(3)
    os.close(ready_w)
    early = rng.random() < 0.2  # kill during start-up: rescan, trim, usage file
    ready, _, _ = select.select([ready_r], [], [], 0 if early else 60)
    time.sleep(rng.uniform(0.0, 0.05) if early else rng.uniform(0.01, 0.5))
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(ready_r)
    if not os.WIFSIGNALED(status):
        return "writer exited by itself"
    return "killed while writing" if ready else "killed while starting"


def case_kill9(quick: bool, rng: random.Random) -> CaseResult:
    res, ref = CaseResult("kill9"), Reference(KILL_POOL)
    for i in range(KILL_POOL):
        ref.kv(i)  # the forked children copy these instead of generating tensors
    with tempfile.TemporaryDirectory() as root:
        for _ in range(20 if quick else 200):
            res.tries += 1
            res.outcomes[_fork_and_kill(root, rng, ref)] += 1
            store = TieredStore(config(root, disk_chunks=48), LAYOUT)
            hits = sum(ref.get(store, i, res) for i in range(KILL_POOL))
            res.outcomes["hits verified"] += hits
            res.outcomes["quarantined"] += store.stats().disk_quarantined
            store.close()
            used = chunk_bytes_on_disk(Path(root))
            res.check(used <= 48 * LAYOUT.chunk_bytes, f"{used} chunk bytes on disk after a restart, over the budget")
        leftovers = [p for p in Path(root).rglob("*.tmp.*")]
        res.outcomes["temporary files left (ignored)"] = len(leftovers)
        res.check(res.outcomes["hits verified"] > 0, "no chunk survived any kill: the writers never wrote")
        res.check(res.outcomes["writer exited by itself"] == 0, "a writer exited before it was killed")
    return res


# ---- corrupted files ----------------------------------------------------------

def case_corrupt(quick: bool, rng: random.Random) -> CaseResult:
    from fault_files import corrupt_files  # scripts/fault_files.py
    res = CaseResult("corrupt")
    n = 400 if quick else 1000
    corrupt_files(res, Reference(n), config, LAYOUT, n, rng)
    return res


# ---- full disk ------------------------------------------------------------------

def _mount_tmpfs(path: str, size: str) -> str | None:
    """None when mounted, else why not."""
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot run mount: {e}"
    return None if done.returncode == 0 else f"mount -t tmpfs refused: {done.stderr.strip() or done.returncode}"


def case_full_disk(quick: bool, rng: random.Random) -> CaseResult:
    res, n, host = CaseResult("full_disk"), 120 if quick else 400, 16
    ref = Reference(n)
    mnt = tempfile.mkdtemp(prefix="lmcsgl-fulldisk-")
    why = _mount_tmpfs(mnt, "96k")  # about 20 chunk files; the disk budget (1000 chunks) never trims
    if why is not None:
        os.rmdir(mnt)
        res.skipped = why
        return res
    try:
        store = TieredStore(config(mnt, host_chunks=host, disk_chunks=1000, max_pending_writes=8), LAYOUT)
        accepted = []
        for i in range(n):
            res.tries += 1
            if ref.put(store, i):
                accepted.append(i)
            res.outcomes["puts accepted" if accepted[-1:] == [i] else "puts dropped (write queue full)"] += 1
            if accepted:
                recent = rng.choice(accepted[-host // 4:])  # still in the host tier: LRU evicts older ones first
                res.check(ref.get(store, recent, res), f"host tier did not serve chunk {recent} on a full disk")
        flushed = store.flush(timeout_s=10)
        res.check(not flushed.timed_out, "flush on a full disk did not return within 10 s")
        for i in range(n):
            res.outcomes["hits verified" if ref.get(store, i, res) else "misses"] += 1
        st = store.stats()
        store.close(timeout_s=10)
        res.outcomes.update(disk_write_errors=st.disk_write_errors, writes_abandoned=st.writes_abandoned)
        res.check(st.disk_write_errors > 0, "the disk never filled: no write failed")
        reopened = TieredStore(config(mnt, disk_chunks=1000), LAYOUT)
        res.outcomes["hits after reopen"] = sum(ref.get(reopened, i, res) for i in range(n))
        reopened.close()
    finally:
        subprocess.run(["umount", mnt], check=False)
        os.rmdir(mnt)
    return res


# ---- processes sharing a directory ------------------------------------------------

MIXED_POOL, MIXED_BUDGET = 160, 48  # keys, disk budget in chunks


def mixed_child(root: str, seed: int, seconds: float) -> dict:
    """Random put/get/prune on ``root`` for ``seconds``; what happened, as a dict."""
    from lmcache_sgl.cache_admin import prune
    rng, ref, res = random.Random(seed), Reference(MIXED_POOL), CaseResult("child")
    store = TieredStore(config(root, host_chunks=4, disk_chunks=MIXED_BUDGET, disk_rescan_interval_s=0.5), LAYOUT)
    deadline, errors = time.monotonic() + seconds, []
    while time.monotonic() < deadline:
        op, i = rng.random(), rng.randrange(MIXED_POOL)
        try:
            if op < 0.5:
                res.outcomes["puts"] += ref.put(store, i)
            elif op < 0.98:
                res.outcomes["hits verified" if ref.get(store, i, res) else "misses"] += 1
            else:
                prune(root, max_bytes=MIXED_BUDGET * LAYOUT.chunk_bytes // 2)
                res.outcomes["prunes"] += 1
        except Exception:  # every error is counted and reported, none may happen
            errors.append(traceback.format_exc(limit=3))
    store.close()
    return {"outcomes": dict(res.outcomes), "wrong_kv": res.wrong_kv, "errors": errors[:3], "num_errors": len(errors)}


def case_processes(quick: bool, rng: random.Random) -> CaseResult:
    res, seconds = CaseResult("processes"), 8.0 if quick else 60.0
    with tempfile.TemporaryDirectory() as root:
        procs = [subprocess.Popen([sys.executable, __file__, "--child-mixed", root, str(rng.randrange(2**31)),
                                   str(seconds)], stdout=subprocess.PIPE, text=True) for _ in range(4)]
        for p in procs:
            out, _ = p.communicate(timeout=seconds + 300)
            res.tries += 1
            res.check(p.returncode == 0, f"a process exited with {p.returncode}")
            if p.returncode != 0:
                continue
            child = json.loads(out.strip().splitlines()[-1])
            res.outcomes.update(child["outcomes"])
            res.outcomes["errors"] += child["num_errors"]
            res.wrong_kv += child["wrong_kv"]
            res.check(not child["errors"], f"errors: {child['errors']}")
        used, budget = chunk_bytes_on_disk(Path(root)), MIXED_BUDGET * LAYOUT.chunk_bytes
        res.outcomes["directory bytes at the end"] = used
        res.check(used <= budget, f"directory holds {used} chunk bytes, over its budget of {budget}")
        store, ref = TieredStore(config(root, disk_chunks=MIXED_BUDGET), LAYOUT), Reference(MIXED_POOL)
        res.outcomes["hits verified after"] = sum(ref.get(store, i, res) for i in range(MIXED_POOL))
        store.close()
    return res


# ---- decoder fuzzing ---------------------------------------------------------------

def case_fuzz(quick: bool, rng: random.Random) -> CaseResult:
    from fault_fuzz import fuzz_decoder  # scripts/fault_fuzz.py
    res = CaseResult("fuzz")
    fuzz_decoder(res, Reference(8), LAYOUT, 20_000 if quick else 200_000, rng)
    return res


# ---- Redis killed and slow ---------------------------------------------------------

def case_redis(quick: bool, rng: random.Random) -> CaseResult:
    from fault_redis import redis_faults  # scripts/fault_redis.py
    res = CaseResult("redis")
    if shutil.which("redis-server") is None:
        res.skipped = "redis-server is not on PATH"
        return res
    redis_faults(res, Reference(10**6), config, LAYOUT, quick)
    return res


# ---- host budget ---------------------------------------------------------------------

def case_host_budget(quick: bool, rng: random.Random) -> CaseResult:
    from fault_host import host_budget_workload  # scripts/fault_host.py
    res = CaseResult("host_budget")
    with tempfile.TemporaryDirectory() as root:
        host_budget_workload(res, Reference(64), config(root, host_chunks=8, disk_chunks=24, max_pending_writes=4),
                             LAYOUT, 5_000 if quick else 50_000, rng)
    return res


CASES: dict[str, Callable[[bool, random.Random], CaseResult]] = {
    "kill9": case_kill9, "corrupt": case_corrupt, "full_disk": case_full_disk, "processes": case_processes,
    "fuzz": case_fuzz, "redis": case_redis, "host_budget": case_host_budget,
}


def run_case(name: str, quick: bool, seed: int) -> CaseResult:
    start = time.monotonic()
    try:
        res = CASES[name](quick, random.Random(seed))
    except Exception:  # a crash of the case is its failure, and the campaign goes on
        res = CaseResult(name, failures=[f"crashed: {traceback.format_exc(limit=5)}"])
    res.seconds = round(time.monotonic() - start, 1)
    return res


def table(results: list[CaseResult]) -> str:
    rows = [("case", "tries", "outcomes", "wrong KV", "result", "s")]
    for r in results:
        outcomes = ", ".join(f"{k}: {v}" for k, v in r.outcomes.items())
        result = r.status + (f" ({r.skipped})" if r.skipped else "") + "".join(f"; {f}" for f in r.failures[:3])
        rows.append((r.case, str(r.tries), outcomes, str(r.wrong_kv), result, str(r.seconds)))
    return "\n".join("| " + " | ".join(row) + " |" for row in [rows[0], ("---",) * 6, *rows[1:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the shortened CI version (under ~2 minutes)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--verbose", action="store_true", help="show the store's log (warnings for every fault)")
    parser.add_argument("--child-mixed", nargs=3, metavar=("ROOT", "SEED", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_mixed:
        root, seed, seconds = args.child_mixed
        print(json.dumps(mixed_child(root, int(seed), float(seconds))))
        return 0
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.CRITICAL)
    names = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(names) - CASES.keys())
    if unknown:
        parser.error(f"unknown cases {unknown}; allowed: {', '.join(CASES)}")
    results = [run_case(name, args.quick, args.seed) for name in names]
    print(json.dumps([r.to_dict() for r in results], indent=1) if args.json else table(results))
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    torch.set_num_threads(1)  # forked writers must not inherit a busy OpenMP pool
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
