"""The zigzag CP layout agrees with megatron-core's get_batch_on_this_cp_rank."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from megatron.core.utils import get_batch_on_this_cp_rank

from harpe_megatron.parallel.cp_layout import zigzag_layout
from harpe_megatron.parallel.zigzag import slice_for_cp_rank, zigzag_positions
from tests.helpers import FakeGroup


def megatron_cp_split(batch: dict, group, monkeypatch) -> dict:
    """megatron-core's split; 0.19 added a required ``is_hybrid_cp`` argument (False: plain CP)
    and reads the group through ``torch.distributed`` (0.16.1 only once it is initialised)."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: group.size())
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: group.rank())
    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
        return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=group)
    return get_batch_on_this_cp_rank(batch, cp_group=group)


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_matches_megatron_batch_split(cp_size, monkeypatch):
    seq = 8 * cp_size
    tokens = torch.arange(2 * seq).reshape(2, seq)
    shares = []
    for r in range(cp_size):
        ref = megatron_cp_split({"tokens": tokens.clone()}, FakeGroup(r, cp_size), monkeypatch)["tokens"]
        ours = slice_for_cp_rank(tokens, 1, r, cp_size)
        assert torch.equal(ours, ref)
        assert torch.equal(zigzag_positions(seq, r, cp_size), ref[0])
        shares.append(ours)
    assert torch.equal(torch.cat(shares, dim=1)[:, np.argsort(zigzag_layout(seq, cp_size).reshape(-1))], tokens)


def test_indivisible_length_is_an_error():
    with pytest.raises(ValueError, match="divisible by 2 \\* context_parallel_size = 4"):
        slice_for_cp_rank(torch.zeros(1, 6), 1, 0, 2)
