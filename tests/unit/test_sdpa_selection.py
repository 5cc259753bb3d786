"""Attention never silently degrades to the math kernel: the selection check, on CPU, with the
capability probe substituted (the real probe asks torch's ``can_use_*_attention`` on CUDA)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from harpe_megatron.model import attention
from harpe_megatron.model.attention import (
    SMALL_SEQUENCE,
    causal_attention,
    context_parallel_causal_attention,
    require_fused_sdpa,
)


def _qkv(s, dtype=torch.float32, heads=2, d=8):
    return [torch.randn(1, heads, s, d, dtype=dtype) for _ in range(3)]


def _probe(rule):
    calls = []

    def probe(q, k, v, dropout_p, is_causal, enable_gqa):
        calls.append(dict(dtype=q.dtype, is_causal=is_causal, sq=q.size(2), sk=k.size(2)))
        return frozenset(rule(q, is_causal))

    return probe, calls


def _like_torch_without_efficient(q, is_causal):
    """fp32: no flash; cuDNN only for is_causal calls; memory-efficient unavailable (as on a device
    or build without it). The fp32 CP case has then only the math kernel."""
    half = q.dtype in (torch.float16, torch.bfloat16)
    return ({"flash"} if half else set()) | ({"cudnn"} if is_causal else set())


def test_real_probe_does_not_apply_off_cuda():
    q, k, v = _qkv(4 * SMALL_SEQUENCE)
    assert attention._torch_sdpa_probe(q, k, v, 0.0, True, False) is None
    require_fused_sdpa(q, k, v, 0.0, lower_right=True)  # CPU: nothing to check


def test_causal_call_with_a_fused_kernel_runs(monkeypatch):
    probe, calls = _probe(lambda q, is_causal: {"cudnn"})
    monkeypatch.setattr(attention, "_sdpa_probe", probe)
    q, k, v = _qkv(2 * SMALL_SEQUENCE)
    causal_attention(q, k, v, scale=0.3)
    assert calls == [dict(dtype=torch.float32, is_causal=True, sq=2 * SMALL_SEQUENCE, sk=2 * SMALL_SEQUENCE)]


def test_math_only_above_small_sequence_raises_naming_dtype_shape_and_fix(monkeypatch):
    probe, _ = _probe(lambda q, is_causal: set())
    monkeypatch.setattr(attention, "_sdpa_probe", probe)
    q, k, v = _qkv(SMALL_SEQUENCE + 2)
    with pytest.raises(RuntimeError) as err:
        causal_attention(q, k, v, scale=0.3)
    msg = str(err.value)
    assert "math kernel" in msg and "torch.float32" in msg and f"(1, 2, {SMALL_SEQUENCE + 2}, 8)" in msg
    assert "training.precision" in msg
    q, k, v = _qkv(SMALL_SEQUENCE)  # small: the math kernel is allowed
    causal_attention(q, k, v, scale=0.3)


def test_cp_fp32_falls_to_math_and_raises_bf16_passes(single_rank, monkeypatch):
    """The CP path's lower-right chunks cannot use cuDNN (CausalBias dispatches to flash or
    memory-efficient only): fp32 there is math-only and must raise; bf16 has flash."""
    probe, calls = _probe(_like_torch_without_efficient)
    monkeypatch.setattr(attention, "_sdpa_probe", probe)
    s = 2 * SMALL_SEQUENCE + 4
    q, k, v = (torch.randn(s, 1, 1, 8) for _ in range(3))  # [s, b, h, d], CP group of one rank
    with pytest.raises(RuntimeError, match="materialised causal_lower_right mask.*torch.float32"):
        context_parallel_causal_attention(q, k, v, 0.3, dist.group.WORLD)
    assert calls[-1]["is_causal"] is False and calls[-1]["sq"] < calls[-1]["sk"]
    out = context_parallel_causal_attention(*(t.bfloat16() for t in (q, k, v)), 0.3, dist.group.WORLD)
    assert out.shape == (1, 1, s, 8) and out.dtype == torch.bfloat16


def test_cp_chunks_match_plain_causal_attention_through_the_checked_path(single_rank, monkeypatch):
    probe, _ = _probe(lambda q, is_causal: {"flash", "efficient"})
    monkeypatch.setattr(attention, "_sdpa_probe", probe)
    q, k, v = (torch.randn(64, 2, 4, 8) for _ in range(3))
    out = context_parallel_causal_attention(q, k, v, 0.3, dist.group.WORLD)
    ref = causal_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), 0.3)
    torch.testing.assert_close(out, ref)
