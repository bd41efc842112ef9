"""Load or recompute: load a chunk from a tier only when that beats recomputing it.

    load time      = chunk bytes / bandwidth of the tier      (measured as the store loads)
    recompute time = chunk tokens / prefill rate              (measured by the engine's prefill)

Both estimates are exponential moving averages of observed transfers, seeded
with conservative priors. Until the engine reports a prefill rate, every tier
is worth loading. Recompute cost grows with context (attention), so treating
it as linear in tokens errs towards recomputing, never towards a slow load.

With ``load_policy: always`` every hit is loaded.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .metrics import Tier

# Priors until measurements arrive, in bytes/s. Host: a memcpy; disk: an NVMe
# behind CPU LZ4 (DESIGN.md section 7: 1.7 GB/s read, about 1-2 GB/s decode);
# remote: a 10 GbE link.
PRIOR_BANDWIDTH = {Tier.HOST: 10e9, Tier.DISK: 1.0e9, Tier.REMOTE: 1.0e9}
_EMA = 0.2  # weight of the newest observation
_MIN_OBSERVED_BYTES = 1 << 16  # smaller transfers time mostly overhead


@dataclass(frozen=True, slots=True)
class Estimate:
    load_s: float
    recompute_s: float | None  # None: no prefill rate known yet

    @property
    def load_wins(self) -> bool:
        return self.recompute_s is None or self.load_s < self.recompute_s


class CostModel:
    def __init__(self, policy: str = "auto") -> None:
        if policy not in ("auto", "always"):
            raise ValueError(f"load_policy={policy!r} is invalid; allowed: 'auto', 'always'")
        self.policy = policy
        self._lock = threading.Lock()
        self._bandwidth = dict(PRIOR_BANDWIDTH)
        self._prefill_tps: float | None = None

    def record_load(self, tier: Tier, nbytes: int, seconds: float) -> None:
        if nbytes < _MIN_OBSERVED_BYTES or seconds <= 0:
            return
        with self._lock:
            self._bandwidth[tier] = (1 - _EMA) * self._bandwidth[tier] + _EMA * nbytes / seconds

    def record_prefill(self, tokens: int, seconds: float) -> None:
        """The engine reports a prefill of ``tokens`` new tokens that took ``seconds``."""
        if tokens <= 0 or seconds <= 0:
            return
        rate = tokens / seconds
        with self._lock:
            self._prefill_tps = rate if self._prefill_tps is None else (1 - _EMA) * self._prefill_tps + _EMA * rate

    def bandwidth(self, tier: Tier) -> float:
        with self._lock:
            return self._bandwidth[tier]

    def estimate(self, tier: Tier, nbytes: int, tokens: int) -> Estimate:
        with self._lock:
            load_s = nbytes / self._bandwidth[tier]
            recompute_s = tokens / self._prefill_tps if self._prefill_tps else None
        return Estimate(load_s, recompute_s)

    def worth_loading(self, tier: Tier, nbytes: int, tokens: int) -> bool:
        return self.policy == "always" or self.estimate(tier, nbytes, tokens).load_wins
