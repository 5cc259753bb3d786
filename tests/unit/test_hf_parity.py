"""HarpeGPTModel with all bases equal == HF LlamaForCausalLM (fp32), weights copied across."""

from __future__ import annotations

import pytest
import torch

from harpe_megatron.config.model import ParallelConfig, PositionalConfig, padded_vocab_size
from harpe_megatron.distributed.bringup import megatron_parallel
from harpe_megatron.hf.llama_names import hf_to_megatron, megatron_to_hf
from harpe_megatron.model.builder import build_model, transformer_config
from harpe_megatron.positional.bases import ConstantBase, UniformBases
from tests.helpers import tiny_hf_llama, tiny_model_config

SEQ = 48
# Measured on CPU fp32 with torch 2.13 / transformers 5.23: max |diff| 1.2e-6 (logits ~ +-5).
ATOL = 1e-5


def _megatron_from_hf(hf, m, positional):
    cfg = transformer_config(m, ParallelConfig(), use_cpu_initialization=True)
    model = build_model(m, positional, cfg, max_sequence_length=SEQ).eval()
    state = hf_to_megatron(hf.state_dict(), m, padded_vocab_size(m.vocab_size, 1))
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("_extra_state") for k in result.missing_keys)
    return model


@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("theta", [10000.0, 5e5])
def test_equal_bases_match_hf_llama_logits(single_rank, groups, theta):
    m = tiny_model_config(num_query_groups=groups)
    hf = tiny_hf_llama(m, rope_theta=theta)
    tokens = torch.randint(0, m.vocab_size, (2, SEQ))
    with megatron_parallel(), torch.no_grad():
        model = _megatron_from_hf(hf, m, PositionalConfig(bases=ConstantBase(base=theta)))
        ours = model(tokens, None, None)[..., : m.vocab_size]
        ref = hf(tokens).logits
        torch.testing.assert_close(ours, ref, rtol=0, atol=ATOL)
        # The mapping is its own inverse: megatron -> HF gives back HF's tensors bit for bit.
        back = megatron_to_hf(model.state_dict(), m)
        for name, t in hf.state_dict().items():
            assert torch.equal(back[name], t), name


def test_per_head_bases_change_the_logits(single_rank):
    """Negative control: the per-head model is not the single-base HF model."""
    m = tiny_model_config(num_query_groups=2)
    hf = tiny_hf_llama(m, rope_theta=10000.0)
    tokens = torch.randint(0, m.vocab_size, (1, SEQ))
    with megatron_parallel(), torch.no_grad():
        model = _megatron_from_hf(hf, m, PositionalConfig(bases=UniformBases(b_min=10.0, b_max=10000.0)))
        diff = (model(tokens, None, None)[..., : m.vocab_size] - hf(tokens).logits).abs().max()
    assert diff > 1e-2


def test_from_batch_position_ids_equal_sequential(single_rank):
    m = tiny_model_config(num_query_groups=2)
    hf = tiny_hf_llama(m)
    tokens = torch.randint(0, m.vocab_size, (2, SEQ))
    positions = torch.arange(SEQ)[None].expand(2, SEQ)
    bases = UniformBases(b_min=100.0, b_max=1e4)
    with megatron_parallel(), torch.no_grad():
        seq_model = _megatron_from_hf(hf, m, PositionalConfig(bases=bases))
        ids_model = _megatron_from_hf(hf, m, PositionalConfig(bases=bases, position_ids="from_batch"))
        torch.testing.assert_close(ids_model(tokens, positions, None), seq_model(tokens, None, None),
                                   rtol=0, atol=0)
        with pytest.raises(ValueError, match="needs position_ids"):
            ids_model(tokens, None, None)
        # Shifted positions: RoPE is relative, so a constant shift changes nothing up to fp error.
        shifted = ids_model(tokens, positions + 1000, None)
        torch.testing.assert_close(shifted, seq_model(tokens, None, None), rtol=0, atol=2e-4)
