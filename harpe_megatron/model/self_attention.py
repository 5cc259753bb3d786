"""HarpeSelfAttention: megatron-core's ``SelfAttention`` with per-head RoPE as an explicit input.

What the layer does with its rotary input is fixed when it is built (``per_head_rope``, a
ModuleSpec parameter set by model/spec.py from ``positional.per_head_rope``), never guessed from
the input at run time:

* ``"fused"``: ``rotary_pos_emb`` is the token positions ``[s, b|1]`` fp32 of this rank's tokens
  (zigzag share under CP; per-sample ids with ``position_ids: from_batch``, e.g. positions that
  restart at every document). q and k are rotated right after the QKV projection by the model's
  :class:`~harpe_megatron.positional.rotary.PerHeadRotaryEmbedding` (bound once at model build,
  :meth:`HarpeSelfAttention.bind_rotary`): the Triton kernel on CUDA, the same expression in
  torch elsewhere; no angle table exists.
* ``"table"``: ``rotary_pos_emb`` is the per-head angle table ``[s, b|1, np (+ ng), d]`` (query
  and key tables packed along the head axis for GQA; one tensor because megatron's activation
  checkpointing saves its arguments with ``save_for_backward``), split here and applied with
  megatron's unfused ``apply_rotary_pos_emb`` (the reference path).

The forward is our own, for training (no inference context, no KV cache, no packed THD
sequences, no cross attention; each refused by name): QKV projection (megatron's
``get_query_key_value_tensors``), RoPE as above, core attention (megatron's
``_checkpointed_attention_forward`` when selective recomputation asks for it), output
projection. ``attention_mask`` is handed to the core attention unchanged: ``None``, or the row's
document ids when the model masks documents (model/attention.py, ``SDPAttention``).
"""

from __future__ import annotations

from typing import Optional

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention
from torch import Tensor

from harpe_megatron.compat import check_megatron
from harpe_megatron.positional.rotary import split_rotary_table

check_megatron()  # SelfAttention internals we call are listed and checked in compat.py

__all__ = ["HarpeSelfAttention", "PER_HEAD_ROPE_MODES"]

PER_HEAD_ROPE_MODES = ("fused", "table")


class HarpeSelfAttention(SelfAttention):
    """megatron ``SelfAttention`` taking our per-head rotary input (module docstring).

    Args (beyond ``SelfAttention``'s): ``per_head_rope``: ``"fused"`` or ``"table"``.
    """

    def __init__(self, *args, per_head_rope: str = "fused", **kwargs) -> None:
        if per_head_rope not in PER_HEAD_ROPE_MODES:
            raise ValueError(f"per_head_rope must be one of {PER_HEAD_ROPE_MODES}, got {per_head_rope!r}")
        super().__init__(*args, **kwargs)
        self.per_head_rope = per_head_rope
        self._rotary = None  # (PerHeadRotaryEmbedding,) for "fused": the model's, not a submodule

    def bind_rotary(self, rotary) -> None:
        """Use the model's ``rotary`` (shared by all layers) for the fused rotation."""
        if self.per_head_rope != "fused":
            raise ValueError(f"bind_rotary is for per_head_rope='fused' layers; this one is {self.per_head_rope!r}")
        # A tuple keeps nn.Module from registering the shared module as a child of every layer.
        self._rotary = (rotary,)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor],
        key_value_states: Optional[Tensor] = None,
        inference_context=None,
        rotary_pos_emb: Optional[Tensor] = None,
        rotary_pos_cos: Optional[Tensor] = None,
        rotary_pos_sin: Optional[Tensor] = None,
        rotary_pos_cos_sin: Optional[Tensor] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params=None,
        sequence_len_offset: Optional[int] = None,
        *,
        inference_params=None,
    ) -> tuple[Tensor, Optional[Tensor]]:
        unsupported = {"key_value_states": key_value_states, "inference_context": inference_context,
                       "inference_params": inference_params, "packed_seq_params": packed_seq_params,
                       "rotary_pos_cos": rotary_pos_cos, "rotary_pos_sin": rotary_pos_sin,
                       "rotary_pos_cos_sin": rotary_pos_cos_sin, "attention_bias": attention_bias,
                       "sequence_len_offset": sequence_len_offset}
        given = sorted(k for k, v in unsupported.items() if v is not None)
        if given:
            raise NotImplementedError(
                f"HarpeSelfAttention is a training-only self-attention; got {', '.join(given)} (inference: export to "
                "HF with tools/convert_to_hf.py; document masking: data.document_masking, not packed sequences)")
        if self.config.attention_output_gate or self.config.no_rope_freq:
            raise NotImplementedError("HarpeSelfAttention implements neither attention_output_gate nor no_rope_freq")
        query, key, value = self.get_query_key_value_tensors(hidden_states, None)
        query, key = self._rotate(query, key, rotary_pos_emb)
        if self.checkpoint_core_attention and self.training:
            core = self._checkpointed_attention_forward(query, key, value, attention_mask,
                                                        attn_mask_type=self.attn_mask_type)
        else:
            core = self.core_attention(query, key, value, attention_mask, attn_mask_type=self.attn_mask_type,
                                       attention_bias=None, packed_seq_params=None)
        return self.linear_proj(core)

    def _rotate(self, query: Tensor, key: Tensor, rotary: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """q ``[s, b, np, d]`` and k ``[s, b, ng, d]`` rotated by this layer's rotary input."""
        s = query.size(0)
        if self.per_head_rope == "fused":
            if rotary is None or rotary.dim() != 2 or rotary.size(0) != s:
                raise ValueError(f"per_head_rope='fused' layers take the positions [{s}, batch|1] as rotary_pos_emb, "
                                 f"got {None if rotary is None else tuple(rotary.shape)}")
            if self._rotary is None:
                raise RuntimeError("per_head_rope='fused' layer used before bind_rotary() (model/gpt.py binds it)")
            return self._rotary[0].rotate_qk(query, key, rotary)
        if rotary is None or rotary.dim() != 4 or rotary.size(0) != s:
            raise ValueError(f"per_head_rope='table' layers take the angle table [{s}, batch|1, heads, d] as "
                             f"rotary_pos_emb, got {None if rotary is None else tuple(rotary.shape)}")
        q_table, k_table = split_rotary_table(rotary, self.num_attention_heads_per_partition,
                                              self.num_query_groups_per_partition)
        cp_group = self.pg_collection.cp
        query = apply_rotary_pos_emb(query, q_table, config=self.config, cp_group=cp_group)
        key = apply_rotary_pos_emb(key, k_table, config=self.config, cp_group=cp_group)
        return query, key
