"""The fault campaign's bad-files case (see fault_campaign.py).

Stores ``n`` chunks, then replaces each file with one of the ``KINDS``: truncated,
a bit flipped (in the preamble or the payload; the header has fields such as
``created`` whose change is harmless), another key's file, another model's chunk
under this key, random bytes, a FIFO, a link to a device, a directory. A fresh
store must miss and quarantine every one.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

from lmcache_sgl import ChunkLayout, ModelFingerprint, TieredStore
from lmcache_sgl.storage.chunk_file import read_header
from lmcache_sgl.storage.disk_tier import QUARANTINE

KINDS = ("truncated", "bit-flipped", "swapped", "foreign", "garbage", "fifo", "device link", "directory")
_NOT_FILES = KINDS[5:]  # replaced by something that is not a regular file


def _mutate(kind: str, blob: bytes, other: bytes, foreign: bytes, rng: random.Random) -> bytes:
    """A bad version of ``blob``: every kind breaks a check that decoding runs."""
    if kind == "truncated":
        return blob[:rng.randrange(len(blob))]
    if kind == "bit-flipped":  # in the preamble or the payload: the header has harmless fields (created)
        offset = read_header(blob)[1]
        pos = rng.choice([rng.randrange(12), rng.randrange(offset, len(blob))])
        return blob[:pos] + bytes([blob[pos] ^ (1 << rng.randrange(8))]) + blob[pos + 1:]
    if kind == "swapped":
        return other  # another key's valid file
    if kind == "foreign":
        return foreign  # another model's valid chunk under this key
    if kind in _NOT_FILES:
        return b""  # _plant replaces the file
    return rng.randbytes(rng.randrange(0, 2 * len(blob)))  # garbage



def _plant(path: Path, kind: str, data: bytes) -> None:
    """Put what ``kind`` names where a chunk file was."""
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)  # opening it for reading would wait for a writer
    elif kind == "device link":
        path.symlink_to("/dev/null")  # a device: reading /dev/zero instead would never end
    elif kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(data)


def corrupt_files(res, ref, config, layout, n: int, rng: random.Random) -> None:
    """Plant ``n`` bad files (the kinds in turn) and count what a fresh store makes of them."""
    other_fp = ModelFingerprint("another-model", "bfloat16", num_layers=2, num_kv_heads=2, head_dim=16)
    with tempfile.TemporaryDirectory() as root:
        with TieredStore(config(root, disk_chunks=2 * n), layout) as store:
            ref.put_all(store, range(n))
        other_layout = ChunkLayout(other_fp, layout.chunk_size)
        with TieredStore(config(root + "/foreign", disk_chunks=2 * n), other_layout) as other:
            for i in range(n):
                while not other.put(ref.key(i), ref.tokens(i), ref.kv(i)):
                    other.flush_pending()
        paths = [Path(root) / ref.key(i)[:2] / f"{ref.key(i)}.kv" for i in range(n)]
        blobs = [p.read_bytes() for p in paths]
        for i, path in enumerate(paths):
            kind = KINDS[i % len(KINDS)]
            foreign = (Path(root) / "foreign" / path.parent.name / path.name).read_bytes()
            _plant(path, kind, _mutate(kind, blobs[i], blobs[(i + 1) % n], foreign, rng))
            res.outcomes[kind] += 1
        shutil.rmtree(Path(root) / "foreign")
        store = TieredStore(config(root, disk_chunks=2 * n), layout)
        for i in range(n):
            res.tries += 1
            res.outcomes["hits" if ref.get(store, i, res) else "misses"] += 1
        st = store.stats()
        store.close()
        moved = len(list((Path(root) / QUARANTINE).iterdir()))
    res.outcomes["quarantined"] = st.disk_quarantined
    res.check(res.outcomes["misses"] == n, f"{res.outcomes['hits']} of {n} bad files were served")
    res.check(st.disk_quarantined == n and moved == n,
              f"quarantined {st.disk_quarantined} (files moved: {moved}) of {n}")
