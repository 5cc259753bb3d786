"""PI / NTK / YaRN / Llama-3 frequencies and attention temperature against HF transformers' rope init."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from harpe_megatron.config.loader import ConfigError, config_from_dict, config_to_dict
from harpe_megatron.config.model import ParallelConfig, PositionalConfig, padded_vocab_size
from harpe_megatron.distributed.bringup import megatron_parallel
from harpe_megatron.hf.llama_names import hf_to_megatron
from harpe_megatron.model.builder import build_model, transformer_config
from harpe_megatron.positional.bases import ConstantBase
from harpe_megatron.positional.scaling import Llama3Scaling, LinearScaling, NTKScaling, YarnScaling
from tests.helpers import tiny_hf_llama, tiny_model_config

HEAD_DIM = 128


def _hf(rope_type: str, theta: float, **params):
    cfg = LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, max_position_embeddings=4096 * 32,
                      rope_parameters={"rope_type": rope_type, "rope_theta": theta, **params})
    return ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu", None)


@pytest.mark.parametrize("theta", [1e4, 5e5, 2.17e6])
@pytest.mark.parametrize("factor", [2.0, 8.0, 32.0])
def test_linear_matches_hf(theta, factor):
    ours = LinearScaling(factor=factor).inverse_frequencies([theta], HEAD_DIM)[0]
    ref, attn = _hf("linear", theta, factor=factor)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert attn == 1.0 == LinearScaling(factor=factor).attention_factor


@pytest.mark.parametrize("theta", [1e4, 5e5])
@pytest.mark.parametrize("factor", [2.0, 32.0])
def test_yarn_matches_hf(theta, factor):
    scaling = YarnScaling(factor=factor, original_max_position_embeddings=4096)
    ours = scaling.inverse_frequencies([theta], HEAD_DIM)[0]
    ref, attn = _hf("yarn", theta, factor=factor, original_max_position_embeddings=4096)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    assert scaling.attention_factor == pytest.approx(attn)


@pytest.mark.parametrize("theta", [5e5, 1e4, 2.5e8])
@pytest.mark.parametrize("factor,low,high,original", [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192),
                                                      (16.0, 2.0, 8.0, 4096)])
def test_llama3_matches_hf(theta, factor, low, high, original):
    """Llama 3.1's bands, bit for bit against transformers' ``llama3`` init; every band occurs."""
    scaling = Llama3Scaling(factor=factor, low_freq_factor=low, high_freq_factor=high,
                            original_max_position_embeddings=original)
    ours = scaling.inverse_frequencies([theta], HEAD_DIM)[0]
    ref, attn = _hf("llama3", theta, factor=factor, low_freq_factor=low, high_freq_factor=high,
                    original_max_position_embeddings=original)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert attn == 1.0 == scaling.attention_factor
    plain = NTKScaling(factor=1.0).inverse_frequencies([theta], HEAD_DIM)[0]
    kept, divided = ours == plain, torch.isclose(ours, plain / factor, rtol=1e-6, atol=0)
    assert kept.any() and divided.any() and (~kept & ~divided).any()  # high, low and blended bands


def test_llama3_config_errors():
    with pytest.raises(ValueError, match="0 < low_freq_factor < high_freq_factor"):
        Llama3Scaling(low_freq_factor=4.0, high_freq_factor=1.0)
    with pytest.raises(ValueError, match="original_max_position_embeddings must be positive"):
        Llama3Scaling(original_max_position_embeddings=0)


@pytest.mark.parametrize("factor", [2.0, 32.0])
def test_static_ntk_equals_hf_dynamic_at_the_matching_length(factor):
    """HF's dynamic NTK grows the base by ((s*L/L0) - (s-1))^(d/(d-2)); at L = L0 (2s-1)/s that
    growth is s^(d/(d-2)), the static NTK-aware rule."""
    theta, original = 1e4, 4096
    seq_len = original * (2 * factor - 1) / factor
    cfg = LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, max_position_embeddings=original,
                      rope_parameters={"rope_type": "dynamic", "rope_theta": theta, "factor": factor})
    ref, _ = ROPE_INIT_FUNCTIONS["dynamic"](cfg, "cpu", seq_len)
    ours = NTKScaling(factor=factor).inverse_frequencies([theta], HEAD_DIM)[0]
    torch.testing.assert_close(ours, ref, rtol=2e-6, atol=0)


def test_per_head_scaling_uses_each_heads_base():
    bases = [1e6, 2.5e6, 4.54e6]
    scaling = YarnScaling(factor=8.0, original_max_position_embeddings=4096)
    table = scaling.inverse_frequencies(bases, HEAD_DIM)
    for row, base in zip(table, bases):
        torch.testing.assert_close(row, scaling.inverse_frequencies([base], HEAD_DIM)[0], rtol=0, atol=0)


@pytest.mark.parametrize("rope_type, scaling", [
    ("linear", LinearScaling(factor=4.0)),
    ("yarn", YarnScaling(factor=4.0, original_max_position_embeddings=16)),
    ("llama3", Llama3Scaling(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)),
])
def test_scaled_model_matches_hf_llama_logits(single_rank, rope_type, scaling):
    """End to end, incl. YaRN's attention temperature (softmax_scale = mscale^2 / sqrt(d))."""
    m = tiny_model_config(num_query_groups=2)
    hf = tiny_hf_llama(m, rope_theta=10000.0)
    params = {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 4.0}
    if rope_type in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = 16
    if rope_type == "llama3":
        params.update(low_freq_factor=1.0, high_freq_factor=4.0)
    hf.config.rope_parameters = params
    hf.model.rotary_emb.__init__(hf.config)  # rebuild HF's rotary tables for the new parameters
    positional = PositionalConfig(bases=ConstantBase(base=10000.0), scaling=scaling)
    tokens = torch.randint(0, m.vocab_size, (2, 48))
    with megatron_parallel(), torch.no_grad():
        cfg = transformer_config(m, ParallelConfig(), use_cpu_initialization=True, positional=positional)
        model = build_model(m, positional, cfg, max_sequence_length=48).eval()
        model.load_state_dict(hf_to_megatron(hf.state_dict(), m, padded_vocab_size(m.vocab_size, 1)), strict=False)
        torch.testing.assert_close(model(tokens, None, None)[..., : m.vocab_size], hf(tokens).logits,
                                   rtol=0, atol=2e-5)


def test_scaling_config_round_trip_and_errors(tmp_path):
    tree = {"model": {"preset": "llama2-7b"}, "training": {"train_iters": 1},
            "positional": {"bases": {"strategy": "paper"}, "scaling": {"type": "yarn", "factor": 32}}}
    cfg = config_from_dict(tree)
    assert cfg.positional.scaling == YarnScaling(factor=32.0)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    tree["positional"]["scaling"] = {"type": "rope3"}
    with pytest.raises(ConfigError, match=r"positional\.scaling\.type: unknown type 'rope3'"):
        config_from_dict(tree)
    tree["positional"]["scaling"] = {"type": "linear", "factor": 0.5}
    with pytest.raises(ConfigError, match=r"<config>: positional\.scaling\.factor must be >= 1, got 0\.5"):
        config_from_dict(tree)
