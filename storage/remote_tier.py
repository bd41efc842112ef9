"""The remote tier: chunk blobs (the disk format, byte for byte) in Redis.

Several engines on several hosts share one cache through it. Every failure
(server down, timeout) is logged and becomes a miss or a dropped write; the
engine never sees an exception from here. Keys live under ``lmcsgl:<key>``.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

_NAMESPACE = "lmcsgl:"
_TIMEOUT_S = 2.0


class RemoteTier:
    def __init__(self, url: str) -> None:
        try:
            import redis
        except ImportError as e:
            raise ValueError(f"remote_url={url!r} needs the redis client: pip install 'lmcache_sgl[redis]'") from e
        self.url = url
        self._client = redis.Redis.from_url(url, socket_timeout=_TIMEOUT_S, socket_connect_timeout=_TIMEOUT_S)
        self._errors_lock = threading.Lock()
        self.errors = 0

    def _failed(self, op: str, key: str, e: Exception) -> None:
        with self._errors_lock:
            self.errors += 1
        log.warning("remote tier %s: %s %s failed: %s", self.url, op, key, e)

    def contains(self, key: str) -> bool:
        try:
            return bool(self._client.exists(_NAMESPACE + key))
        except Exception as e:  # redis.RedisError, OSError
            self._failed("exists", key, e)
            return False

    def read(self, key: str) -> bytes | None:
        try:
            return self._client.get(_NAMESPACE + key)
        except Exception as e:
            self._failed("get", key, e)
            return None

    def write(self, key: str, blob: bytes) -> bool:
        try:
            self._client.set(_NAMESPACE + key, blob)
            return True
        except Exception as e:
            self._failed("set", key, e)
            return False

    def remove(self, key: str) -> None:
        try:
            self._client.delete(_NAMESPACE + key)
        except Exception as e:
            self._failed("delete", key, e)

    def clear(self) -> None:
        try:
            keys = list(self._client.scan_iter(match=_NAMESPACE + "*", count=1000))
            if keys:
                self._client.delete(*keys)
        except Exception as e:
            self._failed("clear", "*", e)

    def close(self) -> None:
        self._client.close()
