"""RoPE frequency scalings (the context-extension baselines), applied per head.

Each scaling is a small dataclass (YAML ``positional.scaling``, chosen by its ``type`` key) that
turns per-head bases into per-head inverse frequencies ``[heads, d/2]`` (fp32) and says which
attention temperature it needs. Combined with per-head bases, a scaling acts on every head with
that head's own base, which is well defined for all of them.

``none``    theta_i = b^(-2i/d)
``linear``  position interpolation (PI, Chen et al. 2023): theta_i / s
``ntk``     static NTK-aware scaling: base b -> b * s^(d/(d-2))
``yarn``    YaRN (Peng et al. 2023): per-dimension blend of theta_i/s and theta_i with a linear
            ramp over the correction range between ``beta_fast`` and ``beta_slow`` rotations in
            the original window, and attention temperature mscale = 0.1 ln(s) + 1 on q and k
            (cos and sin scaled), i.e. attention logits scaled by mscale^2.

Formulas follow the YaRN paper and agree with HF transformers' rope init functions
(tests/unit/test_scaling.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

__all__ = ["RopeScaling", "NoScaling", "LinearScaling", "NTKScaling", "YarnScaling", "ROPE_SCALINGS",
           "plain_inverse_frequencies"]


def plain_inverse_frequencies(bases: Sequence[float], head_dim: int) -> torch.Tensor:
    """``[len(bases), head_dim/2]`` fp32 ``base^(-2i/d)`` (the megatron/HF formula, bit for bit)."""
    if head_dim % 2:
        raise ValueError(f"rotary head dim must be even, got {head_dim}")
    b = torch.as_tensor(bases, dtype=torch.float32).reshape(-1, 1)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    return 1.0 / (b ** exponents)


@dataclass
class RopeScaling:
    """Base class: plain RoPE."""

    name: ClassVar[str] = "none"

    def inverse_frequencies(self, bases: Sequence[float], head_dim: int) -> torch.Tensor:
        return plain_inverse_frequencies(bases, head_dim)

    @property
    def attention_factor(self) -> float:
        """Multiplier on cos/sin (q and k), so attention logits get its square."""
        return 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.name, **dataclasses.asdict(self)}


@dataclass
class NoScaling(RopeScaling):
    name: ClassVar[str] = "none"


def _check_factor(factor: float) -> None:
    if not factor >= 1.0:
        raise ValueError(f"positional.scaling.factor must be >= 1, got {factor}")


@dataclass
class LinearScaling(RopeScaling):
    """Position interpolation: every frequency divided by ``factor``."""

    name: ClassVar[str] = "linear"
    factor: float = 1.0

    def __post_init__(self) -> None:
        _check_factor(self.factor)

    def inverse_frequencies(self, bases, head_dim):
        return plain_inverse_frequencies(bases, head_dim) / self.factor


@dataclass
class NTKScaling(RopeScaling):
    """Static NTK-aware scaling: each base b becomes ``b * factor^(d/(d-2))``."""

    name: ClassVar[str] = "ntk"
    factor: float = 1.0

    def __post_init__(self) -> None:
        _check_factor(self.factor)

    def inverse_frequencies(self, bases, head_dim):
        grow = self.factor ** (head_dim / (head_dim - 2))
        return plain_inverse_frequencies([b * grow for b in bases], head_dim)


@dataclass
class YarnScaling(RopeScaling):
    """YaRN with the original pre-training window ``original_max_position_embeddings``."""

    name: ClassVar[str] = "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True

    def __post_init__(self) -> None:
        _check_factor(self.factor)
        if self.original_max_position_embeddings <= 0:
            raise ValueError("positional.scaling.original_max_position_embeddings must be positive")

    def _correction_range(self, base: float, head_dim: int) -> tuple[float, float]:
        def dim_for(rotations: float) -> float:
            wavelength_ratio = self.original_max_position_embeddings / (rotations * 2 * math.pi)
            return head_dim * math.log(wavelength_ratio) / (2 * math.log(base))

        low, high = dim_for(self.beta_fast), dim_for(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        return max(low, 0), min(high, head_dim - 1)

    def inverse_frequencies(self, bases, head_dim):
        plain = plain_inverse_frequencies(bases, head_dim)
        rows = []
        for row, base in zip(plain, bases):
            low, high = self._correction_range(float(base), head_dim)
            if low == high:
                high += 0.001
            ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
            keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate
            rows.append(row / self.factor * (1 - keep) + row * keep)
        return torch.stack(rows)

    @property
    def attention_factor(self) -> float:
        return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0


ROPE_SCALINGS: dict[str, type[RopeScaling]] = {
    cls.name: cls for cls in (NoScaling, LinearScaling, NTKScaling, YarnScaling)
}
