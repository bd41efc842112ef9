"""Offline operations on a cache directory: stats, inspect, verify, prune, export, import.

Engine-free; safe to run while servers use the directory (every change is an
atomic rename or unlink, which readers already treat as a miss).

What these tools create (archives, imported files, quarantine/) follows the disk
tier's rules: private, or shared with ``shared_group`` (``storage/file_modes.py``).
"""

from __future__ import annotations

import os
import re
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .storage.chunk_file import (MAX_RAW_BYTES, ChunkHeader, CorruptChunk, decode_chunk, max_blob_bytes,
                                  read_chunk, read_stream_header)
from .storage.disk_tier import QUARANTINE, DiskTier, chunk_path, iter_chunk_files, open_regular
from .storage.file_modes import create_file, exposure, file_modes

_KEY = re.compile(r"^[0-9a-f]{32}$")
AGE_BUCKETS = (("<1h", 3600), ("<1d", 86400), ("<7d", 7 * 86400), (">=7d", float("inf")))

Progress = Callable[[Iterable], Iterable]


def _no_progress(items: Iterable) -> Iterable:
    return items


def open_root(root: str | os.PathLike) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise ValueError(f"cache directory {str(path)!r} does not exist or is not a directory")
    return path


def read_file_header(path: Path) -> ChunkHeader:
    """Parse a chunk file's header, reading only the header. Raises CorruptChunk or OSError."""
    with open_regular(path) as f:
        return read_stream_header(f)[0]


def read_file_blob(path: Path) -> bytearray:
    """A chunk file's bytes, header first: a file over its header's bound is refused
    before the payload is read. Raises CorruptChunk or OSError."""
    with open_regular(path) as f:
        return read_chunk(f, os.fstat(f.fileno()).st_size)[1]


def model_label(fingerprint: dict) -> str:
    fp = fingerprint
    return (f"{fp.get('model_name')} {fp.get('kv_dtype')} L{fp.get('num_layers')} H{fp.get('num_kv_heads')}"
            f" D{fp.get('head_dim')} tp{fp.get('tp_rank')}/{fp.get('tp_size')}")


@dataclass
class CacheStats:
    entries: int = 0
    bytes: int = 0
    raw_bytes: int = 0
    unreadable: int = 0
    quarantined: int = 0
    models: dict[str, dict[str, int]] = field(default_factory=dict)  # label -> {"entries", "bytes"}
    age: dict[str, int] = field(default_factory=lambda: {name: 0 for name, _ in AGE_BUCKETS})  # since written
    idle: dict[str, int] = field(default_factory=lambda: {name: 0 for name, _ in AGE_BUCKETS})  # since last use

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes / self.bytes if self.bytes else 1.0


def _bucket(seconds: float) -> str:
    return next(name for name, limit in AGE_BUCKETS if seconds < limit)


def cache_stats(root: str | os.PathLike, progress: Progress = _no_progress) -> CacheStats:
    root = open_root(root)
    stats, now = CacheStats(), time.time()
    for f in progress(list(iter_chunk_files(root))):
        try:
            header = read_file_header(f.path)
        except (CorruptChunk, OSError):
            stats.unreadable += 1
            continue
        stats.entries += 1
        stats.bytes += f.size
        stats.raw_bytes += header.raw_len
        model = stats.models.setdefault(model_label(header.fingerprint), {"entries": 0, "bytes": 0})
        model["entries"] += 1
        model["bytes"] += f.size
        stats.age[_bucket(now - header.created)] += 1
        stats.idle[_bucket(now - f.mtime)] += 1
    quarantine = root / QUARANTINE
    stats.quarantined = len(list(quarantine.iterdir())) if quarantine.is_dir() else 0
    return stats


