"""Tokenizing documents in worker processes, in input order, with a shutdown that cannot hang.

Each worker owns two pipe ends of its own (no lock shared between processes, unlike
``multiprocessing.Pool``, whose shutdown waits on a queue lock a worker may hold: a Ctrl-C
could leave the preprocessor hanging). The parent sends a batch to a worker only when that
worker is idle and reads results oldest first, so the output order is the input order, at most
``workers`` batches are in flight, and no pipe write can wait on a full pipe in both directions.

Ctrl-C: a terminal sends SIGINT to the whole process group. Workers ignore it (it is blocked
while they start and ignored once they run); the parent's ``stop`` callable is polled while it
waits for a result, so an interrupt is noticed within ``POLL_S`` even when a worker is slow, and
the workers are killed and reaped when the iterator is closed (``close()`` or garbage collection).
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import signal
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from harpe_megatron.data.jsonl import Document
from harpe_megatron.data.tokenizer import SentencePieceTokenizer

__all__ = ["tokenized_documents"]

POLL_S = 0.1


def _worker(conn, tokenizer: SentencePieceTokenizer) -> None:
    """Receive lists of texts, send back ("ok", ids) or ("error", exception); ``None`` ends the loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    while True:
        texts = conn.recv()
        if texts is None:
            return
        try:
            reply = ("ok", [np.asarray(tokenizer.tokenize(t), dtype=np.int64) for t in texts])
        except Exception as exc:  # sent to the parent, which raises it
            reply = ("error", exc)
        conn.send(reply)


def _batches(documents: Iterable[Document], size: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for doc in documents:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenized_documents(
    documents: Iterable[Document],
    tokenizer: SentencePieceTokenizer,
    workers: int,
    batch_size: int,
    stop: Callable[[], bool] = lambda: False,
) -> Iterator[tuple[Document, np.ndarray]]:
    """(document, token ids) in input order, tokenized in ``workers`` processes (in this one if 1).

    Raises ``KeyboardInterrupt`` when ``stop()`` turns true while waiting for a worker, and
    ``RuntimeError`` if a worker dies (killed, out of memory).
    """
    if workers <= 1:
        for doc in documents:
            yield doc, np.asarray(tokenizer.tokenize(doc.text), dtype=np.int64)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    procs, conns = [], []
    # SIGINT is blocked while the workers start: they inherit the mask, and a Ctrl-C meanwhile is
    # delivered to the parent after the start instead of inside fork's at-fork hooks (where Python
    # ignores exceptions and the interrupt would be lost).
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        for _ in range(workers):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child_end, tokenizer), daemon=True)
            proc.start()
            child_end.close()
            procs.append(proc)
            conns.append(parent_end)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def died(w: int) -> RuntimeError:
        procs[w].join(timeout=5)
        return RuntimeError(f"tokenizer worker {w} (pid {procs[w].pid}) died with exit code {procs[w].exitcode}")

    def receive(w: int) -> list[np.ndarray]:
        while not conns[w].poll(POLL_S):
            if stop():
                raise KeyboardInterrupt
            if not procs[w].is_alive():
                raise died(w)
        try:
            status, value = conns[w].recv()
        except EOFError:  # the worker's end closed: it is gone
            raise died(w) from None
        if status == "error":
            raise value
        return value

    try:
        idle = collections.deque(range(workers))
        in_flight: collections.deque = collections.deque()  # (batch, worker), oldest first
        for batch in _batches(documents, batch_size):
            if not idle:
                docs, w = in_flight.popleft()
                yield from zip(docs, receive(w))
                idle.append(w)
            w = idle.popleft()
            conns[w].send([d.text for d in batch])
            in_flight.append((batch, w))
        while in_flight:
            docs, w = in_flight.popleft()
            yield from zip(docs, receive(w))
        for conn in conns:
            conn.send(None)
        for proc in procs:
            proc.join(timeout=10)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join()
        for conn in conns:
            conn.close()
