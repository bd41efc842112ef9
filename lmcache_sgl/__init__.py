"""lmcache_sgl: a tiered KV-cache layer (GPU, host RAM, LZ4 disk, Redis) for SGLang and vLLM."""

from .config import CacheConfig, ConfigError
from .keys import ModelFingerprint, content_key, prefix_keys
from .layout import ChunkLayout
from .metrics import StoreStats, Tier
from .tiered_store import LookupResult, TieredStore

__version__ = "0.1.0"
__all__ = ["CacheConfig", "ConfigError", "ModelFingerprint", "ChunkLayout", "TieredStore", "LookupResult",
           "StoreStats", "Tier", "prefix_keys", "content_key"]