def inspect_entry(root: str | os.PathLike, key: str) -> dict:
    """One entry's header, as plain data (token ids as a list)."""
    if not _KEY.match(key):
        raise ValueError(f"key {key!r} is not 32 lowercase hex characters")
    path = chunk_path(open_root(root), key)
    if not path.exists():
        raise ValueError(f"no entry {key} in {root}")
    header = read_file_header(path)
    out = {name: getattr(header, name) for name in header.__slots__}
    out["token_ids"] = [int.from_bytes(header.token_ids[i:i + 4], "little", signed=True)
                        for i in range(0, len(header.token_ids), 4)]
    out["file_bytes"] = path.stat().st_size
    return out


@dataclass
class VerifyReport:
    checked: int
    bad: dict[str, str]  # key -> reason; each was moved to quarantine/
    exposed: dict[str, str] = field(default_factory=dict)  # path relative to the root -> who else can read it
    readable_by_others: bool = False  # any path in ``exposed``


def exposed_paths(root: str | os.PathLike, shared_group: str | int | None = None) -> dict[str, str]:
    """The directory, its subdirectories and files that anyone but the owner (and
    ``shared_group``, when the directory is meant to be shared) can access -> why."""
    root = open_root(root)
    gid = file_modes(shared_group).gid
    found = {}
    for path in _cache_paths(root):
        try:
            reason = exposure(path.stat(), gid)  # a link: what can be read through it
        except FileNotFoundError:
            continue  # removed meanwhile, or a dangling link
        if reason:
            found[str(path.relative_to(root)) if path != root else "."] = reason
    return found


def _cache_paths(root: Path) -> Iterable[Path]:
    """The root and everything up to two levels below it (``<xx>/<key>.kv``, ``quarantine/...``)."""
    yield root
    for sub in _listdir(root):
        yield sub
        if sub.is_dir() and not sub.is_symlink():
            yield from _listdir(sub)


