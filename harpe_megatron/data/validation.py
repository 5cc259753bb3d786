"""Checks of a run's data and tokenizer before training writes anything.

:func:`validate_training_inputs` is called by the trainer first thing (before the run directory,
``config.yaml``, the model or megatron's dataset index cache exist) and by
``tools/check_data.py``. Every failure is a :class:`DataValidationError` whose message names the
config key and the file, and says what was expected:

* ``data.paths`` empty, ``data.tokenizer_model`` unset or missing, not a sentencepiece model;
* the tokenizer's vocabulary differs from ``model.vocab_size`` (ids must have an embedding row,
  and a model trained with another tokenizer reads other ids);
* a prefix of ``data.paths`` without ``.bin``/``.idx``, an ``.idx`` with a bad magic, version or
  dtype code (or a non-integer token dtype), truncated or padded files, sequence lengths,
  pointers or document boundaries that contradict each other or the ``.bin`` size;
* a token id outside ``[0, vocab_size)`` (``vocab_size`` of the tokenizer = ``model.vocab_size``,
  not megatron's padded size: padding rows are never trained as inputs);
* a split of ``data.split`` that megatron builds but that holds no document (megatron's
  ``GPTDataset`` then loops forever computing its epochs) or fewer tokens than one sample
  (``seq_length + 1``, or the position scheme's packed length + 1); ``training.eval_interval``
  with no validation share;
* with ``data.document_masking``, a document that does not end with the tokenizer's EOD (the
  boundaries masking finds);
* an existing index-cache ``.npy`` file of an object dtype (megatron loads its caches with
  ``numpy.load(allow_pickle=True)``, i.e. it would unpickle it);
* whatever the caller adds as ``checks`` (the trainer and ``tools/check_data.py``:
  ``checkpoint.pretrained`` missing or unsafe, :mod:`harpe_megatron.training.input_checks`).

How much is read depends on ``data.validate``:

* ``full`` (default): everything above; every token id is read (a vectorised min/max over the
  memory-mapped ``.bin`` in chunks of :data:`SCAN_CHUNK_TOKENS`), every index entry checked.
  With several ranks each rank reads ``1/world`` of every file, so the corpus is read once per
  launch. Measured on a 2-core VM: 0.7-1.2 s per GiB of ``.bin`` from disk, 0.1-0.25 s per GiB
  from the page cache (uint16; int32 about half as fast from the cache).
* ``quick``: the same checks, but token ids only in :data:`QUICK_WINDOWS` windows of
  :data:`QUICK_WINDOW_TOKENS` tokens spread over each file (start and end included), index
  entries only in the first and last :data:`QUICK_WINDOW_TOKENS`: bounded time for any corpus.
* ``off``: nothing (megatron's own checks and errors remain).

All ranks run the checks; with torch.distributed initialised the outcome is gathered, so a
failure on any rank (e.g. a node that does not see the data) makes every rank raise the same
error and exit instead of waiting in a collective.
"""

from __future__ import annotations

import glob
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
from megatron.core.datasets.indexed_dataset import DType

from harpe_megatron.data.dataset import _IDX_HEADER_BYTES, check_indexed_dataset
from harpe_megatron.data.documents import first_document_without_eod
from harpe_megatron.data.tokenizer import SentencePieceTokenizer
from harpe_megatron.log import get_logger

__all__ = [
    "VALIDATE_MODES",
    "DataValidationError",
    "PrefixReport",
    "ValidationReport",
    "validate_training_inputs",
    "scan_token_ids",
    "split_document_ranges",
]

_log = get_logger(__name__)

VALIDATE_MODES = ("full", "quick", "off")
SCAN_CHUNK_TOKENS = 1 << 24  # 16M tokens (32 MB of uint16) per vectorised min/max
QUICK_WINDOWS = 16
QUICK_WINDOW_TOKENS = 1 << 20
_SPLIT_NAMES = ("train", "valid", "test")


class DataValidationError(ValueError):
    """Training inputs that cannot work; the message names the key/file and what was expected."""


@dataclass
class PrefixReport:
    prefix: str
    dtype: str
    documents: int
    tokens: int
    scanned_tokens: int
    max_id: Optional[int]
    split_documents: dict[str, int]
    split_tokens: dict[str, int]


