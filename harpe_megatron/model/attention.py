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
* Causal self-attention (``attn_mask_type=causal``). Built with ``document_masking=True``
  (``data.document_masking``), causal *within documents*: ``attention_mask`` is then the row's
  document layout, see :class:`SDPAttention` and :mod:`~harpe_megatron.model.document_attention`
  (the kernels: flash varlen on CUDA, a boolean block mask elsewhere). Without it an explicit
  ``attention_mask`` is rejected rather than silently ignored.
* Context parallelism (zigzag, see :mod:`harpe_megatron.parallel.zigzag`): each CP rank holds
  query chunks ``r`` and ``2cp-1-r``. K and V are all-gathered over the CP group (backward:
  reduce-scatter of their gradients, megatron's sequence-parallel mapping on the CP group) and put
  back into natural order; query chunk ``i`` then attends to keys ``[0, (i+1) c)`` with a
  bottom-right-aligned causal mask (``torch.nn.attention.bias.causal_lower_right``), which lets
  SDPA use its fused kernels. The result is exact against one-rank attention; no S x S score
  tensor is built by this code. This is the "all_gather" CP scheme (as in Llama 3 and TE's
  ``cp_comm_type="all_gather"``): it trades K/V memory for simplicity; communication is one
  all-gather of K and V per layer (``2 * S * ng * hn`` elements) and overlaps nothing. Under
  document masking the shares are not zigzag but balanced by attention work
  (:mod:`harpe_megatron.parallel.cp_layout`): each rank's queries are runs of row positions, each
  run attends to its key prefix the same way.
* Never a silent math fallback (:func:`require_fused_sdpa`): on CUDA every call is checked
  before it runs; when no fused kernel (flash, cuDNN, memory-efficient; for the lower-right
  mask only flash and memory-efficient, which is what ``CausalBias`` dispatches to) accepts the
  inputs and the sequence is longer than ``SMALL_SEQUENCE``, it raises naming dtype, shapes and
  the fix instead of materialising S x S scores (e.g. fp32 with CP > 1). Off CUDA (CPU tests) the
  kernel choice is not checked. ``_sdpa_probe`` is the capability probe (tests substitute it).
* Fake tensors (the memory planner, planner/plan.py): ``CausalBias`` cannot be wrapped by
  ``FakeTensorMode``, so every call runs the op SDPA and ``CausalBias`` dispatch to on GPU for
  bf16/fp16: ``aten._scaled_dot_product_flash_attention`` with ``is_causal=True`` (lower-right
  aligned for ``sq < sk``): same output shapes, same saved tensors, same memory as on the GPU
  (:func:`_fake_flash`; document-masked calls too: the one-document-per-row bound).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from harpe_megatron.compat import is_fake
from harpe_megatron.model.document_attention import document_attention
from harpe_megatron.parallel.cp_layout import runs, zigzag_layout
from harpe_megatron.parallel.zigzag import zigzag_chunk_ids

__all__ = [
    "SDPAttention", "causal_attention", "context_parallel_causal_attention", "require_fused_sdpa",
    "SMALL_SEQUENCE",
]

# Up to this many query or key positions the math kernel's score matrix is small enough to allow
# (tiny test models, fp32 references on GPU); above it a math fallback is an error.
SMALL_SEQUENCE = 1024

_FUSED = ("flash", "cudnn", "efficient")


def _fake_flash(q: Tensor, k: Tensor, v: Tensor, scale: float, dropout_p: float) -> Tensor:
    """The planner's attention on fake tensors: the op SDPA and ``CausalBias`` dispatch to on GPU
    for bf16/fp16 (``is_causal``: lower-right aligned when ``sq < sk``); same outputs, saved
    tensors and memory as there. (The CPU kernel is not FLOP-counted, ``CausalBias`` cannot be
    wrapped by ``FakeTensorMode``.)"""
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal=True, scale=scale)[0]


def _torch_sdpa_probe(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, is_causal: bool,
                      enable_gqa: bool) -> Optional[frozenset[str]]:
    """The fused SDPA kernels that accept these ``[b, h, s, d]`` inputs (torch's own checks, also
    honouring ``torch.backends.cuda.*_sdp_enabled``); None off CUDA, where there is no choice to check."""
    if not q.is_cuda or is_fake(q):
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
    if is_fake(q):
        return _fake_flash(q, k, v, scale, dropout_p)
    require_fused_sdpa(q, k, v, dropout_p, lower_right=False)
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale, dropout_p=dropout_p, enable_gqa=k.size(1) != q.size(1)
    )


def _lower_right_causal(q: Tensor, k: Tensor, v: Tensor, scale: float, dropout_p: float, gqa: bool) -> Tensor:
    """Attention of ``q`` ``[b, h, c, d]`` to ``k``/``v`` ``[b, g, L, d]`` (``c <= L``), causal aligned
    bottom-right: query ``i`` sees keys ``[0, L - c + i]``."""
    if q.size(2) == k.size(2):  # plain causal (what CausalBias does too; cuDNN may serve it)
        return causal_attention(q, k, v, scale, dropout_p)
    if is_fake(q):
        return _fake_flash(q, k, v, scale, dropout_p)
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


