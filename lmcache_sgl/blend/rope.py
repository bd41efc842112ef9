"""Rotary position embedding (RoPE) of K, and exact re-rotation to new positions.

RoPE turns each pair of K's rotary elements by ``position * inv_freq[i]``, so
K computed at positions ``p0`` is moved to ``p1`` by turning it by
``(p1 - p0) * inv_freq[i]``: no need for the un-rotated K. Pairs are
``(i, i + R/2)`` in neox order (Llama in SGLang and HF) or ``(2i, 2i + 1)`` in
GPT-J order; elements from ``rotary_dim`` to ``head_dim`` are not rotated.

Angles are computed in float64 and cos/sin rounded to float32 once, so a
re-rotation adds no more error than one float32 rotation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..triton_kernels.rope_rerotate import rerotate_scatter, turn_torch

SUPPORTED_SCALING = ("default", "llama3")


@dataclass(frozen=True, slots=True)
class Llama3Scaling:
    """``rope_scaling`` of type ``llama3`` (Llama 3.1+): long wavelengths slowed by ``factor``."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True, slots=True)
class RopeSpec:
    head_dim: int
    rotary_dim: int
    theta: float
    is_neox_style: bool = True
    scaling: Llama3Scaling | None = None

    def __post_init__(self) -> None:
        if not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim={self.rotary_dim} is invalid; allowed: an even number in "
                             f"[2, head_dim={self.head_dim}]")
        if not self.theta > 0:
            raise ValueError(f"rope theta={self.theta} is invalid; allowed: > 0")

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | Any, head_dim: int, *,
                       is_neox_style: bool = True) -> "RopeSpec":
        """The spec of a HF ``config.json`` (dict) or config object; refuses unsupported scalings.

        Reads ``rope_theta`` / ``partial_rotary_factor`` and ``rope_scaling``, or the
        newer ``rope_parameters`` dict that holds them both.
        """
        get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
        params = dict(get("rope_parameters") or {})
        scaling = get("rope_scaling") or params
        theta = float(params.get("rope_theta", get("rope_theta", 10000.0)))
        partial = float(params.get("partial_rotary_factor", get("partial_rotary_factor", 1.0)) or 1.0)
        return cls(head_dim, int(head_dim * partial), theta, is_neox_style, _parse_scaling(scaling))

    def inv_freq(self) -> torch.Tensor:
        """[rotary_dim / 2] float64 angular frequencies."""
        exps = torch.arange(0, self.rotary_dim, 2, dtype=torch.float64) / self.rotary_dim
        inv = 1.0 / (self.theta ** exps)
        return inv if self.scaling is None else _llama3_inv_freq(inv, self.scaling)


def _parse_scaling(scaling: Mapping[str, Any] | None) -> Llama3Scaling | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported by blending; allowed: {SUPPORTED_SCALING}")
    try:
        return Llama3Scaling(float(scaling["factor"]), float(scaling["low_freq_factor"]),
                             float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
    except KeyError as e:
        raise ValueError(f"rope_scaling type 'llama3' lacks {e.args[0]!r}") from None


def _llama3_inv_freq(inv: torch.Tensor, s: Llama3Scaling) -> torch.Tensor:
    # Wavelengths above old_len / low_freq_factor are slowed by `factor`, those below
    # old_len / high_freq_factor kept, and the band between interpolated linearly in old_len / wavelen.
    wavelen = 2 * math.pi / inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    mid = (1 - smooth) * inv / s.factor + smooth * inv
    out = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    return torch.where((wavelen <= low_wavelen) & (wavelen >= high_wavelen), mid, out)


def cos_sin(angles_pos: torch.Tensor, spec: RopeSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, rotary_dim / 2] float32 of ``angles_pos`` [T] (positions or position deltas)."""
    theta = angles_pos.to(torch.float64)[:, None] * spec.inv_freq().to(angles_pos.device)[None, :]
    return theta.cos().float(), theta.sin().float()


def apply_cos_sin(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """K [T, H, D] turned by the per-token angles behind ``cos``/``sin`` [T, R/2]; same dtype as ``k``."""
    _check_k(k, spec)
    return turn_torch(k, cos.to(k.device), sin.to(k.device), rotary_dim=spec.rotary_dim,
                      neox=spec.is_neox_style).to(k.dtype)


def rotate(k: torch.Tensor, positions: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """RoPE applied to un-rotated K [T, H, D] at ``positions`` [T]."""
    cos, sin = cos_sin(positions, spec)
    return apply_cos_sin(k, cos, sin, spec)


def rerotate(k: torch.Tensor, from_positions: torch.Tensor, to_positions: torch.Tensor,
             spec: RopeSpec) -> torch.Tensor:
    """K [T, H, D] rotated at ``from_positions`` moved to ``to_positions`` (turned by the delta)."""
    if from_positions.shape != to_positions.shape:
        raise ValueError(f"from_positions {tuple(from_positions.shape)} and to_positions "
                         f"{tuple(to_positions.shape)} differ in shape")
    cos, sin = cos_sin(to_positions.long() - from_positions.long().to(to_positions.device), spec)
    return apply_cos_sin(k, cos, sin, spec)


def _check_k(k: torch.Tensor, spec: RopeSpec) -> None:
    if k.dim() != 3 or k.shape[-1] != spec.head_dim:
        raise ValueError(f"K must be [T, H, head_dim={spec.head_dim}], got {tuple(k.shape)}")


def rerotate_into(pool_k: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, from_positions: torch.Tensor,
                  to_positions: torch.Tensor, spec: RopeSpec, backend: str = "auto") -> None:
    """``pool_k[slots] = rerotate(k, from_positions, to_positions)`` in one fused pass.

    ``pool_k``: one layer's K plane [num_slots, H, D] (D contiguous); ``k`` [T, H, D].
    Triton on CUDA, the torch reference elsewhere (``backend`` forces one).
    """
    _check_k(k, spec)
    delta = to_positions.long() - from_positions.long().to(to_positions.device)
    cos, sin = cos_sin(delta.to(pool_k.device), spec)
    rerotate_scatter(k.to(pool_k.device).contiguous(), cos, sin, pool_k, slots.to(pool_k.device),
                     rotary_dim=spec.rotary_dim, neox=spec.is_neox_style, backend=backend)
