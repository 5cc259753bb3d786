"""Carry a RoPE base chosen for one context length over to another length.

A RoPE base ``b`` gives dimension pair ``i`` (of ``d/2``) the wavelength ``2 pi b^(2i/d)``
tokens. Pairs whose wavelength exceeds the context window ``L`` never complete a period in
training; which angles a model sees, and so how it extrapolates, is set by the share of pairs on
each side of that line, ``2 i_c / d = ln(L / 2 pi) / ln(b)`` (the "critical dimension" of Liu et
al. 2023, "Scaling Laws of RoPE-based Extrapolation", as a fraction of the head dim). The rule
here keeps that share: a base ``b`` at length ``L`` becomes, at length ``L'``,

    b' = (L' / 2 pi) ^ kappa,    kappa = ln(b) / ln(L / 2 pi),

the same for every head dim. Examples (Llama-2 and HARPE, arXiv 2412.07171): base 1e4 at 4096
(kappa 1.421) -> 72.6 at 128 tokens; the paper's per-head range 1e6 .. 5e6 at 131072 (kappa
1.389 .. 1.551) -> 1183 .. 2697 at 1024 tokens. ``docs/reproduction.md`` applies it to every
method's base in the small-scale reproduction.
"""

from __future__ import annotations

import math

__all__ = ["base_exponent", "transfer_base"]


def base_exponent(base: float, length: int) -> float:
    """``kappa = ln(base) / ln(length / 2 pi)``: the base as a power of ``length / 2 pi``."""
    if not base > 1.0:
        raise ValueError(f"a RoPE base must be > 1, got {base}")
    if not length > 2 * math.pi:
        raise ValueError(f"the context length must exceed 2 pi tokens, got {length}")
    return math.log(base) / math.log(length / (2 * math.pi))


def transfer_base(base: float, length: int, new_length: int) -> float:
    """The base at ``new_length`` with the same critical-dimension share as ``base`` at ``length``."""
    return (new_length / (2 * math.pi)) ** base_exponent(base, length)
