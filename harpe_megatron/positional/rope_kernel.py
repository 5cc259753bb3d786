"""Triton kernel: per-head RoPE computed from positions and inverse frequencies (no angle table).

Conventions (the same as :mod:`harpe_megatron.positional.rope_apply`'s torch expression):

* ``x`` is ``[s, b, h, d]`` with any strides on the first three dims and a unit stride on the last
  (megatron's q/k views out of the fused QKV projection qualify). ``out`` may be ``x`` (in place).
* ``positions`` is ``[s, b]`` fp32 addressed through its strides (stride 0 on ``b`` broadcasts one
  row of positions to every sample).
* ``inv_freq`` is ``[h, d/2]`` fp32, contiguous; with ``SHARED_FREQ`` it is ``[d/2]`` and every
  head uses it (one base for all heads: the single-base comparison point of the benchmark).
* Rotate-half layout pairs element ``i`` with ``i + d/2``; interleaved (GPT-J) pairs ``2i`` with
  ``2i+1``. Pair ``(x1, x2)`` at angle ``a = pos * inv_freq[h, i]`` becomes
  ``(x1 cos a - x2 sin a, x2 cos a + x1 sin a)``; ``SIGN = -1`` rotates by ``-a`` (the backward).

Numerics: the angle is the fp32 product ``pos * inv_freq`` (bit-identical to the torch expression
and megatron's table), reduced to ``[-pi, pi]`` in fp64 with the fp64 value of 2*pi — exact for any
position below 2^24 — and only then given to ``tl.sin``/``tl.cos``. On NVIDIA these compile to
libdevice's ``sinf``/``cosf`` (checked in the PTX: no ``sin.approx``), whose slow path for large
arguments (raw angles reach ~1.3e5 rad at 128k) is then never taken. The rotation is done in fp32
and rounded once to ``x``'s dtype.

One program handles one token row (all ``b`` samples are separate rows) and ``BLOCK_H`` heads.

Addressing is 64-bit: a row's element offset ``s * stride_s + b * stride_b`` exceeds 2^31 once
tokens-per-rank x token stride does (128k tokens with micro_batch_size 2 at TP 1, where the token
stride of q/k inside the fused QKV output is ``3 * h * d``). Integer kernel arguments and
``tl.program_id`` are int32, so :func:`row_offset` widens the row index before multiplying.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["rope_rows_kernel", "row_offset", "launch_rope"]

_TWO_PI = tl.constexpr(6.283185307179586)


@triton.jit
def row_offset(row, batch, stride_s, stride_b):
    """Element offset (int64) of token row ``row`` (= ``s * batch + b``) of a ``[s, b, ...]`` tensor."""
    wide = row.to(tl.int64)
    return (wide // batch) * stride_s + (wide % batch) * stride_b


@triton.jit
def rope_rows_kernel(
    x_ptr, out_ptr, pos_ptr, freq_ptr,
    batch, heads, half,
    sx_s, sx_b, sx_h,
    so_s, so_b, so_h,
    sp_s, sp_b,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERLEAVED: tl.constexpr, SHARED_FREQ: tl.constexpr, SIGN: tl.constexpr,
):
    row = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_D)
    h_ok = h < heads
    i_ok = i < half
    mask = h_ok[:, None] & i_ok[None, :]

    pos = tl.load(pos_ptr + row_offset(row, batch, sp_s, sp_b))
    if SHARED_FREQ:
        freq = tl.load(freq_ptr + i, mask=i_ok, other=0.0)[None, :]
    else:
        freq = tl.load(freq_ptr + h[:, None] * half + i[None, :], mask=mask, other=0.0)
    angle = pos * freq  # fp32, as in the reference
    wide = angle.to(tl.float64)
    turns = tl.floor(wide * (1.0 / _TWO_PI) + 0.5)  # any integer works; nearest keeps |r| <= pi
    reduced = (wide - turns * _TWO_PI).to(tl.float32)
    cos = tl.cos(reduced)
    sin = tl.sin(reduced) * SIGN

    if INTERLEAVED:
        first = 2 * i
        second = 2 * i + 1
    else:
        first = i
        second = i + half
    x_row = x_ptr + row_offset(row, batch, sx_s, sx_b) + h[:, None].to(tl.int64) * sx_h
    o_row = out_ptr + row_offset(row, batch, so_s, so_b) + h[:, None].to(tl.int64) * so_h
    x1 = tl.load(x_row + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + second[None, :], mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    tl.store(o_row + first[None, :], y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_row + second[None, :], y2.to(out_ptr.dtype.element_ty), mask=mask)


def _block_sizes(heads: int, half: int, shared_freq: bool) -> tuple[int, int]:
    block_d = triton.next_power_of_2(half)
    # ~2k rotation pairs per program: enough work per program, few enough registers per thread.
    block_h = max(1, min(triton.next_power_of_2(heads), 2048 // block_d))
    return block_h, block_d


def launch_rope(x, out, positions, inv_freq, interleaved: bool, inverse: bool) -> None:
    """Rotate ``x`` into ``out`` (which may be ``x``); shapes and conventions: module docstring."""
    s, b, h, d = x.shape
    half = d // 2
    shared = inv_freq.dim() == 1
    block_h, block_d = _block_sizes(h, half, shared)
    grid = (s * b, triton.cdiv(h, block_h))
    rope_rows_kernel[grid](
        x, out, positions, inv_freq,
        b, h, half,
        x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        positions.stride(0), positions.stride(1),
        BLOCK_H=block_h, BLOCK_D=block_d,
        INTERLEAVED=interleaved, SHARED_FREQ=shared, SIGN=-1.0 if inverse else 1.0,
        num_warps=4,
    )
