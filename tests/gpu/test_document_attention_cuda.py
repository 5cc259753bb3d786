"""Document-masked attention on CUDA: the flash varlen kernel (bf16) vs the CPU block-mask path (fp32).

Skipped without CUDA. The rule (model/document_attention.py) picks ``varlen`` for CUDA bf16/fp16;
its output and q/k/v gradients must equal the CPU path's to bf16 precision, for a whole row and
for a CP chunk (the last ``c`` queries against a longer key prefix), with GQA and documents from
one token to longer than the chunk. Run on a GPU machine with ``pytest tests/gpu -s``.
"""

from __future__ import annotations

import pytest
import torch

from harpe_megatron.model.document_attention import (
    document_attention,
    document_kernel,
    masked_document_attention,
    varlen_document_attention,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

LENGTHS = [1, 700, 3, 2500, 129, 1, 860, 3998]  # 8192 tokens


def _case(heads=8, groups=2, d=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seq = sum(LENGTHS)
    q = torch.randn(1, heads, seq, d, generator=gen)
    k = torch.randn(1, groups, seq, d, generator=gen)
    v = torch.randn(1, groups, seq, d, generator=gen)
    ids = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))[None]
    return q, k, v, ids


@pytest.mark.parametrize("c", [8192, 2048])
def test_varlen_bf16_matches_cpu_fp32(c):
    q, k, v, ids = _case()
    upstream = torch.randn(1, q.size(1), c, q.size(3), generator=torch.Generator().manual_seed(1))
    scale = q.size(-1) ** -0.5
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out_ref = masked_document_attention(ref[0][:, :, -c:], ref[1], ref[2], ids, scale)
    out_ref.backward(upstream)
    gpu = [t.cuda().bfloat16().requires_grad_() for t in (q, k, v)]
    assert document_kernel(gpu[0], 0.0) == "varlen"
    out = varlen_document_attention(gpu[0][:, :, -c:], gpu[1], gpu[2], ids.cuda(), scale)
    out.backward(upstream.cuda().bfloat16())
    diffs = {"out": (out.float().cpu() - out_ref.detach()).abs().max().item()}
    for name, a, b in zip("qkv", gpu, ref):
        diffs[f"d{name}"] = (a.grad.float().cpu() - b.grad).abs().max().item()
    print(f"\n[doc-attention cuda] c={c}: max |bf16 varlen - fp32 cpu| {diffs}")
    assert max(diffs.values()) < 5e-2


def test_masked_kernel_on_cuda_is_refused_above_the_small_sequence():
    q, k, v, ids = (t.cuda() for t in _case())  # fp32: the varlen kernel does not apply
    assert document_kernel(q, 0.0) == "masked"
    with pytest.raises(RuntimeError, match="flash varlen kernel needs bf16 or fp16"):
        document_attention(q, k, v, ids, 0.1, 0.0, fake_causal=None, max_dense=1024)
