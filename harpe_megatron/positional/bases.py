"""How each attention head gets its RoPE base: selection strategies and their validation.

A strategy is a small dataclass with its own fields (YAML ``positional.bases``, chosen by its
``strategy`` key) and one method, ``resolve(count, head_dim)``, returning ``count`` bases in head
order. ``count`` is the number of *distinct* bases the model needs: one per KV group (GQA: the
query heads of a group share their key, so they must share its base; for MHA, one per head).
:func:`per_query_head_bases` expands that to one value per query head, the form stored in
configs, checkpoints and the HF export (``harpe_rope_bases``).

Strategies
----------
``paper``        HARPE Table 2 (Llama-2-7B, 32 heads, b_min 1e6, b_max 5e6, stride 3e4).
``uniform``      evenly spaced in [b_min, b_max], ascending or descending head order.
``peak_valley``  the greedy complementary search of HARPE's Algorithm 1
                 (:mod:`harpe_megatron.positional.peak_valley`).
``constant``     one base for every head (ABF, and plain Llama with base 1e4).
``explicit``     a list given in the config (``count`` values, or one per query head).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from harpe_megatron.positional.peak_valley import peak_valley_bases

__all__ = [
    "PAPER_LLAMA2_7B_BASES",
    "BaseStrategy",
    "PaperBases",
    "UniformBases",
    "PeakValleyBases",
    "ConstantBase",
    "ExplicitBases",
    "BASE_STRATEGIES",
    "base_strategy_from_dict",
    "per_query_head_bases",
    "validate_bases",
]

# HARPE (arXiv 2412.07171) Table 2, heads 1..32, in units of 1e6.
_PAPER_TABLE_1E6 = (
    1.00, 1.15, 1.30, 1.45, 2.17, 2.20, 2.23, 2.47,
    2.50, 2.65, 2.68, 2.71, 2.74, 2.80, 2.83, 2.92,
    3.01, 3.04, 3.10, 3.13, 3.16, 3.22, 3.43, 3.46,
    3.61, 3.88, 4.09, 4.15, 4.39, 4.45, 4.51, 4.54,
)
# Rounded through integers so that e.g. 2.17 * 1e6 is exactly 2_170_000.0.
PAPER_LLAMA2_7B_BASES: tuple[float, ...] = tuple(float(round(v * 1e6)) for v in _PAPER_TABLE_1E6)


def validate_bases(bases: Sequence[float], count: int, where: str = "positional.bases") -> list[float]:
    """Check a list of bases: ``count`` finite values, each > 1. Returns it as floats."""
    values = [float(b) for b in bases]
    if len(values) != count:
        raise ValueError(f"{where}: expected {count} bases (one per head/KV group), got {len(values)}")
    bad = [b for b in values if not math.isfinite(b) or b <= 1.0]
    if bad:
        raise ValueError(f"{where}: every RoPE base must be a finite number > 1, got {bad[:4]}")
    return values


@dataclass
class BaseStrategy:
    """Base class: a strategy's config fields plus ``resolve``."""

    name: ClassVar[str] = ""

    def resolve(self, count: int, head_dim: int) -> list[float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.name, **dataclasses.asdict(self)}


@dataclass
class PaperBases(BaseStrategy):
    """The paper's 32 bases for Llama-2-7B (MHA, 32 heads)."""

    name: ClassVar[str] = "paper"

    def resolve(self, count: int, head_dim: int) -> list[float]:
        if count != len(PAPER_LLAMA2_7B_BASES):
            raise ValueError(
                f"positional.bases: strategy 'paper' is the Llama-2-7B table of "
                f"{len(PAPER_LLAMA2_7B_BASES)} heads, but the model needs {count} distinct bases; "
                "use 'uniform' or 'peak_valley' for other head counts"
            )
        return list(PAPER_LLAMA2_7B_BASES)


@dataclass
class UniformBases(BaseStrategy):
    """``b_h = b_min + h (b_max - b_min) / (N - 1)``; ``order`` ascending or descending."""

    name: ClassVar[str] = "uniform"
    b_min: float = 1e6
    b_max: float = 5e6
    order: str = "ascending"

    def __post_init__(self) -> None:
        if self.order not in ("ascending", "descending"):
            raise ValueError(f"positional.bases.order: expected 'ascending' or 'descending', got {self.order!r}")
        if not 1.0 < self.b_min < self.b_max:
            raise ValueError(f"positional.bases: need 1 < b_min < b_max, got b_min={self.b_min}, b_max={self.b_max}")

    def resolve(self, count: int, head_dim: int) -> list[float]:
        if count == 1:
            values = [float(self.b_min)]
        else:
            step = (self.b_max - self.b_min) / (count - 1)
            values = [self.b_min + h * step for h in range(count)]
            values[-1] = float(self.b_max)
        return values if self.order == "ascending" else values[::-1]


