"""Build a Llama-family HarpeGPTModel on megatron-core from the typed config sections."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from harpe_megatron.config.model import (
    ModelConfig,
    ParallelConfig,
    PositionalConfig,
    padded_vocab_size,
    validate_model_setup,
)
from harpe_megatron.model.gpt import HarpeGPTModel
from harpe_megatron.model.spec import block_spec, transformer_engine_available
from harpe_megatron.log import get_logger
from harpe_megatron.positional.bases import per_query_head_bases

__all__ = ["transformer_config", "build_model", "model_head_bases", "TE_UNVERIFIED"]

_log = get_logger(__name__)

TE_UNVERIFIED = ("model.transformer_impl=te: the Transformer Engine layer spec is UNVERIFIED (it has never "
                 "run in this project; no test covers it); model.transformer_impl=local is the tested path")


def transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: bool = False,
    positional: Optional[PositionalConfig] = None,
    **overrides,
) -> TransformerConfig:
    """megatron ``TransformerConfig`` for a Llama decoder (extra TransformerConfig fields via overrides).

    A RoPE scaling with an attention temperature (YaRN's mscale on q and k) enters as
    ``softmax_scale = mscale^2 / sqrt(head_dim)``: scaling q and k by mscale scales their dot
    products by mscale^2, and the softmax sees nothing else.
    """
    validate_model_setup(model, parallel)
    factor = positional.scaling.attention_factor if positional is not None else 1.0
    softmax_scale = factor**2 / math.sqrt(model.head_dim) if factor != 1.0 else None
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,  # megatron's single-table fused RoPE; ours is positional.per_head_rope
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        cp_comm_type=parallel.cp_comm_type,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=use_cpu_initialization,
        pipeline_dtype=params_dtype,
        softmax_scale=softmax_scale,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def model_head_bases(model: ModelConfig, positional: PositionalConfig) -> list[float]:
    """One RoPE base per query head for this model (resolving the configured strategy)."""
    return per_query_head_bases(
        positional.bases, model.num_attention_heads, model.num_query_groups, model.head_dim
    )


def build_model(
    model: ModelConfig,
    positional: PositionalConfig,
    config: TransformerConfig,
    max_sequence_length: int,
    use_transformer_engine: Optional[bool] = None,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    pg_collection=None,
    document_masking: bool = False,
) -> HarpeGPTModel:
    """The model chunk for this rank (parallel state must be initialised).

    ``use_transformer_engine=None`` follows ``model.transformer_impl`` (default ``local``: our
    tested spec). ``te`` needs Transformer Engine installed and logs one warning saying that
    path is unverified (it has never run: TE cannot be installed on CPU and no reachable GPU has it).
    ``document_masking``: attention causal within documents (``data.document_masking``; local only).
    """
    if use_transformer_engine is None:
        use_transformer_engine = model.transformer_impl == "te"
    if use_transformer_engine:
        if not transformer_engine_available():
            raise RuntimeError("model.transformer_impl: te needs transformer_engine, which is not installed; "
                               "use model.transformer_impl: local (the tested default)")
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            _log.warning(TE_UNVERIFIED)
    tp = config.tensor_model_parallel_size
    return HarpeGPTModel(
        config=config,
        transformer_layer_spec=block_spec(config, use_transformer_engine, vp_stage=vp_stage,
                                          per_head_rope=positional.per_head_rope, document_masking=document_masking),
        vocab_size=padded_vocab_size(model.vocab_size, tp, model.make_vocab_size_divisible_by),
        max_sequence_length=max_sequence_length,
        head_bases=model_head_bases(model, positional),
        position_ids_mode=positional.position_ids,
        rotary_interleaved=positional.rotary_interleaved,
        rope_scaling=positional.scaling,
        per_head_rope=positional.per_head_rope,
        document_masking=document_masking,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )
