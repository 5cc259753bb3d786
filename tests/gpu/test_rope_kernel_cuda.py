"""The compiled Triton RoPE kernel on CUDA against the torch expression (fp32 math, fp64 oracle).

Skipped without CUDA. Compiled numerics differ from the interpreter's (hardware sin/cos after the
kernel's range reduction), so they are checked here at 128k positions, where unreduced fast
sin/cos would be off by far more than the bounds. Run with ``pytest tests/gpu -s``.
"""

from __future__ import annotations

import pytest
import torch

from harpe_megatron.positional.rope_apply import apply_per_head_rope, default_impl, rope_torch, triton_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

S, H, D = 131072, 8, 128


def _inputs(dtype, batch=1):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(S, batch, H, D, device="cuda", generator=g).to(dtype)
    pos = torch.arange(S, device="cuda", dtype=torch.float32)[:, None]
    bases = torch.logspace(4, 7, H, device="cuda")
    inv = 1.0 / bases[:, None] ** (torch.arange(0, D, 2, device="cuda", dtype=torch.float32) / D)
    return x, pos, inv


def _oracle(x, pos, inv, interleaved=False):
    """fp64 rotation of the same fp32 angles (the reference's rounding of pos * inv_freq)."""
    angles = (pos[:, :, None, None] * inv[None, None]).double()
    cos, sin = angles.cos(), angles.sin()
    xd = x.double()
    x1, x2 = (xd[..., 0::2], xd[..., 1::2]) if interleaved else xd.chunk(2, dim=-1)
    y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    return torch.stack((y1, y2), -1).flatten(-2) if interleaved else torch.cat((y1, y2), -1)


def test_triton_is_the_default_on_cuda():
    assert triton_available()
    assert default_impl(torch.empty(1, device="cuda")) == "triton"


@pytest.mark.parametrize("interleaved", [False, True])
def test_fp32_kernel_matches_fp64_oracle_at_128k(interleaved):
    x, pos, inv = _inputs(torch.float32)
    out = apply_per_head_rope(x, pos, inv, interleaved=interleaved, impl="triton")
    ref = _oracle(x, pos, inv, interleaved)
    err = (out.double() - ref).abs().max().item()
    torch_err = (rope_torch(x, pos, inv, interleaved).double() - ref).abs().max().item()
    print(f"fp32 max |kernel - fp64| = {err:.2e}, |torch - fp64| = {torch_err:.2e}")
    assert err < 5e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_one_rounding(dtype):
    x, pos, inv = _inputs(dtype, batch=2)
    out = apply_per_head_rope(x, pos, inv, impl="triton")
    ref = _oracle(x.float(), pos.expand(-1, 2), inv)
    ulp = torch.finfo(dtype).eps * ref.abs().clamp_min(1.0)
    assert ((out.double() - ref).abs() <= ulp).all()


def test_backward_and_inplace_match_torch():
    x, pos, inv = _inputs(torch.bfloat16)
    a = x[:4096].clone().requires_grad_()
    b = x[:4096].clone().requires_grad_()
    g = torch.randn_like(a)
    apply_per_head_rope(a, pos[:4096], inv, impl="triton").backward(g)
    apply_per_head_rope(b, pos[:4096], inv, impl="torch").backward(g)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-2, atol=1e-2)
    y = x.clone()
    apply_per_head_rope(y, pos, inv, inplace=True, impl="triton")
    torch.testing.assert_close(y, rope_torch(x, pos, inv), rtol=1e-2, atol=1e-2)
