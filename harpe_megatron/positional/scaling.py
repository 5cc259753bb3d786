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
``llama3``  Llama 3.1's frequency-dependent scaling (Meta, 2024): with ``L`` =
            ``original_max_position_embeddings``, frequencies whose wavelength 2 pi / theta_i is
            shorter than ``L / high_freq_factor`` are kept, longer than ``L / low_freq_factor``
            divided by ``factor``, and those in between blended smoothly (weight
            ``(L / wavelength - low) / (high - low)`` on the kept frequency); no attention
            temperature.                                                  HF ``llama3``

Per-head bases and a scaling compose head by head: a head with base b gets exactly the
frequencies a one-base model with ``rope_theta = b`` and this scaling would have. For ``llama3``
the wavelength bands are fixed by ``original_max_position_embeddings`` and the two factors, not
by the base, so a head whose base is the pretrained ``rope_theta`` keeps the pretrained model's
frequencies and larger bases move more of a head's dimensions into the scaled (long-wavelength)
band (docs/conversion.md, "Llama-3").

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

__all__ = ["RopeScaling", "NoScaling", "LinearScaling", "NTKScaling", "YarnScaling", "Llama3Scaling", "ROPE_SCALINGS",
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


@dataclass
class Llama3Scaling(RopeScaling):
    """Llama 3.1's scaling (see module docstring), per head with that head's base; the operations
    are transformers' ``_compute_llama3_parameters``', in its order (bit-identical frequencies)."""

    name: ClassVar[str] = "llama3"
    hf_rope_type: ClassVar[Optional[str]] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        _check_factor(self.factor)
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError("positional.scaling: llama3 needs 0 < low_freq_factor < high_freq_factor, got "
                             f"{self.low_freq_factor} and {self.high_freq_factor}")
        if self.original_max_position_embeddings <= 0:
            raise ValueError("positional.scaling.original_max_position_embeddings must be positive")

    def inverse_frequencies(self, bases, head_dim):
        inv_freq = plain_inverse_frequencies(bases, head_dim)
        old_context_len = self.original_max_position_embeddings
        low_freq_wavelen = old_context_len / self.low_freq_factor
        high_freq_wavelen = old_context_len / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth_factor) * inv_freq_llama / self.factor + smooth_factor * inv_freq_llama
        is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium_freq, smoothed, inv_freq_llama)

    def to_hf(self, theta):
        return {"rope_type": "llama3", "factor": self.factor, "low_freq_factor": self.low_freq_factor,
                "high_freq_factor": self.high_freq_factor,
                "original_max_position_embeddings": self.original_max_position_embeddings, "rope_theta": float(theta)}

    @classmethod
    def from_hf(cls, spec, hf_config, source, key="rope_parameters"):
        """All four fields are required, as transformers' validation requires them
        (``original_max_position_embeddings`` may sit at the config's top level)."""
        fields = {}
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            if spec.get(name) is None:
                raise ValueError(f"{source}: {key}.{name} is missing (llama3 RoPE scaling needs it)")
            fields[name] = float(spec[name])
        original = spec.get("original_max_position_embeddings") or hf_config.get("original_max_position_embeddings")
        if not original:
            raise ValueError(f"{source}: {key}.original_max_position_embeddings is missing (llama3 RoPE scaling needs it)")
        return cls._from_hf_fields(source, key, original_max_position_embeddings=int(original), **fields)


_SCALINGS = (NoScaling, LinearScaling, NTKScaling, YarnScaling, Llama3Scaling)
ROPE_SCALINGS: dict[str, type[RopeScaling]] = {cls.name: cls for cls in _SCALINGS}
"""Our ``positional.scaling.type`` -> class."""
HF_ROPE_TYPES: dict[str, type[RopeScaling]] = {cls.hf_rope_type: cls for cls in _SCALINGS if cls.hf_rope_type}
"""transformers' ``rope_type`` -> the class that reads it back (:meth:`RopeScaling.from_hf`)."""
