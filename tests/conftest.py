"""Shared fixtures: a one-rank gloo process group for in-process megatron tests, tiny models."""

from __future__ import annotations

import pytest
import torch

from harpe_megatron.testing.distributed import free_port, init_gloo


class FakeGroup:
    """Stands in for a process group where only ``rank()``/``size()`` are read (table slicing)."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


@pytest.fixture(scope="session")
def single_rank():
    """A gloo process group of one rank for this pytest process (megatron needs one)."""
    init_gloo(0, 1, free_port())
    yield


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small real demo build (corpus from text on this machine, tokenizer, indexed dataset)."""
    from harpe_megatron.data.demo import prepare_demo_data

    out = prepare_demo_data(tmp_path_factory.mktemp("demo_data"), vocab_size=512, max_docs=300,
                            progress=False, log=lambda msg: None)
    return out.as_dict()
