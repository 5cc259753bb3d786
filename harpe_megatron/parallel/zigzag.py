"""The zigzag (load-balanced) context-parallel layout, in one place.

Convention (identical to megatron-core's ``get_batch_on_this_cp_rank`` and
``get_pos_emb_on_this_cp_rank``): a global sequence of length S is cut into ``2 * cp`` equal
chunks of ``c = S / (2 * cp)`` tokens; CP rank ``r`` holds chunks ``r`` and ``2 * cp - 1 - r``,
concatenated in that order. Under causal attention every rank then does the same amount of work.

Used by the rotary tables (positions of this rank's tokens), the context-parallel attention
(restoring natural order after an all-gather of K/V) and the data pipeline (splitting batches).
"""

from __future__ import annotations

import torch

__all__ = [
    "zigzag_chunk_ids",
    "zigzag_positions",
    "slice_for_cp_rank",
]


def zigzag_chunk_ids(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """Global chunk indices (out of ``2 * cp_size``) held by ``cp_rank``, in local order."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, {cp_size}), got {cp_rank}")
    return cp_rank, 2 * cp_size - 1 - cp_rank


def _chunk_len(seq_len: int, cp_size: int) -> int:
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq_len} must be divisible by 2 * context_parallel_size = {2 * cp_size}"
        )
    return seq_len // (2 * cp_size)


def zigzag_positions(
    seq_len: int, cp_rank: int, cp_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Global positions (int64, shape ``[seq_len / cp_size]``) of the tokens held by ``cp_rank``."""
    if cp_size == 1:
        return torch.arange(seq_len, device=device)
    c = _chunk_len(seq_len, cp_size)
    first, second = zigzag_chunk_ids(cp_rank, cp_size)
    return torch.cat(
        [torch.arange(first * c, (first + 1) * c, device=device),
         torch.arange(second * c, (second + 1) * c, device=device)]
    )


def slice_for_cp_rank(t: torch.Tensor, seq_dim: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """This rank's zigzag share of ``t`` (global sequence along ``seq_dim``)."""
    if cp_size == 1:
        return t
    c = _chunk_len(t.size(seq_dim), cp_size)
    first, second = zigzag_chunk_ids(cp_rank, cp_size)
    return torch.cat(
        [t.narrow(seq_dim, first * c, c), t.narrow(seq_dim, second * c, c)], dim=seq_dim
    )
