"""Layer specs: Transformer Engine when it is importable, otherwise our local modules.

* TE spec (NGC images): megatron's ``get_gpt_layer_with_transformer_engine_spec`` (fused
  norm+linear, ``TEDotProductAttention`` with context parallelism), final norm ``TENorm``.
* Both use :class:`HarpeSelfAttention` (megatron's SelfAttention that unpacks our rotary table).
* Local spec (CPU, CI, GPUs without TE): megatron's local spec with our :class:`RMSNorm` (sequence
  parallel capable) and :class:`SDPAttention` (context parallel capable) swapped in via
  ModuleSpec submodules; nothing is monkey-patched.

Both receive already-rotated q/k: per-head RoPE is applied by ``SelfAttention`` from the tables
of :class:`~harpe_megatron.positional.rotary.PerHeadRotaryEmbedding` (``positional.per_head_rope:
table``) or inside attention from positions (``fused``); megatron's ``config.apply_rope_fusion``
stays off, since TE's fused RoPE only takes one table for all heads.
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from harpe_megatron.model.attention import HarpeSelfAttention, SDPAttention
from harpe_megatron.model.norm import RMSNorm

__all__ = ["transformer_engine_available", "layer_spec", "block_spec"]


def transformer_engine_available() -> bool:
    """True when ``transformer_engine`` can be imported (never required)."""
    return importlib.util.find_spec("transformer_engine") is not None


def layer_spec(use_transformer_engine: bool) -> ModuleSpec:
    """One Llama decoder layer (RMSNorm, SwiGLU MLP, causal self-attention, no biases)."""
    if use_transformer_engine:
        spec = copy.deepcopy(get_gpt_layer_with_transformer_engine_spec())
    else:
        spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
        spec.submodules.input_layernorm = RMSNorm
        spec.submodules.pre_mlp_layernorm = RMSNorm
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    spec.submodules.self_attention.module = HarpeSelfAttention
    return spec


def block_spec(
    config: TransformerConfig,
    use_transformer_engine: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """The decoder block for this pipeline stage: its layers plus the final norm."""
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = RMSNorm
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec(use_transformer_engine)] * num_layers, layer_norm=final_norm
    )
