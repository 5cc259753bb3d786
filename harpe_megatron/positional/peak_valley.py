"""Peak-valley complementary search for per-head RoPE bases (HARPE, Algorithm 1).

HARPE (arXiv 2412.07171) gives every attention head its own RoPE base, chosen with the greedy
"peak-valley complementary" search of Attention Buckets (Chen et al., ACL 2024):

1. Candidates ``B_c = {b_min + i * stride : i = 0, 1, ..., b_min + i * stride <= b_max}``.
2. Start from the selected set ``S = {b_min}``.
3. Until ``|S| == num_heads``, add the unselected candidate ``c`` minimising
   ``cost(c, S) = sum |peaks(c) - valleys(S)| (+ sum |valleys(c) - peaks(S)| if symmetric)``.
4. Return ``S`` sorted ascending.

The attention waveform of base ``b`` at head dim ``d`` is
``w_b(m) = sum_{j < d/2} 2 cos(m * b^(-2j/d)) / sqrt(d)`` (the RoPE logit of all-ones q and k at
relative distance ``m``); peaks/valleys are its local maxima/minima, and ``|p - v|`` is a distance
in tokens. Conventions (the papers leave them open; defaults in brackets):

* m grid: every integer ``m = 0..max_distance`` [131072], float64, evaluated as one batched
  matrix product (``m = a*B + r``, ``cos(mt) = cos(aBt) cos(rt) - sin(aBt) sin(rt)``).
* extremum: order-``k`` [512]: a peak is an interior ``m`` with ``w(m) > max w[m-k:m]`` and
  ``w(m) >= max w[m+1:m+k+1]`` (windows clipped; a plateau counts once, at its left end);
  valleys mirrored; ``m = 0`` and ``m = max_distance`` excluded.
* pairing [``nearest``]: each peak of the candidate with the nearest valley of a selected
  waveform; ``index`` pairs the k-th peak with the k-th valley.
* aggregation [``sum``] over the selected bases; ``union`` pools their extrema first.
* symmetric [False]: only ``peaks(candidate) -> valleys(selected)``.
* normalize [True]: each pairwise term is the mean gap, not the sum.
* ties go to the smaller base.

Why these defaults, how they compare with HARPE's Table 2 (no interpretation reproduces it) and
the full study: docs/peak_valley.md.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np

__all__ = [
    "candidate_bases",
    "attention_waveform",
    "local_extrema",
    "extrema_positions",
    "complementarity_cost",
    "greedy_select",
    "peak_valley_bases",
]

Pairing = Literal["nearest", "index"]
Aggregate = Literal["sum", "union"]

# Candidates are processed in chunks of this many bases to bound memory
# (one chunk of waveforms at 131073 distances is ~17 MB in float64).
_CHUNK = 16


def _check_head_dim(head_dim: int) -> None:
    if isinstance(head_dim, bool) or not isinstance(head_dim, (int, np.integer)):
        raise ValueError(f"head_dim must be an int, got {head_dim!r}")
    if head_dim <= 0 or head_dim % 2 != 0:
        raise ValueError(f"head_dim must be a positive even integer, got {head_dim}")


def candidate_bases(b_min: float, b_max: float, stride: float) -> np.ndarray:
    """Return the candidate grid ``b_min + i * stride`` (``i = 0, 1, ...``) up to ``b_max``.

    A relative tolerance of 1e-9 stride decides whether ``b_max`` itself lies
    on the grid, so ``candidate_bases(1e6, 5e6, 3e4)`` has 134 entries and
    ``candidate_bases(1.5, 2.5, 0.1)`` ends at 2.5 despite rounding.
    """
    for name, v in (("b_min", b_min), ("b_max", b_max), ("stride", stride)):
        if not math.isfinite(float(v)):
            raise ValueError(f"{name} must be finite, got {v!r}")
    if b_min <= 1.0:
        raise ValueError(f"b_min must be > 1 (a RoPE base), got {b_min}")
    if b_min >= b_max:
        raise ValueError(f"b_min must be < b_max, got b_min={b_min}, b_max={b_max}")
    if stride <= 0:
        raise ValueError(f"stride must be > 0, got {stride}")
    n = int(math.floor((float(b_max) - float(b_min)) / float(stride) + 1e-9)) + 1
    return float(b_min) + float(stride) * np.arange(n, dtype=np.float64)


def attention_waveform(
    bases: float | Sequence[float] | np.ndarray, head_dim: int, max_distance: int
) -> np.ndarray:
    """Attention waveform ``w_b(m) = sum_{j<d/2} 2 cos(m b^(-2j/d)) / sqrt(d)``.

    Args:
        bases: a scalar base or a 1-D sequence of ``C`` bases.
        head_dim: ``d``, positive and even.
        max_distance: the largest relative distance; ``m = 0..max_distance``.

    Returns:
        float64 array of shape ``(C, max_distance + 1)``, or ``(max_distance + 1,)``
        for a scalar base. Row ``i`` column ``m`` is ``w_{bases[i]}(m)``.

    Uses the blocked angle-addition factorisation (see module docstring), so
    it costs one batched matrix product of ``C * (max_distance+1) * d`` flops.
    """
    _check_head_dim(head_dim)
    if isinstance(max_distance, bool) or not isinstance(max_distance, (int, np.integer)):
        raise ValueError(f"max_distance must be an int, got {max_distance!r}")
    if max_distance < 0:
        raise ValueError(f"max_distance must be >= 0, got {max_distance}")
    scalar = np.ndim(bases) == 0
    b = np.atleast_1d(np.asarray(bases, dtype=np.float64))
    if b.ndim != 1:
        raise ValueError("bases must be a scalar or a 1-D sequence")
    if np.any(~np.isfinite(b)) or np.any(b <= 0):
        raise ValueError("bases must be finite and positive")

    half = head_dim // 2
    j = np.arange(half, dtype=np.float64)
    theta = b[:, None] ** (-2.0 * j / head_dim)  # (C, d/2)
    n = int(max_distance) + 1
    blk = max(1, int(math.ceil(math.sqrt(n))))
    nblk = -(-n // blk)
    a = np.arange(nblk, dtype=np.float64) * blk  # block starts aB
    r = np.arange(blk, dtype=np.float64)  # offsets inside a block
    pa = a[None, :, None] * theta[:, None, :]  # (C, A, d/2)
    pr = r[None, :, None] * theta[:, None, :]  # (C, B, d/2)
    left = np.concatenate([np.cos(pa), -np.sin(pa)], axis=2)  # (C, A, d)
    right = np.concatenate([np.cos(pr), np.sin(pr)], axis=2)  # (C, B, d)
    w = np.matmul(left, right.transpose(0, 2, 1)).reshape(len(b), nblk * blk)[:, :n]
    w *= 2.0 / math.sqrt(head_dim)
    return w[0] if scalar else w


def _order_k_extrema(x: np.ndarray, k: int, peaks: bool) -> np.ndarray:
    """Mask of order-``k`` peaks (``peaks=True``) or valleys of each row of ``x`` (k >= 2).

    An order-``k`` peak ``i`` must be the first maximum of the aligned block
    ``[qk, qk + k)`` that holds it: that block lies inside ``[i-k+1, i+k-1]``,
    where ``w[i]`` is ``>`` everything on its left and ``>=`` everything on its
    right. So only one candidate per block (its first arg-max) is taken, and
    only those are checked against their two full ``k``-windows. The cost is
    O(n) per row for any ``k``. Valleys are the peaks of ``-x``. Out-of-range
    window entries are padded so that they never win, which clips the windows
    at the ends.
    """
    rows, n = x.shape
    sign = 1.0 if peaks else -1.0
    nb = -(-n // k)
    y = np.full((rows, nb * k + 2 * k), -np.inf)  # y[t] = sign * x[t - k]
    np.multiply(x, sign, out=y[:, k : k + n])
    blocks = y[:, k : k + nb * k].reshape(rows, nb, k)
    cand = np.argmax(blocks, axis=2) + np.arange(nb) * k  # x-index of each block's first max
    val = np.take_along_axis(y, cand + k, axis=1)
    win = np.lib.stride_tricks.sliding_window_view(y, k, axis=1)  # win[:, t] = y[:, t:t+k]
    r = np.arange(rows)[:, None]
    left = win[r, cand].max(axis=2)  # max x[i-k : i]
    right = win[r, cand + (k + 1)].max(axis=2)  # max x[i+1 : i+k+1]
    ok = (val > left) & (val >= right)
    ok &= (cand > 0) & (cand < n - 1)
    mask = np.zeros((rows, n), dtype=bool)
    rr, cc = np.nonzero(ok)
    mask[rr, cand[rr, cc]] = True
    return mask


def local_extrema(w: np.ndarray, order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks ``(peaks, valleys)`` of order-``order`` local extrema along the last axis.

    ``i`` is a peak if ``0 < i < n-1``, ``w[i] > max(w[i-order:i])`` and
    ``w[i] >= max(w[i+1:i+order+1])`` (windows clipped at the ends). Valleys use
    the mirrored test, ``w[i] < min(left window)`` and ``w[i] <= min(right window)``.
    ``order=1`` is the ordinary neighbour test.
    """
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
        raise ValueError(f"extremum order must be a positive int, got {order!r}")
    w = np.asarray(w, dtype=np.float64)
    if w.ndim not in (1, 2):
        raise ValueError("w must be 1-D or 2-D")
    squeeze = w.ndim == 1
    x = np.atleast_2d(w)
    peaks = np.zeros(x.shape, dtype=bool)
    valleys = np.zeros(x.shape, dtype=bool)
    if x.shape[1] >= 3:
        if order == 1:
            mid, lft, rgt = x[:, 1:-1], x[:, :-2], x[:, 2:]
            peaks[:, 1:-1] = (mid > lft) & (mid >= rgt)
            valleys[:, 1:-1] = (mid < lft) & (mid <= rgt)
        else:
            peaks = _order_k_extrema(x, order, peaks=True)
            valleys = _order_k_extrema(x, order, peaks=False)
    if squeeze:
        return peaks[0], valleys[0]
    return peaks, valleys


