"""RoPE frequency scalings (the context-extension baselines), applied per head.

Each scaling is a small dataclass (YAML ``positional.scaling``, chosen by its ``type`` key) that
turns per-head bases into per-head inverse frequencies ``[heads, d/2]`` (fp32), says which
attention temperature it needs, and owns its mapping to and from transformers' RoPE config
(``rope_parameters``; ``rope_scaling`` in 4.x). Combined with per-head bases, a scaling acts on
every head with that head's own base, which is well defined for all of them.

``none``    theta_i = b^(-2i/d)                                  HF ``default``
``linear``  position interpolation (PI, Chen et al. 2023): theta_i / s      HF ``linear``
``ntk``     static NTK-aware scaling: base b -> b * s^(d/(d-2))  HF ``default`` with that base
``yarn``    YaRN (Peng et al. 2023): per-dimension blend of theta_i/s and theta_i with a linear
            ramp over the correction range between ``beta_fast`` and ``beta_slow`` rotations in
            the original window, and attention temperature :func:`yarn_attention_factor` on q and
            k (cos and sin scaled), i.e. attention logits scaled by its square.   HF ``yarn``

Formulas follow the YaRN paper and agree with HF transformers' rope init functions
(tests/unit/test_scaling.py, tests/unit/test_export_frequencies.py).

The HF mapping of a scaling: :meth:`RopeScaling.to_hf` (its ``rope_parameters``),
:meth:`RopeScaling.hf_bases` (the bases the HF model gets), :meth:`RopeScaling.from_hf` (back,
refusing what has no equivalent) and :data:`HF_ROPE_TYPES` (HF ``rope_type`` -> class). A new
scaling is one subclass here: its math, its config fields and these methods.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch

__all__ = ["RopeScaling", "NoScaling", "LinearScaling", "NTKScaling", "YarnScaling", "ROPE_SCALINGS",
           "HF_ROPE_TYPES", "plain_inverse_frequencies", "yarn_attention_factor"]


def plain_inverse_frequencies(bases: Sequence[float], head_dim: int) -> torch.Tensor:
    """``[len(bases), head_dim/2]`` fp32 ``base^(-2i/d)`` (the megatron/HF formula, bit for bit)."""
    if head_dim % 2:
        raise ValueError(f"rotary head dim must be even, got {head_dim}")
    b = torch.as_tensor(bases, dtype=torch.float32).reshape(-1, 1)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    return 1.0 / (b ** exponents)


def yarn_attention_factor(factor: float) -> float:
    """YaRN's attention temperature ``0.1 ln(s) + 1`` (1 for ``s <= 1``), applied to q and k."""
    return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0


@dataclass
class RopeScaling:
    """Base class: plain RoPE.

    ``hf_rope_type``: the transformers ``rope_type`` this class reads back in :meth:`from_hf`
    (``None``: no HF type of its own, e.g. static NTK, which exports as larger bases).
    """

    name: ClassVar[str] = "none"
    hf_rope_type: ClassVar[Optional[str]] = None

    def inverse_frequencies(self, bases: Sequence[float], head_dim: int) -> torch.Tensor:
        return plain_inverse_frequencies(bases, head_dim)

    @property
    def attention_factor(self) -> float:
        """Multiplier on cos/sin (q and k), so attention logits get its square."""
        return 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.name, **dataclasses.asdict(self)}

    # --- Hugging Face transformers mapping -------------------------------------------------------

    def to_hf(self, theta: float) -> dict[str, Any]:
        """transformers' ``rope_parameters`` for this scaling with base ``theta`` (plain: ``default``)."""
        return {"rope_type": "default", "rope_theta": float(theta)}

    def hf_bases(self, bases: Sequence[float], head_dim: int) -> list[float]:
        """The bases the exported HF model gets, one per head (plain RoPE: ``bases`` unchanged)."""
        return [float(b) for b in bases]

    @classmethod
    def from_hf(cls, spec: dict[str, Any], hf_config: dict[str, Any], source: str,
                key: str = "rope_parameters") -> "RopeScaling":
        """The scaling of an HF config whose RoPE dict ``spec`` (found under ``key`` of
        ``hf_config``) has this class's ``rope_type``; ``ValueError`` naming ``source`` and the
        key for what has no equivalent."""
        return cls()

    @classmethod
    def _from_hf_fields(cls, source: str, key: str, **fields: Any) -> "RopeScaling":
        try:
            return cls(**fields)
        except ValueError as exc:
            raise ValueError(f"{source}: {key}: {exc}") from None


