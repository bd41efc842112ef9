"""The remote tier: chunk blobs (the disk format, byte for byte) in Redis.

Several engines on several hosts share one cache through it. Every failure
(server down, timeout) is logged and becomes a miss or a dropped write; the
engine never sees an exception from here. Keys live under ``lmcsgl:<key>``.

Bounded waits: each call has a connect and read timeout and no retries, and a
circuit breaker skips the server after a failure (see ``CircuitBreaker``), so a
Redis that stops answering costs a caller at most one timeout per back-off
period; while the breaker is open, every call answers a miss at once.

Credentials: the URL may carry them (``redis://user:pass@host:port/db``,
``rediss://`` for TLS). Only ``redact_url``'s form of it is ever logged or put
in an error message, and errors from the client are scrubbed of the password.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Callable, Sequence, TypeVar
from urllib.parse import unquote

from .chunk_file import CorruptChunk

log = logging.getLogger(__name__)

_NAMESPACE = "lmcsgl:"
BACKOFF_BASE_S = 0.5  # the first open period; it doubles on each failed probe
T = TypeVar("T")
URL_SCHEMES = ("redis", "rediss")  # rediss: TLS
_QUERY_SECRET = re.compile(r"(?i)((?:^|&)[^=&]*password=)([^&#]*)")  # redis-py reads ?password=... too


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (scheme, user, host, port, db kept); safe to log.

    ``redis://user:pass@host:6379/0`` -> ``redis://user:***@host:6379/0``. Userinfo without a
    colon is hidden whole (it may be a bare token), and so are ``password=`` query values.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return f"***@{url.rpartition('@')[2]}" if "@" in url else url
    before_query, q, query = rest.partition("?")
    userinfo, at, host_path = before_query.rpartition("@")
    if at:
        user = userinfo.partition(":")[0] if ":" in userinfo else ""
        before_query = f"{user}:***@{host_path}" if user else f"***@{host_path}"
    return f"{scheme}://{before_query}{q}{_QUERY_SECRET.sub(_hide_value, query)}"


def _hide_value(m: re.Match) -> str:
    return m.group(1) + "***"


def url_secrets(url: str) -> list[str]:
    """Every password the URL carries, raw and percent-decoded: what to scrub from messages."""
    rest = url.partition("://")[2]
    before_query, _, query = rest.partition("?")
    userinfo = before_query.rpartition("@")[0]
    found = [userinfo.partition(":")[2] if ":" in userinfo else userinfo]
    found += [m.group(2) for m in _QUERY_SECRET.finditer(query)]
    return sorted({v for s in found if s for v in (s, unquote(s))}, key=len, reverse=True)


class CircuitBreaker:
    """Closed: every call passes. A failure opens it for a back-off; then one
    caller probes (half-open) while the others are still refused. The probe's
    success closes it and resets the back-off; its failure reopens it for
    twice the previous period, at most ``max_s``.

    Thread-safe. ``allow()`` before a call, then ``record_success()`` or
    ``record_failure()``; ``trips`` counts the closed/half-open -> open moves.
    """

    def __init__(self, base_s: float, max_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._base = min(base_s, max_s)
        self._max = max_s
        self._clock = clock
        self._lock = threading.Lock()
        self._open_until: float | None = None  # None: closed
        self._backoff = 0.0  # the current open period; 0 while closed
        self._probing = False
        self.trips = 0

    @property
    def state(self) -> str:
        """'closed' (calls pass), 'open' (refused until the back-off ends) or 'half_open' (one probe may pass)."""
        with self._lock:
            if self._open_until is None:
                return "closed"
            return "open" if self._clock() < self._open_until else "half_open"

    def allow(self) -> bool:
        with self._lock:
            if self._open_until is None:
                return True
            if self._probing or self._clock() < self._open_until:
                return False
            self._probing = True  # this caller is the one probe
            return True

    def record_success(self) -> None:
        with self._lock:
            self._open_until, self._backoff, self._probing = None, 0.0, False

    def record_failure(self) -> bool:
        """True when this failure opened the breaker (a late failure of a call
        that started before it opened does not extend the back-off)."""
        with self._lock:
            if self._open_until is not None and not self._probing:
                return False
            self._backoff = self._base if self._backoff == 0.0 else min(2 * self._backoff, self._max)
            self._open_until = self._clock() + self._backoff
            self._probing = False
            self.trips += 1
            return True


class RemoteTier:
    def __init__(self, url: str, timeout_s: float = 0.25, backoff_max_s: float = 30.0,
                 ttl_s: int | None = None) -> None:
        self.url = redact_url(url)  # the only form of the URL this object shows
        self._secrets = url_secrets(url)
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"remote_ttl_s={ttl_s!r} is invalid; allowed: seconds > 0, or unset")
        self.ttl_s = ttl_s  # None: entries live until Redis evicts them
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as e:
            hint = "pip install 'lmcache_sgl[redis]'"
            raise ValueError(f"remote_url={self.url!r} needs the redis client: {hint}") from e
        # No retries: a retry would multiply the time a caller waits on a silent server.
        try:
            self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                                retry=Retry(NoBackoff(), 0), retry_on_timeout=False)
        except ValueError as e:  # a malformed URL; redis-py's message may quote it
            raise ValueError(f"remote_url={self.url!r} is invalid: {self._scrub(str(e))}") from None
        self._breaker = CircuitBreaker(BACKOFF_BASE_S, backoff_max_s)
        self._errors_lock = threading.Lock()
        self.errors = 0

    @property
    def breaker_trips(self) -> int:
        return self._breaker.trips

    @property
    def breaker_state(self) -> str:
        return self._breaker.state

    def ping(self) -> str | None:
        """None when the server answers PING, else why not (redacted); skips the server while the breaker is open."""
        if not self._breaker.allow():
            return "circuit breaker open"
        try:
            self._client.ping()
        except Exception as e:  # redis.RedisError, OSError
            self._failed("ping", "-", e)
            return self._scrub(str(e)) or type(e).__name__
        self._breaker.record_success()
        return None

    def _call(self, op: str, key: str, fn: Callable[[], T], default: T) -> T:
        """``fn()``, or ``default`` when the breaker is open or the call fails."""
        if not self._breaker.allow():
            return default
        try:
            result = fn()
        except Exception as e:  # redis.RedisError, OSError
            self._failed(op, key, e)
            return default
        self._breaker.record_success()
        return result

    def _failed(self, op: str, key: str, e: Exception) -> None:
        with self._errors_lock:
            self.errors += 1
        tripped = self._breaker.record_failure()
        log.warning("remote tier %s: %s %s failed: %s%s", self.url, op, key, self._scrub(str(e)),
                    "; skipping the server for a back-off" if tripped else "")

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def contains(self, key: str) -> bool:
        return self.contains_many([key])[0]

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """Which keys are stored, in one round trip (a pipeline of EXISTS)."""
        if not keys:
            return []

        def exists_all() -> list[bool]:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(_NAMESPACE + key)
            return [bool(n) for n in pipe.execute()]

        return self._call("exists", keys[0] if len(keys) == 1 else f"{keys[0]} (+{len(keys) - 1})",
                          exists_all, [False] * len(keys))

    def read(self, key: str, max_bytes: int | None = None) -> bytes | None:
        """The blob, or None on a miss or failure. A value longer than ``max_bytes``
        raises ``CorruptChunk``; at most ``max_bytes + 1`` bytes are transferred."""
        if max_bytes is None:
            return self._call("get", key, lambda: self._client.get(_NAMESPACE + key), None)
        # GETRANGE bounds the transfer; a missing key reads as b"" (no valid blob is empty).
        blob = self._call("get", key, lambda: self._client.getrange(_NAMESPACE + key, 0, max_bytes), None)
        if blob is not None and len(blob) > max_bytes:
            raise CorruptChunk(f"remote value is more than {max_bytes} bytes, longer than any chunk of this layout")
        return blob or None

    def write(self, key: str, blob: bytes) -> bool:
        return self._call("set", key, lambda: bool(self._client.set(_NAMESPACE + key, blob, ex=self.ttl_s)), False)

    def remove(self, key: str) -> None:
        self._call("delete", key, lambda: self._client.delete(_NAMESPACE + key), None)

    def clear(self) -> None:
        def delete_all() -> None:
            keys = list(self._client.scan_iter(match=_NAMESPACE + "*", count=1000))
            if keys:
                self._client.delete(*keys)

        self._call("clear", "*", delete_all, None)

    def close(self) -> None:
        self._client.close()
