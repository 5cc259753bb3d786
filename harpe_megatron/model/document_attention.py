"""Attention that stops at document boundaries, on one block of queries: the kernels and their rule.

Conventions
-----------
* ``documents`` ``[b, L]`` (integer): the document id of every key position ``0 .. L-1`` of a
  row, non-decreasing along the row, so that each document is one contiguous run (what
  :mod:`harpe_megatron.data.documents` makes: the number of EOD tokens before a token). Ids are
  compared for equality only; their values do not matter.
* A call covers the *last* ``c`` positions of that key prefix as queries: ``q`` ``[b, h, c, d]``
  are the positions ``L-c .. L-1``, ``k``/``v`` ``[b, g, L, d]`` (``g`` divides ``h``: GQA) the
  positions ``0 .. L-1``. This is the shape of a zigzag CP chunk (model/attention.py: chunk ``i``
  against the keys ``[0, (i+1) c)``); without CP, ``c == L``.
* The query at position ``p`` sees the key at ``j`` iff ``j <= p`` and
  ``documents[j] == documents[p]``: causal within its document. Every query sees itself, so no
  softmax row is empty (no NaN, whatever the layout). Output ``[b, h, c, d]``.

Kernels, chosen per call by :func:`document_kernel` (the stated rule):

* ``"varlen"`` -- CUDA tensors in bf16/fp16, head dim a multiple of 8 and at most 256, no
  dropout: flash attention over variable-length pieces
  (:func:`torch.nn.attention.varlen.varlen_attn`). Each row's query block is cut where the
  document changes; piece ``p`` attends to its document's keys from the document's start to the
  piece's last query, causal aligned bottom-right. Within one block the pieces' key ranges are
  adjacent, so one call per row covers the block with ``q`` and the key prefix starting at the
  first piece's document start (a view for one-row micro-batches, the 128k case; a copy per row
  otherwise): no tile outside a document's causal triangle is computed.
  The pieces are computed on the host from the ids (:func:`document_pieces`; one small
  device-to-host copy per row and layer).
* ``"masked"`` -- everything else (CPU, fp32): one ``scaled_dot_product_attention`` with the
  boolean mask ``[b, 1, c, L]`` of the rule above. It computes the same thing as ``"varlen"``
  and is the CPU path; it materialises ``c x L`` mask entries, so on CUDA it is allowed only up
  to ``max_dense`` positions (model/attention.py passes ``SMALL_SEQUENCE``) and above that it
  raises, naming the fix, instead of silently building long masks.
* ``"fake"`` -- fake tensors (the memory planner): a FakeTensor has no ids to cut, so the
  planner runs the causal flash op of the chunk, i.e. the bound of one document per row (the
  same saved tensors as the varlen kernel: output and log-sum-exp); its FLOPs are then scaled by
  the data's document lengths in the planner (planner/plan.py).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.varlen import varlen_attn

from harpe_megatron.compat import is_fake

__all__ = ["document_kernel", "document_pieces", "masked_document_attention", "varlen_document_attention",
           "document_attention"]

_HALF = (torch.float16, torch.bfloat16)


def document_kernel(q: Tensor, dropout_p: float) -> str:
    """``"fake"``, ``"varlen"`` or ``"masked"`` for a ``[b, h, c, d]`` query block (module doc)."""
    if is_fake(q):
        return "fake"
    d = q.size(-1)
    if q.is_cuda and q.dtype in _HALF and d % 8 == 0 and d <= 256 and dropout_p == 0.0:
        return "varlen"
    return "masked"


def document_pieces(documents: np.ndarray, c: int) -> tuple[int, np.ndarray, np.ndarray]:
    """``(key_start, cu_q, cu_k)`` of the last ``c`` queries of one row's ``documents`` ``[L]``.

    ``cu_q`` (int32, ``[pieces + 1]``) cuts the query block where the document changes;
    ``key_start`` is the start of the first piece's document; ``cu_k`` cuts the keys
    ``[key_start, L)`` so that piece ``p`` has the keys from its document's start to its last
    query (``cu_k[p+1] - cu_k[p] >= cu_q[p+1] - cu_q[p]``, bottom-right aligned).
    """
    documents = np.asarray(documents)
    length = documents.shape[0]
    if documents.ndim != 1 or not 0 < c <= length:
        raise ValueError(f"documents must be one row [L] with 0 < c <= L, got shape {documents.shape} and c={c}")
    if np.any(documents[1:] < documents[:-1]):
        raise ValueError("document ids must be non-decreasing along the row (each document one contiguous run)")
    block = documents[length - c:]
    cu_q = np.concatenate(([0], np.flatnonzero(block[1:] != block[:-1]) + 1, [c])).astype(np.int32)
    key_start = int(np.searchsorted(documents, block[0], side="left"))
    cu_k = cu_q + np.int32(length - c - key_start)
    cu_k[0] = 0
    return key_start, cu_q, cu_k


def masked_document_attention(q: Tensor, k: Tensor, v: Tensor, documents: Tensor, scale: float,
                              dropout_p: float = 0.0) -> Tensor:
    """The ``"masked"`` kernel: SDPA with the ``[b, 1, c, L]`` document-causal mask."""
    c, length = q.size(2), k.size(2)
    same = documents[:, length - c:, None] == documents[:, None, :]
    causal = torch.ones(c, length, dtype=torch.bool, device=q.device).tril(length - c)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(same & causal)[:, None], scale=scale,
                                          dropout_p=dropout_p, enable_gqa=k.size(1) != q.size(1))


def _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, enable_gqa):
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=(-1, 0), enable_gqa=enable_gqa)


VarlenKernel = Callable[..., Tensor]


def varlen_document_attention(q: Tensor, k: Tensor, v: Tensor, documents: Tensor, scale: float,
                              kernel: Optional[VarlenKernel] = None) -> Tensor:
    """The ``"varlen"`` kernel, one call per row (module doc).

    ``kernel(q [t, h, d], k [t_k, g, d], v, cu_q, cu_k, max_q, max_k, scale, enable_gqa)`` runs
    causal (bottom-right) attention on every piece; default: torch's flash ``varlen_attn``. The
    tests pass a CPU reference with the same contract to check the piece arithmetic off GPU.
    """
    kernel = kernel or _torch_varlen
    c, length = q.size(2), k.size(2)
    gqa = k.size(1) != q.size(1)
    host = documents.detach().to("cpu", torch.int64).numpy()
    rows = []
    for r in range(q.size(0)):
        key_start, cu_q, cu_k = document_pieces(host[r], c)
        out = kernel(q[r].transpose(0, 1).contiguous(), k[r, :, key_start:].transpose(0, 1).contiguous(),
                     v[r, :, key_start:].transpose(0, 1).contiguous(),
                     torch.from_numpy(cu_q).to(q.device), torch.from_numpy(cu_k).to(q.device),
                     int(np.diff(cu_q).max()), int(np.diff(cu_k).max()), scale, gqa)
        rows.append(out.transpose(0, 1))  # [c, h, d] -> [h, c, d]
    return torch.stack(rows)


def document_attention(q: Tensor, k: Tensor, v: Tensor, documents: Tensor, scale: float, dropout_p: float,
                       fake_causal: Callable[[Tensor, Tensor, Tensor], Tensor], max_dense: int) -> Tensor:
    """Document-causal attention of the last ``c`` queries (module doc), by :func:`document_kernel`.
    ``documents`` may live on the host (the model keeps them there: the varlen kernel cuts its
    pieces on the host; the block mask moves them to ``q``'s device).

    ``fake_causal(q, k, v)``: the planner's causal op for fake tensors; ``max_dense``: longest
    ``"masked"`` call allowed on CUDA.
    """
    if documents.dim() != 2 or documents.size(0) != q.size(0) or documents.size(1) != k.size(2):
        raise ValueError(f"documents must be [batch, keys] = [{q.size(0)}, {k.size(2)}], got {tuple(documents.shape)}")
    kind = document_kernel(q, dropout_p)
    if kind == "fake":
        return fake_causal(q, k, v)
    if kind == "varlen":
        return varlen_document_attention(q, k, v, documents, scale)
    if q.is_cuda and k.size(2) > max_dense:
        raise RuntimeError(
            f"document-masked attention over {k.size(2)} keys would build a {q.size(2)} x {k.size(2)} mask per row "
            f"for q {tuple(q.shape)} {q.dtype}, head_dim {q.size(-1)}, dropout {dropout_p}: the flash varlen kernel "
            "needs bf16 or fp16 (training.precision), head_dim a multiple of 8 and <= 256 and attention dropout 0; "
            "see docs/document_masking.md")
    return masked_document_attention(q, k, v, documents.to(q.device), scale, dropout_p)
