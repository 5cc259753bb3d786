"""The CP layout balanced by attention work (parallel/cp_layout.py): a valid layout, never less
balanced than zigzag, and near-even where zigzag is not (documents of many lengths)."""

from __future__ import annotations

import numpy as np
import pytest

from harpe_megatron.parallel.cp_layout import balanced_layout, chunk_count, rank_work, runs, zigzag_layout
from harpe_megatron.parallel.zigzag import zigzag_positions


def _work(lengths):
    return np.concatenate([np.arange(1, n + 1) for n in lengths]).astype(np.float64)


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_layout_is_a_permutation_with_equal_shares(cp):
    rng = np.random.default_rng(cp)
    lengths = rng.integers(1, 300, size=400)
    work = _work(lengths)[: 2048]
    index = balanced_layout(work, cp)
    assert index.shape == (cp, 2048 // cp)
    assert sorted(index.reshape(-1).tolist()) == list(range(2048))
    for r in range(cp):  # each rank's chunks in increasing row position
        assert (np.diff(index[r]) > 0).all()
    balanced, zigzag = rank_work(index, work), rank_work(zigzag_layout(2048, cp), work)
    assert balanced.sum() == zigzag.sum() == work.sum()
    assert balanced.max() <= zigzag.max()
    assert balanced.max() / balanced.mean() < 1.05 < zigzag.max() / zigzag.mean()


def test_one_document_per_row_keeps_zigzag():
    work = np.arange(1, 257, dtype=np.float64)  # plain causal: zigzag is exactly balanced
    assert (balanced_layout(work, 4) == zigzag_layout(256, 4)).all()
    assert (zigzag_layout(256, 4)[1] == zigzag_positions(256, 1, 4).numpy()).all()


def test_chunk_count_and_runs():
    assert chunk_count(131072, 8) == 64 and chunk_count(24, 2) == 8 and chunk_count(12, 3) == 12 and chunk_count(10, 1) == 2
    with pytest.raises(ValueError, match="divisible by 2"):
        chunk_count(30, 4)
    assert runs([0, 1, 2, 3, 8, 9, 10, 11, 4, 5]) == [(0, 4, 0), (8, 4, 4), (4, 2, 8)]
