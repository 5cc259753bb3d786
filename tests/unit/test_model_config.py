"""Model/positional/parallel config sections: defaults, presets and errors that name the key."""

from __future__ import annotations

import pytest
import torch

from harpe_megatron.config.model import (
    ModelConfig,
    ParallelConfig,
    PositionalConfig,
    padded_vocab_size,
    validate_model_setup,
)
from harpe_megatron.config.presets import get_preset
from harpe_megatron.distributed.bringup import megatron_parallel
from harpe_megatron.model.builder import build_model, model_head_bases, transformer_config
from harpe_megatron.positional.bases import PAPER_LLAMA2_7B_BASES, UniformBases


def test_llama2_7b_preset_has_the_published_shapes():
    m = get_preset("llama2-7b")
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups) == (32, 4096, 32, 32)
    assert (m.ffn_hidden_size, m.vocab_size, m.norm_epsilon, m.head_dim) == (11008, 32000, 1e-5, 128)
    assert m.untie_embeddings_and_output_weights
    assert model_head_bases(m, PositionalConfig()) == list(PAPER_LLAMA2_7B_BASES)


def test_llama2_7b_parameter_count(single_rank):
    """6.74B parameters, as published for Llama-2-7B (counted on the meta device, no memory)."""
    m = get_preset("llama2-7b")
    with megatron_parallel():
        cfg = transformer_config(m, ParallelConfig(), use_cpu_initialization=True)
        with torch.device("meta"):
            model = build_model(m, PositionalConfig(), cfg, max_sequence_length=4096)
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_size=65), "model.hidden_size \\(65\\) must be divisible by model.num_attention_heads"),
        (dict(num_query_groups=3), "model.num_attention_heads \\(4\\) must be divisible by model.num_query_groups"),
        (dict(num_layers=0), "model.num_layers must be positive"),
    ],
)
def test_model_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_parallel_and_cross_section_errors():
    with pytest.raises(ValueError, match="sequence_parallel needs parallel.tensor_model_parallel_size > 1"):
        ParallelConfig(sequence_parallel=True)
    with pytest.raises(ValueError, match="num_attention_heads \\(4\\) must be divisible by parallel.tensor_model_parallel_size \\(8\\)"):
        validate_model_setup(ModelConfig(), ParallelConfig(tensor_model_parallel_size=8))
    with pytest.raises(ValueError, match="num_query_groups \\(2\\) must be divisible by parallel.tensor_model_parallel_size \\(4\\)"):
        validate_model_setup(ModelConfig(num_query_groups=2), ParallelConfig(tensor_model_parallel_size=4))
    sp = ParallelConfig(tensor_model_parallel_size=2, context_parallel_size=2, sequence_parallel=True)
    with pytest.raises(ValueError, match="must be divisible by 8 \\(2 x context_parallel_size x tensor_model_parallel_size"):
        validate_model_setup(ModelConfig(), sp, seq_length=36)
    validate_model_setup(ModelConfig(), sp, seq_length=40)
    with pytest.raises(ValueError, match="parallel.cp_comm_type: expected null, p2p, all_gather, a2a or a2a\\+p2p, got 'ring'"):
        ParallelConfig(cp_comm_type="ring")


def test_cp_comm_type_reaches_megatron():
    """(megatron hands it to core attention only when CP > 1; SDPAttention's refusal of what it
    does not implement is tested in test_layers.py.)"""
    m = ModelConfig(num_query_groups=2)
    for comm in (None, "all_gather", "p2p", "a2a+p2p"):
        cfg = transformer_config(m, ParallelConfig(context_parallel_size=2, cp_comm_type=comm),
                                 use_cpu_initialization=True)
        assert cfg.cp_comm_type == comm


def test_positional_errors():
    with pytest.raises(ValueError, match="positional.position_ids"):
        PositionalConfig(position_ids="random")
    with pytest.raises(ValueError, match="positional.per_head_rope: expected 'fused' or 'table', got 'triton'"):
        PositionalConfig(per_head_rope="triton")
    assert PositionalConfig().position_ids == "sequential" and not PositionalConfig().position_ids_explicit
    assert PositionalConfig(bases={"strategy": "uniform"}).bases == UniformBases()


def test_vocab_padding():
    assert padded_vocab_size(32000, 1) == 32000
    assert padded_vocab_size(32000, 8) == 32768
    assert padded_vocab_size(200, 2) == 256
