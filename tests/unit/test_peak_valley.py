"""Tests for the HARPE peak-valley complementary base search.

The slow reference functions below (``_ref_*``) use plain Python loops and
``math.cos`` and share no code with the vectorised module. They re-derive the
waveform, the extrema, the objective and the greedy search for tiny cases.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from harpe_megatron.positional.peak_valley import (
    attention_waveform,
    candidate_bases,
    complementarity_cost,
    extrema_positions,
    greedy_select,
    local_extrema,
    peak_valley_bases,
)

B_MIN, B_MAX, STRIDE = 1e6, 5e6, 3e4
N_HEADS, HEAD_DIM, MAX_DIST = 32, 128, 131072

# HARPE (arXiv 2412.07171) Table 2, per-head bases in units of 1e6. Used only to
# measure how close the search gets; the module never sees these values.
PAPER_TABLE_2 = [
    1.00, 1.15, 1.30, 1.45, 2.17, 2.20, 2.23, 2.47, 2.50, 2.65, 2.68, 2.71, 2.74, 2.80,
    2.83, 2.92, 3.01, 3.04, 3.10, 3.13, 3.16, 3.22, 3.43, 3.46, 3.61, 3.88, 4.09, 4.15,
    4.39, 4.45, 4.51, 4.54,
]

# Closeness of the default interpretation to Table 2, as measured (see
# docs/peak_valley.md). The asserts allow no drop in matches and a small
# margin on the distances.
MEASURED_EXACT = 2
MEASURED_OVERLAP = 12
MEASURED_MEAN_ABS = 0.1425e6
MEASURED_MAX_ABS = 0.48e6


def closeness(bases, paper=PAPER_TABLE_2, b_min=B_MIN, stride=STRIDE):
    """(exact same-slot grid matches, set overlap, mean |diff|, max |diff|) of sorted lists."""
    ours = np.sort(np.asarray(bases, dtype=np.float64))
    ref = np.sort(np.asarray(paper, dtype=np.float64) * 1e6)
    k_ours = np.rint((ours - b_min) / stride).astype(int)
    k_ref = np.rint((ref - b_min) / stride).astype(int)
    diff = np.abs(ours - ref)
    return (
        int(np.sum(k_ours == k_ref)),
        len(set(k_ours.tolist()) & set(k_ref.tolist())),
        float(diff.mean()),
        float(diff.max()),
    )


@pytest.fixture(scope="module")
def paper_result():
    return peak_valley_bases(N_HEADS, B_MIN, B_MAX, STRIDE, HEAD_DIM, MAX_DIST)


# --------------------------------------------------------------------------
# slow, loop-based reference implementation
# --------------------------------------------------------------------------
def _ref_waveform(base, d, max_distance):
    return [
        sum(2.0 * math.cos(m * base ** (-2.0 * j / d)) for j in range(d // 2)) / math.sqrt(d)
        for m in range(max_distance + 1)
    ]


def _ref_extrema(w, order):
    n = len(w)
    peaks, valleys = [], []
    for i in range(1, n - 1):
        left = w[max(0, i - order) : i]
        right = w[i + 1 : i + 1 + order]
        if w[i] > max(left) and w[i] >= max(right):
            peaks.append(i)
        if w[i] < min(left) and w[i] <= min(right):
            valleys.append(i)
    return peaks, valleys


def _ref_term(src, ref, pairing, normalize):
    if pairing == "nearest":
        gaps = [min(abs(x - r) for r in ref) for x in src]
    else:
        gaps = [abs(x - r) for x, r in zip(src, ref)]
    total = float(sum(gaps))
    return total / max(len(gaps), 1) if normalize else total


def _ref_cost(cp, cv, sel_p, sel_v, pairing, aggregate, symmetric, normalize):
    if aggregate == "union":
        groups = [(sorted(set().union(*map(set, sel_p))), sorted(set().union(*map(set, sel_v))))]
    else:
        groups = list(zip(sel_p, sel_v))
    cost = 0.0
    for sp, sv in groups:
        cost += _ref_term(cp, sv, pairing, normalize)
        if symmetric:
            cost += _ref_term(cv, sp, pairing, normalize)
    return cost


def _ref_greedy(peaks, valleys, k, pairing, aggregate, symmetric, normalize):
    sel = [0]
    while len(sel) < k:
        best, best_cost = None, math.inf
        for c in range(len(peaks)):
            if c in sel:
                continue
            cost = _ref_cost(
                peaks[c], valleys[c], [peaks[s] for s in sel], [valleys[s] for s in sel],
                pairing, aggregate, symmetric, normalize,
            )
            if cost < best_cost:  # strict: ties keep the smaller index
                best, best_cost = c, cost
        sel.append(best)
    return sel


# Tiny toy problem: d = 8, m up to 150, six candidate bases.
TOY = dict(b_min=20.0, b_max=45.0, stride=5.0, head_dim=8, max_distance=150)
KNOBS = [
    dict(pairing=p, aggregate=a, symmetric=s, normalize=n)
    for (p, a), s, n in itertools.product(
        [("nearest", "sum"), ("nearest", "union"), ("index", "sum")], [False, True], [False, True]
    )
]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def test_candidate_grid():
    c = candidate_bases(B_MIN, B_MAX, STRIDE)
    assert len(c) == 134
    assert c[0] == B_MIN and c[-1] <= B_MAX
    assert np.allclose(np.diff(c), STRIDE)
    # b_max exactly on the grid despite float rounding of 0.1
    c2 = candidate_bases(1.5, 2.5, 0.1)
    assert len(c2) == 11 and math.isclose(c2[-1], 2.5)


def test_waveform_matches_direct_formula():
    bases = [10000.0, 1e6, 4.54e6]
    w = attention_waveform(bases, 16, 700)
    assert w.shape == (3, 701) and w.dtype == np.float64
    for i, b in enumerate(bases):
        np.testing.assert_allclose(w[i], _ref_waveform(b, 16, 700), rtol=0, atol=1e-11)
    # w(0) = d/sqrt(d) = sqrt(d); scalar base gives a 1-D array
    w1 = attention_waveform(1e6, 128, 10)
    assert w1.shape == (11,) and math.isclose(w1[0], math.sqrt(128), rel_tol=1e-12)
    # the blocked evaluation is accurate far out, too
    m = np.array([131071.0, 131072.0])
    theta = 2.3e6 ** (-2.0 * np.arange(64) / 128)
    direct = (2 * np.cos(m[:, None] * theta)).sum(1) / math.sqrt(128)
    np.testing.assert_allclose(attention_waveform(2.3e6, 128, 131072)[-2:], direct, atol=1e-9)


@pytest.mark.parametrize("order", [1, 2, 3, 7, 40, 500])
def test_local_extrema_against_loops(order):
    rng = np.random.default_rng(order)
    x = rng.normal(size=(3, 300))
    x[1, 100:110] = 4.0  # plateau peak
    x[2, 50:55] = -4.0  # plateau valley
    x[0] = np.round(x[0], 1)  # many ties
    pk, vl = local_extrema(x, order)
    for r in range(3):
        rp, rv = _ref_extrema(list(x[r]), order)
        assert np.flatnonzero(pk[r]).tolist() == rp
        assert np.flatnonzero(vl[r]).tolist() == rv


def test_toy_extrema_positions_against_loops():
    cands = candidate_bases(TOY["b_min"], TOY["b_max"], TOY["stride"])
    for order in (1, 3):
        peaks, valleys = extrema_positions(cands, TOY["head_dim"], TOY["max_distance"], order)
        for i, b in enumerate(cands):
            rp, rv = _ref_extrema(_ref_waveform(b, TOY["head_dim"], TOY["max_distance"]), order)
            assert peaks[i].tolist() == rp and valleys[i].tolist() == rv


# --------------------------------------------------------------------------
# objective and greedy step against the slow reference
# --------------------------------------------------------------------------
@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: "-".join(str(v) for v in k.values()))
def test_toy_objective_and_greedy_match_reference(order, knobs):
    cands = candidate_bases(TOY["b_min"], TOY["b_max"], TOY["stride"])
    ref_p, ref_v = zip(*(
        _ref_extrema(_ref_waveform(b, TOY["head_dim"], TOY["max_distance"]), order)
        for b in cands
    ))
    peaks, valleys = extrema_positions(cands, TOY["head_dim"], TOY["max_distance"], order)

    # objective for several selected sets, every candidate
    for sel in ([0], [0, 3], [0, 2, 5], [1, 4]):
        vec = complementarity_cost(
            peaks, valleys, [peaks[s] for s in sel], [valleys[s] for s in sel], **knobs
        )
        loop = [
            _ref_cost(ref_p[c], ref_v[c], [ref_p[s] for s in sel], [ref_v[s] for s in sel],
                      **knobs)
            for c in range(len(cands))
        ]
        np.testing.assert_allclose(vec, loop, rtol=1e-12, atol=1e-12)

    # each greedy step picks the arg-min of the (loop) objective
    picked = greedy_select(peaks, valleys, len(cands), **knobs)
    assert picked == _ref_greedy(ref_p, ref_v, len(cands), **knobs)

    # and the public API agrees with it
    out = peak_valley_bases(4, TOY["b_min"], TOY["b_max"], TOY["stride"], TOY["head_dim"],
                            TOY["max_distance"], extremum_order=order, **knobs)
    assert out == sorted(float(cands[i]) for i in picked[:4])


# --------------------------------------------------------------------------
# properties of the paper-setting result
# --------------------------------------------------------------------------
def test_paper_settings_properties(paper_result):
    out = paper_result
    assert len(out) == N_HEADS
    assert all(isinstance(x, float) for x in out)
    assert all(a < b for a, b in zip(out, out[1:]))
    assert out[0] == B_MIN
    for x in out:
        assert B_MIN <= x <= B_MAX
        k = (x - B_MIN) / STRIDE
        assert abs(k - round(k)) < 1e-9
        assert x == B_MIN + round(k) * STRIDE


def test_closeness_to_paper_table_does_not_regress(paper_result):
    exact, overlap, mean_abs, max_abs = closeness(paper_result)
    assert exact >= MEASURED_EXACT
    assert overlap >= MEASURED_OVERLAP
    assert mean_abs <= MEASURED_MEAN_ABS + 0.01e6
    assert max_abs <= MEASURED_MAX_ABS + 0.03e6


def test_closeness_metric_sanity():
    assert closeness([x * 1e6 for x in PAPER_TABLE_2]) == (32, 32, 0.0, 0.0)


def test_deterministic():
    kw = dict(b_min=1e6, b_max=2e6, stride=5e4, head_dim=64, max_distance=8192,
              extremum_order=64)
    a = peak_valley_bases(8, **kw)
    b = peak_valley_bases(8, **kw)
    assert a == b and len(a) == 8 and a[0] == 1e6


def test_edge_counts():
    kw = dict(b_min=TOY["b_min"], b_max=TOY["b_max"], stride=TOY["stride"],
              head_dim=TOY["head_dim"], max_distance=TOY["max_distance"], extremum_order=1)
    assert peak_valley_bases(1, **kw) == [20.0]
    everything = peak_valley_bases(6, **kw)
    assert everything == [20.0, 25.0, 30.0, 35.0, 40.0, 45.0]


# --------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_heads=135), "exceeds"),
        (dict(num_heads=0), "num_heads"),
        (dict(num_heads=2.0), "num_heads"),
        (dict(b_min=5e6), "b_min must be < b_max"),
        (dict(b_min=6e6), "b_min must be < b_max"),
        (dict(b_min=1.0), "b_min must be > 1"),
        (dict(stride=0.0), "stride"),
        (dict(stride=-3e4), "stride"),
        (dict(b_max=float("inf")), "finite"),
        (dict(head_dim=127), "head_dim"),
        (dict(head_dim=0), "head_dim"),
        (dict(max_distance=1), "max_distance"),
        (dict(max_distance=100.5), "max_distance"),
        (dict(extremum_order=0), "extremum_order"),
        (dict(pairing="closest"), "pairing"),
        (dict(aggregate="mean"), "aggregate"),
        (dict(pairing="index", aggregate="union"), "only defined"),
        (dict(max_distance=100, extremum_order=512), "no peak or no valley"),
    ],
)
def test_input_validation(kwargs, match):
    args = dict(num_heads=N_HEADS, b_min=B_MIN, b_max=B_MAX, stride=STRIDE,
                head_dim=HEAD_DIM, max_distance=MAX_DIST)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        peak_valley_bases(**args)
