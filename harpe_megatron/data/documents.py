"""Document boundaries in packed rows: ids, per-document positions, loss at boundaries, attention work.

Packed rows (data/dataset.py) run across documents. With ``data.document_masking`` every row
carries its document boundaries to the attention, which then stops at them
(model/document_attention.py). Conventions:

* **Boundaries** are the tokenizer's EOD token, which the preprocessor appends to every document
  (megatron's own ``reset_position_ids`` / ``reset_attention_mask`` / ``eod_mask_loss`` read them
  the same way). The EOD token belongs to the document it ends. A row may start and end inside a
  document (the packed rows cut documents): such a piece is a document of its own in that row.
* ``document_ids`` ``[b, s]`` int64: the number of EOD tokens before a token in its row (0 for
  the row's first document). Non-decreasing; each document is one contiguous run.
* **Positions** (``data.reset_position_ids``, as Llama 3 trains): ``position_ids`` restart at 0 at
  every document start (also for the piece a row starts with). Otherwise they stay
  ``0 .. s-1`` (RoPE then sees the same relative distances inside a document either way).
* **Loss at boundaries**: a document's last token (its EOD) would predict the *next* document's
  first token, which it cannot see under document masking. That prediction is excluded
  (``loss_mask = 0`` where the input token is EOD, megatron's ``eod_mask_loss``), so a row of k
  documents trains exactly the k documents' own next-token predictions, as if each ran alone.
* ``token_index`` ``[b, s]`` int64: each token's position in its row (``0 .. s-1`` before the CP
  cut; afterwards it tells the model which row positions a CP rank holds).
* ``attention_keys`` ``[b, s]`` (float32): how many keys each token's query attends, i.e. its
  position in its document + 1. Summed over the tokens of a step (the trainer does it through
  the loss report), it is the step's number of attended (query, key) pairs: the attention FLOPs
  that the MFU line counts (step/metrics.py).

All tensors here are per-token ``[b, s]``. For context parallelism a document-masked batch is not
cut in zigzag but in the layout balanced by ``attention_keys`` (:func:`cp_share`,
:mod:`harpe_megatron.parallel.cp_layout`), every per-token tensor alike, plus ``token_index``
(each token's position in its row), from which the model restores row order.

Attention work of a document-length distribution (the FLOPs document masking saves):
:func:`packed_attention_fraction` packs documents of given lengths into rows of ``seq_length``
tokens the way the GPT dataset does (shuffled, concatenated, cut) and returns the attended pairs
under document masking divided by those of plain causal attention (``sum s_i (s_i + 1) / 2`` over
the pieces of each row vs ``S (S + 1) / 2``); :func:`dataset_document_lengths` reads the document
lengths of an indexed dataset.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset
from torch import Tensor

from harpe_megatron.parallel.cp_layout import balanced_layout, rank_work, zigzag_layout

__all__ = ["document_ids", "document_positions", "apply_document_masking", "attended_pairs",
           "packed_attention_fraction", "packed_rows", "dataset_document_lengths", "cp_rank_pairs",
           "data_attention_fraction", "cp_share", "first_document_without_eod"]


def document_ids(tokens: Tensor, eod: int) -> Tensor:
    """``[b, s]`` int64: the number of EOD tokens before each token of its row."""
    is_eod = (tokens == eod).to(torch.int64)
    return torch.cumsum(is_eod, dim=-1) - is_eod


def document_positions(ids: Tensor) -> Tensor:
    """``[b, s]`` int64: each token's index inside its document (0 at every document start)."""
    s = ids.size(-1)
    index = torch.arange(s, dtype=torch.int64, device=ids.device).expand_as(ids)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[..., 1:] = ids[..., 1:] != ids[..., :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index))
    return index - torch.cummax(start_index, dim=-1).values


