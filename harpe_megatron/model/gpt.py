"""HarpeGPTModel: megatron-core's GPTModel with per-head rotary tables.

The smallest injection that works: the model is built with ``position_embedding_type='none'`` (so
megatron creates neither a learned position embedding nor its single-base ``RotaryEmbedding``),
and ``_preprocess`` — the one place where megatron produces the rotary input handed to every layer
— is extended to return ours instead: with ``per_head_rope="fused"`` (default) the token positions
``[s, b]`` fp32, which :class:`~harpe_megatron.model.self_attention.HarpeSelfAttention` turns into
rotated q/k with the fused per-head kernel; with ``"table"``, the per-head angle table (packed q/k
for GQA) for megatron's unfused ``apply_rotary_pos_emb``. The layers are built for one of the two
(the spec's ``per_head_rope``) and the model checks that they were. Everything else (embedding,
decoder, output layer, vocab-parallel loss, sharded state dict) is megatron's.

Document masking (``document_masking=True``, ``data.document_masking``): ``forward``'s
``attention_mask`` argument is this rank's document layout ``[b, 2, s_local]``: the document id
and the row position of each of its tokens (the data pipeline's ``document_ids`` and
``token_index``, cut in the CP layout balanced by attention work, parallel/cp_layout.py). The
model all-gathers it over the CP group once per forward, moves it to the host once, and hands
every layer ``[b, 2, S]``: the row's document ids in row order and the row position of every
all-gathered slot, with which its ``SDPAttention`` restores row order and attends causally
within documents (model/attention.py, model/document_attention.py). Positions then always come
from the batch (``position_ids``: ``0 .. S-1`` or per-document, cut like the tokens).

Architectural choices (Llama-2): pre-norm RMSNorm (eps 1e-5), SwiGLU MLP, no linear biases,
rotate-half RoPE applied to q and k with one base per query head (shared inside a KV group),
untied input embedding and output layer, causal attention.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from harpe_megatron.compat import check_megatron
from harpe_megatron.model.self_attention import HarpeSelfAttention
from harpe_megatron.positional.rotary import PerHeadRotaryEmbedding

check_megatron()  # supported megatron-core, internals we subclass present (compat.py)

__all__ = ["HarpeGPTModel"]


class HarpeGPTModel(GPTModel):
    """GPTModel whose rotary embedding is :class:`PerHeadRotaryEmbedding`.

    Args (beyond GPTModel's):
        head_bases: one RoPE base per query head of the whole model (megatron head order).
        position_ids_mode: ``"sequential"`` (positions 0..S-1, zigzag-sharded under CP; the
            ``position_ids`` argument of ``forward`` is ignored as in megatron) or
            ``"from_batch"`` (``position_ids`` ``[b, s_local]`` drive the rotation; required).
        rope_scaling: a :class:`~harpe_megatron.positional.scaling.RopeScaling` (PI/NTK/YaRN); its
            attention temperature must be in ``config.softmax_scale`` (see model/builder.py).
        per_head_rope: ``"fused"`` (positions + in-attention per-head kernel) or ``"table"``
            (angle tables through megatron's unfused path). Same result up to rounding. Not
            megatron's ``config.apply_rope_fusion`` (one table for all heads), which stays off.
            The layer spec must build its attention layers for the same mode.
        document_masking: attention causal within documents; ``forward`` then needs the document
            ids as ``attention_mask`` (module docstring). The layer spec must match.
    """

    def __init__(
        self,
        config: TransformerConfig,
        transformer_layer_spec: TransformerBlockSubmodules,
        vocab_size: int,
        max_sequence_length: int,
        head_bases: Sequence[float],
        position_ids_mode: str = "sequential",
        rotary_interleaved: bool = False,
        rope_scaling=None,
        per_head_rope: str = "fused",
        document_masking: bool = False,
        pre_process: bool = True,
        post_process: bool = True,
        parallel_output: bool = True,
        share_embeddings_and_output_weights: bool = False,
        pg_collection: Optional[ProcessGroupCollection] = None,
        vp_stage: Optional[int] = None,
    ) -> None:
        if len(head_bases) != config.num_attention_heads:
            raise ValueError(
                f"head_bases has {len(head_bases)} entries, expected one per query head "
                f"({config.num_attention_heads})"
            )
        if position_ids_mode not in ("sequential", "from_batch"):
            raise ValueError(f"position_ids_mode must be 'sequential' or 'from_batch', got {position_ids_mode!r}")
        if per_head_rope not in ("fused", "table"):
            raise ValueError(f"per_head_rope must be 'fused' or 'table', got {per_head_rope!r}")
        super().__init__(
            config=config,
            transformer_layer_spec=transformer_layer_spec,
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            position_embedding_type="none",
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
        self.position_ids_mode = position_ids_mode
        self.rotary_pos_emb = PerHeadRotaryEmbedding(
            head_bases=head_bases,
            head_dim=config.kv_channels,
            num_query_groups=config.num_query_groups,
            tp_rank=self.pg_collection.tp.rank(),
            tp_size=self.pg_collection.tp.size(),
            cp_group=self.pg_collection.cp,
            rotary_interleaved=rotary_interleaved,
            scaling=rope_scaling,
        )
        self.per_head_rope = per_head_rope
        self.document_masking = document_masking
        for layer in self.decoder.layers:
            attention = getattr(layer, "self_attention", None)
            if not isinstance(attention, HarpeSelfAttention) or attention.per_head_rope != per_head_rope:
                raise TypeError(f"per_head_rope={per_head_rope!r} needs HarpeSelfAttention layers built for it "
                                f"(model/spec.py), got {type(attention).__name__} "
                                f"({getattr(attention, 'per_head_rope', None)!r})")
            if getattr(attention.core_attention, "document_masking", False) != document_masking:
                raise TypeError(f"document_masking={document_masking} needs layers built for it (model/spec.py)")
            if per_head_rope == "fused":
                attention.bind_rotary(self.rotary_pos_emb)

    @property
    def head_bases(self) -> list[float]:
        return list(self.rotary_pos_emb.head_bases)

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Optional[Tensor] = None,
                *args, **kwargs):
        """megatron's ``GPTModel.forward``; ``attention_mask`` is ``None`` or, with document masking,
        this rank's document layout ``[b, 2, s_local]`` (module docstring)."""
        return super().forward(input_ids, position_ids, self._layer_documents(attention_mask), *args, **kwargs)

    def _layer_documents(self, layout: Optional[Tensor]) -> Optional[Tensor]:
        """The layers' ``attention_mask``: ``[b, 2, S]`` on the host, ``[:, 0]`` the row's document
        ids in row order, ``[:, 1]`` the row position of every all-gathered slot (rank-major)."""
        if not self.document_masking:
            if layout is not None:
                raise ValueError("HarpeGPTModel was built without document masking and takes no attention_mask "
                                 "(causal attention); set data.document_masking: true to mask documents")
            return None
        if layout is None or layout.dim() != 3 or layout.size(1) != 2 or layout.dtype.is_floating_point:
            raise ValueError("HarpeGPTModel with document masking needs this rank's document ids and token "
                             "positions [batch, 2, seq] (integer) as attention_mask, got "
                             f"{None if layout is None else (tuple(layout.shape), layout.dtype)}")
        cp = self.pg_collection.cp
        if cp is not None and cp.size() > 1:
            local = layout.permute(2, 0, 1).contiguous()  # [s_local, b, 2]: gather along the sequence
            gathered = torch.empty((local.size(0) * cp.size(),) + local.shape[1:], dtype=local.dtype,
                                   device=local.device)
            dist.all_gather_into_tensor(gathered, local, group=cp)
            layout = gathered.permute(1, 2, 0)  # [b, 2, S], slots rank-major
        layout = layout.cpu()  # once per forward: the attention cuts its work on the host
        ids, slots = layout[:, 0], layout[:, 1]
        row_order = torch.empty_like(ids).scatter_(1, slots, ids)
        return torch.stack((row_order, slots), dim=1)

    def _preprocess(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        decoder_input: Tensor = None,
        inference_context=None,
        packed_seq_params=None,
        padding_mask: Optional[Tensor] = None,
    ):
        if inference_context is not None:
            raise NotImplementedError(
                "HarpeGPTModel has no megatron inference path; export to HF (tools/convert_to_hf.py) "
                "to generate with a KV cache"
            )
        if packed_seq_params is not None:
            raise NotImplementedError("packed (THD) sequences are not supported by HarpeGPTModel")
        out = super()._preprocess(
            input_ids=input_ids,
            position_ids=position_ids,
            decoder_input=decoder_input,
            inference_context=None,
            packed_seq_params=None,
            padding_mask=padding_mask,
        )
        hidden = out[0] if out[0] is not None else self.decoder.input_tensor
        local_len = hidden.size(0)
        if self.config.sequence_parallel:
            local_len *= self.config.tensor_model_parallel_size
        seq_len = local_len * self.config.context_parallel_size
        if self.position_ids_mode == "from_batch" or self.document_masking:
            # (document masking: a CP rank's tokens follow the balanced layout, not zigzag, so even
            # sequential positions come from the batch, which cuts them like the tokens)
            if position_ids is None:
                raise ValueError("position_ids_mode='from_batch' (or document masking) needs position_ids "
                                 "[batch, seq] in forward()")
        else:
            position_ids = None
        if self.per_head_rope == "fused":
            rotary = self.rotary_pos_emb.rope_positions(seq_len, position_ids=position_ids, device=hidden.device)
        else:
            rotary = self.rotary_pos_emb(seq_len, position_ids=position_ids, device=hidden.device)
        return (out[0], rotary) + tuple(out[2:])