def _listdir(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def verify(root: str | os.PathLike, threads: int = 4, progress: Progress = _no_progress,
           shared_group: str | int | None = None) -> VerifyReport:
    """Fully decode every file (header, lengths, checksum); quarantine the bad ones.
    Also lists what others can read (``exposed``): a warning, nothing is changed."""
    root = open_root(root)
    exposed = exposed_paths(root, shared_group)
    files = list(iter_chunk_files(root))

    def check(key: str) -> str | None:
        try:
            decode_chunk(read_file_blob(chunk_path(root, key)), key=key)
            return None
        except FileNotFoundError:
            return None  # removed meanwhile: nothing to verify
        except (CorruptChunk, OSError) as e:  # decode_chunk raises nothing else on any bytes
            return str(e)

    with ThreadPoolExecutor(threads) as pool:
        reasons = list(progress(pool.map(check, [f.key for f in files])))
    bad = {f.key: r for f, r in zip(files, reasons) if r is not None}
    if bad:
        tier = DiskTier(root, budget_bytes=1 << 62, policy="LRU", shared_group=shared_group)
        for key, reason in bad.items():
            tier.quarantine(key, reason)
    return VerifyReport(len(files), bad, exposed, bool(exposed))


@dataclass
class PruneReport:
    removed: list[str]
    freed_bytes: int
    kept_entries: int
    kept_bytes: int
    dry_run: bool


def prune(root: str | os.PathLike, *, max_bytes: int | None = None, older_than_s: float | None = None,
          model: str | None = None, dry_run: bool = False) -> PruneReport:
    """Remove entries of ``model`` (a model_name), then idle longer than ``older_than_s``,
    then the least recently used until the directory fits ``max_bytes``."""
    root = open_root(root)
    files = sorted(iter_chunk_files(root), key=lambda f: f.mtime)  # coldest first
    now, doomed = time.time(), set()
    for f in files:
        if older_than_s is not None and now - f.mtime > older_than_s:
            doomed.add(f.key)
        elif model is not None and _names_model(_model_of(f.path), model):
            doomed.add(f.key)
    kept = [f for f in files if f.key not in doomed]
    total = sum(f.size for f in kept)
    for f in kept:
        if max_bytes is None or total <= max_bytes:
            break
        doomed.add(f.key)
        total -= f.size
    removed = [f for f in files if f.key in doomed]
    if not dry_run:
        for f in removed:
            f.path.unlink(missing_ok=True)
    return PruneReport([f.key for f in removed], sum(f.size for f in removed), len(files) - len(removed),
                       sum(f.size for f in files) - sum(f.size for f in removed), dry_run)


def _names_model(model_name: str | None, wanted: str) -> bool:
    """``wanted`` is the full model_name, or the directory name before its weights digest."""
    return model_name is not None and wanted in (model_name, model_name.split("@", 1)[0])


def _model_of(path: Path) -> str | None:
    try:
        return read_file_header(path).fingerprint.get("model_name")
    except (CorruptChunk, OSError):
        return None


def export_archive(root: str | os.PathLike, archive: str | os.PathLike, progress: Progress = _no_progress,
                   shared_group: str | int | None = None) -> int:
    """Write every entry into one tar file (payloads are already compressed), private or
    shared with ``shared_group`` like the cache itself. Returns the count."""
    root = open_root(root)
    modes = file_modes(shared_group)
    files = list(iter_chunk_files(root))
    tmp = Path(f"{archive}.tmp.{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a leftover of a crashed export by a process with our pid
    try:
        with os.fdopen(create_file(tmp, modes), "wb") as out, tarfile.open(fileobj=out, mode="w") as tar:
            for f in progress(files):
                try:
                    tar.add(f.path, arcname=f"{f.key[:2]}/{f.path.name}")
                except FileNotFoundError:
                    continue
        os.replace(tmp, archive)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(files)


@dataclass
class ImportReport:
    imported: int
    skipped_existing: int
    rejected: dict[str, str]  # member name -> reason


def import_archive(archive: str | os.PathLike, root: str | os.PathLike,
                   progress: Progress = _no_progress, shared_group: str | int | None = None) -> ImportReport:
    """Add an archive's entries to ``root``; each is verified before it lands, atomically, and
    created private or shared with ``shared_group`` (the archive's modes and owners are ignored)."""
    root = Path(root)
    tier = DiskTier(root, budget_bytes=1 << 62, policy="LRU", shared_group=shared_group)
    imported = skipped = 0
    rejected: dict[str, str] = {}
    with tarfile.open(archive, "r") as tar:
        for member in progress(tar.getmembers()):
            reason = _import_member(tar, member, root, tier)
            if reason == "exists":
                skipped += 1
            elif reason:
                rejected[member.name] = reason
            elif member.isfile():
                imported += 1
    return ImportReport(imported, skipped, rejected)


_MAX_MEMBER = max_blob_bytes(MAX_RAW_BYTES)  # no valid chunk file is longer


def _member_kind_error(member: tarfile.TarInfo) -> str | None:
    """Only regular files no longer than a chunk file can be are imported: links and devices are never created."""
    if member.issym() or member.islnk():
        return f"a link to {member.linkname!r} is not a regular file"
    if not member.isfile():
        return "a device, fifo or other special member is not a regular file"
    if member.size > _MAX_MEMBER:
        return f"member of {member.size} bytes exceeds the largest chunk file, {_MAX_MEMBER} bytes"
    return None


def _import_member(tar: tarfile.TarFile, member: tarfile.TarInfo, root: Path, tier: DiskTier) -> str | None:
    if member.isdir():
        return None
    kind_error = _member_kind_error(member)
    if kind_error:
        return kind_error
    parts = member.name.split("/")
    key = parts[-1].removesuffix(".kv")
    if len(parts) != 2 or not parts[-1].endswith(".kv") or not _KEY.match(key) or parts[0] != key[:2]:
        return "not a chunk file name (<xx>/<32 hex>.kv)"
    if chunk_path(root, key).exists():
        return "exists"
    try:
        blob = read_chunk(tar.extractfile(member), member.size)[1]  # bounded by the header's raw size
        decode_chunk(blob, key=key)
    except CorruptChunk as e:  # decode_chunk raises nothing else on any bytes
        return str(e)
    except (OSError, tarfile.TarError) as e:  # a truncated or unreadable archive member
        return f"unreadable member: {e}"
    return None if tier.write(key, bytes(blob)) else "write failed"
