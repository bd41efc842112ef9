"""One frozen config for the whole cache, built from LMCache-compatible names.

Sources, later ones overriding earlier ones:
  1. defaults (below),
  2. a YAML file (``LMCACHE_CONFIG_FILE`` or an explicit path),
  3. ``LMCACHE_<KEY>`` environment variables,
  4. explicit overrides (an engine's extra config, a CLI flag).

Every value is validated once, in ``__post_init__``; a bad value or an unknown
key raises ``ConfigError`` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from .storage.file_modes import resolve_group
from .storage.remote_tier import URL_SCHEMES, redact_url

ENV_PREFIX = "LMCACHE_"
TOOL_ENV_PREFIX = "LMCACHE_SGL_"  # the project's own switches (shims, model cache), not config keys
CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"
# LMCache's own process switches (usage reporting, its logger), not config keys: a user moving
# from LMCache keeps them set as LMCache advises, so they are ignored rather than refused.
LMCACHE_PROCESS_ENV = frozenset({"LMCACHE_TRACK_USAGE", "LMCACHE_LOG_LEVEL"})
GiB = 1 << 30

CACHE_POLICIES = ("LRU", "FIFO", "LFU")
DISK_CODECS = ("lz4", "zstd", "none")
LOAD_POLICIES = ("auto", "always")
PREFETCH_POLICIES = ("best_effort", "wait_complete", "timeout")
DISK_WRITE_POLICIES = ("write_through", "write_back")
SAVE_POLICIES = ("write_through", "write_back", "write_through_selective")


class ConfigError(ValueError):
    """A config key has a bad value, or is unknown."""


@dataclass(frozen=True, slots=True)
class CacheConfig:
    # Tokens per chunk; the unit of keys, storage and transfer (LMCache: chunk_size).
    chunk_size: int = 256
    # The model's name in every key; None: the checkpoint directory's name plus a digest of its
    # config and weights (lmcache_sgl/model_identity.py).
    model_id: str | None = None
    # Keep a host (CPU RAM) tier (LMCache: local_cpu).
    local_cpu: bool = True
    # Host tier budget in GiB (LMCache: max_local_cpu_size).
    max_local_cpu_size: float = 5.0
    # Disk tier directory; None disables it. A "file://" prefix is accepted (LMCache: local_disk).
    local_disk: str | None = None
    # Disk tier budget in GiB (LMCache: max_local_disk_size).
    max_local_disk_size: float = 20.0
    # A group name or gid the disk directory is shared with (dirs 2770, files 0660, that group);
    # None: private to the user (dirs 0700, files 0600).
    shared_dir_group: str | None = None
    # Remote tier, "redis://[user:pass@]host:port[/db]" or "rediss://..." (TLS); None disables it
    # (LMCache: remote_url). Logged only with its password redacted.
    remote_url: str | None = None
    # Connect and read timeout of each Redis call, ms: the longest an engine thread waits on a silent server.
    remote_timeout_ms: int = 250
    # Cap of the circuit breaker's back-off, s: after a failure, Redis is skipped (a miss) for a back-off
    # that doubles from 0.5 s up to this cap, then probed once.
    remote_backoff_max_s: float = 30.0
    # Seconds a Redis entry lives after it is written (SET EX); None: until Redis evicts it.
    remote_ttl_s: int | None = field(default=None, metadata={"kind": int})
    # Eviction order of the host and disk tiers (LMCache: cache_policy).
    cache_policy: str = "LRU"
    # Seconds between rescans of the disk directory's real content before trimming (0: rescan on every trim).
    disk_rescan_interval_s: float = 30.0
    # Store the last, partial chunk of a prompt under its own key (LMCache: save_unfull_chunk).
    save_unfull_chunk: bool = False
    # Codec of disk and remote payloads.
    disk_codec: str = "lz4"
    # Byte-shuffle multi-byte dtypes before compression (bf16: 1.00x -> 1.19x with LZ4).
    byte_shuffle: bool = True
    # "auto": load a hit only when the cost model says loading beats recompute; "always": load every hit.
    load_policy: str = "auto"
    # Bounded queue of pending disk/remote writes; a put that finds it full is dropped and counted.
    max_pending_writes: int = 64
    # "write_through": every put is also queued at once for disk and Redis (durable within about
    # max_pending_writes chunk writes); "write_back": a chunk goes down only when the host tier evicts it.
    disk_write_policy: str = "write_through"
    # SGLang, device -> host tier (HiCache's names): when a radix path's full chunks are copied into
    # the store. "write_through": after the prefill that first caches them; "write_through_selective":
    # once a second request reuses them; "write_back": only when the device evicts them. Eviction saves
    # whatever is still missing under every policy.
    save_policy: str = "write_through"
    # Seconds a stop (SIGTERM/SIGINT, shutdown, /flush_cache) may spend writing chunks to disk.
    shutdown_flush_timeout_s: float = 30.0
    # Threads for compression and file I/O.
    io_threads: int = 4
    # CPU priority of background writes (disk and Redis encoding): this many nice steps below
    # the engine, so compression yields cores to the forward and to reads. 0 turns it off.
    write_nice: int = 10
    # When a request whose store hit lies on disk or Redis is admitted (SGLang, HiCache's names):
    # "best_effort": with what reached host memory, waiting only while nothing else runs;
    # "wait_complete": once every chunk is in host memory (or the read failed);
    # "timeout": like wait_complete for at most prefetch_timeout_ms, then with what arrived.
    prefetch_policy: str = "timeout"
    # The wait limit of prefetch_policy "timeout", ms from the request's first admission attempt.
    prefetch_timeout_ms: int = 1000
    # Blended reuse (CacheBlend, docs/blending.md): documents' KV reused at any position in a prompt.
    enable_blending: bool = False
    # The text between documents in a blend prompt; tokenized once with the served model's tokenizer.
    blend_special_str: str = " # # "
    # Share of a blend's reused tokens recomputed from the check layer on, each in [0, 1]; the first is used.
    blend_recompute_ratios: tuple[float, ...] = field(default=(0.15,), metadata={"kind": tuple, "item": float})
    # The layer where the tokens to recompute are chosen (>= 0, below the model's layer count); the first is used.
    blend_check_layers: tuple[int, ...] = field(default=(1,), metadata={"kind": tuple, "item": int})
    # Segments (documents) shorter than this many tokens are neither stored nor matched.
    blend_min_tokens: int = 256

    def __post_init__(self) -> None:
        _require(self.chunk_size >= 1, "chunk_size", self.chunk_size, "an integer >= 1")
        _require(self.max_local_cpu_size >= 0, "max_local_cpu_size", self.max_local_cpu_size, "a size in GiB >= 0")
        _require(self.max_local_disk_size >= 0, "max_local_disk_size", self.max_local_disk_size, "a size in GiB >= 0")
        object.__setattr__(self, "cache_policy", self.cache_policy.upper())
        _require(self.cache_policy in CACHE_POLICIES, "cache_policy", self.cache_policy, f"one of {CACHE_POLICIES}")
        _require(self.disk_codec in DISK_CODECS, "disk_codec", self.disk_codec, f"one of {DISK_CODECS}")
        _require(self.load_policy in LOAD_POLICIES, "load_policy", self.load_policy, f"one of {LOAD_POLICIES}")
        _require(self.disk_write_policy in DISK_WRITE_POLICIES, "disk_write_policy", self.disk_write_policy,
                 f"one of {DISK_WRITE_POLICIES}")
        _require(self.save_policy in SAVE_POLICIES, "save_policy", self.save_policy, f"one of {SAVE_POLICIES}")
        _require(self.shutdown_flush_timeout_s > 0, "shutdown_flush_timeout_s", self.shutdown_flush_timeout_s,
                 "seconds > 0")
        _require(self.max_pending_writes >= 1, "max_pending_writes", self.max_pending_writes, "an integer >= 1")
        _require(self.io_threads >= 1, "io_threads", self.io_threads, "an integer >= 1")
        _require(0 <= self.write_nice <= 19, "write_nice", self.write_nice, "an integer in [0, 19]")
        _require(self.prefetch_policy in PREFETCH_POLICIES, "prefetch_policy", self.prefetch_policy,
                 f"one of {PREFETCH_POLICIES}")
        _require(self.prefetch_timeout_ms >= 0, "prefetch_timeout_ms", self.prefetch_timeout_ms, "an integer >= 0 (ms)")
        _require(self.remote_timeout_ms >= 1, "remote_timeout_ms", self.remote_timeout_ms, "an integer >= 1 (ms)")
        _require(self.remote_backoff_max_s > 0, "remote_backoff_max_s", self.remote_backoff_max_s, "seconds > 0")
        _require(self.disk_rescan_interval_s >= 0, "disk_rescan_interval_s", self.disk_rescan_interval_s,
                 "seconds >= 0")
        _check_remote_url(self.remote_url)
        _require(self.remote_ttl_s is None or self.remote_ttl_s > 0, "remote_ttl_s", self.remote_ttl_s,
                 "whole seconds > 0, or unset")
        _check_group(self.shared_dir_group)
        _check_blend(self)
        if self.local_disk is not None and self.local_disk.startswith("file://"):
            object.__setattr__(self, "local_disk", self.local_disk[len("file://"):])

    def __repr__(self) -> str:
        shown = {f: getattr(self, f) for f in _FIELDS}
        shown["remote_url"] = self.remote_url and redact_url(self.remote_url)
        return f"CacheConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @property
    def host_bytes(self) -> int:
        return int(self.max_local_cpu_size * GiB) if self.local_cpu else 0

    @property
    def disk_bytes(self) -> int:
        return int(self.max_local_disk_size * GiB) if self.local_disk else 0

    def replace(self, **changes: Any) -> "CacheConfig":
        return from_mapping({**dataclasses.asdict(self), **changes}, source="override")

    @classmethod
    def load(cls, path: str | os.PathLike | None = None,
             overrides: Mapping[str, Any] | None = None,
             environ: Mapping[str, str] | None = None) -> "CacheConfig":
        """Defaults, then the YAML file, then LMCACHE_* variables, then ``overrides``."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        path = path or environ.get(CONFIG_FILE_ENV)
        if path:
            values.update(_read_yaml(Path(path)))
        values.update(_read_env(environ))
        values.update(overrides or {})
        return from_mapping(values, source="config")


