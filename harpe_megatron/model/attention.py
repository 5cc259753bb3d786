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
* Never a silent math fallback (:func:`require_fused_sdpa`): on CUDA every call is checked
  before it runs; when no fused kernel (flash, cuDNN, memory-efficient; for the lower-right
  mask only flash and memory-efficient, which is what ``CausalBias`` dispatches to) accepts the
  inputs and the sequence is longer than ``SMALL_SEQUENCE``, it raises naming dtype, shapes and
  the fix instead of materialising S x S scores (e.g. fp32 with CP > 1). Off CUDA (CPU tests) the
  kernel choice is not checked. ``_sdpa_probe`` is the capability probe (tests substitute it).
* Fake tensors (the memory planner, planner/plan.py): ``CausalBias`` cannot be wrapped by
  ``FakeTensorMode``, so every call runs the op SDPA and ``CausalBias`` dispatch to on GPU for
  bf16/fp16: ``aten._scaled_dot_product_flash_attention`` with ``is_causal=True`` (lower-right
  aligned for ``sq < sk``): same output shapes, same saved tensors, same memory as on the GPU.
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
from torch._subclasses.fake_tensor import is_fake as _torch_is_fake
from torch.nn.attention.bias import causal_lower_right

from harpe_megatron.parallel.zigzag import gathered_to_natural_order, zigzag_chunk_ids
from harpe_megatron.positional.rotary import split_rotary_table

__all__ = [
    "SDPAttention", "HarpeSelfAttention", "causal_attention", "context_parallel_causal_attention",
    "require_fused_sdpa", "SMALL_SEQUENCE",
]

# Up to this many query or key positions the math kernel's score matrix is small enough to allow
# (tiny test models, fp32 references on GPU); above it a math fallback is an error.
SMALL_SEQUENCE = 1024

_FUSED = ("flash", "cudnn", "efficient")


def _is_fake(t: Tensor) -> bool:
    """Whether ``t`` is a FakeTensor (thin wrapper over torch's private helper)."""
    return _torch_is_fake(t)


def _torch_sdpa_probe(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, is_causal: bool,
                      enable_gqa: bool) -> Optional[frozenset[str]]:
    """The fused SDPA kernels that accept these ``[b, h, s, d]`` inputs (torch's own checks, also
    honouring ``torch.backends.cuda.*_sdp_enabled``); None off CUDA, where there is no choice to check."""
    if not q.is_cuda or _is_fake(q):
        return None
    cuda = torch.backends.cuda
    params = cuda.SDPAParams(q, k, v, None, dropout_p, is_causal, enable_gqa)
    checks = {"flash": (cuda.flash_sdp_enabled, cuda.can_use_flash_attention),
              "cudnn": (cuda.cudnn_sdp_enabled, cuda.can_use_cudnn_attention),
              "efficient": (cuda.mem_efficient_sdp_enabled, cuda.can_use_efficient_attention)}
    return frozenset(name for name, (enabled, usable) in checks.items() if enabled() and usable(params))


_sdpa_probe = _torch_sdpa_probe  # the capability probe; tests substitute it to check selection on CPU


def require_fused_sdpa(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, lower_right: bool) -> None:
    """Raise unless SDPA will run a fused kernel for these ``[b, h, s, d]`` inputs (see module doc).

    ``lower_right``: the call uses a ``causal_lower_right`` mask (CP chunks with ``sq < sk``),
    which ``CausalBias`` serves with flash or memory-efficient attention only, else it
    materialises the mask and runs the math kernel; otherwise the call is ``is_causal=True``.
    """
    gqa = k.size(1) != q.size(1)
    kernels = _sdpa_probe(q, k, v, dropout_p, not lower_right, gqa)
    if kernels is None:
        return
    if lower_right:
        kernels = kernels & {"flash", "efficient"}
    if kernels or max(q.size(-2), k.size(-2)) <= SMALL_SEQUENCE:
        return
    b, h, sq, d = q.shape
    raise RuntimeError(
        f"scaled_dot_product_attention would fall back to the math kernel "
        f"({'a materialised causal_lower_right mask and ' if lower_right else ''}{sq} x {k.size(-2)} scores per "
        f"head) for q {tuple(q.shape)} {q.dtype}, k/v {tuple(k.shape)} {k.dtype} (head_dim {d}, dropout {dropout_p}"
        f"{', GQA' if gqa else ''}): none of the fused kernels (flash, cuDNN, memory-efficient) accepts these inputs. "
        "Fix: train in bf16 or fp16 (training.precision; flash attention needs them"
        f"{' and the CP path cannot use cuDNN' if lower_right else ''}), keep head_dim a multiple of 8 and <= 256, "
        "attention dropout 0, and the kernels enabled (torch.backends.cuda.enable_flash_sdp / "
        "enable_mem_efficient_sdp); see docs/performance.md"
    )


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, dropout_p: float = 0.0) -> Tensor:
    """Causal attention on ``[b, h, s, d]`` tensors (``k``/``v`` may have fewer heads: GQA)."""
    if _is_fake(q):  # the planner: the flash op SDPA runs on GPU (the CPU kernel is not FLOP-counted)
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal=True, scale=scale)[0]
    require_fused_sdpa(q, k, v, dropout_p, lower_right=False)
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale, dropout_p=dropout_p, enable_gqa=k.size(1) != q.size(1)
    )


def _lower_right_causal(q: Tensor, k: Tensor, v: Tensor, scale: float, dropout_p: float, gqa: bool) -> Tensor:
    """Attention of ``q`` ``[b, h, c, d]`` to ``k``/``v`` ``[b, g, L, d]`` (``c <= L``), causal aligned
    bottom-right: query ``i`` sees keys ``[0, L - c + i]``."""
    if q.size(2) == k.size(2):  # plain causal (what CausalBias does too; cuDNN may serve it)
        return causal_attention(q, k, v, scale, dropout_p)
    if _is_fake(q):  # FakeTensorMode cannot wrap CausalBias; this is the op it dispatches to on GPU
        return torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, dropout_p, is_causal=True, scale=scale
        )[0]
    require_fused_sdpa(q, k, v, dropout_p, lower_right=True)
    if not q.is_cuda:
        # What CausalBias does off CUDA (no fused kernel takes it there): materialise the mask and
        # run SDPA with it. Built here, the path holds no tensor subclass, which the planner's
        # dispatch-mode tracker could not wrap on real tensors.
        mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril(k.size(2) - q.size(2))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p,
                                              enable_gqa=gqa)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=causal_lower_right(q.size(2), k.size(2)), scale=scale, dropout_p=dropout_p,
        enable_gqa=gqa,
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
        outs.append(_lower_right_causal(q_chunk, k_all[:, :, :kv_len], v_all[:, :, :kv_len], scale, dropout_p, gqa))
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
