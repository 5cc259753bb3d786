"""Per-head rotary tables against outside oracles: megatron's RotaryEmbedding and HF Llama RoPE."""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.transformer_config import TransformerConfig
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply_rotary_pos_emb

from harpe_megatron.distributed.cpu import cpu_megatron
from harpe_megatron.positional.rotary import PerHeadRotaryEmbedding
from harpe_megatron.positional.scaling import plain_inverse_frequencies
from tests.helpers import FakeGroup

HEAD_DIM = 16
PAPER_LIKE = [1e6, 1.15e6, 2.17e6, 4.54e6]


def _mcore_config(heads: int = 4, groups: int = 4) -> TransformerConfig:
    return TransformerConfig(num_layers=1, hidden_size=heads * HEAD_DIM, num_attention_heads=heads,
                             num_query_groups=groups, apply_rope_fusion=False)


@pytest.mark.parametrize("base", [10000.0, 500000.0, 5e6])
@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_constant_base_table_equals_megatron_rotary(base, cp_size):
    seq = 64
    for cp_rank in range(cp_size):
        group = FakeGroup(cp_rank, cp_size)
        ours = PerHeadRotaryEmbedding([base] * 4, HEAD_DIM, num_query_groups=4, cp_group=group)
        q_table, k_table = ours.split(ours(seq))
        with cpu_megatron():
            stock = RotaryEmbedding(kv_channels=HEAD_DIM, rotary_percent=1.0, rotary_base=base,
                                    use_cpu_initialization=True, cp_group=group)
            ref = RotaryEmbedding.forward.__wrapped__(stock, seq)  # bypass the lru_cache
        assert q_table.shape == (seq // cp_size, 1, 4, HEAD_DIM)
        assert k_table is q_table  # MHA: one table serves q and k
        assert q_table.dtype == torch.float32
        for h in range(4):
            assert torch.equal(q_table[:, :, h], ref[:, :, 0]), f"head {h}, cp rank {cp_rank}"


def test_each_head_rotates_like_hf_llama_with_its_base():
    seq, batch, heads = 40, 2, len(PAPER_LIKE)
    rope = PerHeadRotaryEmbedding(PAPER_LIKE, HEAD_DIM, num_query_groups=heads)
    q_table, _ = rope.split(rope(seq))
    x = torch.randn(seq, batch, heads, HEAD_DIM)
    rotated = apply_rotary_pos_emb(x, q_table, config=_mcore_config(heads), cp_group=FakeGroup(0, 1))
    pos = torch.arange(seq)[None].expand(batch, seq)
    for h, base in enumerate(PAPER_LIKE):
        hf_rope = LlamaRotaryEmbedding(LlamaConfig(hidden_size=heads * HEAD_DIM, num_attention_heads=heads,
                                                   rope_theta=base))
        cos, sin = hf_rope(x, pos)
        xh = x[:, :, h].permute(1, 0, 2)[:, None]  # [b, 1, s, d] (HF layout)
        hf_q, _ = hf_apply_rotary_pos_emb(xh, xh, cos, sin)
        torch.testing.assert_close(rotated[:, :, h], hf_q[:, 0].permute(1, 0, 2), rtol=0, atol=2e-6)
    # The heads really differ: a single base would not reproduce them.
    single = apply_rotary_pos_emb(x, rope.split(rope(seq))[0][:, :, :1].expand(-1, -1, heads, -1),
                                  config=_mcore_config(heads), cp_group=FakeGroup(0, 1))
    assert (single[:, :, -1] - rotated[:, :, -1]).abs().max() > 1e-3


def test_gqa_key_table_has_one_row_per_group_and_tp_slices_heads():
    bases = [1e4, 1e4, 5e5, 5e5, 2e6, 2e6, 3e6, 3e6]  # 8 query heads, 4 KV groups
    full = PerHeadRotaryEmbedding(bases, HEAD_DIM, num_query_groups=4)
    packed = full(32)
    assert packed.shape == (32, 1, 8 + 4, HEAD_DIM)  # query and key tables packed for GQA
    full_q, full_k = full.split(packed)
    assert full_q.shape[2] == 8 and full_k.shape[2] == 4
    for g in range(4):
        torch.testing.assert_close(full_k[:, :, g], full_q[:, :, 2 * g], rtol=0, atol=0)
    for tp_rank in range(2):
        rope = PerHeadRotaryEmbedding(bases, HEAD_DIM, num_query_groups=4, tp_rank=tp_rank, tp_size=2)
        q, k = rope.split(rope(32))
        assert torch.equal(q, full_q[:, :, 4 * tp_rank : 4 * tp_rank + 4])
        assert torch.equal(k, full_k[:, :, 2 * tp_rank : 2 * tp_rank + 2])


def test_bases_differing_inside_a_kv_group_are_rejected():
    with pytest.raises(ValueError, match="query heads 0..1 share KV group 0"):
        PerHeadRotaryEmbedding([1e4, 2e4, 3e4, 3e4], HEAD_DIM, num_query_groups=2)


def test_per_sample_position_ids():
    rope = PerHeadRotaryEmbedding(PAPER_LIKE, HEAD_DIM, num_query_groups=4)
    seq = 24
    sequential, _ = rope.split(rope(seq))
    same, _ = rope.split(rope(seq, position_ids=torch.arange(seq)[None].expand(3, seq)))
    assert same.shape == (seq, 3, 4, HEAD_DIM)
    assert torch.equal(same, sequential.expand(-1, 3, -1, -1))
    ids = torch.stack([torch.arange(seq) * 7, torch.randint(0, 100000, (seq,)).sort().values])
    table, _ = rope.split(rope(seq, position_ids=ids))
    inv = plain_inverse_frequencies(PAPER_LIKE, HEAD_DIM)
    expected = ids.t()[:, :, None, None].float() * inv[None, None]
    torch.testing.assert_close(table[..., : HEAD_DIM // 2], expected, rtol=0, atol=0)
    torch.testing.assert_close(table[..., HEAD_DIM // 2 :], expected, rtol=0, atol=0)


def test_position_ids_must_be_this_cp_ranks_share():
    rope = PerHeadRotaryEmbedding(PAPER_LIKE, HEAD_DIM, num_query_groups=4, cp_group=FakeGroup(0, 2))
    with pytest.raises(ValueError, match=r"position_ids must be \[batch, 16\]"):
        rope(32, position_ids=torch.arange(32)[None])
    table, _ = rope.split(rope(32, position_ids=torch.arange(16)[None]))
    assert table.shape[0] == 16


def test_no_stale_tables_when_length_changes():
    rope = PerHeadRotaryEmbedding(PAPER_LIKE, HEAD_DIM, num_query_groups=4)
    short, _ = rope.split(rope(8))
    long, _ = rope.split(rope(64))
    again, _ = rope.split(rope(8))
    assert long.shape[0] == 64 and torch.equal(short, again)
    torch.testing.assert_close(long[:8], short, rtol=0, atol=0)
    other = PerHeadRotaryEmbedding([2e6] * 4, HEAD_DIM, num_query_groups=4)(8)
    assert not torch.equal(other, short)


def test_interleaved_layout_matches_megatron():
    rope = PerHeadRotaryEmbedding([1e4] * 2, HEAD_DIM, num_query_groups=2, rotary_interleaved=True)
    with cpu_megatron():
        stock = RotaryEmbedding(kv_channels=HEAD_DIM, rotary_percent=1.0, rotary_interleaved=True,
                                use_cpu_initialization=True, cp_group=FakeGroup(0, 1))
        ref = RotaryEmbedding.forward.__wrapped__(stock, 16)
    assert torch.equal(rope.split(rope(16))[0][:, :, 0], ref[:, :, 0])


def test_table_stays_fp32_when_the_model_is_cast_to_bf16():
    rope = PerHeadRotaryEmbedding(PAPER_LIKE, HEAD_DIM, num_query_groups=4)
    reference, _ = rope.split(rope(4096))
    rope = rope.bfloat16()  # what megatron's Float16Module does to the whole model
    table, _ = rope.split(rope(4096))
    assert table.dtype == torch.float32
    assert torch.equal(table, reference)