_FIELDS = {f.name: f for f in fields(CacheConfig)}


def from_mapping(values: Mapping[str, Any], source: str) -> CacheConfig:
    """Build a config from raw values (strings allowed), converting and checking each key."""
    converted = {}
    for key, raw in values.items():
        if key not in _FIELDS:
            raise ConfigError(f"unknown {source} key {key!r}; allowed keys: {sorted(_FIELDS)}")
        converted[key] = _convert(key, raw)
    return CacheConfig(**converted)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _read_env(environ: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for name, value in environ.items():
        # LMCACHE_SGL_* belong to the project's tools and shims, not to the config.
        if (not name.startswith(ENV_PREFIX) or name == CONFIG_FILE_ENV or name.startswith(TOOL_ENV_PREFIX)
                or name in LMCACHE_PROCESS_ENV):
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key not in _FIELDS:
            env_names = sorted(ENV_PREFIX + k.upper() for k in _FIELDS)
            raise ConfigError(f"unknown environment variable {name}; allowed: {env_names}")
        out[key] = value
    return out


def _convert(key: str, raw: Any) -> Any:
    default = _FIELDS[key].default
    if raw is None:
        if default is None:
            return None
        raise ConfigError(f"{key} must not be empty")
    kind = _FIELDS[key].metadata.get("kind") or (type(default) if default is not None else str)
    if kind is tuple:
        return _to_tuple(key, raw, _FIELDS[key].metadata["item"])
    if kind is bool:
        return _to_bool(key, raw)
    try:
        if kind is int and isinstance(raw, float) and not raw.is_integer():
            raise ValueError
        value = kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={raw!r} is not a valid {kind.__name__}") from None
    if kind is str and value.lower() in ("", "none", "null") and default is None:
        return None
    return value


def _to_tuple(key: str, raw: Any, item: type) -> tuple:
    """A list from YAML, or a string "0.15,0.3" / "[0.15, 0.3]" (environment), or one value."""
    if isinstance(raw, str):
        raw = [part for part in raw.strip().strip("[]()").split(",") if part.strip()]
    elif not isinstance(raw, (list, tuple)):
        raw = [raw]
    try:
        values = tuple(_to_item(x, item) for x in raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={raw!r} is not a list of {item.__name__}") from None
    if not values:
        raise ConfigError(f"{key} must not be empty; allowed: a list of {item.__name__}")
    return values


def _to_item(raw: Any, item: type) -> Any:
    if isinstance(raw, bool) or (item is int and isinstance(raw, float) and not raw.is_integer()):
        raise ValueError
    return item(raw.strip() if isinstance(raw, str) else raw)


def _check_blend(cfg: "CacheConfig") -> None:
    for key in ("blend_recompute_ratios", "blend_check_layers"):
        if isinstance(getattr(cfg, key), list):  # built directly with a list: keep the config hashable
            object.__setattr__(cfg, key, tuple(getattr(cfg, key)))
    _require(isinstance(cfg.blend_special_str, str) and cfg.blend_special_str != "", "blend_special_str",
             cfg.blend_special_str, "a non-empty string")
    _require(_non_empty_tuple(cfg.blend_recompute_ratios)
             and all(isinstance(r, (int, float)) and 0.0 <= r <= 1.0 for r in cfg.blend_recompute_ratios),
             "blend_recompute_ratios", cfg.blend_recompute_ratios, "a non-empty list of numbers in [0, 1]")
    _require(_non_empty_tuple(cfg.blend_check_layers)
             and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in cfg.blend_check_layers),
             "blend_check_layers", cfg.blend_check_layers, "a non-empty list of integers >= 0")
    _require(cfg.blend_min_tokens >= 1, "blend_min_tokens", cfg.blend_min_tokens, "an integer >= 1")


def _non_empty_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) > 0


def _to_bool(key: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key}={raw!r} is not a boolean; allowed: true/false, 1/0, yes/no, on/off")


def _check_remote_url(url: str | None) -> None:
    """The URL is only ever shown redacted: it may carry a password."""
    if url is None:
        return
    scheme, sep, rest = url.partition("://")
    host = rest.partition("?")[0].rpartition("@")[2].partition("/")[0]
    if not sep or scheme not in URL_SCHEMES or not host:
        raise ConfigError(f"remote_url={redact_url(url)!r} is invalid; allowed: a URL of the form "
                          f"redis://host:port[/db] or rediss://host:port[/db] (TLS), credentials as user:password@host")


def _check_group(group: str | None) -> None:
    if group is not None:
        try:
            resolve_group(group)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid; allowed: {allowed}")
