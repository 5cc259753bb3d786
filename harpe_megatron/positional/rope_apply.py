"""Apply per-head RoPE from positions and inverse frequencies, with autograd.

``apply_per_head_rope(x, positions, inv_freq)`` rotates ``x`` ``[s, b, h, d]`` (megatron's
sequence-first q or k of this rank) by the angles ``positions[s, b] * inv_freq[h, i]``:

* rotate-half layout (default; GPT-NeoX / HF Llama): element ``i`` pairs with ``i + d/2``;
  ``interleaved=True`` (GPT-J): ``2i`` pairs with ``2i+1``. Both match megatron's
  ``apply_rotary_pos_emb`` on the corresponding angle table (``cat(a, a)`` / ``repeat_interleave``).
* ``positions`` ``[s, b]`` (or ``[s, 1]``, broadcast over the batch) are absolute token positions
  — for context parallelism, the zigzag positions of this CP rank's tokens
  (:func:`harpe_megatron.parallel.zigzag.zigzag_positions`); for CREAM/PoSE, the per-sample ids.
* ``inv_freq`` ``[h, d/2]`` fp32: one row per head of ``x`` (a query table has a row per query
  head, a key table a row per KV group); ``[d/2]`` means one base for every head.

Math is fp32 whatever ``x``'s dtype (angles ``pos * inv_freq`` rounded exactly as in megatron's
table), rounded once to ``x.dtype``. The backward is the rotation by ``-angle``; nothing of size
``s x h x d`` is saved for it (only ``positions`` and ``inv_freq``), unlike the table path, which
keeps fp32 cos/sin per layer alive through autograd.

Implementations: ``"triton"`` (:mod:`harpe_megatron.positional.rope_kernel`, used automatically
for CUDA tensors when Triton is importable) and ``"torch"`` (the same expression in torch: CPU, and
the reference the kernel is tested against). ``HARPE_ROPE_IMPL=torch|triton`` overrides the choice.
Fake tensors (the memory planner) take the Triton path's allocations without launching it.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor

from harpe_megatron.compat import is_fake

__all__ = ["apply_per_head_rope", "rope_torch", "triton_available", "default_impl"]

_IMPLS = ("torch", "triton")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether the Triton kernel can be imported (Triton installed and importable)."""
    try:
        import harpe_megatron.positional.rope_kernel  # noqa: F401
    except Exception:  # ImportError, or a Triton that fails to initialise without a driver
        return False
    return True


def default_impl(x: Tensor) -> str:
    """``HARPE_ROPE_IMPL`` if set, else ``"triton"`` for CUDA tensors with Triton, else ``"torch"``."""
    forced = os.environ.get("HARPE_ROPE_IMPL")
    if forced:
        if forced not in _IMPLS:
            raise ValueError(f"HARPE_ROPE_IMPL: expected one of {_IMPLS}, got {forced!r}")
        return forced
    if is_fake(x):
        return "triton"  # the memory planner: the GPU path's allocations (no kernel runs on fake tensors)
    return "triton" if x.is_cuda and triton_available() else "torch"


def _pairs(x: Tensor, interleaved: bool) -> tuple[Tensor, Tensor]:
    if interleaved:
        return x[..., 0::2], x[..., 1::2]
    half = x.size(-1) // 2
    return x[..., :half], x[..., half:]


def rope_torch(x: Tensor, positions: Tensor, inv_freq: Tensor, interleaved: bool = False,
               inverse: bool = False) -> Tensor:
    """The torch expression (no autograd bookkeeping of its own): rotated copy of ``x``."""
    angles = positions.to(torch.float32)[:, :, None, None] * inv_freq.to(torch.float32).reshape(
        1, 1, -1, inv_freq.size(-1)
    )
    cos, sin = torch.cos(angles), torch.sin(angles)
    if inverse:
        sin = -sin
    x1, x2 = _pairs(x.to(torch.float32), interleaved)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    if interleaved:
        out = torch.stack((y1, y2), dim=-1).flatten(-2)
    else:
        out = torch.cat((y1, y2), dim=-1)
    return out.to(x.dtype)


def _rotate(x: Tensor, positions: Tensor, inv_freq: Tensor, interleaved: bool, inverse: bool, impl: str,
            out: Optional[Tensor]) -> Tensor:
    if impl == "triton":
        src = x if x.stride(-1) == 1 else x.contiguous()
        target = out if out is not None and out.stride(-1) == 1 else torch.empty(
            x.shape, dtype=x.dtype, device=x.device)
        if not is_fake(x):  # fake tensors (the planner): the kernel's allocations, without the kernel
            from harpe_megatron.positional.rope_kernel import launch_rope

            launch_rope(src, target, positions, inv_freq, interleaved, inverse)
        if out is not None and target is not out:
            out.copy_(target)
            return out
        return target
    result = rope_torch(x, positions, inv_freq, interleaved, inverse)
    if out is not None:
        out.copy_(result)
        return out
    return result


class _PerHeadRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, positions, inv_freq, interleaved, impl, inplace):
        ctx.save_for_backward(positions, inv_freq)
        ctx.interleaved, ctx.impl = interleaved, impl
        if inplace:
            ctx.mark_dirty(x)
        return _rotate(x, positions, inv_freq, interleaved, False, impl, out=x if inplace else None)

    @staticmethod
    def backward(ctx, grad):
        positions, inv_freq = ctx.saved_tensors
        return _rotate(grad, positions, inv_freq, ctx.interleaved, True, ctx.impl, out=None), None, None, None, None, None


def _check(x: Tensor, positions: Tensor, inv_freq: Tensor) -> None:
    if x.dim() != 4 or x.size(-1) % 2:
        raise ValueError(f"x must be [s, b, heads, d] with even d, got {tuple(x.shape)}")
    s, b, h, d = x.shape
    if positions.dim() != 2 or positions.size(0) != s or positions.size(1) not in (1, b):
        raise ValueError(f"positions must be [{s}, {b}] or [{s}, 1] for x {tuple(x.shape)}, got {tuple(positions.shape)}")
    if inv_freq.size(-1) != d // 2 or (inv_freq.dim() == 2 and inv_freq.size(0) != h) or inv_freq.dim() > 2:
        raise ValueError(f"inv_freq must be [{h}, {d // 2}] or [{d // 2}] for x {tuple(x.shape)}, got {tuple(inv_freq.shape)}")
    if positions.device != x.device or inv_freq.device != x.device:
        raise ValueError(f"x ({x.device}), positions ({positions.device}) and inv_freq ({inv_freq.device}) "
                         "must be on one device")


def apply_per_head_rope(
    x: Tensor,
    positions: Tensor,
    inv_freq: Tensor,
    interleaved: bool = False,
    inplace: bool = False,
    impl: Optional[str] = None,
) -> Tensor:
    """Rotate ``x`` ``[s, b, h, d]`` per head (see module docstring); differentiable.

    ``inplace=True`` writes into ``x`` (which then must not be needed by autograd elsewhere).
    ``impl``: ``"triton"``, ``"torch"`` or ``None`` (:func:`default_impl`).
    """
    _check(x, positions, inv_freq)
    impl = impl or default_impl(x)
    if impl not in _IMPLS:
        raise ValueError(f"impl: expected one of {_IMPLS}, got {impl!r}")
    positions = positions.to(torch.float32)
    inv_freq = inv_freq.to(torch.float32).contiguous()
    if positions.size(1) == 1 and x.size(1) > 1:
        positions = positions.expand(-1, x.size(1))  # stride 0 over the batch
    return _PerHeadRope.apply(x, positions, inv_freq, interleaved, impl, inplace)