@dataclass
class PeakValleyBases(BaseStrategy):
    """HARPE Algorithm 1 (greedy peak-valley complementary search) on the grid ``b_min + k*stride``."""

    name: ClassVar[str] = "peak_valley"
    b_min: float = 1e6
    b_max: float = 5e6
    stride: float = 3e4
    max_distance: int = 131072

    def __post_init__(self) -> None:
        if not 1.0 < self.b_min < self.b_max:
            raise ValueError(f"positional.bases: need 1 < b_min < b_max, got b_min={self.b_min}, b_max={self.b_max}")
        if self.stride <= 0:
            raise ValueError(f"positional.bases.stride must be > 0, got {self.stride}")

    def resolve(self, count: int, head_dim: int) -> list[float]:

        return peak_valley_bases(
            num_heads=count, b_min=self.b_min, b_max=self.b_max, stride=self.stride,
            head_dim=head_dim, max_distance=self.max_distance,
        )


@dataclass
class ConstantBase(BaseStrategy):
    """One base for all heads: plain RoPE (1e4 for Llama-2) or ABF (e.g. 5e6)."""

    name: ClassVar[str] = "constant"
    base: float = 10000.0

    def resolve(self, count: int, head_dim: int) -> list[float]:
        return [float(self.base)] * count


@dataclass
class ExplicitBases(BaseStrategy):
    """Bases listed in the config: one per KV group, or one per query head."""

    name: ClassVar[str] = "explicit"
    values: list[float] = field(default_factory=list)

    def resolve(self, count: int, head_dim: int) -> list[float]:
        return validate_bases(self.values, count, "positional.bases.values")


BASE_STRATEGIES: dict[str, type[BaseStrategy]] = {
    cls.name: cls for cls in (PaperBases, UniformBases, PeakValleyBases, ConstantBase, ExplicitBases)
}


def base_strategy_from_dict(spec: dict[str, Any], where: str = "positional.bases") -> BaseStrategy:
    """Build a strategy from its YAML mapping, e.g. ``{strategy: uniform, b_min: 1e6, b_max: 5e6}``."""
    if not isinstance(spec, dict) or "strategy" not in spec:
        raise ValueError(f"{where}: expected a mapping with a 'strategy' key, one of {sorted(BASE_STRATEGIES)}")
    spec = dict(spec)
    name = spec.pop("strategy")
    if name not in BASE_STRATEGIES:
        raise ValueError(f"{where}.strategy: unknown strategy {name!r}; expected one of {sorted(BASE_STRATEGIES)}")
    cls = BASE_STRATEGIES[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {unknown} for strategy {name!r}; allowed: {sorted(known) or 'none'}"
        )
    return cls(**spec)


def check_group_bases(head_bases: Sequence[float], num_query_groups: int, where: str) -> None:
    """Every KV group's query heads (consecutive in megatron head order) share one base (GQA: the
    heads of a group share their key, hence its rotation); ValueError naming ``where`` if not."""
    per_group = len(head_bases) // num_query_groups
    for g in range(num_query_groups):
        group = list(head_bases[g * per_group : (g + 1) * per_group])
        if len(set(group)) != 1:
            raise ValueError(f"{where}: query heads {g * per_group}..{(g + 1) * per_group - 1} share KV group {g} "
                             f"(GQA) and so must share one RoPE base, got {group}")


def per_query_head_bases(
    strategy: BaseStrategy, num_attention_heads: int, num_query_groups: int, head_dim: int
) -> list[float]:
    """One base per query head (megatron head order), consistent inside every KV group.

    ``explicit`` lists may give one value per query head; they are accepted only if all heads of
    a KV group share a value. Every other strategy is asked for one base per KV group.
    """
    if num_attention_heads % num_query_groups:
        raise ValueError(
            f"num_attention_heads ({num_attention_heads}) must be divisible by num_query_groups ({num_query_groups})"
        )
    per_group = num_attention_heads // num_query_groups
    if isinstance(strategy, ExplicitBases) and len(strategy.values) == num_attention_heads and per_group > 1:
        values = validate_bases(strategy.values, num_attention_heads, "positional.bases.values")
        check_group_bases(values, num_query_groups, "positional.bases.values")
        return values
    group_bases = validate_bases(strategy.resolve(num_query_groups, head_dim), num_query_groups, "positional.bases")
    return [b for b in group_bases for _ in range(per_group)]
