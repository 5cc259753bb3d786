"""Context-parallel layouts balanced by attention work (document masking), as token indices.

Zigzag (:mod:`harpe_megatron.parallel.zigzag`) balances *causal* attention: a query's work is its
position + 1, and chunk ``r`` paired with chunk ``2cp-1-r`` gives every rank the same sum. Under
document masking a query's work is its position *in its document* + 1, and zigzag can leave the
busiest rank with about twice the mean (docs/document_masking.md has the figures for the shipped
mixture). The balanced layout assigns chunks by their work instead:

* the row is cut into ``K = 2 cp m`` equal chunks, ``m`` the largest of 4, 2, 1 that divides
  ``S / (2 cp)`` (:func:`chunk_count`);
* chunk work = the sum of a per-token work array (attended keys per query,
  ``data/documents.py: attention_keys``, summed over the rows of a micro-batch);
* every rank gets ``2m`` chunks (the same token count): chunks in order of decreasing work, each
  to the least-loaded rank that still has room (ties: lower rank, then lower chunk index);
* the zigzag layout is kept when it is at least as balanced (one document per row, for one).

A layout is ``index`` ``[cp, S / cp]`` (int64): the row positions of the tokens rank ``r``
holds, in its local order (its chunks in increasing position). It is a permutation of
``0 .. S-1``; the data pipeline cuts every per-token tensor with it and hands each token's row
position to the model (``token_index``), which puts all-gathered K/V and document ids back in
row order and finds its query chunks with :func:`runs`. Deterministic: every rank computes the
same layout from the same (full) rows.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from harpe_megatron.parallel.zigzag import zigzag_chunk_ids

__all__ = ["chunk_count", "zigzag_layout", "balanced_layout", "runs", "rank_work"]


def chunk_count(seq_len: int, cp_size: int) -> int:
    """``K = 2 cp m`` chunks of the balanced layout (module docstring)."""
    if seq_len % (2 * cp_size):
        raise ValueError(f"sequence length {seq_len} must be divisible by 2 * context_parallel_size = {2 * cp_size}")
    for m in (4, 2, 1):
        if (seq_len // (2 * cp_size)) % m == 0:
            return 2 * cp_size * m
    raise AssertionError("unreachable")  # m = 1 always divides


def zigzag_layout(seq_len: int, cp_size: int) -> np.ndarray:
    """The zigzag layout (parallel/zigzag.py) as ``[cp, S / cp]`` row positions (numpy: host
    arithmetic, also inside the planner's fake-tensor mode)."""
    if cp_size == 1:
        return np.arange(seq_len, dtype=np.int64)[None]
    c = seq_len // (2 * cp_size)
    chunks = [zigzag_chunk_ids(r, cp_size) for r in range(cp_size)]
    return np.stack([np.concatenate([np.arange(j * c, (j + 1) * c) for j in pair]) for pair in chunks]).astype(np.int64)


def rank_work(index: np.ndarray, work: np.ndarray) -> np.ndarray:
    """Work of every rank's tokens under ``index`` (``[cp]``)."""
    return np.asarray(work, dtype=np.float64)[index].sum(axis=1)


def balanced_layout(work: Sequence[float], cp_size: int) -> np.ndarray:
    """The balanced layout (module docstring) for per-token ``work`` ``[S]``: ``[cp, S / cp]``."""
    work = np.asarray(work, dtype=np.float64)
    seq_len = work.shape[0]
    zigzag = zigzag_layout(seq_len, cp_size)
    if cp_size == 1:
        return zigzag
    k = chunk_count(seq_len, cp_size)
    c, per_rank = seq_len // k, k // cp_size
    chunk_work = work.reshape(k, c).sum(axis=1)
    loads, chunks = np.zeros(cp_size), [[] for _ in range(cp_size)]
    for j in sorted(range(k), key=lambda j: (-chunk_work[j], j)):
        rank = min((r for r in range(cp_size) if len(chunks[r]) < per_rank), key=lambda r: (loads[r], r))
        chunks[rank].append(j)
        loads[rank] += chunk_work[j]
    balanced = np.stack([np.concatenate([np.arange(j * c, (j + 1) * c) for j in sorted(ch)]) for ch in chunks])
    if rank_work(balanced, work).max() < rank_work(zigzag, work).max():
        return balanced
    return zigzag


def runs(local_index: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(row start, length, local offset)`` of each run of consecutive row positions in one
    rank's ``local_index`` (its query chunks, merged where adjacent), in local order."""
    index = np.asarray(local_index, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [index.size]))
    return [(int(index[a]), int(b - a), int(a)) for a, b in zip(starts, ends)]