@dataclass
class ValidationReport:
    mode: str
    vocab_size: int = 0
    prefixes: list[PrefixReport] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        if self.mode == "off":
            return "data checks off (data.validate: off)"
        tokens = sum(p.tokens for p in self.prefixes)
        scanned = sum(p.scanned_tokens for p in self.prefixes)
        ids = [p.max_id for p in self.prefixes if p.max_id is not None]
        splits = ", ".join(
            f"{name} {sum(p.split_documents.get(name, 0) for p in self.prefixes):,}"
            for name in _SPLIT_NAMES if any(name in p.split_documents for p in self.prefixes)
        )
        return (f"data checks ({self.mode}) passed: {len(self.prefixes)} prefix(es), {tokens:,} tokens, "
                f"{scanned:,} token ids read on this rank (max {max(ids) if ids else '-'} < vocab {self.vocab_size}), "
                f"documents per split: {splits}; {self.seconds:.2f} s")


def _fail(msg: str) -> None:
    raise DataValidationError(msg)


# Training launches build no data; the demo's data has its own step.
_DEMO_HINT = ("; for the demo corpus of configs/tiny_cpu.yaml run `bash scripts/demo.sh` or "
              "`python -m harpe_megatron.cli.prepare_run --config CONFIG` first")


# --- tokenizer -------------------------------------------------------------------------------------
def _check_tokenizer(cfg) -> int:
    """The tokenizer's vocabulary size, after checking it against ``model.vocab_size``."""

    path = cfg.data.tokenizer_model
    if not path:
        _fail("data.tokenizer_model is not set (the sentencepiece model the data was tokenized with)")
    try:
        tokenizer = SentencePieceTokenizer(path)
    except FileNotFoundError:
        _fail(f"data.tokenizer_model: {path} does not exist (expected a sentencepiece .model file){_DEMO_HINT}")
    except ValueError as exc:
        _fail(f"data.tokenizer_model: {exc}")
    if tokenizer.vocab_size != cfg.model.vocab_size:
        _fail(
            f"data.tokenizer_model: {path} has {tokenizer.vocab_size} pieces but model.vocab_size is "
            f"{cfg.model.vocab_size}; they must be equal (use the tokenizer the model was trained with, "
            f"or set model.vocab_size: {tokenizer.vocab_size} for a model trained from scratch)"
        )
    return tokenizer.vocab_size


# --- index files -----------------------------------------------------------------------------------
def _index_arrays(idx_path: str):
    """(dtype code, sequence lengths, byte pointers, document boundaries) of a structurally valid ``.idx``."""
    with open(idx_path, "rb") as f:
        header = f.read(_IDX_HEADER_BYTES)
    code = header[17]
    n_seq, n_doc = struct.unpack("<QQ", header[18:34])

    def view(dtype, offset: int, count: int) -> np.ndarray:
        if count == 0:
            return np.zeros(0, dtype)
        return np.memmap(idx_path, dtype=dtype, mode="r", offset=offset, shape=(count,))

    lengths = view(np.int32, _IDX_HEADER_BYTES, n_seq)
    pointers = view(np.int64, _IDX_HEADER_BYTES + 4 * n_seq, n_seq)
    documents = view(np.int64, _IDX_HEADER_BYTES + 12 * n_seq, n_doc)
    return code, lengths, pointers, documents


def _index_ranges(mode: str, n: int, rank: int, world: int) -> list[tuple[int, int]]:
    """Entries of the index this rank checks: its 1/world share (full) or the first and last
    QUICK_WINDOW_TOKENS entries on rank 0 (quick)."""
    if mode == "full":
        lo, hi = n * rank // world, n * (rank + 1) // world
        return [(lo, hi)] if hi > lo else []
    if rank != 0:
        return []
    if n <= 2 * QUICK_WINDOW_TOKENS:
        return [(0, n)] if n else []
    return [(0, QUICK_WINDOW_TOKENS), (n - QUICK_WINDOW_TOKENS, n)]


