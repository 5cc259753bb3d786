"""Named architecture presets (``model.preset`` in YAML or ``get_preset(name)``)."""

from __future__ import annotations

import dataclasses

from harpe_megatron.config.model import ModelConfig

__all__ = ["PRESETS", "get_preset"]

PRESETS: dict[str, ModelConfig] = {
    # Llama-2-7B (Touvron et al. 2023; HF meta-llama/Llama-2-7b-hf config.json).
    "llama2-7b": ModelConfig(
        num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=32,
        ffn_hidden_size=11008, vocab_size=32000, norm_epsilon=1e-5,
        untie_embeddings_and_output_weights=True, pretrained_context_length=4096,
    ),
    # Llama-3-8B / Llama-3.1-8B (Meta 2024; HF meta-llama/Llama-3.1-8B config.json): GQA with 8 KV
    # groups, vocabulary 128,256, untied embeddings. Pre-trained at 8192 tokens (3.1's config.json
    # says 131072: its llama3 RoPE scaling, positional.scaling, stretches the 8k window).
    "llama3-8b": ModelConfig(
        num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
        ffn_hidden_size=14336, vocab_size=128256, norm_epsilon=1e-5,
        untie_embeddings_and_output_weights=True, pretrained_context_length=8192,
    ),
    # Tiny sizes for CPU tests and the demo. "tiny" is MHA, "tiny-gqa" has 2 query heads per group.
    "tiny": ModelConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=4,
        ffn_hidden_size=176, vocab_size=256, pretrained_context_length=64,
    ),
    "tiny-gqa": ModelConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=176, vocab_size=256, pretrained_context_length=64,
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A copy of preset ``name`` with field overrides applied (validated again)."""
    if name not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
