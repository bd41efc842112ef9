"""The disk tier: one file per chunk under ``<root>/<key[:2]>/<key>.kv``.

- Writes go to a unique temporary name in the same directory, are fsynced,
  then renamed over the final name (``os.replace`` is atomic), so a reader sees
  either no file or a whole one, also across processes sharing ``root``.
- The index (key -> size) is rebuilt by scanning ``root`` on start, oldest
  modification first, so a restarted process reuses the cache and keeps an
  approximate LRU order: a read hit refreshes the file's mtime.
- A file another process wrote after our scan is found on lookup (``exists``).
  A file another process evicted is a plain miss.
- The size budget counts the files this process knows; eviction removes the
  coldest. Processes sharing a directory each enforce it on their own view.
- Bad files are moved to ``<root>/quarantine/`` and are never served.

Thread-safe: an internal lock guards the index; file I/O runs outside it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator, NamedTuple

from .eviction import make_policy

log = logging.getLogger(__name__)

SUFFIX = ".kv"
QUARANTINE = "quarantine"
_STALE_TMP_SECONDS = 3600


class ChunkFile(NamedTuple):
    key: str
    path: Path
    size: int
    mtime: float  # last use


def chunk_path(root: Path, key: str) -> Path:
    return root / key[:2] / (key + SUFFIX)


def iter_chunk_files(root: Path) -> Iterator[ChunkFile]:
    """Every chunk file under ``root``; removes temporary files of writers that died."""
    for sub in root.iterdir():
        if not sub.is_dir() or sub.name == QUARANTINE or len(sub.name) != 2:
            continue
        for f in sub.iterdir():
            try:
                st = f.stat()
            except FileNotFoundError:
                continue  # removed by another process meanwhile
            if f.name.endswith(SUFFIX):
                yield ChunkFile(f.name[:-len(SUFFIX)], f, st.st_size, st.st_mtime)
            elif ".tmp." in f.name and time.time() - st.st_mtime > _STALE_TMP_SECONDS:
                f.unlink(missing_ok=True)


class DiskTier:
    def __init__(self, root: str | os.PathLike, budget_bytes: int, policy: str) -> None:
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._sizes: dict[str, int] = {}
        self._policy = make_policy(policy)
        self.used_bytes = 0
        self.quarantined = 0
        self.evictions = 0
        self.write_errors = 0
        self.root.mkdir(parents=True, exist_ok=True)  # OSError here: the caller disables the tier
        self._scan()

    def path(self, key: str) -> Path:
        return chunk_path(self.root, key)

    def _scan(self) -> None:
        for f in sorted(iter_chunk_files(self.root), key=lambda f: f.mtime):
            self._add(f.key, f.size)
        log.info("disk tier %s: %d chunks, %.1f MiB", self.root, len(self._sizes), self.used_bytes / 2**20)

    def _add(self, key: str, size: int) -> None:
        self.used_bytes += size - self._sizes.get(key, 0)
        self._sizes[key] = size
        self._policy.add(key)

    def _forget(self, key: str) -> None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self.used_bytes -= size
            self._policy.remove(key)

    def __len__(self) -> int:
        return len(self._sizes)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._sizes)

    def contains(self, key: str) -> bool:
        with self._lock:
            if key in self._sizes:
                return True
        try:
            size = self.path(key).stat().st_size
        except OSError:
            return False
        with self._lock:  # written by another process since our scan
            self._add(key, size)
        return True

    def write(self, key: str, blob: bytes) -> bool:
        """Store a blob atomically, evicting over budget. False (and logged) on I/O errors."""
        if len(blob) > self.budget_bytes:
            return False
        final = self.path(key)
        tmp = final.with_name(f"{final.name}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            final.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self.write_errors += 1
            log.warning("disk tier: cannot write %s: %s", final, e)
            return False
        with self._lock:
            self._add(key, len(blob))
            victims = self._over_budget()
        for victim in victims:
            self.path(victim).unlink(missing_ok=True)
        return True

    def _over_budget(self) -> list[str]:
        victims, excess = [], self.used_bytes - self.budget_bytes
        for key in self._policy.coldest():
            if excess <= 0:
                break
            victims.append(key)
            excess -= self._sizes[key]
        for key in victims:
            self._forget(key)
        self.evictions += len(victims)
        return victims

    def read(self, key: str) -> bytes | None:
        """The blob, or None when the file is gone or unreadable."""
        path = self.path(key)
        try:
            blob = path.read_bytes()
            os.utime(path)  # LRU order survives restarts
        except FileNotFoundError:
            with self._lock:
                self._forget(key)
            return None
        except OSError as e:
            log.warning("disk tier: cannot read %s: %s", path, e)
            return None
        with self._lock:
            self._policy.touch(key)
        return blob

    def quarantine(self, key: str, reason: str) -> None:
        """Move a bad file out of the cache so it is never read again."""
        path = self.path(key)
        dest = self.root / QUARANTINE / f"{key}.{os.getpid()}.{time.time_ns()}{SUFFIX}"
        try:
            dest.parent.mkdir(exist_ok=True)
            os.replace(path, dest)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("disk tier: cannot quarantine %s (%s); deleting it", path, e)
            path.unlink(missing_ok=True)
        with self._lock:
            self._forget(key)
            self.quarantined += 1
        log.warning("disk tier: quarantined %s: %s", path.name, reason)

    def remove(self, key: str) -> None:
        with self._lock:
            self._forget(key)
        self.path(key).unlink(missing_ok=True)

    def clear(self) -> None:
        for key in self.keys():
            self.remove(key)