def _check_index_arrays(key: str, idx_path: str, bin_path: str, mode: str = "full", rank: int = 0,
                        world: int = 1) -> np.dtype:
    """Dtype an integer type; lengths, pointers and document boundaries consistent. Returns the dtype.

    Reads the index in chunks of SCAN_CHUNK_TOKENS entries, only this rank's share of it
    (see :func:`_index_ranges`), so memory stays bounded for indices of billions of documents.
    """
    code, lengths, pointers, documents = _index_arrays(idx_path)
    dtype = np.dtype(DType.dtype_from_code(code))
    if dtype.kind not in "iu":
        _fail(f"{key}: {idx_path}: token dtype {dtype.name} (code {code}) in its header, expected an integer type "
              "(uint16 below 65500 ids, else int32)")
    if lengths.size and pointers[0] != 0:
        _fail(f"{key}: {idx_path}: the first sequence starts at byte {int(pointers[0])} of {bin_path}, expected 0")
    for start, stop in _index_ranges(mode, lengths.size, rank, world):
        for lo in range(start, stop, SCAN_CHUNK_TOKENS):
            hi = min(stop, lo + SCAN_CHUNK_TOKENS)
            chunk = np.asarray(lengths[lo:hi])
            if chunk.min() < 0:
                _fail(f"{key}: {idx_path}: negative sequence length at sequence {lo + int(np.argmax(chunk < 0))}")
            # pointer i+1 == pointer i + length i x itemsize, for i in [lo, hi - 1) and across chunks
            top = min(hi + 1, lengths.size)
            expected = pointers[lo:top - 1] + chunk[: top - 1 - lo].astype(np.int64) * dtype.itemsize
            bad = np.flatnonzero(pointers[lo + 1:top] != expected)
            if bad.size:
                i = lo + int(bad[0]) + 1
                _fail(f"{key}: {idx_path}: sequence {i} starts at byte {int(pointers[i])}, expected "
                      f"{int(expected[i - 1 - lo])} (previous start + length x {dtype.itemsize} bytes of {dtype.name}, "
                      "the dtype in its header): pointers and lengths disagree (a wrong dtype code in the header "
                      "or a damaged index)")
    for start, stop in _index_ranges(mode, documents.size, rank, world):
        for lo in range(start, stop, SCAN_CHUNK_TOKENS):
            chunk = np.asarray(documents[lo:min(stop, lo + SCAN_CHUNK_TOKENS) + 1])
            if (lo == 0 and chunk[0] != 0) or np.any(np.diff(chunk) < 0):
                _fail(f"{key}: {idx_path}: document boundaries must start at 0 and never decrease")
    return dtype


def _read_index(prefix: str, key: str, mode: str = "full", rank: int = 0, world: int = 1):
    """(info, dtype, sequence lengths, byte pointers) after every structural check of the pair."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    if not os.path.exists(idx_path) and not os.path.exists(bin_path):
        parent = os.path.dirname(os.path.abspath(prefix))
        where = "" if os.path.isdir(parent) else f"; directory {parent} does not exist"
        _fail(f"{key}: no indexed dataset at {prefix!r} (neither {bin_path} nor {idx_path} exists{where}); "
              f"expected the prefix written by tools/preprocess_data.py, without .bin/.idx{_DEMO_HINT}")
    try:
        info = check_indexed_dataset(prefix)
    except FileNotFoundError as exc:
        _fail(f"{key}: {exc}")
    except ValueError as exc:
        if str(exc).startswith(bin_path):
            # The index is complete but the .bin size disagrees: a wrong dtype in the header or damaged
            # pointers explain it more precisely than the size alone.
            _check_index_arrays(key, idx_path, bin_path)
        _fail(f"{key}: {exc}")
    dtype = _check_index_arrays(key, idx_path, bin_path, mode, rank, world)
    _, lengths, pointers, _ = _index_arrays(idx_path)
    return info, dtype, lengths, pointers


def split_document_ranges(split: str, num_sequences: int) -> list[Optional[range]]:
    """Megatron's train/valid/test ranges of sequence indices for ``split`` (None: no share)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [None if m is None else range(int(round(m[0] * num_sequences)), int(round(m[1] * num_sequences)))
            for m in matrix]


def _check_splits(cfg, key: str, prefix: str, lengths: np.ndarray, needed_tokens: int,
                  report: PrefixReport) -> None:
    ranges = split_document_ranges(cfg.data.split, len(lengths))
    if ranges[0] is None:
        _fail(f"data.split: {cfg.data.split!r} gives the train split no share; expected a positive first entry")
    if cfg.training.eval_interval and ranges[1] is None:
        _fail(f"training.eval_interval is {cfg.training.eval_interval} but data.split {cfg.data.split!r} leaves no "
              "validation share; give the second entry a positive weight or set training.eval_interval: 0")
    for name, r in zip(_SPLIT_NAMES, ranges):
        if r is None:
            continue
        tokens = int(lengths[r.start:r.stop].sum(dtype=np.int64))
        report.split_documents[name], report.split_tokens[name] = len(r), tokens
        if len(r) == 0:
            _fail(f"{key}: data.split {cfg.data.split!r} gives the {name} split of {prefix} no document "
                  f"({len(lengths)} documents in all; megatron would never finish building it); use more "
                  f"documents or set the {name} share to 0")
        if tokens < needed_tokens:
            _fail(f"{key}: the {name} split of {prefix} holds {tokens} tokens ({len(r)} documents), fewer than one "
                  f"sample of {needed_tokens} tokens (data.seq_length {cfg.data.seq_length}"
                  f"{' packed by data.position_scheme to ' + str(needed_tokens - 1) if needed_tokens - 1 != cfg.data.seq_length else ''}"
                  " + 1); use more data or a shorter data.seq_length")


