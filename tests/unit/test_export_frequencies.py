"""The exported HF model rotates every head like the trainer: every RoPE scaling x every base strategy.

Trainer side: the bases the model builder resolves (``model_head_bases``), the per-head inverse
frequencies of the rotary module the megatron model owns (``PerHeadRotaryEmbedding``) and the
softmax scale of its TransformerConfig (YaRN's temperature enters there). Export side: the
``config.json`` of ``hf_config_dict``, read by the config class the HF folder would get
(``LlamaConfig`` for one base, the shipped ``HarpeLlamaConfig`` otherwise), and the rotary
embedding of that model (transformers' ``LlamaRotaryEmbedding`` or the shipped
``HarpeLlamaRotaryEmbedding``): inverse frequencies per query head and the cos/sin multiplier.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from harpe_megatron.config.model import ModelConfig, ParallelConfig, PositionalConfig
from harpe_megatron.hf.config import hf_config_dict, megatron_trees_from_hf
from harpe_megatron.hf.harpe_llama.configuration_harpe_llama import HarpeLlamaConfig
from harpe_megatron.hf.harpe_llama.modeling_harpe_llama import HarpeLlamaRotaryEmbedding
from harpe_megatron.model.builder import model_head_bases, transformer_config
from harpe_megatron.positional.bases import (
    BASE_STRATEGIES,
    ConstantBase,
    ExplicitBases,
    PaperBases,
    PeakValleyBases,
    UniformBases,
)
from harpe_megatron.positional.rotary import PerHeadRotaryEmbedding
from harpe_megatron.positional.scaling import (
    ROPE_SCALINGS,
    Llama3Scaling,
    LinearScaling,
    NoScaling,
    NTKScaling,
    YarnScaling,
)

HEAD_DIM = 32
ORIGINAL, FACTOR = 256, 8.0
SCALINGS = {
    "none": NoScaling(),
    "linear": LinearScaling(factor=FACTOR),
    "ntk": NTKScaling(factor=FACTOR),
    "yarn": YarnScaling(factor=FACTOR, original_max_position_embeddings=ORIGINAL),
    # ORIGINAL / high = 64 and ORIGINAL / low = 256 put every strategy's heads in all three bands
    "llama3": Llama3Scaling(factor=FACTOR, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=ORIGINAL),
}
STRATEGIES = {
    "paper": PaperBases(),  # the 32-head Llama-2-7B table: needs 32 KV groups
    "uniform": UniformBases(b_min=1e4, b_max=5e5),
    "peak_valley": PeakValleyBases(b_min=1e3, b_max=5e3, stride=5e2, max_distance=32768),
    "constant": ConstantBase(base=5e5),  # one base: exported as a plain LlamaForCausalLM
    "explicit": ExplicitBases(values=[1e4, 3e4, 2e5, 1e6]),
}


def test_every_scaling_and_strategy_is_covered():
    """A new scaling or base strategy needs an example here (and so gets checked below)."""
    assert set(SCALINGS) == set(ROPE_SCALINGS)
    assert set(STRATEGIES) == set(BASE_STRATEGIES)


def _model(strategy: str) -> ModelConfig:
    heads, groups = (32, 32) if strategy == "paper" else (8, 4)  # GQA except for the paper's MHA table
    return ModelConfig(num_layers=1, hidden_size=heads * HEAD_DIM, num_attention_heads=heads,
                       num_query_groups=groups, ffn_hidden_size=64, vocab_size=128)


def _exported_rotary(m, head_bases, scaling, tmp_path):
    """``(inverse frequencies [heads, d/2], cos/sin multiplier, config.json)`` of the exported model."""
    cfg = hf_config_dict(m, head_bases, scaling, torch.float32, max_position_embeddings=int(ORIGINAL * FACTOR))
    (tmp_path / "config.json").write_text(json.dumps(cfg))  # what the folder holds, read back as HF does
    if cfg["model_type"] == "llama":
        rotary = LlamaRotaryEmbedding(LlamaConfig.from_pretrained(tmp_path))
        inv_freq = rotary.inv_freq.to(torch.float32)[None].expand(m.num_attention_heads, -1)
    else:
        rotary = HarpeLlamaRotaryEmbedding(HarpeLlamaConfig.from_pretrained(tmp_path))
        per_group = m.num_attention_heads // m.num_query_groups
        inv_freq = rotary.inv_freq(torch.device("cpu")).repeat_interleave(per_group, dim=0)
    return inv_freq, float(rotary.attention_scaling), cfg


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("scaling_name", sorted(SCALINGS))
def test_exported_model_rotates_like_the_trainer(strategy, scaling_name, tmp_path):
    m, scaling = _model(strategy), SCALINGS[scaling_name]
    positional = PositionalConfig(bases=STRATEGIES[strategy], scaling=scaling)

    head_bases = model_head_bases(m, positional)
    rotary = PerHeadRotaryEmbedding(head_bases, m.head_dim, m.num_query_groups, scaling=positional.scaling)
    trainer_q, trainer_k = rotary.qk_inverse_frequencies(torch.device("cpu"))
    per_group = m.num_attention_heads // m.num_query_groups
    assert torch.equal(trainer_k.repeat_interleave(per_group, dim=0), trainer_q)  # GQA: a group shares its row
    softmax_scale = transformer_config(m, ParallelConfig(), positional=positional).softmax_scale

    exported, attention_scaling, cfg = _exported_rotary(m, head_bases, scaling, tmp_path)
    assert cfg["model_type"] == ("llama" if strategy == "constant" else "harpe_llama")
    # transformers' own YaRN evaluates the same formula in another order (ulps apart); the shipped
    # model and every other case agree bit for bit.
    exact = not (scaling_name == "yarn" and cfg["model_type"] == "llama")
    torch.testing.assert_close(exported, trainer_q, rtol=0 if exact else 1e-6, atol=0)

    # YaRN's temperature: the trainer scales the logits by factor^2 in the softmax scale, the HF
    # model scales cos and sin (so q and k) by factor.
    assert attention_scaling == pytest.approx(scaling.attention_factor, rel=1e-12)
    trainer_scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(m.head_dim)
    assert trainer_scale == pytest.approx(attention_scaling**2 / math.sqrt(m.head_dim), rel=1e-12)

    # Importing the export gives the scaling back; static NTK comes back as plain RoPE on the
    # larger bases it stands for.
    back = megatron_trees_from_hf(cfg)["positional"]["scaling"]
    assert back == (NoScaling() if scaling_name == "ntk" else scaling).to_dict()
