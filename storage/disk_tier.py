"""The disk tier: one file per chunk under ``<root>/<key[:2]>/<key>.kv``.

- Writes go to a unique temporary name in the same directory, are fsynced,
  then renamed over the final name (``os.replace`` is atomic), so a reader sees
  either no file or a whole one, also across processes sharing ``root``.
- The index (key -> size) is rebuilt by scanning ``root`` on start, oldest
  modification first, so a restarted process reuses the cache and keeps an
  approximate LRU order: a read hit refreshes the file's mtime.
- A file another process wrote after our scan is found on lookup (``exists``).
  A file another process evicted or removed is a plain miss, never an error.
- The budget is the directory's: every process keeps one count of the chunk
  bytes in ``<root>/.usage.lock`` (8 bytes, little endian), changed only under
  ``flock`` on that file. A write renames its file into place, then takes the
  lock, adds its size and evicts the coldest files until the count fits. So
  between a rename and its trim the directory holds at most one extra chunk
  per writing process; after every trim, it fits the budget.
- Victims come from this process's index, coldest first. Before trimming, when
  the last rescan is older than ``rescan_interval_s``, the index and the count
  are rebuilt from the directory itself (oldest mtime first, the one order all
  processes share; LFU counts restart). That brings in other processes' files
  and forgets files removed behind the count's back (``prune``, ``rm``, a
  crash). Opening a directory rescans it and trims it to the budget at once.
- Bad files are moved to ``<root>/quarantine/`` and are never served; so is anything
  under a chunk's name that is not a regular file (a FIFO, a device, a directory).
- Pinned keys (``pin``, the control API's) are never chosen as victims and
  ``clear`` keeps them, so pinned files may hold the directory over budget.
  Pins live in this process's memory: other processes and a restart do not see them.
- Private by default: what the tier creates (directories, chunk and temporary
  files, the usage file) is ``0700``/``0600``, or ``2770``/``0660`` owned by
  ``shared_group``; see ``file_modes.py``. An existing root keeps its mode (a
  warning names one that others can read).

Thread-safe: an internal lock guards the index; file I/O runs outside it.
Lock order: ``_dir_lock`` (this process's side of the flock), the flock, ``_lock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import stat
import struct
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from .chunk_file import CorruptChunk
from .eviction import make_policy
from .file_modes import create_file, exposure, file_modes, make_dir, make_dirs, open_or_create

log = logging.getLogger(__name__)

SUFFIX = ".kv"
QUARANTINE = "quarantine"
USAGE_FILE = ".usage.lock"  # flock'ed by every writer; holds the directory's chunk bytes
_USAGE = struct.Struct("<q")
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
        try:
            entries = list(sub.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed by another process meanwhile
        for f in entries:
            try:
                st = f.stat()
            except FileNotFoundError:
                continue  # removed by another process meanwhile
            if f.name.endswith(SUFFIX):
                yield ChunkFile(f.name[:-len(SUFFIX)], f, st.st_size, st.st_mtime)
            elif ".tmp." in f.name and time.time() - st.st_mtime > _STALE_TMP_SECONDS:
                f.unlink(missing_ok=True)


def _read_usage(fd: int) -> int | None:
    """The directory's chunk bytes from the usage file; None when missing or garbled."""
    raw = os.pread(fd, _USAGE.size, 0)
    if len(raw) != _USAGE.size:
        return None
    (total,) = _USAGE.unpack(raw)
    return total if total >= 0 else None


