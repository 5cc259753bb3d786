"""Per-head rotary position tables for megatron-core's ``SelfAttention``.

Replaces megatron's ``RotaryEmbedding`` (one base, lru-cached, CUDA-bound). Conventions:

* Rotate-half (GPT-NeoX / HF Llama) layout by default: the angle table is
  ``cat(angles, angles)`` along the last dim, with ``angles[..., i] = pos * base_h^(-2i/d)``,
  ``i = 0..d/2-1``. ``rotary_interleaved=True`` gives the GPT-J layout instead. The table holds
  *angles*; megatron's apply path takes ``cos``/``sin`` of it.
* Head order is megatron's: query head ``h`` belongs to KV group ``h // (heads / groups)``; TP rank
  ``t`` owns query heads ``[t * np, (t+1) * np)`` and groups ``[t * ng, (t+1) * ng)``.
* Output is one tensor. MHA: ``[s, 1, np, d]`` (``[s, b, np, d]`` with per-sample position ids),
  which megatron's unfused ``apply_rotary_pos_emb`` broadcasts against q and k ``[s, b, heads, d]``.
  GQA: the query and key tables packed along the head axis, ``[s, 1, np + ng, d]``;
  :class:`~harpe_megatron.model.attention.HarpeSelfAttention` splits it into the
  ``(query_table, key_table)`` pair megatron's ``SelfAttention`` accepts. One tensor (not a
  tuple) is what megatron's activation checkpointing can save between layers.
* Positions are those of the tokens on this rank: the zigzag share of ``arange(S_global)`` under
  context parallelism (:mod:`harpe_megatron.parallel.zigzag`), or the given per-sample
  ``position_ids`` ``[b, s_local]`` (already sharded like the tokens; CREAM/PoSE).
* Frequencies and angles are fp32, recomputed on every call (cheap next to attention: one
  ``s x heads x d`` outer product per forward, shared by all layers), so nothing goes stale when
  the sequence length, the positions or the bases change.

Two ways to use it. The *table* path (:meth:`PerHeadRotaryEmbedding.forward`) builds the angle
table that megatron's unfused ``apply_rotary_pos_emb`` consumes — ``s x heads x d`` fp32, 2 GiB at
128k tokens and 32 heads, kept alive per layer by autograd as cos/sin. The *fused* path
(``positional.per_head_rope: fused``, the default) hands the layers only the positions
(:meth:`PerHeadRotaryEmbedding.rope_positions`, ``[s, b]``) and applies RoPE inside attention from
them and :meth:`PerHeadRotaryEmbedding.qk_inverse_frequencies` with
:func:`~harpe_megatron.positional.rope_apply.apply_per_head_rope` (Triton on CUDA).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from harpe_megatron.parallel.zigzag import zigzag_positions
from harpe_megatron.positional.bases import check_group_bases
from harpe_megatron.positional.rope_apply import apply_per_head_rope
from harpe_megatron.positional.scaling import NoScaling, RopeScaling

__all__ = ["PerHeadRotaryEmbedding", "split_rotary_table"]


class PerHeadRotaryEmbedding(nn.Module):
    """Rotary tables with one base per query head, for this TP rank's heads and CP rank's tokens.

    Args:
        head_bases: one base per query head of the whole model (megatron head order); heads of a
            KV group must share a value.
        head_dim: rotary dimension (``kv_channels``).
        num_query_groups: KV groups of the whole model.
        tp_rank, tp_size: tensor-parallel coordinates (heads are split across TP ranks).
        cp_group: context-parallel process group (``None`` or size 1: no CP).
        rotary_interleaved: GPT-J layout instead of rotate-half.
        scaling: frequency scaling (PI / NTK / YaRN) applied to every head with its own base.
    """

    def __init__(
        self,
        head_bases: Sequence[float],
        head_dim: int,
        num_query_groups: int,
        tp_rank: int = 0,
        tp_size: int = 1,
        cp_group: Optional[torch.distributed.ProcessGroup] = None,
        rotary_interleaved: bool = False,
        scaling: Optional[RopeScaling] = None,
    ) -> None:
        super().__init__()
        num_heads = len(head_bases)
        if num_heads % num_query_groups or num_heads % tp_size or num_query_groups % tp_size:
            raise ValueError(
                f"{num_heads} heads / {num_query_groups} KV groups cannot be split over TP={tp_size}"
            )
        per_group = num_heads // num_query_groups
        check_group_bases(head_bases, num_query_groups, "head_bases")
        self.head_bases = [float(b) for b in head_bases]
        self.head_dim = head_dim
        self.rotary_interleaved = rotary_interleaved
        self.scaling = scaling if scaling is not None else NoScaling()
        self.cp_group = cp_group
        np_local = num_heads // tp_size
        # Bases are kept as Python floats, not float buffers: megatron's Float16Module casts every
        # floating buffer to bf16, which would ruin the frequencies. They are turned into fp32
        # inverse frequencies on the target device at each call ([heads, d/2]: negligible).
        self.local_q_bases = self.head_bases[tp_rank * np_local : (tp_rank + 1) * np_local]
        self.local_k_bases = self.local_q_bases[::per_group]
        self.shared_qk = per_group == 1
        self._inv_freq_cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _cp(self) -> tuple[int, int]:
        if self.cp_group is None:
            return 0, 1
        return self.cp_group.rank(), self.cp_group.size()

    def positions(self, seq_len: int, device: torch.device) -> Tensor:
        """fp32 positions ``[s_local]`` of this CP rank's tokens for a global length ``seq_len``."""
        cp_rank, cp_size = self._cp()
        return zigzag_positions(seq_len, cp_rank, cp_size, device=device).to(torch.float32)

    def _table(self, pos: Tensor, bases: list[float]) -> Tensor:
        # pos: [s, B] fp32; inv_freq: [h, d/2] -> angles [s, B, h, d/2]
        inv_freq = self.scaling.inverse_frequencies(bases, self.head_dim).to(pos.device)
        angles = pos[:, :, None, None] * inv_freq[None, None]
        if self.rotary_interleaved:
            return angles.repeat_interleave(2, dim=-1)
        return torch.cat((angles, angles), dim=-1)

    def rope_positions(
        self,
        seq_len: int,
        position_ids: Optional[Tensor] = None,
        device: Optional[torch.device] = None,
    ) -> Tensor:
        """fp32 positions ``[s_local, b]`` (``[s_local, 1]`` when shared by the batch) of this
        rank's tokens: the zigzag share of ``0..seq_len-1``, or ``position_ids`` transposed."""
        device = device if device is not None else torch.device("cpu")
        if position_ids is None:
            return self.positions(seq_len, device)[:, None]
        _, cp_size = self._cp()
        if position_ids.dim() != 2 or position_ids.size(1) * cp_size != seq_len:
            raise ValueError(
                f"position_ids must be [batch, {seq_len // cp_size}] (this CP rank's tokens), "
                f"got {tuple(position_ids.shape)}"
            )
        return position_ids.to(device=device, dtype=torch.float32).t()

    def qk_inverse_frequencies(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """fp32 ``(query [np, d/2], key [ng, d/2])`` inverse frequencies of this TP rank's heads,
        scaling applied (cached per device: bases and scaling are fixed at construction)."""
        device = torch.device(device)
        if device not in self._inv_freq_cache:
            q = self.scaling.inverse_frequencies(self.local_q_bases, self.head_dim).to(device)
            k = q if self.shared_qk else self.scaling.inverse_frequencies(self.local_k_bases, self.head_dim).to(device)
            self._inv_freq_cache[device] = (q, k)
        return self._inv_freq_cache[device]

    def rotate_qk(self, query: Tensor, key: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """The fused path: rotate megatron's ``query`` ``[s, b, np, d]`` and ``key`` ``[s, b, ng, d]``
        by ``positions`` (:meth:`rope_positions`); the YaRN attention factor is not applied here
        (it is in the softmax scale, see model/builder.py)."""
        inv_q, inv_k = self.qk_inverse_frequencies(query.device)
        positions = positions.to(query.device)
        query = apply_per_head_rope(query, positions, inv_q, interleaved=self.rotary_interleaved)
        key = apply_per_head_rope(key, positions, inv_k, interleaved=self.rotary_interleaved)
        return query, key

    def forward(
        self,
        seq_len: int,
        position_ids: Optional[Tensor] = None,
        device: Optional[torch.device] = None,
    ) -> Tensor:
        """Angle tables for a global sequence of ``seq_len`` tokens (the table path, see the
        module docstring).

        Args:
            seq_len: global sequence length (all CP ranks together).
            position_ids: optional ``[b, s_local]`` positions of this rank's tokens.
            device: where to build the tables (default: CPU).
        """
        pos = self.rope_positions(seq_len, position_ids, device)
        q_table = self._table(pos, self.local_q_bases)
        if self.shared_qk:
            return q_table
        return torch.cat([q_table, self._table(pos, self.local_k_bases)], dim=2)

    def split(self, table: Tensor) -> tuple[Tensor, Tensor]:
        """``(query_table, key_table)`` from :meth:`forward`'s output."""
        return split_rotary_table(table, len(self.local_q_bases), len(self.local_k_bases))


def split_rotary_table(table: Tensor, np_local: int, ng_local: int) -> tuple[Tensor, Tensor]:
    """Query and key tables from a (possibly packed) per-head table, see the module docstring."""
    if table.size(2) == np_local:
        return table, table
    if table.size(2) != np_local + ng_local:
        raise ValueError(f"rotary table has {table.size(2)} heads, expected {np_local} or {np_local + ng_local}")
    return table[:, :, :np_local], table[:, :, np_local:]
