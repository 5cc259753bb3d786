"""Layer specs: Transformer Engine when it is importable, otherwise our local modules.

* TE spec (NGC images): megatron's ``get_gpt_layer_with_transformer_engine_spec`` (fused
  norm+linear, ``TEDotProductAttention`` with context parallelism), final norm ``TENorm``.
* Local spec (CPU, CI, GPUs without TE): megatron's local spec with our :class:`RMSNorm` (sequence
  parallel capable) and :class:`SDPAttention` (context parallel capable) swapped in via
  ModuleSpec submodules; nothing is monkey-patched.
* Both use :class:`HarpeSelfAttention` (megatron's SelfAttention taking our per-head rotary input,
  model/self_attention.py).

Both core attentions receive already-rotated q/k. ``HarpeSelfAttention`` applies per-head RoPE in
one of two ways, fixed per layer by a spec parameter from ``positional.per_head_rope`` (model/gpt.py
hands the layers the matching rotary input):

* fused (the default): the layers get only the token positions ``[s, b]``; right after the QKV
  projection q and k are rotated by
  :func:`~harpe_megatron.positional.rope_apply.apply_per_head_rope` (our Triton kernel on CUDA,
  the same expression in torch elsewhere) from the positions and each head's inverse
  frequencies (:meth:`~harpe_megatron.positional.rotary.PerHeadRotaryEmbedding.rotate_qk`); no
  angle table is built;
* table (``per_head_rope: table``, the reference): the per-head angle table of
  :class:`~harpe_megatron.positional.rotary.PerHeadRotaryEmbedding` (packed q/k for GQA), split
  into query and key tables for megatron's unfused ``apply_rotary_pos_emb``.

megatron's own ``TransformerConfig.apply_rope_fusion`` stays off on both paths (model/builder.py):
its fused RoPE (TE's) takes one table for all heads.

``document_masking`` (``data.document_masking``) builds every ``SDPAttention`` causal within
documents (model/document_attention.py); the TE spec has no such mode here (TE masks documents
through packed THD sequences, which this project does not drive) and refuses it.
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

from harpe_megatron.model.attention import SDPAttention
from harpe_megatron.model.norm import RMSNorm
from harpe_megatron.model.self_attention import HarpeSelfAttention

__all__ = ["transformer_engine_available", "layer_spec", "block_spec"]


def transformer_engine_available() -> bool:
    """True when ``transformer_engine`` can be imported (never required)."""
    return importlib.util.find_spec("transformer_engine") is not None


def layer_spec(use_transformer_engine: bool, per_head_rope: str = "fused", document_masking: bool = False) -> ModuleSpec:
    """One Llama decoder layer (RMSNorm, SwiGLU MLP, causal self-attention, no biases).

    ``per_head_rope``: the layers' RoPE mode (model/self_attention.py); ``document_masking``:
    attention causal within documents (local spec only).
    """
    if use_transformer_engine:
        if document_masking:
            raise ValueError("data.document_masking needs model.transformer_impl: local (our SDPAttention); the "
                             "Transformer Engine spec masks documents only through packed THD sequences")
        spec = copy.deepcopy(get_gpt_layer_with_transformer_engine_spec())
    else:
        spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
        spec.submodules.input_layernorm = RMSNorm
        spec.submodules.pre_mlp_layernorm = RMSNorm
        spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
            module=SDPAttention, params={"document_masking": document_masking})
    spec.submodules.self_attention.module = HarpeSelfAttention
    spec.submodules.self_attention.params = {**spec.submodules.self_attention.params, "per_head_rope": per_head_rope}
    return spec


def block_spec(
    config: TransformerConfig,
    use_transformer_engine: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
    per_head_rope: str = "fused",
    document_masking: bool = False,
) -> TransformerBlockSubmodules:
    """The decoder block for this pipeline stage: its layers plus the final norm (layer options
    as in :func:`layer_spec`)."""
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = RMSNorm
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec(use_transformer_engine, per_head_rope, document_masking)] * num_layers,
        layer_norm=final_norm
    )
