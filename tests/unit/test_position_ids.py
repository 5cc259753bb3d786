"""CREAM and PoSE position sampling: invariants, determinism and the intended distributions."""

from __future__ import annotations

import numpy as np
import pytest

from harpe_megatron.positional.position_ids import CreamPositions, PosePositions, truncated_normal_int


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


def _expected_cream_centre(n: int, k: int) -> float:
    """E[middle-segment centre] / L computed from the scheme's definition, not from the sampler."""
    from statistics import NormalDist

    dist = NormalDist(1 + k, 3.0)
    mass = dist.cdf(2 * k) - dist.cdf(2)
    total = 0.0
    for h in (n // 3, 4 * k):  # relativity / continuity, 1/2 each
        middle = n - 2 * h
        for r in range(2, 2 * k):  # int() of the truncated normal: P(r <= X < r + 1)
            p_r = (dist.cdf(r + 1) - dist.cdf(r)) / mass
            low, high = h + int((middle - 1) * r / 2), int(r / 2 * n) - h - 1
            total += 0.5 * p_r * ((low + high) / 2 - (middle - 1) / 2)
    return total / (n * k)


def test_cream_middle_centre_has_the_intended_distribution():
    """factor 8: the sampled middle-segment centres average to the value the definition implies."""
    n, k = 4096, 8
    scheme = CreamPositions(factor=k)
    rng = np.random.default_rng(1234)
    centres = []
    for _ in range(4000):
        _, pos = scheme.sample(rng, n)
        segs = _segments(pos)
        middle = segs[1] if len(segs) == 3 else pos
        centres.append(middle.mean() / (n * k))
    centres = np.array(centres)
    expected = _expected_cream_centre(n, k)
    assert 0.3 < expected < 0.5  # inside the target window, around its middle
    assert abs(centres.mean() - expected) < 4 * centres.std() / np.sqrt(len(centres))
    assert (centres < 0.25).mean() > 0.02 and (centres > 0.75).mean() > 0.01  # spread over the window


def test_truncated_normal_stays_in_range_and_has_its_centre():
    rng = np.random.default_rng(0)
    draws = np.array([truncated_normal_int(rng, 9.0, 3.0, 2, 16) for _ in range(5000)])
    assert draws.min() >= 2 and draws.max() <= 16
    assert abs(draws.mean() - 8.5) < 0.3  # int() truncation lowers the mean by ~0.5


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
