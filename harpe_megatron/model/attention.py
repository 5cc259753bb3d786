"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` with context parallelism.

The drop-in for megatron-core's local ``DotProductAttention`` (which materialises a
``[b*h, s, s]`` score tensor and asserts ``context_parallel_size == 1``). Used by the local layer
spec, i.e. whenever Transformer Engine is not installed (CPU, CI, plain GPU boxes).

Conventions
-----------
* Inputs are megatron's: query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` for this TP
  rank's heads, already rotated (RoPE is applied by ``SelfAttention`` before core attention).
  Query head ``h`` uses KV group ``h // (np // ng)`` (megatron's grouped layout), which is what
  SDPA's ``enable_gqa`` does. Output is ``[sq, b, np * hn]``.
* Causal self-attention only (``attn_mask_type=causal``); an explicit ``attention_mask`` is
  rejected rather than silently ignored.
* Context parallelism (zigzag, see :mod:`harpe_megatron.parallel.zigzag`): each CP rank holds
  query chunks ``r`` and ``2cp-1-r``. K and V are all-gathered over the CP group (backward:
  reduce-scatter of their gradients, megatron's sequence-parallel mapping on the CP group) and put
  back into natural order; query chunk ``i`` then attends to keys ``[0, (i+1) c)`` with a
  bottom-right-aligned causal mask (``torch.nn.attention.bias.causal_lower_right``), which lets
  SDPA use its fused kernels. The result is exact against one-rank attention; no S x S score
  tensor is built by this code. This is the "all_gather" CP scheme (as in Llama 3 and TE's
  ``cp_comm_type="all_gather"``): it trades K/V memory for simplicity; communication is one
  all-gather of K and V per layer (``2 * S * ng * hn`` elements) and overlaps nothing.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from harpe_megatron.parallel.zigzag import gathered_to_natural_order, zigzag_chunk_ids
from harpe_megatron.positional.rotary import split_rotary_table

__all__ = ["SDPAttention", "HarpeSelfAttention", "causal_attention", "context_parallel_causal_attention"]


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, dropout_p: float = 0.0) -> Tensor:
    """Causal attention on ``[b, h, s, d]`` tensors (``k``/``v`` may have fewer heads: GQA)."""
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale, dropout_p=dropout_p, enable_gqa=k.size(1) != q.size(1)
    )


def context_parallel_causal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    cp_group: torch.distributed.ProcessGroup,
    dropout_p: float = 0.0,
) -> Tensor:
    """Exact causal attention for zigzag-sharded ``[s_local, b, h, d]`` inputs (see module doc).

    Returns ``[b, h, s_local, d]`` for this rank's two query chunks, in local (zigzag) order.
    """
    cp_size = cp_group.size()
    cp_rank = cp_group.rank()
    c = q.size(0) // 2
    k_all = gather_from_sequence_parallel_region(k, tensor_parallel_output_grad=True, group=cp_group)
    v_all = gather_from_sequence_parallel_region(v, tensor_parallel_output_grad=True, group=cp_group)
    k_all = gathered_to_natural_order(k_all, 0, cp_size).permute(1, 2, 0, 3)
    v_all = gathered_to_natural_order(v_all, 0, cp_size).permute(1, 2, 0, 3)
    q = q.permute(1, 2, 0, 3)
    gqa = k_all.size(1) != q.size(1)
    outs = []
    for local_idx, chunk in enumerate(zigzag_chunk_ids(cp_rank, cp_size)):
        q_chunk = q[:, :, local_idx * c : (local_idx + 1) * c]
        kv_len = (chunk + 1) * c
        mask = causal_lower_right(c, kv_len)
        outs.append(
            F.scaled_dot_product_attention(
                q_chunk, k_all[:, :, :kv_len], v_all[:, :, :kv_len],
                attn_mask=mask, scale=scale, dropout_p=dropout_p, enable_gqa=gqa,
            )
        )
    return torch.cat(outs, dim=2)


class SDPAttention(MegatronModule):
    """megatron-core core-attention module (``submodules.core_attention`` of ``SelfAttention``)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPAttention supports causal self-attention only, got {attn_mask_type}")
        if config.apply_query_key_layer_scaling:
            raise ValueError("SDPAttention does not implement apply_query_key_layer_scaling")
        if cp_comm_type not in (None, "all_gather"):
            raise ValueError(
                f"SDPAttention implements cp_comm_type='all_gather' only, got {cp_comm_type!r}; "
                "other schemes need Transformer Engine"
            )
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.cp_group = pg_collection.cp
        self.layer_number = layer_number
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        if attention_mask is not None:
            raise ValueError(
                "SDPAttention is causal by construction and takes no attention_mask; pass "
                "attention_mask=None (document masking would need packed sequences)"
            )
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention_bias")
        dropout_p = self.dropout_p if self.training else 0.0
        sq, b, np_, hn = query.shape
        if self.cp_group is not None and self.cp_group.size() > 1:
            out = context_parallel_causal_attention(
                query, key, value, self.softmax_scale, self.cp_group, dropout_p
            )
        else:
            out = causal_attention(
                query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3),
                self.softmax_scale, dropout_p,
            )
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)


class HarpeSelfAttention(SelfAttention):
    """megatron ``SelfAttention`` that takes our per-head rotary input, in one of two forms.

    The rotary input travels through the decoder block as one tensor (activation checkpointing
    saves its arguments with ``save_for_backward``, which cannot hold a tuple):

    * 4-D: the per-head angle table ``[s, b|1, np (+ ng), d]`` (packed q/k for GQA), split here
      into the ``(query_table, key_table)`` pair that megatron applies with its unfused path;
    * 2-D: token positions ``[s, b|1]`` (fused path). megatron gets no rotary input; RoPE is
      applied to q and k right after the QKV projection — where megatron would apply it — by
      overriding :meth:`get_query_key_value_tensors`, using the model's
      :class:`~harpe_megatron.positional.rotary.PerHeadRotaryEmbedding` (see :meth:`bind_rotary`).
    """

    _rotary = None  # the model's PerHeadRotaryEmbedding, set by bind_rotary (not a submodule)
    _rope_positions: Optional[Tensor] = None

    def bind_rotary(self, rotary) -> None:
        """Use ``rotary`` (the model's, shared by all layers) for positions-form rotary inputs."""
        # A tuple keeps nn.Module from registering the shared module as a child of every layer.
        self._rotary = (rotary,)

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        if isinstance(rotary_pos_emb, Tensor) and rotary_pos_emb.dim() == 2:
            if self._rotary is None:
                raise RuntimeError("positions given as rotary input, but bind_rotary() was never called")
            self._rope_positions = rotary_pos_emb
            try:
                return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs)
            finally:
                self._rope_positions = None
        if isinstance(rotary_pos_emb, Tensor):
            rotary_pos_emb = split_rotary_table(
                rotary_pos_emb, self.num_attention_heads_per_partition, self.num_query_groups_per_partition
            )
        return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)

    def get_query_key_value_tensors(self, *args, **kwargs):
        out = super().get_query_key_value_tensors(*args, **kwargs)
        if self._rope_positions is None:
            return out
        query, key, *rest = out
        query, key = self._rotary[0].rotate_qk(query, key, self._rope_positions)
        return (query, key, *rest)