def apply_document_masking(batch: Mapping[str, Tensor], eod: int, reset_position_ids: bool) -> dict[str, Tensor]:
    """``batch`` (full rows, before any CP slicing) with ``document_ids``, ``attention_keys``, the
    boundary loss excluded and, with ``reset_position_ids``, per-document ``position_ids``."""
    out = dict(batch)
    tokens = batch["tokens"]
    ids = document_ids(tokens, eod)
    positions = document_positions(ids)
    out["document_ids"] = ids
    out["token_index"] = torch.arange(tokens.size(-1), dtype=torch.int64, device=tokens.device).expand_as(ids).contiguous()
    out["attention_keys"] = (positions + 1).to(torch.float32)
    out["loss_mask"] = batch["loss_mask"] * (tokens != eod).to(batch["loss_mask"].dtype)
    if reset_position_ids:
        out["position_ids"] = positions
    return out


def attended_pairs(lengths: np.ndarray) -> float:
    """(query, key) pairs of causal attention inside documents of these lengths: ``sum s (s + 1) / 2``."""
    lengths = np.asarray(lengths, dtype=np.float64)
    return float(np.sum(lengths * (lengths + 1) / 2))


def packed_rows(doc_lengths: Sequence[int], seq_length: int, seed: int = 1234,
                max_rows: Optional[int] = None) -> list[np.ndarray]:
    """The document pieces (lengths) of every full row when documents of ``doc_lengths`` are
    shuffled (``seed``), concatenated and cut into rows of ``seq_length`` (the last partial row
    is dropped, as training does; ``max_rows`` keeps the first rows only)."""
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    lengths = lengths[lengths > 0]
    if lengths.size == 0:
        raise ValueError("no documents (all lengths are 0)")
    order = np.random.default_rng(seed).permutation(lengths.size)
    ends = np.cumsum(lengths[order])
    rows = int(ends[-1] // seq_length)
    if max_rows is not None:
        rows = min(rows, max_rows)
    if rows == 0:
        raise ValueError(f"the documents hold {int(ends[-1])} tokens, fewer than one row of {seq_length}")
    total = rows * seq_length
    cuts = np.union1d(ends[ends < total], np.arange(1, rows + 1, dtype=np.int64) * seq_length)
    pieces = np.diff(np.concatenate(([0], cuts)))
    row_of_piece = (np.cumsum(pieces) - 1) // seq_length
    return np.split(pieces, np.flatnonzero(np.diff(row_of_piece)) + 1)


def packed_attention_fraction(doc_lengths: Sequence[int], seq_length: int, seed: int = 1234,
                              max_rows: Optional[int] = None) -> tuple[float, int]:
    """``(fraction, rows)``: attended pairs with document masking / with causal attention, over the
    rows :func:`packed_rows` makes (module docstring)."""
    rows = packed_rows(doc_lengths, seq_length, seed, max_rows)
    masked = sum(attended_pairs(r) for r in rows)
    return masked / (len(rows) * attended_pairs([seq_length])), len(rows)


def cp_rank_pairs(pieces: np.ndarray, cp_size: int, layout: str = "balanced") -> np.ndarray:
    """Attended pairs of each CP rank's queries (``[cp]``) for one row of document ``pieces`` under
    the ``"zigzag"`` or the ``"balanced"`` layout (:mod:`harpe_megatron.parallel.cp_layout`)."""
    keys = np.concatenate([np.arange(1, p + 1, dtype=np.float64) for p in pieces])  # position in document + 1
    if layout == "zigzag":
        index = zigzag_layout(keys.size, cp_size)
    elif layout == "balanced":
        index = balanced_layout(keys, cp_size)
    else:
        raise ValueError(f"layout must be 'zigzag' or 'balanced', got {layout!r}")
    return rank_work(index, keys)


def cp_share(batch: Mapping[str, Tensor], cp_rank: int, cp_size: int) -> dict[str, Tensor]:
    """This CP rank's share of a document-masked ``batch`` (full rows, after
    :func:`apply_document_masking`): the balanced layout of the micro-batch (one for all its rows,
    from their summed ``attention_keys``), every ``[b, s, ...]`` tensor cut with it (so
    ``token_index`` names each kept token's position in the row). ``cp_size == 1`` keeps the rows
    whole."""
    keys = batch["attention_keys"]
    if cp_size == 1:
        return dict(batch)
    index = torch.from_numpy(balanced_layout(keys.sum(0).double().cpu().numpy(), cp_size)[cp_rank]).to(keys.device)
    return {name: t.index_select(1, index) for name, t in batch.items()}


def dataset_document_lengths(prefix: str, max_documents: Optional[int] = None, seed: int = 1234) -> np.ndarray:
    """Token count of every document of the indexed dataset ``prefix`` (``.bin``/``.idx``), or of
    ``max_documents`` of them drawn at random (seeded, with replacement) when it holds more: an
    estimate of the distribution that reads O(max_documents) of a corpus of any size."""
    dataset = IndexedDataset(prefix)
    sequence_lengths = dataset.sequence_lengths
    bounds = np.asarray(dataset.document_indices, dtype=np.int64)
    n = bounds.size - 1
    if max_documents is None or n <= max_documents:
        ends = np.concatenate(([0], np.cumsum(np.asarray(sequence_lengths, dtype=np.int64))))
        return ends[bounds[1:]] - ends[bounds[:-1]]
    docs = np.random.default_rng(seed).integers(0, n, size=max_documents)
    starts, stops = bounds[docs], bounds[docs + 1]
    if np.all(stops - starts == 1):  # one sequence per document (what the preprocessors write)
        return np.asarray(sequence_lengths[starts], dtype=np.int64)
    return np.array([int(np.sum(sequence_lengths[a:b])) for a, b in zip(starts, stops)], dtype=np.int64)


def data_attention_fraction(prefixes: Sequence[str], weights: Optional[Sequence[float]], seq_length: int,
                            seed: int = 1234, max_rows: int = 4096, max_documents: int = 1 << 20) -> Optional[float]:
    """:func:`packed_attention_fraction` of a blend of indexed datasets (each prefix packed on its
    own, as megatron's blend draws every row from one dataset; weighted by ``weights`` or, with
    ``None``, by token counts), over at most ``max_rows`` rows of at most ``max_documents``
    documents per prefix (:func:`dataset_document_lengths`). ``None`` when a prefix cannot be
    read or holds less than one row."""
    fractions, shares = [], []
    for i, prefix in enumerate(prefixes):
        try:
            lengths = dataset_document_lengths(str(prefix), max_documents, seed)
            fraction, _ = packed_attention_fraction(lengths, seq_length, seed, max_rows)
        except (OSError, ValueError, AssertionError):
            return None
        fractions.append(fraction)
        shares.append(float(weights[i]) if weights is not None else float(lengths.sum()))
    return float(np.dot(fractions, shares) / np.sum(shares)) if fractions else None


def first_document_without_eod(bin_path: str, dtype: np.dtype, lengths: np.ndarray, pointers: np.ndarray,
                               boundaries: np.ndarray, eod: int, ranges: Sequence[tuple[int, int]],
                               chunk: int = 1 << 20) -> Optional[int]:
    """The first document, among the document index ``ranges`` of an indexed dataset (its
    ``.idx`` arrays), whose last token is not ``eod``; ``None`` when all end with it (empty
    documents are skipped). Document masking finds boundaries by EOD tokens only."""
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    for lo, hi in ranges:
        for start in range(lo, hi, chunk):
            docs = np.arange(start, min(hi, start + chunk))
            last = np.asarray(boundaries[docs + 1]) - 1
            nonempty = last >= np.asarray(boundaries[docs])
            last = np.where(nonempty, last, 0)
            nonempty &= np.asarray(lengths[last]) > 0
            ends = np.asarray(pointers[last]) // dtype.itemsize + np.asarray(lengths[last]) - 1
            bad = nonempty & (tokens[np.where(nonempty, ends, 0)] != eod)
            if bad.any():
                return int(docs[np.argmax(bad)])
    return None
