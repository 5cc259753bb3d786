"""Writing megatron indexed datasets (``<prefix>.bin`` / ``<prefix>.idx``) from documents.

One document = one sequence entry (and one document entry) of megatron's ``IndexedDataset``:
``[BOS] tokens(text) EOS``, BOS only with ``add_bos=True`` (the Llama-2 convention for
continual pretraining is EOS-separated documents without BOS). Token dtype: megatron's
``DType.optimal_dtype(vocab_size)`` (``uint16`` below 65500 ids, e.g. Llama-2's 32000, else
``int32``). Documents whose text has no token are skipped (counted in the report).

Length upsampling (:mod:`harpe_megatron.data.upsample`) decides per document after tokenization;
dropped documents are not written. The report (before/after statistics) is written next to the
data as ``<prefix>.report.json``.

Atomicity: everything is written under temporary names in the output directory
(``<prefix>.tmp-<host>-<pid>.*``) and renamed at the end (``.bin``, ``.report.json``, then
``.idx``), so an error or an interrupt (Ctrl-C) leaves no output file, only the previous state.
Temporary files of a writer that was killed (kill -9, node loss) are removed by the next write of
the same prefix on the same host, once their pid is gone (other hosts' files are left alone).
Existing outputs are refused unless ``overwrite=True``.

Tokenization can run in ``workers`` processes (:mod:`harpe_megatron.data.tokenize_workers`),
written in input order, so the output does not depend on the number of workers. Ctrl-C: a
terminal sends SIGINT to the whole process group; workers ignore it, the parent's handler only
records it (Python's own ``KeyboardInterrupt`` can land inside fork's at-fork hooks, where it is
ignored and lost) and the write loop raises ``KeyboardInterrupt`` after the current document or
while waiting for a worker, then kills the workers and removes its temporary files.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm

from harpe_megatron.data.jsonl import Document
from harpe_megatron.data.tokenize_workers import tokenized_documents
from harpe_megatron.data.tokenizer import SentencePieceTokenizer
from harpe_megatron.data.upsample import DEFAULT_BIN_EDGES, LengthUpsampler, UpsamplingReport

__all__ = ["PreprocessResult", "output_paths", "token_dtype", "write_indexed_dataset"]


@dataclass
class PreprocessResult:
    """What :func:`write_indexed_dataset` wrote."""

    prefix: str
    bin_path: str
    idx_path: str
    report_path: str
    documents: int  # documents written
    tokens: int  # tokens written (including EOS/BOS)
    dtype: str
    report: dict[str, Any]


def output_paths(prefix: str) -> dict[str, str]:
    """The files the preprocessor writes for ``prefix``."""
    return {"bin": prefix + ".bin", "idx": prefix + ".idx", "report": prefix + ".report.json"}


def token_dtype(vocab_size: int) -> type[np.number]:
    """The numpy dtype megatron picks for token ids of a vocabulary of ``vocab_size``."""
    return DType.optimal_dtype(vocab_size)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp(output_prefix: str) -> list[str]:
    """Remove ``<prefix>.tmp-<this host>-<pid>.*`` files whose writer process is gone; their names."""
    pattern = re.compile(re.escape(os.path.basename(output_prefix)) + r"\.tmp-" + re.escape(socket.gethostname())
                         + r"-(\d+)\.")
    removed = []
    for path in sorted(glob.glob(glob.escape(output_prefix) + ".tmp-*")):
        match = pattern.match(os.path.basename(path))
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            _remove([path])
            removed.append(path)
    return removed


class _CtrlC:
    """Context manager: SIGINT sets :attr:`requested` (main thread only; the previous handler is put back)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_CtrlC":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def _remove(paths: Iterable[str]) -> None:
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders a failed write made (given outermost first), innermost first, if empty."""
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()


def write_indexed_dataset(
    documents: Iterable[Document],
    tokenizer: SentencePieceTokenizer,
    output_prefix: str,
    *,
    upsampler: LengthUpsampler | None = None,
    bin_edges: Sequence[int] = DEFAULT_BIN_EDGES,
    add_bos: bool = False,
    workers: int = 1,
    batch_size: int = 64,
    overwrite: bool = False,
    progress: bool = True,
) -> PreprocessResult:
    """Tokenize ``documents``, apply ``upsampler`` and write ``output_prefix.{bin,idx,report.json}``.

    ``upsampler=None`` keeps every document (the report still uses the default 4096-token
    threshold to define "long"). Raises ``FileExistsError`` if an output exists and not
    ``overwrite``; ``ValueError`` if a token id is outside ``[0, vocab_size)`` (naming the
    document's ``file:line``) or if no document is left to write.
    """
    upsampler = upsampler or LengthUpsampler.keep_all()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if add_bos:
        bos = tokenizer.bos  # raises if the model has none
    outputs = output_paths(output_prefix)
    existing = [p for p in outputs.values() if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"output exists: {', '.join(existing)} (pass overwrite=True / --overwrite to replace)")
    out_dir = Path(os.path.abspath(output_prefix)).parent
    created = [d for d in reversed([out_dir, *out_dir.parents]) if not d.exists()]  # outermost first
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        _remove_empty(created)
        raise ValueError(f"output prefix {output_prefix}: its folder cannot be created ({exc.strerror}: "
                         f"{exc.filename})") from None
    stale = _remove_stale_tmp(output_prefix)
    if stale:
        print(f"removed temporary files of an interrupted earlier write: {', '.join(stale)}", file=sys.stderr)
    tmp_prefix = f"{output_prefix}.tmp-{socket.gethostname()}-{os.getpid()}"
    tmp = output_paths(tmp_prefix)

    vocab_size = tokenizer.vocab_size
    dtype = token_dtype(vocab_size)
    eod = tokenizer.eod
    report = UpsamplingReport(upsampler, bin_edges)
    written_docs = written_tokens = empty = 0
    builder = None
    ctrl_c = _CtrlC()
    tokenized = tokenized_documents(documents, tokenizer, workers, batch_size, stop=lambda: ctrl_c.requested)
    bar = tqdm(desc=f"tokenizing -> {os.path.basename(output_prefix)}", unit="doc", disable=not progress,
               file=sys.stderr, mininterval=0.5, dynamic_ncols=True)
    with ctrl_c:
        try:
            builder = IndexedDatasetBuilder(tmp["bin"], dtype=dtype)
            for doc, ids in tokenized:
                if ctrl_c.requested:
                    raise KeyboardInterrupt
                bar.update(1)
                if ids.size == 0:
                    empty += 1
                    continue
                lo, hi = int(ids.min()), int(ids.max())
                if lo < 0 or hi >= vocab_size:
                    bad = hi if hi >= vocab_size else lo
                    raise ValueError(f"{doc.where}: token id {bad} outside the vocabulary [0, {vocab_size}) "
                                     f"of {tokenizer.model_path}")
                parts = ([np.array([bos], dtype=np.int64)] if add_bos else []) + [ids, np.array([eod], dtype=np.int64)]
                tokens = np.concatenate(parts)
                kept = upsampler.keep(doc.index, tokens.size)
                report.add(doc.source, int(tokens.size), kept)
                if not kept:
                    continue
                builder.add_item(torch.from_numpy(tokens))
                builder.end_document()
                written_docs += 1
                written_tokens += int(tokens.size)
                if written_docs % 1000 == 0:
                    bar.set_postfix(kept=written_docs, tokens=written_tokens, refresh=False)
            bar.set_postfix(kept=written_docs, tokens=written_tokens)
            if written_docs == 0:
                raise ValueError(
                    f"no document left to write to {output_prefix} (input documents: "
                    f"{report.to_dict()['total']['before']['documents']}, "
                    f"empty: {empty}); lower short_threshold or raise short_keep_prob"
                )
            builder.finalize(tmp["idx"])
            summary = report.to_dict()
            summary["empty_documents_skipped"] = empty
            summary["output"] = {"prefix": output_prefix, "documents": written_docs, "tokens": written_tokens,
                                 "dtype": np.dtype(dtype).name, "tokenizer": tokenizer.model_path,
                                 "vocab_size": vocab_size, "add_bos": add_bos, "eod": eod}
            with open(tmp["report"], "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
                f.write("\n")
            if ctrl_c.requested:
                raise KeyboardInterrupt
            for key in ("bin", "report", "idx"):  # the .idx last: both data files present => complete
                os.replace(tmp[key], outputs[key])
        except BaseException:
            tokenized.close()  # now, not at garbage collection: kills the workers
            if builder is not None and not builder.data_file.closed:
                builder.data_file.close()
            _remove(tmp.values())
            _remove_empty(created)
            raise
        finally:
            bar.close()
    if ctrl_c.requested:  # Ctrl-C after the last document: the output is complete, say so
        print("interrupted after the output was complete; it is kept", file=sys.stderr)
    return PreprocessResult(
        prefix=output_prefix, bin_path=outputs["bin"], idx_path=outputs["idx"], report_path=outputs["report"],
        documents=written_docs, tokens=written_tokens, dtype=np.dtype(dtype).name, report=summary,
    )
