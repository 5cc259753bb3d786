"""CREAM and PoSE position sampling: invariants, determinism and the intended distributions."""

from __future__ import annotations

import numpy as np
import pytest

from harpe_megatron.positional.position_ids import CreamPositions, PosePositions, clamped_normal_int


def _segments(pos: np.ndarray) -> list[np.ndarray]:
    cuts = np.nonzero(np.diff(pos) != 1)[0] + 1
    return np.split(pos, cuts)


@pytest.mark.parametrize("n, factor", [(4096, 8), (256, 4), (96, 8)])
def test_cream_segment_invariants(n, factor):
    scheme = CreamPositions(factor=factor)
    rng = np.random.default_rng(0)
    target = n * factor
    heads = set()
    for _ in range(300):
        idx, pos = scheme.sample(rng, n)
        assert len(pos) == n and np.array_equal(idx, pos)
        assert pos[0] == 0 and pos[-1] == target - 1
        assert np.all(np.diff(pos) > 0) and pos.max() < target
        head = int(np.argmax(np.diff(pos) != 1)) + 1 if np.any(np.diff(pos) != 1) else None
        segs = _segments(pos)
        # head [0, h), middle contiguous, tail [L-h, L); head and tail have equal length
        assert 1 <= len(segs) <= 3
        if len(segs) == 3:
            h = len(segs[0])
            assert len(segs[2]) == h and segs[2][0] == target - h
            assert len(segs[1]) == n - 2 * h
            heads.add(h)
        assert head is None or head > 0
    assert heads <= {n // 3, 4 * factor}


def _ratio_pmf(k: int, mean: float | None = None) -> dict[int, float]:
    """P(r) of CREAM's ratio from its definition: r = int(clamp(x, 2, 2k)), x ~ Normal(mean, 3);
    mean 1 + k (ours) unless given (the reference's fixed 9)."""
    from statistics import NormalDist

    dist = NormalDist(1 + k if mean is None else mean, 3.0)
    pmf = {r: dist.cdf(r + 1) - dist.cdf(r) for r in range(3, 2 * k)}
    pmf[2], pmf[2 * k] = dist.cdf(3), 1 - dist.cdf(2 * k)  # the clamped tails sit on the bounds
    return pmf


def _expected_middle(n: int, k: int, mean: float | None = None) -> tuple[float, float]:
    """(E[middle-segment start], E[position of the sample's token n // 2] / L) from the scheme's
    definition. Token n // 2 always lies in the middle segment (head and tail are <= n // 3 long),
    at ``start + n // 2 - h``; the segments cannot be told apart from the positions alone when the
    middle happens to continue the head or the tail, so tests sample that token."""
    start, offset = 0.0, 0.0
    for h in (n // 3, 4 * k):  # relativity / continuity, 1/2 each
        middle = n - 2 * h
        offset += 0.5 * (n // 2 - h)
        for r, p_r in _ratio_pmf(k, mean).items():
            low = h + int((middle - 1) * r / 2)
            high = max(int(r / 2 * n) - h - 1, low)
            start += 0.5 * p_r * ((low + high) / 2 - (middle - 1))
    return start, (start + offset) / (n * k)


def test_cream_middle_centre_has_the_intended_distribution():
    """factor 8: the sampled middle segments' positions average to the value the definition implies."""
    n, k = 4096, 8
    scheme = CreamPositions(factor=k)
    rng = np.random.default_rng(1234)
    centres = np.array([scheme.sample(rng, n)[1][n // 2] / (n * k) for _ in range(4000)])
    _, expected = _expected_middle(n, k)
    assert 0.3 < expected < 0.5  # inside the target window, around its middle
    assert abs(centres.mean() - expected) < 4 * centres.std() / np.sqrt(len(centres))
    assert (centres < 0.25).mean() > 0.02 and (centres > 0.75).mean() > 0.01  # spread over the window


@pytest.mark.parametrize("k", [8, 32])
def test_cream_ratio_mean_and_tails(k):
    """CREAM's ratio r at factor 8 (the reference's own setting: mean 9, and the reference's clamped
    tails P(r = 2) = 2.3%, P(r = 16) = 1.0%) and 32 (mean 33: E[r] = 32.5, 2.3% beyond 2 sigma on
    each side, nothing on the bounds), sampled against the distribution the definition implies."""
    pmf = _ratio_pmf(k)
    rng = np.random.default_rng(k)
    draws = np.array([clamped_normal_int(rng, 1 + k, 3.0, 2, 2 * k) for _ in range(40_000)])
    assert draws.min() >= 2 and draws.max() <= 2 * k
    mean = sum(r * p for r, p in pmf.items())
    assert mean == pytest.approx({8: 8.51, 32: 32.5}[k], abs=0.01)  # int() lowers 1 + k by ~0.5
    assert abs(draws.mean() - mean) < 4 * draws.std() / np.sqrt(len(draws))
    # beyond 2 sigma: x < k - 5 gives r <= k - 6, x >= k + 7 gives r >= k + 7
    tails = {"low": (draws <= k - 6).mean(), "high": (draws >= k + 7).mean()}
    expected = {"low": sum(p for r, p in pmf.items() if r <= k - 6),
                "high": sum(p for r, p in pmf.items() if r >= k + 7)}
    for side in tails:
        assert expected[side] == pytest.approx(0.02275, abs=1e-4)
        assert abs(tails[side] - expected[side]) < 4 * np.sqrt(expected[side] / len(draws)), side
    bounds = {"r = 2": (draws == 2).mean(), "r = 2k": (draws == 2 * k).mean()}
    if k == 8:  # the reference's clamped tails
        assert pmf[2] == pytest.approx(0.0228, abs=1e-4) and pmf[16] == pytest.approx(0.0098, abs=1e-4)
        assert abs(bounds["r = 2"] - pmf[2]) < 4 * np.sqrt(pmf[2] / len(draws))
        assert abs(bounds["r = 2k"] - pmf[16]) < 4 * np.sqrt(pmf[16] / len(draws))
    else:
        assert pmf[2] < 1e-20 and pmf[64] < 1e-20 and bounds == {"r = 2": 0.0, "r = 2k": 0.0}


@pytest.mark.parametrize("k", [8, 32])
def test_cream_middle_start_follows_the_factor(k):
    """The middle segment's mean start at N = 4096: 11.8k of 32k at factor 8 (the reference's too),
    51.8k of 128k at factor 32; the reference's fixed mean 9 would put it at 11.7k of 128k there."""
    n = 4096
    start, middle_token = _expected_middle(n, k)
    assert start == pytest.approx({8: 11755, 32: 51819}[k], abs=1)
    assert _expected_middle(n, k, mean=9.0)[0] == pytest.approx({8: 11755, 32: 11657}[k], abs=1)
    rng = np.random.default_rng(100 + k)
    sampled = np.array([CreamPositions(factor=k).sample(rng, n)[1][n // 2] / (n * k) for _ in range(2000)])
    assert abs(sampled.mean() - middle_token) < 4 * sampled.std() / np.sqrt(len(sampled))


def test_schemes_are_deterministic():
    for scheme in (CreamPositions(factor=4), PosePositions(target=4096, chunks=3)):
        a = [scheme.sample(np.random.default_rng(7), 512)[1] for _ in range(2)]
        assert np.array_equal(a[0], a[1])


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_pose_invariants(chunks):
    n, target = 512, 8192
    scheme = PosePositions(target=target, chunks=chunks)
    rng = np.random.default_rng(0)
    shifts = []
    for _ in range(500):
        idx, pos = scheme.sample(rng, n)
        assert np.array_equal(idx, np.arange(n))
        assert np.all(np.diff(pos) > 0) and pos[0] == 0 and pos.max() < target
        bounds = np.linspace(0, n, chunks + 1).astype(int)
        chunk_shifts = [pos[b] - b for b in bounds[:-1]]
        assert chunk_shifts == sorted(chunk_shifts) and chunk_shifts[0] == 0
        for b0, b1, s in zip(bounds[:-1], bounds[1:], chunk_shifts):
            assert np.array_equal(pos[b0:b1], np.arange(b0, b1) + s)
        shifts.append(chunk_shifts[-1])
    if chunks > 1:
        # u_1 ~ U[0, L - N]: its mean is about (L - N) / 2 for two chunks
        if chunks == 2:
            assert abs(np.mean(shifts) / (target - n) - 0.5) < 0.05
        assert max(shifts) > 0.8 * (target - n)


def test_bad_settings():
    with pytest.raises(ValueError, match="factor must be >= 2"):
        CreamPositions(factor=1)
    with pytest.raises(ValueError, match=r"pose.target \(1024\) must be >= the window \(4096\)"):
        PosePositions(target=1024).validate(4096)
    with pytest.raises(ValueError, match="too short for factor 8"):
        CreamPositions(factor=8).validate(64)


def test_apply_scheme_to_a_packed_batch():
    import torch

    from harpe_megatron.data.dataset import slice_batch_for_cp, to_batch
    from harpe_megatron.data.position_sampling import apply_position_scheme

    window, scheme = 48, CreamPositions(factor=4)
    target = scheme.target_length(window)
    rows = [np.arange(target + 1) + 1000 * r for r in range(3)]  # token id = 1000*row + position
    batch = to_batch(rows)
    out = apply_position_scheme(batch, scheme, window, sample_indices=[10, 11, 12], seed=5)
    assert all(out[k].shape == (3, window) for k in ("tokens", "labels", "loss_mask", "position_ids"))
    for r in range(3):
        pos = out["position_ids"][r]
        assert torch.equal(out["tokens"][r], pos + 1000 * r)       # the token at each kept position
        assert torch.equal(out["labels"][r], pos + 1 + 1000 * r)   # and its true successor
        assert pos.max() < target and torch.all(pos[1:] > pos[:-1])
    again = apply_position_scheme(batch, scheme, window, sample_indices=[10, 11, 12], seed=5)
    assert all(torch.equal(out[k], again[k]) for k in out)        # seeded by sample index
    other = apply_position_scheme(batch, scheme, window, sample_indices=[13, 11, 12], seed=5)
    assert torch.equal(other["position_ids"][1], out["position_ids"][1])
    # CP: tokens and positions are split together, so each token keeps its position
    for cp_rank in range(2):
        share = slice_batch_for_cp(out, cp_rank, 2)
        assert torch.equal(share["tokens"][0], share["position_ids"][0])