@dataclass
class NoScaling(RopeScaling):
    name: ClassVar[str] = "none"
    hf_rope_type: ClassVar[Optional[str]] = "default"


def _check_factor(factor: float) -> None:
    if not factor >= 1.0:
        raise ValueError(f"positional.scaling.factor must be >= 1, got {factor}")


@dataclass
class LinearScaling(RopeScaling):
    """Position interpolation: every frequency divided by ``factor``."""

    name: ClassVar[str] = "linear"
    hf_rope_type: ClassVar[Optional[str]] = "linear"
    factor: float = 1.0

    def __post_init__(self) -> None:
        _check_factor(self.factor)

    def inverse_frequencies(self, bases, head_dim):
        return plain_inverse_frequencies(bases, head_dim) / self.factor

    def to_hf(self, theta):
        return {"rope_type": "linear", "factor": self.factor, "rope_theta": float(theta)}

    @classmethod
    def from_hf(cls, spec, hf_config, source, key="rope_parameters"):
        if spec.get("factor") is None:
            raise ValueError(f"{source}: {key}.factor is missing (linear RoPE scaling needs it)")
        return cls._from_hf_fields(source, key, factor=float(spec["factor"]))


@dataclass
class NTKScaling(RopeScaling):
    """Static NTK-aware scaling: each base b becomes ``b * factor^(d/(d-2))``; exported to HF as
    those bases (plain RoPE), so an HF config never reads back as NTK."""

    name: ClassVar[str] = "ntk"
    factor: float = 1.0

    def __post_init__(self) -> None:
        _check_factor(self.factor)

    def hf_bases(self, bases, head_dim):
        grow = self.factor ** (head_dim / (head_dim - 2))
        return [float(b) * grow for b in bases]

    def inverse_frequencies(self, bases, head_dim):
        return plain_inverse_frequencies(self.hf_bases(bases, head_dim), head_dim)


@dataclass
class YarnScaling(RopeScaling):
    """YaRN with the original pre-training window ``original_max_position_embeddings``."""

    name: ClassVar[str] = "yarn"
    hf_rope_type: ClassVar[Optional[str]] = "yarn"
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
        return yarn_attention_factor(self.factor)

    def to_hf(self, theta):
        return {"rope_type": "yarn", "factor": self.factor,
                "original_max_position_embeddings": self.original_max_position_embeddings,
                "beta_fast": self.beta_fast, "beta_slow": self.beta_slow, "truncate": self.truncate,
                "attention_factor": self.attention_factor, "rope_theta": float(theta)}

    @classmethod
    def from_hf(cls, spec, hf_config, source, key="rope_parameters"):
        """transformers' defaults: ``original_max_position_embeddings`` from the config's top level
        (then ``max_position_embeddings``), ``factor`` = max / original, betas 32 and 1."""
        for extra in ("mscale", "mscale_all_dim"):
            if spec.get(extra):
                raise ValueError(f"{source}: {key}.{extra} (DeepSeek-style YaRN) is not supported")
        original = (spec.get("original_max_position_embeddings") or hf_config.get("original_max_position_embeddings")
                    or hf_config.get("max_position_embeddings"))
        if not original:
            raise ValueError(f"{source}: YaRN needs original_max_position_embeddings")
        factor = float(spec.get("factor") or hf_config["max_position_embeddings"] / original)
        given = spec.get("attention_factor")
        if given is not None and abs(float(given) - yarn_attention_factor(factor)) > 1e-9:
            raise ValueError(f"{source}: {key}.attention_factor={given} differs from YaRN's 0.1 ln(factor) + 1 "
                             f"= {yarn_attention_factor(factor)}; not supported")
        return cls._from_hf_fields(
            source, key, factor=factor, original_max_position_embeddings=int(original),
            beta_fast=float(spec.get("beta_fast") or 32.0), beta_slow=float(spec.get("beta_slow") or 1.0),
            truncate=bool(spec.get("truncate", True)))


_SCALINGS = (NoScaling, LinearScaling, NTKScaling, YarnScaling)
ROPE_SCALINGS: dict[str, type[RopeScaling]] = {cls.name: cls for cls in _SCALINGS}
"""Our ``positional.scaling.type`` -> class."""
HF_ROPE_TYPES: dict[str, type[RopeScaling]] = {cls.hf_rope_type: cls for cls in _SCALINGS if cls.hf_rope_type}
"""transformers' ``rope_type`` -> the class that reads it back (:meth:`RopeScaling.from_hf`)."""