class DiskTier:
    def __init__(self, root: str | os.PathLike, budget_bytes: int, policy: str,
                 rescan_interval_s: float = 30.0, shared_group: str | int | None = None) -> None:
        if rescan_interval_s < 0:
            raise ValueError(f"rescan_interval_s={rescan_interval_s!r} is invalid; allowed: seconds >= 0")
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self.rescan_interval_s = rescan_interval_s
        self.modes = file_modes(shared_group)  # ValueError: unknown group
        self._lock = threading.Lock()
        self._dir_lock = threading.Lock()  # flock excludes processes, not the threads of one
        self._sizes: dict[str, int] = {}  # the files this process knows; a subset of the directory
        self._pinned: set[str] = set()  # never evicted by this process's trims
        self._policy_name = policy
        self._policy = make_policy(policy)
        self._last_rescan = -math.inf
        self.used_bytes = 0  # the directory's chunk bytes (all processes), as of the last count
        self.quarantined = 0
        self.evictions = 0
        self.write_errors = 0
        make_dirs(self.root, self.modes)  # OSError here: the caller disables the tier
        self._warn_if_exposed()
        with self._directory() as fd:
            self._trim_locked(fd, self._rescan_locked(), rescanned=True)
        log.info("disk tier %s: %d chunks, %.1f MiB", self.root, len(self._sizes), self.used_bytes / 2**20)

    def _warn_if_exposed(self) -> None:
        reason = exposure(self.root.stat(), self.modes.gid)
        if reason:
            log.warning("disk tier %s is readable beyond its owner (%s); cached prompts can be read from it. "
                        "See 'Privacy' in docs/operations.md", self.root, reason)

    def path(self, key: str) -> Path:
        return chunk_path(self.root, key)

    @contextmanager
    def _directory(self) -> Iterator[int]:
        """Hold the directory's lock, shared with every process; yields the usage file's descriptor."""
        with self._dir_lock:
            fd = open_or_create(self.root / USAGE_FILE, self.modes)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield fd
            finally:
                os.close(fd)  # releases the flock

    def _rescan_locked(self) -> int:
        """Rebuild the index from the directory, oldest mtime first. Returns the directory's bytes."""
        files = sorted(iter_chunk_files(self.root), key=lambda f: f.mtime)
        policy = make_policy(self._policy_name)
        sizes = {}
        for f in files:
            sizes[f.key] = f.size
            policy.add(f.key)
        with self._lock:
            self._sizes, self._policy = sizes, policy
        self._last_rescan = time.monotonic()
        return sum(sizes.values())

    def _set_usage_locked(self, fd: int, total: int) -> None:
        os.pwrite(fd, _USAGE.pack(max(total, 0)), 0)
        with self._lock:
            self.used_bytes = max(total, 0)

    def _add_usage_locked(self, fd: int, delta: int) -> int:
        """The count plus ``delta``; a rescan when the usage file is missing or garbled."""
        total = _read_usage(fd)
        return self._rescan_locked() if total is None else total + delta

    def _trim_locked(self, fd: int, total: int, rescanned: bool = False) -> None:
        """Evict the coldest files until the directory's ``total`` bytes fit; records the count."""
        if total > self.budget_bytes and not rescanned \
                and time.monotonic() - self._last_rescan >= self.rescan_interval_s:
            total, rescanned = self._rescan_locked(), True
        while total > self.budget_bytes:
            victim = self._pop_coldest()
            if victim is None:
                if rescanned:
                    break  # nothing left to evict
                total, rescanned = self._rescan_locked(), True
                continue
            freed = _unlink(self.path(victim))  # 0: gone already, and counted by whoever removed it
            total -= freed
            if freed:
                with self._lock:
                    self.evictions += 1
        self._set_usage_locked(fd, total)

    def _pop_coldest(self) -> str | None:
        with self._lock:
            key = next((k for k in self._policy.coldest() if k not in self._pinned), None)
            if key is not None:
                self._forget(key)
            return key

    def _account_write(self, key: str, size: int) -> None:
        """A file of ``size`` bytes was just renamed into place: count it and trim."""
        with self._lock:
            replaced = self._sizes.get(key, 0)  # 0 also when it replaced another process's file: over-counts
            self._add(key, size)
        try:
            with self._directory() as fd:
                self._trim_locked(fd, self._add_usage_locked(fd, size - replaced))
        except OSError as e:  # the file is stored; a later trim or rescan counts it
            log.warning("disk tier %s: cannot update the usage count: %s", self.root, e)

    def _free(self, remove_file: Callable[[], int]) -> None:
        """Run ``remove_file`` (idempotent; returns the bytes it freed) and uncount what it freed."""
        try:
            with self._directory() as fd:
                freed = remove_file()
                self._set_usage_locked(fd, self._add_usage_locked(fd, -freed))
                return
        except OSError as e:
            log.warning("disk tier %s: cannot update the usage count (%s); the next rescan corrects it", self.root, e)
        remove_file()

    def _add(self, key: str, size: int) -> None:
        self._sizes[key] = size
        self._policy.add(key)

    def _forget(self, key: str) -> None:
        if self._sizes.pop(key, None) is not None:
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
            make_dir(final.parent, self.modes)
            with os.fdopen(create_file(tmp, self.modes), "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as e:
            with contextlib.suppress(OSError):  # e.g. NotADirectoryError: a file sits where final.parent belongs
                tmp.unlink(missing_ok=True)
            with self._lock:
                self.write_errors += 1
            log.warning("disk tier: cannot write %s: %s", final, e)
            return False
        self._account_write(key, len(blob))
        return True

    def read(self, key: str, max_bytes: int | None = None) -> bytes | None:
        """The blob, or None when the file is gone or unreadable.

        Raises ``CorruptChunk`` for a file longer than ``max_bytes`` (nothing
        valid is that long) or one that is not a regular file (a FIFO, a
        device, a directory), without reading it.
        """
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO must not wait for a writer
            try:
                blob = _read_regular(fd, max_bytes)
            finally:
                os.close(fd)
        except FileNotFoundError:
            with self._lock:
                self._forget(key)
            return None
        except OSError as e:
            log.warning("disk tier: cannot read %s: %s", path, e)
            return None
        with contextlib.suppress(OSError):  # e.g. a read-only mount: the blob is still good
            os.utime(path)  # LRU order survives restarts
        with self._lock:
            self._policy.touch(key)
        return blob

    def quarantine(self, key: str, reason: str) -> None:
        """Move a bad file out of the cache so it is never read again."""
        path = self.path(key)
        dest = self.root / QUARANTINE / f"{key}.{os.getpid()}.{time.time_ns()}{SUFFIX}"
        with self._lock:
            self._forget(key)
            self.quarantined += 1

        def move_out() -> int:
            try:
                size = path.stat().st_size
                make_dir(dest.parent, self.modes)
                os.replace(path, dest)
                return size
            except FileNotFoundError:
                return 0
            except OSError as e:
                log.warning("disk tier: cannot quarantine %s (%s); deleting it", path, e)
                return _unlink(path)

        self._free(move_out)
        log.warning("disk tier: quarantined %s: %s", path.name, reason)

    def remove(self, key: str) -> None:
        with self._lock:
            self._forget(key)
        self._free(lambda: _unlink(self.path(key)))

    def pin(self, key: str) -> bool:
        """Keep ``key``'s file out of eviction and ``clear``; False when no file holds it."""
        if not self.contains(key):
            return False
        with self._lock:
            self._pinned.add(key)
        return True

    def unpin(self, key: str) -> None:
        with self._lock:
            self._pinned.discard(key)

    def clear(self) -> None:
        """Remove every file this process knows, except pinned ones."""
        with self._lock:
            keys = [k for k in self._sizes if k not in self._pinned]
        for key in keys:
            self.remove(key)


@contextlib.contextmanager
def open_regular(path: str | os.PathLike):
    """A binary file object for ``path``; CorruptChunk, before any read, unless it is a
    regular file. Opening never waits for a writer, so a FIFO planted under a chunk's
    name cannot hang the caller."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptChunk(f"not a regular file ({stat.filemode(st.st_mode)})")
        with open(fd, "rb", closefd=False) as f:
            yield f
    finally:
        os.close(fd)


def _read_regular(fd: int, max_bytes: int | None) -> bytes:
    """The whole file behind ``fd``; CorruptChunk, before any read, unless it is a regular
    file of at most ``max_bytes``. Reads at most the size it had when opened."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise CorruptChunk(f"not a regular file ({stat.filemode(st.st_mode)})")
    if max_bytes is not None and st.st_size > max_bytes:
        raise CorruptChunk(f"file is {st.st_size} bytes, more than any chunk of this layout ({max_bytes})")
    with open(fd, "rb", closefd=False) as f:
        return f.read(st.st_size)


def _unlink(path: Path) -> int:
    """Remove a file; the bytes freed, 0 when it was gone already or cannot be removed."""
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    except OSError as e:
        log.warning("disk tier: cannot remove %s: %s", path, e)
        return 0
    return size
