"""The control API over one ``TieredStore``: lookup, pin, unpin, clear, health, stats.

Token ids in (or text with a tokenizer), named results out; bad input raises
``ValueError`` naming the value and what is allowed. The SGLang adapter serves
the same operations over HTTP (``adapters/sglang/control_http.py``) and the
CLI drives that (``lmcache-sgl lookup --server URL``).

A prompt of n tokens, chunk size C, of which the engine's device cache holds
the first d (0 without an engine):

    # [0, d)                   device (SGLang's radix tree), counted as ``device``
    # [d, k*C)                 leading chunks some tier holds, each counted in the fastest tier holding it
    # [k*C, n)                 not cached (a miss, or a partial tail: only full chunks are keyed here)

Pins (``pin``/``unpin``) keep chunks out of host and disk eviction and out of
``clear``; they live in the serving process's memory and end with it.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any, NamedTuple, Sequence

import numpy as np

from .cache_admin import read_file_header
from .keys import prefix_keys
from .metrics import StoreStats, Tier
from .storage.chunk_file import CorruptChunk
from .tiered_store import TieredStore

TIERS = tuple(t.value for t in Tier)  # the names ``clear(tier=...)`` accepts
_MAX_TOKEN = 2**31 - 1


class LookupReport(NamedTuple):
    """How many leading tokens of a prompt are cached, by the fastest tier holding each."""

    prompt_tokens: int
    cached_tokens: int  # device + host + disk + remote
    device: int
    host: int
    disk: int
    remote: int


class PinReport(NamedTuple):
    chunks: int  # leading chunks pinned (a prefix: stops at the first chunk no local tier holds)
    tokens: int  # chunks * chunk_size
    host_chunks: int  # of those, pinned in the host tier
    disk_chunks: int  # ... and on disk


class UnpinReport(NamedTuple):
    chunks: int  # chunks that were pinned and are not any more


class ClearReport(NamedTuple):
    tiers: tuple[str, ...]  # the tiers cleared
    model: str | None  # only this model's entries, when given
    host_removed: int
    disk_removed: int
    pinned_kept: int  # pinned chunks stay until unpinned


class TierHealth(NamedTuple):
    tier: str
    enabled: bool
    ok: bool  # True for a disabled tier: nothing is wrong with it
    error: str | None


class HealthReport(NamedTuple):
    ok: bool  # every enabled tier is ok
    tiers: tuple[TierHealth, ...]
    remote_breaker: str | None  # 'closed' | 'open' | 'half_open'; None without a remote tier


class StatsReport(NamedTuple):
    store: StoreStats
    pinned_chunks: int


def as_json(result: Any) -> Any:
    """A control result (NamedTuples, dataclasses, nested) as JSON-ready builtins."""
    if isinstance(result, StoreStats):
        return result.to_dict()
    if isinstance(result, tuple) and hasattr(result, "_asdict"):
        return {k: as_json(v) for k, v in result._asdict().items()}
    if isinstance(result, (list, tuple)):
        return [as_json(v) for v in result]
    if isinstance(result, dict):
        return {str(k): as_json(v) for k, v in result.items()}
    return result


def token_ids(prompt: str | Sequence[int] | np.ndarray, tokenizer=None) -> list[int]:
    """The prompt's token ids; text needs ``tokenizer`` (anything with ``encode(text) -> list[int]``)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; pass token ids or tokenizer=...")
        prompt = tokenizer.encode(prompt)
    if isinstance(prompt, (bytes, dict)) or not hasattr(prompt, "__len__"):
        raise ValueError(f"tokens must be a list of token ids, got {type(prompt).__name__}")
    ids = list(prompt.tolist() if isinstance(prompt, np.ndarray) else prompt)
    if not ids:
        raise ValueError("tokens is empty; allowed: one or more token ids")
    bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, (int, np.integer))
                or not 0 <= t <= _MAX_TOKEN), None)
    if bad is not None:
        raise ValueError(f"token id {bad!r} is invalid; allowed: integers in [0, {_MAX_TOKEN}]")
    return [int(t) for t in ids]


