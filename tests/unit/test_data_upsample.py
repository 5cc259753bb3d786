"""Length upsampling: the keep rule, its determinism, and the report's numbers."""

from __future__ import annotations

import json
import random

import pytest

from harpe_megatron.data.upsample import DEFAULT_BIN_EDGES, LengthUpsampler, UpsamplingReport, bin_labels


def test_long_documents_always_kept():
    u = LengthUpsampler(short_threshold=4096, short_keep_prob=0.0, seed=7)
    assert all(u.keep(i, 4096 + (i % 50_000)) for i in range(5000))
    assert not any(u.keep(i, 4095) for i in range(5000))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_short_documents_kept_with_probability_p(p):
    u = LengthUpsampler(short_threshold=4096, short_keep_prob=p, seed=1234)
    n = 20_000
    kept = sum(u.keep(i, 100 + i % 3000) for i in range(n))
    # binomial std: sqrt(p(1-p)/n) <= 0.0036; 4 sigma
    assert abs(kept / n - p) < 0.015


def test_decisions_deterministic_and_order_independent():
    u = LengthUpsampler(short_threshold=100, short_keep_prob=0.3, seed=42)
    indices = list(range(2000))
    first = {i: u.keep(i, 10) for i in indices}
    shuffled = indices[:]
    random.Random(0).shuffle(shuffled)
    again = LengthUpsampler(short_threshold=100, short_keep_prob=0.3, seed=42)
    assert {i: again.keep(i, 10) for i in shuffled} == first
    other = LengthUpsampler(short_threshold=100, short_keep_prob=0.3, seed=43)
    assert {i: other.keep(i, 10) for i in indices} != first


def test_keep_all_and_validation():
    u = LengthUpsampler.keep_all(short_threshold=100)
    assert all(u.keep(i, 1) for i in range(100)) and not u.active
    with pytest.raises(ValueError, match="short_keep_prob"):
        LengthUpsampler(short_keep_prob=1.5)
    with pytest.raises(ValueError, match="short_threshold"):
        LengthUpsampler(short_threshold=-1)


def test_bin_labels():
    assert bin_labels(DEFAULT_BIN_EDGES) == [
        "<1k", "1k-2k", "2k-4k", "4k-8k", "8k-16k", "16k-32k", "32k-64k", "64k-128k", ">=128k"]
    assert bin_labels([128, 512]) == ["<128", "128-512", ">=512"]


def test_report_numbers_on_a_hand_made_example():
    u = LengthUpsampler(short_threshold=100, short_keep_prob=0.5, seed=0)
    r = UpsamplingReport(u, bin_edges=[50, 100, 200])
    # source a: 40 (short, dropped), 150 (long, kept), 60 (short, kept); source b: 300 (long), 10 (short, dropped)
    for source, length, kept in [("a", 40, False), ("a", 150, True), ("a", 60, True), ("b", 300, True), ("b", 10, False)]:
        r.add(source, length, kept)
    d = r.to_dict()
    assert d["bins"] == ["<50", "50-100", "100-200", ">=200"]
    a, b, total = d["sources"]["a"], d["sources"]["b"], d["total"]
    assert (a["before"]["documents"], a["before"]["tokens"]) == (3, 250)
    assert (a["after"]["documents"], a["after"]["tokens"]) == (2, 210)
    assert a["before"]["long_token_share"] == pytest.approx(150 / 250)
    assert a["after"]["long_token_share"] == pytest.approx(150 / 210)
    assert a["before"]["histogram"] == {"documents": [1, 1, 1, 0], "tokens": [40, 60, 150, 0]}
    assert a["after"]["histogram"] == {"documents": [0, 1, 1, 0], "tokens": [0, 60, 150, 0]}
    assert (b["before"]["tokens"], b["after"]["tokens"]) == (310, 300)
    assert b["after"]["long_token_share"] == 1.0
    assert (total["before"]["documents"], total["before"]["tokens"]) == (5, 560)
    assert (total["after"]["documents"], total["after"]["tokens"]) == (3, 510)
    assert total["before"]["long_token_share"] == pytest.approx(450 / 560)
    assert total["after"]["long_token_share"] == pytest.approx(450 / 510)
    assert a["before"]["token_share"] == pytest.approx(250 / 560)
    assert a["after"]["token_share"] == pytest.approx(210 / 510)
    assert total["after"]["histogram"]["documents"] == [0, 1, 1, 1]
    assert json.loads(json.dumps(d)) == d  # JSON-ready
    text = r.render()
    for needle in ("TOTAL", "documents < 100 tokens kept with p=0.5", "length histogram: a", "100-200", "80.4%"):
        assert needle in text, needle