def _block_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, dropout_p: float,
                     documents: Optional[Tensor]) -> Tensor:
    """The last ``c`` of ``L`` positions (``q`` ``[b, h, c, d]``) against the keys ``[0, L)``:
    causal, or causal within documents when ``documents`` ``[b, L]`` is given."""
    if documents is None:
        return _lower_right_causal(q, k, v, scale, dropout_p, k.size(1) != q.size(1))
    return document_attention(q, k, v, documents, scale, dropout_p,
                              fake_causal=lambda *qkv: _fake_flash(*qkv, scale, dropout_p), max_dense=SMALL_SEQUENCE)


def _query_runs(layout: Optional[Tensor], cp_rank: int, cp_size: int, local_len: int) -> tuple[Tensor, list]:
    """``(row order of the gathered slots, this rank's query runs)`` for a layout (see
    :func:`context_parallel_causal_attention`); zigzag without one, or on fake tensors. Host work."""
    if layout is None or is_fake(layout):  # zigzag: one run per chunk (also at CP 1: two chunks)
        index, c = zigzag_layout(local_len * cp_size, cp_size), local_len // 2
        chunks = zigzag_chunk_ids(cp_rank, cp_size)
        return torch.from_numpy(np.argsort(index.reshape(-1), kind="stable")), [
            (chunk * c, c, i * c) for i, chunk in enumerate(chunks)]
    slots = layout[:, 1].numpy()
    if (slots != slots[:1]).any():
        raise ValueError("the rows of a micro-batch must share one CP layout (data/documents.py: cp_share)")
    index = slots[0].reshape(cp_size, local_len)
    return torch.from_numpy(np.argsort(index.reshape(-1), kind="stable")), runs(index[cp_rank])


def context_parallel_causal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    cp_group: torch.distributed.ProcessGroup,
    dropout_p: float = 0.0,
    layout: Optional[Tensor] = None,
) -> Tensor:
    """Exact causal attention for context-parallel ``[s_local, b, h, d]`` inputs (see module doc).

    ``layout``: ``None``: zigzag shares, causal attention. Else document masking
    (model/gpt.py makes it): ``[b, 2, S]`` (host), ``[:, 0]`` the row's document ids in row order,
    ``[:, 1]`` the row position of every all-gathered slot (rank-major; a balanced layout,
    parallel/cp_layout.py, one for all rows), attention causal within documents
    (:mod:`~harpe_megatron.model.document_attention`). Returns ``[b, h, s_local, d]`` for this
    rank's queries, in local order.
    """
    cp_size = cp_group.size()
    cp_rank = cp_group.rank()
    k_all = gather_from_sequence_parallel_region(k, tensor_parallel_output_grad=True, group=cp_group)
    v_all = gather_from_sequence_parallel_region(v, tensor_parallel_output_grad=True, group=cp_group)
    order, query_runs = _query_runs(layout, cp_rank, cp_size, q.size(0))
    order = order.to(k_all.device)
    k_all = k_all.index_select(0, order).permute(1, 2, 0, 3)
    v_all = v_all.index_select(0, order).permute(1, 2, 0, 3)
    q = q.permute(1, 2, 0, 3)
    documents = layout[:, 0] if layout is not None else None
    outs = []
    for start, length, offset in query_runs:  # row start, length, local offset: the rank's chunks in local order
        end = start + length
        docs = documents[:, :end] if documents is not None else None
        outs.append(_block_attention(q[:, :, offset:offset + length], k_all[:, :, :end], v_all[:, :, :end],
                                     scale, dropout_p, docs))
    return torch.cat(outs, dim=2)


class SDPAttention(MegatronModule):
    """megatron-core core-attention module (``submodules.core_attention`` of ``SelfAttention``).

    ``document_masking`` (set in the layer spec, model/spec.py) fixes what ``attention_mask``
    is: ``False``: ``None`` only (causal attention); ``True``: the row's document layout
    ``[b, 2, S]`` (all CP ranks' tokens; HarpeGPTModel.forward gathers it once per forward, see
    :func:`context_parallel_causal_attention`), attention causal within documents
    (model/document_attention.py).
    """

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
        document_masking: bool = False,
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
        self.document_masking = document_masking

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
        documents = self._documents(attention_mask, query)
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention_bias")
        dropout_p = self.dropout_p if self.training else 0.0
        sq, b, np_, hn = query.shape
        if self.cp_group is not None and self.cp_group.size() > 1:
            out = context_parallel_causal_attention(
                query, key, value, self.softmax_scale, self.cp_group, dropout_p, documents
            )
        else:
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            if documents is None:
                out = causal_attention(q, k, v, self.softmax_scale, dropout_p)
            else:
                out = _block_attention(q, k, v, self.softmax_scale, dropout_p, documents[:, 0])
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)

    def _documents(self, attention_mask: Optional[Tensor], query: Tensor) -> Optional[Tensor]:
        """The document layout this layer was built for (class doc), checked."""
        if not self.document_masking:
            if attention_mask is not None:
                raise ValueError("SDPAttention was built without document masking (causal by construction) and "
                                 "takes no attention_mask; set data.document_masking: true to mask documents")
            return None
        cp = self.cp_group.size() if self.cp_group is not None else 1
        expected = (query.size(1), 2, query.size(0) * cp)
        if attention_mask is None or attention_mask.dtype.is_floating_point or tuple(attention_mask.shape) != expected:
            got = None if attention_mask is None else (tuple(attention_mask.shape), attention_mask.dtype)
            raise ValueError(f"SDPAttention with document masking needs the row's document layout [batch, 2, seq] = "
                             f"{list(expected)} (integer; model/gpt.py) as attention_mask, got {got}")
        return attention_mask
