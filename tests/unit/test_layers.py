"""Our local-spec modules against megatron-core's and HF's: SDPA core attention, RMSNorm."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from harpe_megatron.config.model import ParallelConfig
from harpe_megatron.distributed.bringup import megatron_parallel
from harpe_megatron.model.attention import SDPAttention
from harpe_megatron.model.builder import transformer_config
from harpe_megatron.model.norm import RMSNorm
from tests.helpers import tiny_model_config


@pytest.mark.parametrize("groups", [4, 2, 1])
def test_sdpa_attention_equals_megatron_dot_product_attention(single_rank, groups):
    m = tiny_model_config(num_query_groups=groups)
    with megatron_parallel():
        cfg = transformer_config(m, ParallelConfig(), use_cpu_initialization=True)
        ours = SDPAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
        ref = DotProductAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
        s, b, d = 24, 2, m.head_dim
        q = torch.randn(s, b, 4, d)
        k, v = torch.randn(s, b, groups, d), torch.randn(s, b, groups, d)
        causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
        torch.testing.assert_close(ours(q, k, v, None), ref(q, k, v, causal), rtol=1e-5, atol=1e-6)


def test_sdpa_attention_rejects_explicit_masks(single_rank):
    m = tiny_model_config()
    with megatron_parallel():
        cfg = transformer_config(m, ParallelConfig(), use_cpu_initialization=True)
        attn = SDPAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
        x = torch.randn(8, 1, 4, 16)
        with pytest.raises(ValueError, match="takes no attention_mask"):
            attn(x, x, x, torch.ones(1, 1, 8, 8, dtype=torch.bool))
        for comm in ("p2p", "a2a"):  # parallel.cp_comm_type values that need Transformer Engine
            with pytest.raises(ValueError, match=f"implements cp_comm_type='all_gather' only, got '{comm}'"):
                SDPAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
                             cp_comm_type=comm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_equals_hf(single_rank, dtype):
    m = tiny_model_config()
    cfg = transformer_config(m, ParallelConfig(), use_cpu_initialization=True)
    ours, ref = RMSNorm(cfg, 64, eps=1e-5), LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        w = torch.rand(64) + 0.5
        ours.weight.copy_(w)
        ref.weight.copy_(w)
    x = (torch.randn(5, 3, 64) * 3).to(dtype)
    torch.testing.assert_close(ours.to(dtype)(x), ref.to(dtype)(x), rtol=0, atol=0)


def test_rmsnorm_marks_weight_for_sequence_parallel_grad_reduction(single_rank):
    m = tiny_model_config()
    cfg = transformer_config(m, ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
                             use_cpu_initialization=True)
    assert RMSNorm(cfg, 64).weight.sequence_parallel is True