# --- token ids -------------------------------------------------------------------------------------
def scan_token_ids(bin_path: str, dtype: np.dtype, total_tokens: int, vocab_size: int,
                   ranges: list[tuple[int, int]]) -> tuple[int, Optional[int], Optional[tuple[int, int]]]:
    """Read the token ids of ``ranges`` (token offsets) in chunks.

    Returns ``(tokens read, max id seen, first bad (offset, id) or None)``; a bad id is one
    outside ``[0, vocab_size)``.
    """
    if total_tokens == 0:
        return 0, None, None
    data = np.memmap(bin_path, dtype=dtype, mode="r", shape=(total_tokens,))
    signed = dtype.kind == "i"
    read, top = 0, None
    for start, stop in ranges:
        for lo in range(start, stop, SCAN_CHUNK_TOKENS):
            chunk = data[lo:min(stop, lo + SCAN_CHUNK_TOKENS)]
            hi = int(chunk.max())
            top = hi if top is None else max(top, hi)
            read += chunk.size
            if hi >= vocab_size or (signed and int(chunk.min()) < 0):
                i = int(np.flatnonzero((chunk >= vocab_size) | (chunk < 0))[0])
                return read, top, (lo + i, int(chunk[i]))
    return read, top, None


def _scan_ranges(mode: str, total: int, rank: int, world: int) -> list[tuple[int, int]]:
    if mode == "full":
        lo, hi = total * rank // world, total * (rank + 1) // world
        return [(lo, hi)] if hi > lo else []
    if total <= QUICK_WINDOWS * QUICK_WINDOW_TOKENS:
        return [(0, total)] if rank == 0 else []
    starts = np.linspace(0, total - QUICK_WINDOW_TOKENS, QUICK_WINDOWS).astype(np.int64)
    mine = [(int(s), int(s) + QUICK_WINDOW_TOKENS) for i, s in enumerate(starts) if i % world == rank]
    return mine


def _check_token_ids(mode: str, key: str, prefix: str, dtype: np.dtype, tokens: int, pointers: np.ndarray,
                     vocab_size: int, tokenizer: str, rank: int, world: int, report: PrefixReport) -> None:
    bin_path = prefix + ".bin"
    read, top, bad = scan_token_ids(bin_path, dtype, tokens, vocab_size, _scan_ranges(mode, tokens, rank, world))
    report.scanned_tokens, report.max_id = read, top
    if bad is not None:
        offset, value = bad
        sequence = int(np.searchsorted(pointers, offset * dtype.itemsize, side="right")) - 1
        _fail(f"{key}: {bin_path}: token id {value} at token {offset} (document {sequence}) is outside the "
              f"vocabulary [0, {vocab_size}) of data.tokenizer_model {tokenizer} (= model.vocab_size); the data "
              "was tokenized with another tokenizer or is damaged")


def _check_document_ends(cfg, key: str, prefix: str, dtype: np.dtype, mode: str, rank: int, world: int) -> None:
    """data.document_masking: every document (this rank's share; quick: the index's ends) ends with EOD."""
    _, lengths, pointers, boundaries = _index_arrays(prefix + ".idx")
    eod = SentencePieceTokenizer(cfg.data.tokenizer_model).eod
    bad = first_document_without_eod(prefix + ".bin", dtype, lengths, pointers, boundaries, eod,
                                     _index_ranges(mode, boundaries.size - 1, rank, world))
    if bad is not None:
        _fail(f"{key}: {prefix}.bin: document {bad} does not end with the tokenizer's EOD (id {eod}); "
              "data.document_masking finds document boundaries by EOD tokens, which tools/preprocess_data.py "
              "appends to every document")


