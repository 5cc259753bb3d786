"""The fused per-head RoPE path (positions + inverse frequencies) against megatron's unfused path.

Oracle: megatron-core's own ``apply_rotary_pos_emb`` on our per-head angle table (itself tested
against HF Llama and megatron's RotaryEmbedding in test_rotary.py). Here the torch implementation
runs; the Triton kernel is held to the same expression in test_rope_kernel.py (interpreter) and
tests/gpu (CUDA).
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.transformer_config import TransformerConfig

from harpe_megatron.config.model import ParallelConfig, PositionalConfig
from harpe_megatron.distributed.bringup import megatron_parallel
from harpe_megatron.model.builder import build_model, transformer_config
from harpe_megatron.positional.bases import UniformBases
from harpe_megatron.positional.rope_apply import apply_per_head_rope, rope_torch
from harpe_megatron.positional.rotary import PerHeadRotaryEmbedding
from harpe_megatron.positional.scaling import YarnScaling
from tests.helpers import FakeGroup, tiny_model_config

HEAD_DIM = 16
BASES = [1e4, 3e5, 1e6, 4.5e6]


def _megatron_rotate(x, table, interleaved):
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, apply_rope_fusion=False,
                               rotary_interleaved=interleaved)
    return apply_rotary_pos_emb(x, table, config=config, cp_group=FakeGroup(0, 1))


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("groups", [4, 2])
@pytest.mark.parametrize("cp_rank", [0, 1])
def test_torch_path_equals_megatron_on_per_head_tables(interleaved, groups, cp_rank):
    seq, batch = 64, 3
    bases = [BASES[h * groups // 4] for h in range(4)] if groups < 4 else BASES
    rope = PerHeadRotaryEmbedding(bases, HEAD_DIM, num_query_groups=groups, cp_group=FakeGroup(cp_rank, 2),
                                  rotary_interleaved=interleaved)
    q_table, k_table = rope.split(rope(seq))
    positions = rope.rope_positions(seq)
    inv_q, inv_k = rope.qk_inverse_frequencies("cpu")
    q = torch.randn(seq // 2, batch, 4, HEAD_DIM, requires_grad=True)
    k = torch.randn(seq // 2, batch, groups, HEAD_DIM, requires_grad=True)
    ref_q, ref_k = _megatron_rotate(q, q_table, interleaved), _megatron_rotate(k, k_table, interleaved)
    out_q = apply_per_head_rope(q, positions, inv_q, interleaved=interleaved, impl="torch")
    out_k = apply_per_head_rope(k, positions, inv_k, interleaved=interleaved, impl="torch")
    torch.testing.assert_close(out_q, ref_q, rtol=0, atol=2e-6)
    torch.testing.assert_close(out_k, ref_k, rtol=0, atol=2e-6)
    g = torch.randn_like(out_q)
    (grad_ours,) = torch.autograd.grad(out_q, q, g)
    (grad_ref,) = torch.autograd.grad(ref_q, q, g)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=0, atol=2e-6)


def test_large_positions_and_per_sample_ids():
    """Positions of a 128k sequence (angles up to ~1.3e5 rad) and per-sample ids (CREAM/PoSE)."""
    s, b = 32, 2
    rope = PerHeadRotaryEmbedding(BASES, HEAD_DIM, num_query_groups=4)
    ids = torch.stack([torch.arange(s) * 4096 + 7, torch.arange(s) + 131000])  # [b, s]
    positions = rope.rope_positions(s, position_ids=ids)
    assert positions.shape == (s, b) and positions.dtype == torch.float32
    table = rope(s, position_ids=ids)
    x = torch.randn(s, b, 4, HEAD_DIM, dtype=torch.float64).float()
    inv_q, _ = rope.qk_inverse_frequencies("cpu")
    torch.testing.assert_close(apply_per_head_rope(x, positions, inv_q, impl="torch"),
                               _megatron_rotate(x, table, False), rtol=0, atol=3e-6)


def test_rotation_is_norm_preserving_and_inverse_undoes_it():
    x = torch.randn(20, 2, 4, HEAD_DIM)
    pos = torch.arange(20, dtype=torch.float32)[:, None] * 977
    inv = PerHeadRotaryEmbedding(BASES, HEAD_DIM, num_query_groups=4).qk_inverse_frequencies("cpu")[0]
    y = rope_torch(x, pos.expand(-1, 2), inv)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rope_torch(y, pos.expand(-1, 2), inv, inverse=True), x, rtol=0, atol=1e-5)
    assert (y - x).abs().max() > 0.1  # it did rotate


def test_inplace_writes_into_x_and_keeps_autograd():
    base = torch.randn(10, 1, 4, HEAD_DIM, requires_grad=True)
    x = base * 1.0  # a non-leaf that may be modified in place
    pos = torch.arange(10, dtype=torch.float32)[:, None]
    inv = torch.rand(4, HEAD_DIM // 2)
    expected = rope_torch(x.detach(), pos, inv)
    out = apply_per_head_rope(x, pos, inv, inplace=True, impl="torch")
    assert out.data_ptr() == x.data_ptr()
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    torch.testing.assert_close(base.grad, rope_torch(torch.ones_like(expected), pos, inv, inverse=True),
                               rtol=0, atol=1e-6)


def test_backward_saves_no_sequence_sized_tensors():
    """The point of the fused path: autograd keeps positions and frequencies, not s x h x d cos/sin."""
    s, heads = 256, 4
    x = torch.randn(s, 1, heads, HEAD_DIM, requires_grad=True)
    pos = torch.arange(s, dtype=torch.float32)[:, None]
    inv = torch.rand(heads, HEAD_DIM // 2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        apply_per_head_rope(x, pos, inv, impl="torch")
    assert saved and max(saved) <= s  # positions [s, 1] and inv_freq [h, d/2]
    saved.clear()
    table = torch.cat([pos[:, :, None, None] * inv[None, None]] * 2, dim=-1)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        _megatron_rotate(x, table, False)
    assert max(saved) >= s * heads * HEAD_DIM  # the table path does keep them (negative control)


def test_bad_shapes_are_named():
    x = torch.randn(8, 2, 4, HEAD_DIM)
    with pytest.raises(ValueError, match=r"positions must be \[8, 2\] or \[8, 1\]"):
        apply_per_head_rope(x, torch.zeros(7, 1), torch.rand(4, HEAD_DIM // 2))
    with pytest.raises(ValueError, match=r"inv_freq must be \[4, 8\] or \[8\]"):
        apply_per_head_rope(x, torch.zeros(8, 1), torch.rand(2, HEAD_DIM // 2))
    with pytest.raises(ValueError, match="impl: expected one of"):
        apply_per_head_rope(x, torch.zeros(8, 1), torch.rand(4, HEAD_DIM // 2), impl="cuda")


def _model(positional, groups, seq):
    m = tiny_model_config(num_query_groups=groups)
    torch.manual_seed(0)
    cfg = transformer_config(m, ParallelConfig(), use_cpu_initialization=True, positional=positional)
    return build_model(m, positional, cfg, max_sequence_length=seq), m


@pytest.mark.parametrize("groups", [4, 2])
@pytest.mark.parametrize("position_ids", ["sequential", "from_batch"])
@pytest.mark.parametrize("scaling", [None, YarnScaling(factor=4.0, original_max_position_embeddings=16)])
def test_model_fused_path_equals_table_path(single_rank, groups, position_ids, scaling):
    seq = 32
    kwargs = dict(bases=UniformBases(b_min=100.0, b_max=1e6), position_ids=position_ids)
    if scaling is not None:
        kwargs["scaling"] = scaling
    with megatron_parallel():
        fused, m = _model(PositionalConfig(per_head_rope="fused", **kwargs), groups, seq)
        table, _ = _model(PositionalConfig(per_head_rope="table", **kwargs), groups, seq)
        table.load_state_dict(fused.state_dict())
        tokens = torch.randint(0, m.vocab_size, (2, seq))
        ids = torch.stack([torch.arange(seq) * 3, torch.arange(seq) + 50]) if position_ids == "from_batch" else None
        labels = torch.randint(0, m.vocab_size, (2, seq))
        losses = []
        grads = []
        for model in (fused, table):
            loss = model(tokens, ids, None, labels=labels).float().mean()
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-6)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=2e-6, msg=name)