def parse_tier(tier: str | None) -> tuple[Tier, ...]:
    """``None`` (every tier) or one tier name -> the tiers to clear."""
    if tier is None:
        return tuple(Tier)
    if tier not in TIERS:
        raise ValueError(f"tier={tier!r} is invalid; allowed: {', '.join(TIERS)}, or none for all")
    return (Tier(tier),)


def split_by_tier(tiers: Sequence[Tier], chunk_size: int, device_tokens: int) -> dict[str, int]:
    """Tokens per tier of leading chunks ``first..`` (first = device_tokens // C), past the device's tokens."""
    counts = {t.value: 0 for t in Tier}
    first = device_tokens // chunk_size
    for i, tier in enumerate(tiers):
        start = (first + i) * chunk_size
        counts[tier.value] += start + chunk_size - max(start, device_tokens)
    return counts


def min_lookup(reports: Sequence[LookupReport]) -> LookupReport:
    """Combine TP ranks' lookups: each field's MIN, what every rank can serve."""
    if not reports:
        raise ValueError("no lookup reports to combine")
    return LookupReport(*(min(r[i] for r in reports) for i in range(len(LookupReport._fields))))


def _names_model(model_name: str | None, wanted: str) -> bool:
    """``wanted`` is the full model_name, or its directory part before the weights digest ('@')."""
    return model_name is not None and wanted in (model_name, model_name.split("@", 1)[0])


class CacheControl:
    """The control operations on one store (one model fingerprint, one TP rank)."""

    def __init__(self, store: TieredStore) -> None:
        self.store = store
        self.chunk_size = store.layout.chunk_size
        self.model_name = store.layout.fingerprint.model_name

    def keys(self, tokens: Sequence[int]) -> list[str]:
        """The prefix keys of the prompt's full chunks."""
        n_full = len(tokens) - len(tokens) % self.chunk_size
        return prefix_keys(self.store.layout.fingerprint, tokens[:n_full], self.chunk_size)

    def lookup(self, prompt, tokenizer=None, *, device_tokens: int = 0) -> LookupReport:
        """Leading cached tokens per tier; moves no data and counts no lookup in the store's stats."""
        tokens = token_ids(prompt, tokenizer)
        if not 0 <= device_tokens <= len(tokens):
            raise ValueError(f"device_tokens={device_tokens} is outside [0, {len(tokens)}]")
        first = device_tokens // self.chunk_size
        tiers = self.store.locate(self.keys(tokens)[first:])
        counts = split_by_tier(tiers, self.chunk_size, device_tokens)
        cached = max(device_tokens, (first + len(tiers)) * self.chunk_size)
        return LookupReport(len(tokens), cached, device_tokens, counts["host"], counts["disk"], counts["remote"])

    def pin(self, prompt, tokenizer=None) -> PinReport:
        """Pin the prompt's leading chunks held in host or disk (see ``TieredStore.pin_chunks``)."""
        tokens = token_ids(prompt, tokenizer)
        keys = self.keys(tokens)
        spans = [tokens[i * self.chunk_size:(i + 1) * self.chunk_size] for i in range(len(keys))]
        r = self.store.pin_chunks(keys, spans)
        return PinReport(r.chunks, r.chunks * self.chunk_size, r.host, r.disk)

    def unpin(self, prompt, tokenizer=None) -> UnpinReport:
        return UnpinReport(self.store.unpin_chunks(self.keys(token_ids(prompt, tokenizer))))

    def clear(self, tier: str | None = None, model: str | None = None) -> ClearReport:
        """Empty one tier or all; with ``model``, only that model's entries (host and disk; Redis cannot select)."""
        tiers = parse_tier(tier)
        if model is not None and (not isinstance(model, str) or not model):
            raise ValueError(f"model={model!r} is invalid; allowed: a model_name, or its part before '@'")
        if model is not None and tiers == (Tier.REMOTE,):
            raise ValueError("clear(model=...) cannot select Redis entries (keys do not name the model); "
                             "allowed tiers with a model: host, disk, or none for both")
        before = self.store.stats()
        if model is None:
            self.store.clear(tiers)
        else:
            self._clear_model(tiers, model)
        after = self.store.stats()
        return ClearReport(tuple(t.value for t in tiers if model is None or t != Tier.REMOTE), model,
                           before.host_entries - after.host_entries, before.disk_entries - after.disk_entries,
                           len(self.store.pinned_keys()))

    def _clear_model(self, tiers: tuple[Tier, ...], model: str) -> None:
        if Tier.HOST in tiers and _names_model(self.model_name, model):  # the host tier holds this model only
            self.store.clear((Tier.HOST,))
        disk = self.store.disk
        if Tier.DISK not in tiers or disk is None:
            return
        pinned = self.store.pinned_keys()
        for key in disk.keys():
            if key in pinned:
                continue
            try:
                name = read_file_header(disk.path(key)).fingerprint.get("model_name")
            except (CorruptChunk, OSError):
                continue  # gone or unreadable: a read quarantines it
            if _names_model(name, model):
                disk.remove(key)

    def health(self) -> HealthReport:
        stats = self.store.stats()
        tiers = (TierHealth("host", stats.host_capacity_bytes > 0, True, None), self._disk_health(),
                 self._remote_health())
        remote = self.store.remote
        return HealthReport(all(t.ok for t in tiers), tiers, remote.breaker_state if remote is not None else None)

    def _disk_health(self) -> TierHealth:
        disk = self.store.disk
        if disk is None:
            local_disk = self.store.config.local_disk  # configured but disabled at start: an error
            error = f"local_disk={local_disk!r} could not be opened" if local_disk else None
            return TierHealth("disk", False, error is None, error)
        if not disk.root.is_dir():
            return TierHealth("disk", True, False, f"{disk.root} is not a directory")
        if not os.access(disk.root, os.W_OK | os.X_OK):
            return TierHealth("disk", True, False, f"{disk.root} is not writable")
        return TierHealth("disk", True, True, None)

    def _remote_health(self) -> TierHealth:
        remote = self.store.remote
        if remote is None:
            return TierHealth("remote", False, True, None)
        error = remote.ping()
        return TierHealth("remote", True, error is None, error)

    def stats(self) -> StatsReport:
        return StatsReport(self.store.stats(), len(self.store.pinned_keys()))


