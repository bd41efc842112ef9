"""Which model a chunk's KV came from: the name that goes into the fingerprint.

A directory's last component is not an identity: ``run-a/checkpoint-1000``
and ``run-b/checkpoint-1000`` are different fine-tunes of one shape, and a
shared directory or Redis would serve one's KV to the other. So a local
checkpoint is named ``<dir name>@<weights digest>``, where the digest covers

- ``config.json`` (parsed, without the path-dependent ``_name_or_path``),
- every weight file's name and size, and a safetensors file's header
  (tensor names, dtypes, shapes, offsets),
- a few fixed samples of each weight file's bytes (start, middle and end of
  its data, 64 KiB each).

Headers and sizes alone cannot tell two fine-tunes of one architecture apart
(save_pretrained writes identical headers for them), which is why a handful of
small reads is added: about a dozen 64 KiB reads for a 16 GB checkpoint in
four shards, milliseconds on any disk, independent of the checkpoint's size.
The digest depends only on the files' bytes, so the same checkpoint copied to
another path (or served by SGLang, vLLM and ``lmcache-sgl prepopulate``)
keeps its identity.

A directory without weight files (an engine's dummy load format) is named by
its config alone, with a warning. A model path that is not a local directory (a hub id the engine resolves
itself) is used as given; ``model_id`` in the config overrides everything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path

from .keys import model_name_from_path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
INDEX_SUFFIX = ".index.json"
SAMPLE_BYTES = 64 * 1024
DIGEST_HEX = 16  # 64 bits in the name; collisions need a deliberate attack on blake2b
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the format's own limit

logger = logging.getLogger(__name__)


class ModelIdentityError(ValueError):
    """The checkpoint directory could not be read to name the model."""


def model_identity(model_path: str | os.PathLike, model_id: str | None = None) -> str:
    """The fingerprint's ``model_name`` for a served or prepopulated model."""
    if model_id:
        return str(model_id)
    path = Path(model_path)
    if not path.is_dir():
        return str(model_path).rstrip("/\\")
    return f"{model_name_from_path(str(model_path))}@{weights_digest(path)}"


def weights_digest(model_dir: Path) -> str:
    """Hex digest of what identifies a checkpoint's weights (module docstring)."""
    h = hashlib.blake2b(digest_size=DIGEST_HEX // 2, person=b"lmcsgl-model")
    h.update(_canonical_config(model_dir / "config.json"))
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and _is_weight_or_index(p.name))
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in files):
        # Dummy or remote weights: only the config can name the model. Not an error (the engine serves
        # it), but two such directories with one config share keys, so say how to tell them apart.
        logger.warning("no weight files (%s) in %s: the model is identified by its config.json only; "
                       "set model_id in the lmcache config to name it explicitly", ", ".join(WEIGHT_SUFFIXES),
                       model_dir)
    for path in files:
        h.update(path.name.encode() + b"\0")
        try:
            h.update(_file_fingerprint(path))
        except OSError as e:
            raise ModelIdentityError(f"cannot read {path} to identify the model: {e}") from e
    return h.hexdigest()


def _is_weight_or_index(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(INDEX_SUFFIX)


def _canonical_config(path: Path) -> bytes:
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return b"no-config"
    except (OSError, ValueError) as e:
        raise ModelIdentityError(f"cannot read {path}: {e}") from e
    if isinstance(config, dict):
        config.pop("_name_or_path", None)
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def _file_fingerprint(path: Path) -> bytes:
    """Size, safetensors header if any, and three fixed samples of the data."""
    size = path.stat().st_size
    parts = [struct.pack("<Q", size)]
    with path.open("rb") as f:
        if path.name.endswith(INDEX_SUFFIX):
            return parts[0] + f.read()
        data_start = _safetensors_data_start(f, size) if path.suffix == ".safetensors" else 0
        if data_start:
            f.seek(0)
            parts.append(f.read(data_start))  # 8-byte length + JSON header
        data_len = size - data_start
        for offset in sorted({0, max(0, data_len // 2 - SAMPLE_BYTES // 2), max(0, data_len - SAMPLE_BYTES)}):
            f.seek(data_start + offset)
            parts.append(f.read(SAMPLE_BYTES))
    return b"".join(parts)


def _safetensors_data_start(f, size: int) -> int:
    """Byte offset where tensor data begins, or 0 when the header is not valid."""
    head = f.read(8)
    if len(head) < 8:
        return 0
    header_len = struct.unpack("<Q", head)[0]
    if header_len > min(_MAX_SAFETENSORS_HEADER, size - 8):
        return 0
    return 8 + header_len
