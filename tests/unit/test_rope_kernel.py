"""The Triton per-head RoPE kernel against the torch expression, on CPU via TRITON_INTERPRET=1.

The interpreter runs the kernel's Python body with numpy semantics (fp64 range reduction and
fp32 sin/cos included), so indexing, strides, masks, layouts and the backward sign are checked
here; compiled-code numerics (hardware sin/cos) are checked on CUDA in tests/gpu.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from harpe_megatron.positional.rope_apply import apply_per_head_rope, rope_torch

triton = pytest.importorskip("triton")

# Within one output ulp: fp32 ~ 1e-7 relative (values ~ 4 here), bf16/fp16 one rounding step.
TOL = {torch.float32: dict(rtol=0, atol=2e-6), torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
       torch.float16: dict(rtol=1e-3, atol=1e-3)}


@pytest.fixture(scope="module")
def interpreted():
    """Re-import the kernel module with the interpreter on (triton.jit decides at decoration)."""
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the compiled kernel is tested in tests/gpu instead")
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    import harpe_megatron.positional.rope_kernel as kernel

    importlib.reload(kernel)
    yield kernel
    mp.undo()
    importlib.reload(kernel)


def _inputs(s, b, h, d, dtype, per_sample=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s, b, h, d, generator=g).to(dtype)
    if per_sample:
        pos = torch.randint(0, 131072, (s, b), generator=g).to(torch.float32)
    else:
        pos = (torch.arange(s, dtype=torch.float32) * 4093.0)[:, None]  # up to ~1.3e5
    bases = torch.logspace(2, 7, h)
    inv = 1.0 / bases[:, None] ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    return x, pos, inv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("per_sample", [False, True])
def test_forward_matches_torch(interpreted, dtype, interleaved, per_sample):
    x, pos, inv = _inputs(33, 2, 5, 12, dtype, per_sample)  # odd sizes: masks on heads and d/2
    out = apply_per_head_rope(x, pos, inv, interleaved=interleaved, impl="triton")
    ref = rope_torch(x, pos.expand(-1, 2), inv, interleaved)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("interleaved", [False, True])
def test_backward_matches_torch_autograd(interpreted, interleaved):
    x, pos, inv = _inputs(17, 2, 4, 16, torch.float32)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    g = torch.randn_like(x)
    apply_per_head_rope(x1, pos, inv, interleaved=interleaved, impl="triton").backward(g)
    apply_per_head_rope(x2, pos, inv, interleaved=interleaved, impl="torch").backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=2e-6)


def test_strided_views_shared_base_and_inplace(interpreted):
    x, pos, inv = _inputs(9, 3, 8, 16, torch.float32)
    view = x[:, :, 1::2]  # megatron's q/k are views with a head stride != d
    out = apply_per_head_rope(view, pos, inv[1::2], impl="triton")
    torch.testing.assert_close(out, rope_torch(view, pos.expand(-1, 3), inv[1::2]), rtol=0, atol=2e-6)
    shared = apply_per_head_rope(x, pos, inv[0], impl="triton")  # one base for all heads
    torch.testing.assert_close(shared, rope_torch(x, pos.expand(-1, 3), inv[0]), rtol=0, atol=2e-6)
    target = x.clone()
    ref = rope_torch(target, pos.expand(-1, 3), inv)
    result = apply_per_head_rope(target, pos, inv, inplace=True, impl="triton")
    assert result.data_ptr() == target.data_ptr()
    torch.testing.assert_close(target, ref, rtol=0, atol=2e-6)


def test_kernel_is_really_per_head(interpreted):
    """Negative control: giving every head the first head's frequencies changes the output."""
    x, pos, inv = _inputs(8, 1, 4, 16, torch.float32)
    per_head = apply_per_head_rope(x, pos, inv, impl="triton")
    single = apply_per_head_rope(x, pos, inv[0], impl="triton")
    torch.testing.assert_close(per_head[:, :, 0], single[:, :, 0], rtol=0, atol=1e-6)
    assert (per_head[:, :, 1:] - single[:, :, 1:]).abs().max() > 0.1



def test_row_offsets_are_64_bit(interpreted):
    """Row offsets past 2^31 elements: 131072 tokens x micro-batch 2 at TP 1, q inside the fused
    QKV output (token stride 3 * 32 heads * 128). Rows come in as int32, like ``tl.program_id``,
    and strides as int32 kernel arguments, so an int32 ``s * stride`` would wrap here."""
    tl = pytest.importorskip("triton.language")
    globals()["_kernels"] = interpreted  # the interpreter resolves names in the module's globals

    @triton.jit
    def offsets(rows_ptr, out_ptr, batch, stride_s, stride_b):
        i = tl.program_id(0)
        tl.store(out_ptr + i, _kernels.row_offset(tl.load(rows_ptr + i), batch, stride_s, stride_b))  # noqa: F821

    tokens, batch, stride_b = 131072, 2, 3 * 32 * 128
    stride_s = batch * stride_b
    rows = torch.tensor([0, 1, 7, tokens, tokens * batch - 2, tokens * batch - 1], dtype=torch.int32)
    out = torch.zeros(len(rows), dtype=torch.int64)
    offsets[(len(rows),)](rows, out, batch, stride_s, stride_b)
    wide = rows.long()
    expected = (wide // batch) * stride_s + (wide % batch) * stride_b
    assert int(expected[-1]) >= 2**31
    torch.testing.assert_close(out, expected)