class ServerControl:
    """The same operations against a running SGLang server's ``/lmcache/*`` routes (JSON dicts back).

    A 4xx/5xx answer raises ``ValueError`` with the server's reason; an unreachable
    server raises ``OSError``.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 60.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"server URL {url!r} is invalid; allowed: http://HOST:PORT or https://HOST:PORT")
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s

    def lookup(self, tokens: Sequence[int] | None = None, text: str | None = None) -> dict:
        return self._call("lookup", _prompt_body(tokens, text))

    def pin(self, tokens: Sequence[int] | None = None, text: str | None = None) -> dict:
        return self._call("pin", _prompt_body(tokens, text))

    def unpin(self, tokens: Sequence[int] | None = None, text: str | None = None) -> dict:
        return self._call("unpin", _prompt_body(tokens, text))

    def clear(self, tier: str | None = None, model: str | None = None) -> dict:
        parse_tier(tier)
        return self._call("clear", {"tier": tier, "model": model})

    def health(self) -> dict:
        return self._call("health", None)

    def stats(self) -> dict:
        return self._call("stats", None)

    def _call(self, op: str, body: dict | None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}/lmcache/{op}", data=data, headers=headers,
                                         method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.load(response)
        except urllib.error.HTTPError as e:
            raise ValueError(f"{self.url}/lmcache/{op}: HTTP {e.code}: {_reason(e)}") from None
        except urllib.error.URLError as e:
            raise OSError(f"cannot reach {self.url}: {e.reason}") from None


def _prompt_body(tokens: Sequence[int] | None, text: str | None) -> dict:
    if (tokens is None) == (text is None):
        raise ValueError("give exactly one of tokens (token ids) or text")
    return {"tokens": token_ids(tokens)} if tokens is not None else {"text": text}


def _reason(error) -> str:
    try:
        return json.loads(error.read()).get("error") or str(error.reason)
    except (ValueError, AttributeError, OSError):
        return str(error.reason)
