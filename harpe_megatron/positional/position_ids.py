"""Position-id schemes that train a long window inside a short one: CREAM and PoSE.

Both pick which tokens of a long document a short training sample shows, and which positions
(in the long, target window) they carry. The model then runs with
``positional.position_ids: from_batch`` (implied by setting ``data.position_scheme``) and these
ids drive the rotary tables.

A scheme's ``sample(rng, n)`` returns ``(token_index, position_ids)``, two int64 arrays of the
training length ``n`` (the window, ``data.seq_length``): the sample is ``doc[token_index]`` with
positions ``position_ids`` (strictly increasing, all in ``[0, target_length(n))``).
Deterministic for a given ``numpy.random.Generator`` state.

CREAM (Wu et al., NeurIPS 2024, arXiv 2406.07138; reference implementation: the public repository
wutong4012/CREAM, ``src/train.py``), window ``N``, target ``L = factor * N``: head and tail
segments of ``h`` tokens each (``h = N // 3``, "relativity", or ``h = 4 * factor``, "continuity",
with probability 1/2), keep their true positions ``[0, h)`` and ``[L - h, L)``; the middle
``Lm = N - 2h`` tokens are a contiguous span ending at ``end``,
``end ~ U_int[h + (Lm - 1) r / 2, (r / 2) N - h - 1]`` with ``r = int(clamp(x, 2, 2 factor))``,
``x ~ Normal(1 + factor, 3)`` (:func:`clamped_normal_int`) -- which centres the middle segment
near the middle of the target window. Tokens are taken from the same positions of the document.
The reference draws ``x`` from Normal(9, 3) for every factor and clamps it the same way; at its
factor 8 the two are the same distribution. Why the mean follows the factor here: docs/data.md,
"CREAM's middle segment for factors other than 8".

PoSE (Zhu et al., ICLR 2024): the first ``N`` tokens of the document, cut into ``chunks`` equal
chunks; chunk ``i`` is shifted by ``u_i ~ U_int[u_{i-1}, L - N]`` (``u_0 = 0``), so positions
grow monotonically and reach at most ``L - 1``. Tokens are contiguous (content is unchanged).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np

__all__ = ["PositionScheme", "CreamPositions", "PosePositions", "POSITION_SCHEMES", "clamped_normal_int"]


def clamped_normal_int(rng: np.random.Generator, mean: float, std: float, low: int, high: int) -> int:
    """``int(x)`` of ``x ~ Normal(mean, std)`` clamped to ``[low, high]``: a draw outside is set to
    the bound, not drawn again (CREAM's reference does the same), so the bounds carry the tails'
    mass."""
    return int(min(max(rng.normal(mean, std), low), high))


@dataclass
class PositionScheme:
    """Base class (YAML ``data.position_scheme``, chosen by ``type``)."""

    name: ClassVar[str] = ""

    def target_length(self, n: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def validate(self, n: int) -> None:
        """Check the scheme against the training window ``n``."""

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"type": self.name, **asdict(self)}


@dataclass
class CreamPositions(PositionScheme):
    """CREAM's positions for a window ``n`` and a target ``factor`` x longer."""

    name: ClassVar[str] = "cream"
    factor: int = 8

    def __post_init__(self) -> None:
        if self.factor < 2:
            raise ValueError(f"cream.factor must be >= 2, got {self.factor}")

    def target_length(self, n: int) -> int:
        return n * self.factor

    def validate(self, n: int) -> None:
        if n < 12 * self.factor:
            raise ValueError(f"cream: window {n} is too short for factor {self.factor} (needs >= 12 x factor)")

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        k, target = self.factor, self.target_length(n)
        head = n // 3 if rng.random() < 0.5 else 4 * k
        middle = n - 2 * head
        r = clamped_normal_int(rng, 1 + k, 3.0, 2, 2 * k)
        low = head + int((middle - 1) * r / 2)
        high = int(r / 2 * n) - head - 1
        end = int(rng.integers(low, max(high, low) + 1))
        positions = np.concatenate([
            np.arange(head),
            np.arange(end - middle + 1, end + 1),
            np.arange(target - head, target),
        ]).astype(np.int64)
        return positions.copy(), positions


@dataclass
class PosePositions(PositionScheme):
    """PoSE's skip-wise positions: ``chunks`` chunks of the window, each shifted further."""

    name: ClassVar[str] = "pose"
    target: int = 32768
    chunks: int = 2

    def __post_init__(self) -> None:
        if self.chunks < 1:
            raise ValueError(f"pose.chunks must be >= 1, got {self.chunks}")

    def target_length(self, n: int) -> int:
        return self.target

    def validate(self, n: int) -> None:
        if self.target < n:
            raise ValueError(f"pose.target ({self.target}) must be >= the window ({n})")
        if self.chunks > n:
            raise ValueError(f"pose.chunks ({self.chunks}) must be <= the window ({n})")

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        bounds = np.linspace(0, n, self.chunks + 1).astype(np.int64)
        positions = np.empty(n, dtype=np.int64)
        shift = 0
        for i in range(self.chunks):
            if i > 0:
                shift = int(rng.integers(shift, self.target - n + 1))
            positions[bounds[i]:bounds[i + 1]] = np.arange(bounds[i], bounds[i + 1]) + shift
        return np.arange(n, dtype=np.int64), positions


POSITION_SCHEMES: dict[str, type[PositionScheme]] = {cls.name: cls for cls in (CreamPositions, PosePositions)}