def extrema_positions(
    bases: Sequence[float] | np.ndarray, head_dim: int, max_distance: int, order: int = 1
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Peak and valley positions (sorted int64 arrays of ``m``) of each base's waveform.

    Works through the bases in chunks, so memory stays ~O(chunk * max_distance).
    """
    b = np.atleast_1d(np.asarray(bases, dtype=np.float64))
    peaks: list[np.ndarray] = []
    valleys: list[np.ndarray] = []
    for lo in range(0, len(b), _CHUNK):
        w = attention_waveform(b[lo : lo + _CHUNK], head_dim, max_distance)
        pk, vl = local_extrema(w, order)
        peaks.extend(np.flatnonzero(row) for row in pk)
        valleys.extend(np.flatnonzero(row) for row in vl)
    return peaks, valleys


def _pad(rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stack ragged 1-D arrays into ``(values float64 zero-padded, valid mask)``."""
    width = max((len(r) for r in rows), default=0)
    vals = np.zeros((len(rows), max(width, 1)), dtype=np.float64)
    valid = np.zeros_like(vals, dtype=bool)
    for i, r in enumerate(rows):
        vals[i, : len(r)] = r
        valid[i, : len(r)] = True
    return vals, valid


def _nearest_gap(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """For each entry of ``x``, the distance to the nearest element of sorted ``ref``."""
    idx = np.searchsorted(ref, x)
    lo = ref[np.clip(idx - 1, 0, len(ref) - 1)]
    hi = ref[np.clip(idx, 0, len(ref) - 1)]
    return np.minimum(np.abs(x - lo), np.abs(hi - x))


def _directional_cost(
    src: np.ndarray, valid: np.ndarray, ref: np.ndarray, pairing: Pairing, normalize: bool
) -> np.ndarray:
    """Cost of pairing each row of ``src`` (padded extrema of candidates) with ``ref``.

    Returns one value per row. ``nearest``: sum (or mean) over valid ``src``
    entries of the gap to the nearest ``ref`` element. ``index``: sum (or mean)
    of ``|src[k] - ref[k]|`` for ``k < min(len(src_row), len(ref))``.
    """
    ref = np.asarray(ref, dtype=np.float64)
    if pairing == "nearest":
        gaps = np.where(valid, _nearest_gap(src, ref), 0.0)
        count = valid.sum(axis=1)
    else:
        k = min(src.shape[1], len(ref))
        r = np.zeros(src.shape[1])
        r[:k] = ref[:k]
        use = valid.copy()
        use[:, k:] = False
        gaps = np.where(use, np.abs(src - r), 0.0)
        count = use.sum(axis=1)
    total = gaps.sum(axis=1)
    return total / np.maximum(count, 1) if normalize else total


def complementarity_cost(
    cand_peaks: Sequence[np.ndarray],
    cand_valleys: Sequence[np.ndarray],
    sel_peaks: Sequence[np.ndarray],
    sel_valleys: Sequence[np.ndarray],
    *,
    pairing: Pairing = "nearest",
    aggregate: Aggregate = "sum",
    symmetric: bool = False,
    normalize: bool = True,
) -> np.ndarray:
    """Objective of the greedy step for each candidate (lower = more complementary).

    Args:
        cand_peaks, cand_valleys: per-candidate sorted extremum positions.
        sel_peaks, sel_valleys: per-selected-base sorted extremum positions.
        pairing, aggregate, symmetric, normalize: see :func:`peak_valley_bases`.

    Returns:
        float64 array with one cost per candidate.
    """
    _check_knobs(pairing, aggregate)
    if len(sel_peaks) == 0 or len(sel_peaks) != len(sel_valleys):
        raise ValueError("need at least one selected base with both peaks and valleys")
    cp, cpv = _pad(cand_peaks)
    cv, cvv = _pad(cand_valleys)
    if aggregate == "union":
        groups = [(np.unique(np.concatenate(list(sel_peaks))),
                   np.unique(np.concatenate(list(sel_valleys))))]
    else:
        groups = list(zip(sel_peaks, sel_valleys))
    cost = np.zeros(len(cand_peaks))
    for sp, sv in groups:
        cost += _directional_cost(cp, cpv, sv, pairing, normalize)
        if symmetric:
            cost += _directional_cost(cv, cvv, sp, pairing, normalize)
    return cost


def _check_knobs(pairing: str, aggregate: str) -> None:
    if pairing not in ("nearest", "index"):
        raise ValueError(f"pairing must be 'nearest' or 'index', got {pairing!r}")
    if aggregate not in ("sum", "union"):
        raise ValueError(f"aggregate must be 'sum' or 'union', got {aggregate!r}")
    if pairing == "index" and aggregate == "union":
        raise ValueError("pairing='index' is only defined with aggregate='sum'")


def greedy_select(
    peaks: Sequence[np.ndarray],
    valleys: Sequence[np.ndarray],
    num_select: int,
    *,
    pairing: Pairing = "nearest",
    aggregate: Aggregate = "sum",
    symmetric: bool = False,
    normalize: bool = True,
) -> list[int]:
    """Greedy search on precomputed extrema; returns candidate indices in the order picked.

    Candidate 0 is selected first. Every step adds the unselected candidate with
    the smallest :func:`complementarity_cost` against the current selection.
    Ties go to the lowest index. With ``aggregate="sum"`` the cost is kept as a
    running total, so each step only computes the cost against the newest base.
    """
    _check_knobs(pairing, aggregate)
    n = len(peaks)
    if len(valleys) != n or not 1 <= num_select <= n:
        raise ValueError(f"num_select must be in [1, {n}] with one valley list per peak list")
    cp, cpv = _pad(peaks)
    cv, cvv = _pad(valleys)
    selected = [0]
    taken = np.zeros(n, dtype=bool)
    taken[0] = True
    running = np.zeros(n)  # running sum of pairwise costs ("sum")
    union_p = np.asarray(peaks[0], dtype=np.float64)
    union_v = np.asarray(valleys[0], dtype=np.float64)
    while len(selected) < num_select:
        s = selected[-1]
        if aggregate == "sum":
            # cost(c, S) = sum_s cost(c, s): add only the newest selected base.
            running += _directional_cost(cp, cpv, valleys[s], pairing, normalize)
            if symmetric:
                running += _directional_cost(cv, cvv, peaks[s], pairing, normalize)
            cost = running
        else:
            if s != 0:
                union_p = np.union1d(union_p, peaks[s])
                union_v = np.union1d(union_v, valleys[s])
            cost = _directional_cost(cp, cpv, union_v, pairing, normalize)
            if symmetric:
                cost = cost + _directional_cost(cv, cvv, union_p, pairing, normalize)
        # argmin returns the first minimum, so ties go to the smaller base.
        nxt = int(np.argmin(np.where(taken, np.inf, cost)))
        selected.append(nxt)
        taken[nxt] = True
    return selected


def peak_valley_bases(
    num_heads: int,
    b_min: float = 1e6,
    b_max: float = 5e6,
    stride: float = 3e4,
    head_dim: int = 128,
    max_distance: int = 131072,
    *,
    extremum_order: int = 512,
    pairing: Pairing = "nearest",
    aggregate: Aggregate = "sum",
    symmetric: bool = False,
    normalize: bool = True,
) -> list[float]:
    """Pick one RoPE base per head with the greedy peak-valley complementary search.

    Args:
        num_heads: number of bases to return (one per head); ``1 <= num_heads <=``
            number of candidates.
        b_min, b_max, stride: the candidate grid ``b_min + i*stride <= b_max``.
            ``b_min`` is always selected first.
        head_dim: RoPE head dimension ``d`` (positive, even).
        max_distance: waveforms are evaluated at the integer distances ``0..max_distance``.
        extremum_order: a peak must dominate a ``+-extremum_order`` window (see
            :func:`local_extrema`); 1 gives ordinary neighbour extrema.
        pairing: ``"nearest"`` (each extremum to the nearest opposite extremum)
            or ``"index"`` (k-th with k-th).
        aggregate: ``"sum"`` (add the cost against each selected base) or
            ``"union"`` (pool the selected bases' extrema first).
        symmetric: also add the valleys(candidate) -> peaks(selected) term.
        normalize: average the gaps in each term instead of summing them.

    Returns:
        ``num_heads`` distinct grid bases, sorted ascending, as Python floats.

    Raises:
        ValueError: for an invalid grid, ``num_heads`` outside ``[1, #candidates]``,
            odd or non-positive ``head_dim``, bad ``max_distance``/knobs, or if some
            candidate waveform has no peak or no valley in the chosen range.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)):
        raise ValueError(f"num_heads must be an int, got {num_heads!r}")
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    _check_head_dim(head_dim)
    if isinstance(max_distance, bool) or not isinstance(max_distance, (int, np.integer)):
        raise ValueError(f"max_distance must be an int, got {max_distance!r}")
    if max_distance < 2:
        raise ValueError(f"max_distance must be >= 2, got {max_distance}")
    if isinstance(extremum_order, bool) or not isinstance(extremum_order, (int, np.integer)) \
            or extremum_order < 1:
        raise ValueError(f"extremum_order must be a positive int, got {extremum_order!r}")
    _check_knobs(pairing, aggregate)
    cands = candidate_bases(b_min, b_max, stride)
    if num_heads > len(cands):
        raise ValueError(
            f"num_heads={num_heads} exceeds the {len(cands)} candidates in "
            f"[{b_min}, {b_max}] with stride {stride}"
        )
    if num_heads == 1:
        return [float(cands[0])]

    peaks, valleys = extrema_positions(cands, head_dim, max_distance, extremum_order)
    empty = [i for i in range(len(cands)) if len(peaks[i]) == 0 or len(valleys[i]) == 0]
    if empty:
        raise ValueError(
            f"the waveform of base {cands[empty[0]]:g} has no peak or no valley of order "
            f"{extremum_order} in m = 0..{max_distance}; increase max_distance or "
            f"decrease extremum_order"
        )

    picked = greedy_select(
        peaks, valleys, num_heads,
        pairing=pairing, aggregate=aggregate, symmetric=symmetric, normalize=normalize,
    )
    return [float(x) for x in np.sort(cands[picked])]