# --- index cache -----------------------------------------------------------------------------------
def _check_cache(cfg, prefixes: list[str]) -> None:
    """Refuse existing megatron index-cache files that would be unpickled (object dtype)."""
    dirs = [cfg.data.cache_dir] if cfg.data.cache_dir else [os.path.join(p, "cache", "GPTDataset_indices")
                                                              for p in prefixes]
    for d in dirs:
        for path in sorted(glob.glob(os.path.join(glob.escape(d), "*.npy"))):
            try:
                with open(path, "rb") as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    _, _, dtype = read_header(f)
            except (ValueError, OSError) as exc:
                _fail(f"data.cache_dir: {path} is not a valid .npy index cache ({exc}); delete it to rebuild")
            if dtype.hasobject:
                _fail(f"data.cache_dir: {path} holds Python objects (dtype {dtype}), not an index; megatron loads "
                      "caches with allow_pickle=True, so it is refused; delete it to rebuild")


# --- entry -----------------------------------------------------------------------------------------
def _validate_local(cfg, mode: str, rank: int, world: int, checks: Sequence[Callable]) -> ValidationReport:
    start = time.perf_counter()
    report = ValidationReport(mode=mode)
    if not cfg.data.paths:
        _fail("data.paths is empty: expected at least one indexed-dataset prefix (written by tools/preprocess_data.py)")
    vocab_size = _check_tokenizer(cfg)
    report.vocab_size = vocab_size
    scheme = cfg.data.position_scheme
    packed = scheme.target_length(cfg.data.seq_length) if scheme is not None else cfg.data.seq_length
    for i, prefix in enumerate(cfg.data.paths):
        key = f"data.paths[{i}]"
        info, dtype, lengths, pointers = _read_index(prefix, key, mode, rank, world)
        pr = PrefixReport(prefix=prefix, dtype=dtype.name, documents=info.documents, tokens=info.tokens,
                          scanned_tokens=0, max_id=None, split_documents={}, split_tokens={})
        _check_splits(cfg, key, prefix, lengths, packed + 1, pr)
        _check_token_ids(mode, key, prefix, dtype, info.tokens, pointers, vocab_size, cfg.data.tokenizer_model,
                         rank, world, pr)
        if cfg.data.document_masking:
            _check_document_ends(cfg, key, prefix, dtype, mode, rank, world)
        report.prefixes.append(pr)
    _check_cache(cfg, list(cfg.data.paths))
    for check in checks:
        try:
            check(cfg)
        except ValueError as exc:
            _fail(str(exc))
    report.seconds = time.perf_counter() - start
    return report


def validate_training_inputs(cfg, mode: Optional[str] = None, announce: bool = False,
                             checks: Sequence[Callable] = ()) -> ValidationReport:
    """Check the data and tokenizer of ``cfg`` (a RunConfig) before anything is written.

    ``mode`` defaults to ``cfg.data.validate``. With torch.distributed initialised this is a
    collective: call it on every rank; each reads its share and every rank raises the same
    :class:`DataValidationError` if any rank found a problem. ``announce``: rank 0 logs the
    one-line summary (``harpe_megatron.log``). ``checks`` are further ``check(cfg)`` calls made with the data checks
    (unless ``mode`` is off) whose ``ValueError`` is reported the same way (the trainer's: the
    initial weights, :mod:`harpe_megatron.training.input_checks`).
    """
    import torch.distributed as dist

    mode = mode or cfg.data.validate
    if mode not in VALIDATE_MODES:
        _fail(f"data.validate: expected one of {list(VALIDATE_MODES)}, got {mode!r}")
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if mode == "off":
        report = ValidationReport(mode=mode)
    elif not distributed:
        report = _validate_local(cfg, mode, rank, world, checks)
    else:
        error: Optional[str] = None
        report = None
        try:
            report = _validate_local(cfg, mode, rank, world, checks)
        except DataValidationError as exc:
            error = str(exc)
        except Exception as exc:  # an unexpected failure must still reach the other ranks
            error = f"data check failed on rank {rank}: {type(exc).__name__}: {exc}"
        errors: list[Optional[str]] = [None] * world
        dist.all_gather_object(errors, error)
        first = next(((r, e) for r, e in enumerate(errors) if e is not None), None)
        if first is not None:
            r, e = first
            _fail(e if e == error else f"(found by rank {r}) {e}")
        assert report is not None
    if announce and rank == 0:
        _log.info(report.summary())
    return report
