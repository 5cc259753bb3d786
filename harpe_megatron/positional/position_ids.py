"""Position-id schemes that train a long window inside a short one: CREAM and PoSE.

Both pick which tokens of a long document a short training sample shows, and which positions
(in the long, target window) they carry. The model then runs with
``positional.position_ids: from_batch`` and these ids drive the rotary tables.

A scheme's ``sample(rng)`` returns ``(token_index, position_ids)``, two int64 arrays of the
training length ``n``: the sample is ``doc[token_index]`` with positions ``position_ids``
(strictly increasing, all in ``[0, target_length)``). Deterministic for a given
``numpy.random.Generator`` state.

CREAM (Wu et al., NeurIPS 2024; REFERENCE.md section 2), window ``N``, target ``L = factor * N``:
head and tail segments of ``h`` tokens each (``h = N // 3``, "relativity", or
``h = 4 * factor``, "continuity", with probability 1/2), keep their true positions ``[0, h)``
and ``[L - h, L)``; the middle ``Lm = N - 2h`` tokens are a contiguous span ending at ``end``,
``end ~ U_int[h + (Lm - 1) r / 2, (r / 2) N - h - 1]`` with ``r`` an integer from a normal
(mean ``1 + factor``, std 3) truncated to ``[2, 2 factor]`` -- which centres the middle segment
near the middle of the target window. Tokens are taken from the same positions of the document.

PoSE (Zhu et al., ICLR 2024): the first ``N`` tokens of the document, cut into ``chunks`` equal
chunks; chunk ``i`` is shifted by ``u_i ~ U_int[u_{i-1}, L - N]`` (``u_0 = 0``), so positions
grow monotonically and reach at most ``L - 1``. Tokens are contiguous (content is unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import ClassVar

import numpy as np

__all__ = ["CreamPositions", "PosePositions", "truncated_normal_int"]


def truncated_normal_int(rng: np.random.Generator, mean: float, std: float, low: float, high: float) -> int:
    """An int from N(mean, std) restricted to [low, high] by inverse-CDF sampling (cast down)."""
    dist = NormalDist(mean, std)
    u = rng.uniform(dist.cdf(low), dist.cdf(high))
    return int(min(max(dist.inv_cdf(u), low), high))


@dataclass
class CreamPositions:
    """CREAM's positions for a window of ``pretrained_length`` tokens and target ``factor`` x longer."""

    name: ClassVar[str] = "cream"
    pretrained_length: int = 4096
    factor: int = 8

    def __post_init__(self) -> None:
        if self.factor < 2:
            raise ValueError(f"cream.factor must be >= 2, got {self.factor}")
        if self.pretrained_length < 12 * self.factor:
            raise ValueError("cream.pretrained_length is too short for the continuity segments (4 x factor)")

    @property
    def target_length(self) -> int:
        return self.pretrained_length * self.factor

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        n, k = self.pretrained_length, self.factor
        head = n // 3 if rng.random() < 0.5 else 4 * k
        middle = n - 2 * head
        r = truncated_normal_int(rng, 1 + k, 3.0, 2, 2 * k)
        low = head + int((middle - 1) * r / 2)
        high = int(r / 2 * n) - head - 1
        end = int(rng.integers(low, max(high, low) + 1))
        positions = np.concatenate([
            np.arange(head),
            np.arange(end - middle + 1, end + 1),
            np.arange(self.target_length - head, self.target_length),
        ]).astype(np.int64)
        return positions.copy(), positions


@dataclass
class PosePositions:
    """PoSE's skip-wise positions: ``chunks`` chunks of the window, each shifted further."""

    name: ClassVar[str] = "pose"
    pretrained_length: int = 4096
    target_length: int = 32768
    chunks: int = 2

    def __post_init__(self) -> None:
        if self.target_length < self.pretrained_length:
            raise ValueError("pose.target_length must be >= pose.pretrained_length")
        if not 1 <= self.chunks <= self.pretrained_length:
            raise ValueError(f"pose.chunks must be in [1, pretrained_length], got {self.chunks}")

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        n = self.pretrained_length
        bounds = np.linspace(0, n, self.chunks + 1).astype(np.int64)
        positions = np.empty(n, dtype=np.int64)
        shift = 0
        for i in range(self.chunks):
            if i > 0:
                shift = int(rng.integers(shift, self.target_length - n + 1))
            positions[bounds[i]:bounds[i + 1]] = np.arange(bounds[i], bounds[i + 1]) + shift
        return np.arange(n, dtype=np.int64), positions
