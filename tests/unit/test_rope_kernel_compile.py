"""Ahead-of-time compilation of the Triton RoPE kernel to PTX (no GPU needed).

Catches what the interpreter tests (test_rope_kernel.py) let through — e.g. a non-constexpr
global, which the interpreter accepts and the compiler rejects — and checks the range reduction
uses the fp64 value of 2*pi (an fp32-rounded one would be off by ~4e-3 rad at 128k).
"""

from __future__ import annotations

import importlib

import pytest

triton = pytest.importorskip("triton")


_SIGNATURE = {"x_ptr": "*{dt}", "out_ptr": "*{dt}", "pos_ptr": "*fp32", "freq_ptr": "*fp32",
              "batch": "i32", "heads": "i32", "half": "i32", "sx_s": "i32", "sx_b": "i32", "sx_h": "i32",
              "so_s": "i32", "so_b": "i32", "so_h": "i32", "sp_s": "i32", "sp_b": "i32",
              "BLOCK_H": "constexpr", "BLOCK_D": "constexpr", "INTERLEAVED": "constexpr",
              "SHARED_FREQ": "constexpr", "SIGN": "constexpr"}


@pytest.fixture
def compiled_kernel(monkeypatch):
    """The kernel as a compilable JITFunction, whatever TRITON_INTERPRET said at its import."""
    import harpe_megatron.positional.rope_kernel as kernel

    if not isinstance(kernel.rope_rows_kernel, triton.runtime.JITFunction):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        importlib.reload(kernel)
    return kernel.rope_rows_kernel


def test_kernel_compiles_for_hopper_and_ampere_without_a_gpu(compiled_kernel):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cases = [("bf16", 90, False, False, 1.0), ("fp16", 90, True, True, -1.0), ("fp32", 80, False, False, -1.0)]
    for dt, arch, interleaved, shared, sign in cases:
        signature = {k: v.format(dt=dt) for k, v in _SIGNATURE.items()}
        constexprs = {"BLOCK_H": 32, "BLOCK_D": 64, "INTERLEAVED": interleaved, "SHARED_FREQ": shared, "SIGN": sign}
        src = ASTSource(fn=compiled_kernel, signature=signature, constexprs=constexprs)
        ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4}).asm["ptx"]
        assert f".target sm_{arch}" in ptx
        assert "0dC01921FB54442D18" in ptx or "0d401921FB54442D18" in ptx, "2*pi is not the fp64 constant"
