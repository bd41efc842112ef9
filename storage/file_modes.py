"""Who may read a cache directory: private by default, or one deliberately shared group.

Chunk files hold prompts' token ids, and KV can be inverted back to text, so
a cache directory is as sensitive as the prompts themselves.

- Private (the default): directories ``0700``, files ``0600``.
- Shared with one group: directories ``2770`` (setgid, so what is created in
  them inherits the group), files ``0660``, both owned by that group.

Everything is created with at most the owner's bits (``mkdir``/``os.open``
with ``0o700``/``0o600``; a umask can only narrow that), then given its group
and its exact mode. So no umask ever exposes a path, and no path is ever
readable by anyone but the owner and the intended group, not even briefly.
"""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path
from typing import NamedTuple

PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600
SHARED_DIR, SHARED_FILE = 0o2770, 0o660
_OWNER_ONLY = 0o700


class FileModes(NamedTuple):
    dir_mode: int
    file_mode: int
    gid: int | None  # None: private; else the group the directory is shared with


PRIVATE = FileModes(PRIVATE_DIR, PRIVATE_FILE, None)


def resolve_group(group: str | int) -> int:
    """A group name or numeric gid -> gid. Raises ValueError naming an unknown group."""
    text = str(group).strip()
    if text.isdigit():
        return int(text)  # a gid needs no /etc/group entry (containers, LDAP without NSS)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ValueError(f"shared_dir_group={group!r} is not a known group; allowed: a group name "
                         f"from the group database or a numeric gid") from None


def file_modes(shared_group: str | int | None) -> FileModes:
    if shared_group is None or str(shared_group).strip() == "":
        return PRIVATE
    return FileModes(SHARED_DIR, SHARED_FILE, resolve_group(shared_group))


def make_dir(path: Path, modes: FileModes) -> bool:
    """Create directory ``path`` with ``modes``; False when it exists (left as it is).

    The parent must exist. Raises OSError (e.g. no permission to give the group).
    """
    try:
        os.mkdir(path, modes.dir_mode & _OWNER_ONLY)
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(f"{path} exists and is not a directory") from None
        return False
    _finish(path, None, modes.dir_mode, modes.gid)
    return True


def make_dirs(path: Path, modes: FileModes) -> None:
    """``make_dir`` for ``path``; missing parents are created with the process's defaults
    (they are not the cache's directories)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    make_dir(path, modes)


def create_file(path: Path, modes: FileModes, flags: int = os.O_WRONLY) -> int:
    """Create a new file (``O_EXCL``) with ``modes``; its open descriptor. Raises OSError."""
    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, modes.file_mode & _OWNER_ONLY)
    try:
        _finish(path, fd, modes.file_mode, modes.gid)
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise
    return fd


def open_or_create(path: Path, modes: FileModes, flags: int = os.O_RDWR) -> int:
    """Open ``path``, creating it with ``modes`` when missing; its descriptor. Raises OSError."""
    while True:
        try:
            return os.open(path, flags)
        except FileNotFoundError:
            pass
        try:
            return create_file(path, modes, flags)
        except FileExistsError:
            continue  # another process created it between the two calls


def _finish(path: Path, fd: int | None, mode: int, gid: int | None) -> None:
    """Give a just-created path (readable by its owner only) its group, then its exact mode."""
    if gid is not None:
        if fd is None:
            os.chown(path, -1, gid)
        else:
            os.fchown(fd, -1, gid)
    if fd is None:
        os.chmod(path, mode)
    else:
        os.fchmod(fd, mode)


def exposure(st: os.stat_result, shared_gid: int | None) -> str | None:
    """Why a path with stat ``st`` is readable beyond its owner and the intended group; None if it is not."""
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o007:
        return f"mode {mode:04o}: other users can access it"
    if mode & 0o070 and (shared_gid is None or st.st_gid != shared_gid):
        whom = "no group is meant to" if shared_gid is None else f"it belongs to gid {st.st_gid}, not {shared_gid}"
        return f"mode {mode:04o}: its group can access it, but {whom}"
    return None
