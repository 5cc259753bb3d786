"""Attention causal within documents (model/document_attention.py), on one block of queries.

Oracle: every document run alone through plain causal ``scaled_dot_product_attention`` (what a
row of k documents must equal). The varlen route's piece arithmetic (the GPU path) is checked on
CPU with a reference kernel of the same contract as torch's flash ``varlen_attn``: one causal,
bottom-right aligned SDPA per piece.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harpe_megatron.model.document_attention import (
    document_attention,
    document_kernel,
    document_pieces,
    masked_document_attention,
    varlen_document_attention,
)

SCALE = 0.3


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, enable_gqa):
    """torch's ``varlen_attn`` contract on CPU: causal (bottom-right) attention per piece."""
    outs = []
    for i in range(cu_q.numel() - 1):
        qi, ki, vi = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
        assert qi.size(0) <= max_q and ki.size(0) <= max_k and ki.size(0) >= qi.size(0) > 0
        mask = torch.ones(qi.size(0), ki.size(0), dtype=torch.bool).tril(ki.size(0) - qi.size(0))
        out = F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1),
                                             attn_mask=mask, scale=scale, enable_gqa=enable_gqa)
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


def _ids(lengths):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def _separately(q, k, v, ids):
    """Oracle: each document of each row alone, plain causal SDPA; ``[b, h, L, d]``."""
    out = torch.empty_like(q)
    for r in range(q.size(0)):
        for doc in ids[r].unique():
            sel = (ids[r] == doc).nonzero().flatten()
            a, b = sel[0].item(), sel[-1].item() + 1
            out[r, :, a:b] = F.scaled_dot_product_attention(q[r:r + 1, :, a:b], k[r:r + 1, :, a:b], v[r:r + 1, :, a:b],
                                                            is_causal=True, scale=SCALE,
                                                            enable_gqa=k.size(1) != q.size(1))[0]
    return out


def _problem(rows_lengths, heads=4, groups=2, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    length = sum(rows_lengths[0])
    q = torch.randn(len(rows_lengths), heads, length, d, generator=gen)
    k = torch.randn(len(rows_lengths), groups, length, d, generator=gen)
    v = torch.randn(len(rows_lengths), groups, length, d, generator=gen)
    ids = torch.stack([_ids(lengths) for lengths in rows_lengths])
    return q, k, v, ids


ROWS = [[5, 1, 9, 3, 14], [32], [1] * 32, [20, 12]]  # the row of one token each: every query sees itself only


def test_pieces_of_a_block():
    ids = np.repeat([0, 1, 2, 3], [5, 3, 6, 2])  # documents [0,5) [5,8) [8,14) [14,16)
    key_start, cu_q, cu_k = document_pieces(ids, 10)  # queries at 6..15
    assert key_start == 5  # the first query's document starts at 5
    assert cu_q.tolist() == [0, 2, 8, 10]  # query pieces 6-7 | 8-13 | 14-15
    assert cu_k.tolist() == [0, 3, 9, 11]  # keys 5-7 | 8-13 | 14-15 (relative to 5): adjacent
    key_start, cu_q, cu_k = document_pieces(ids, 16)
    assert (key_start, cu_q.tolist(), cu_k.tolist()) == (0, [0, 5, 8, 14, 16], [0, 5, 8, 14, 16])
    with pytest.raises(ValueError, match="non-decreasing"):
        document_pieces(np.array([0, 1, 0]), 2)


@pytest.mark.parametrize("groups", [4, 2, 1])
@pytest.mark.parametrize("c", [32, 12, 5])
def test_masked_equals_documents_run_separately(groups, c):
    q, k, v, ids = _problem(ROWS, groups=groups)
    ref = _separately(q, k, v, ids)[:, :, -c:]
    out = masked_document_attention(q[:, :, -c:], k, v, ids, SCALE)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("c", [32, 12, 5])
def test_varlen_pieces_equal_the_masked_cpu_path_with_gradients(c):
    """The GPU route's decomposition (reference kernel) == the CPU path, outputs and q/k/v grads."""
    q, k, v, ids = _problem(ROWS, groups=2)
    upstream = torch.randn(q.size(0), q.size(1), c, q.size(3))
    results = []
    for route in ("masked", "varlen"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        block = leaves[0][:, :, -c:]
        if route == "masked":
            out = masked_document_attention(block, leaves[1], leaves[2], ids, SCALE)
        else:
            out = varlen_document_attention(block, leaves[1], leaves[2], ids, SCALE, kernel=reference_varlen)
        out.backward(upstream)
        results.append([out.detach()] + [t.grad for t in leaves])
    for a, b in zip(*results):  # fp32, summation order only (gradients up to ~5)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert torch.isfinite(results[0][1]).all()


def test_every_row_finite_when_each_token_is_its_own_document():
    """No softmax row is empty: a query that sees only itself returns its own value."""
    q, k, v, ids = _problem([[1] * 16], groups=4)
    q.requires_grad_()
    out = masked_document_attention(q, k, v, ids, SCALE)
    torch.testing.assert_close(out, v, rtol=0, atol=1e-6)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_the_mask_matters():
    """Guard against a vacuous comparison: causal attention over the row differs."""
    q, k, v, ids = _problem([ROWS[0]])
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=True)
    assert (masked_document_attention(q, k, v, ids, SCALE) - plain).abs().max() > 0.1


def test_rule_and_shape_check():
    q, k, v, ids = _problem([[10, 6]])
    assert document_kernel(q, 0.0) == "masked"  # CPU: the block mask (varlen needs CUDA + bf16/fp16)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        assert document_kernel(torch.empty(1, 4, 8, 8), 0.0) == "fake"
    seen = []
    out = document_attention(q, k, v, ids, SCALE, 0.0, fake_causal=lambda *a: seen.append(a), max_dense=4)
    assert not seen and out.shape == q.shape  # max_dense binds on CUDA only
    with pytest.raises(ValueError, match=r"documents must be \[batch, keys\] = \[1, 16\]"):
        document_attention(q, k, v, ids[:, :8], SCALE, 0.0, fake_causal=None, max_dense=4)
