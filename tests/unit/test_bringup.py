"""The one bring-up: device choice, seeding, and the CPU backend entered only for device cpu."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from harpe_megatron.config.loader import ConfigError, config_from_dict
from harpe_megatron.distributed.bringup import current_device, megatron_parallel, resolve_device
from tests.helpers import process_threads


def test_device_setting():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"device: expected one of \['auto', 'cuda', 'cpu'\], got 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: cuda was asked for but torch sees no CUDA device"):
            resolve_device("cuda")


def test_current_device():
    assert current_device() == (torch.cuda.current_device() if torch.cuda.is_available() else "cpu")


def test_training_device_is_validated_with_its_key():
    with pytest.raises(ConfigError, match=r"training\.device: expected auto, cuda or cpu, got 'gpu'"):
        config_from_dict({"training": {"train_iters": 1, "device": "gpu"}})


def test_cpu_bring_up_seeds_every_generator_and_announces_once(single_rank, caplog):
    draws = []
    for _ in range(2):
        with caplog.at_level(logging.INFO, logger="harpe"):
            with megatron_parallel(seed=7, device="cpu", announce=True) as device:
                assert device == "cpu"
                assert torch.cuda.current_device() == 0  # the redirection is active inside
                draws.append((torch.rand(3), random.random()))
    assert torch.equal(draws[0][0], draws[1][0]) and draws[0][1] == draws[1][1]
    lines = [r.getMessage() for r in caplog.records if r.name == "harpe.distributed.bringup"]
    assert lines == [lines[0]] * 2 and lines[0].startswith("device: cpu (gloo;")


def test_seed_none_leaves_the_generators_alone(single_rank):
    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    with megatron_parallel(seed=None, device="cpu"):
        assert torch.equal(torch.rand(2), expected)


def test_repeated_bring_ups_leave_no_groups_or_threads_behind(single_rank):
    """megatron forgets its sub-groups on destroy; the bring-up destroys them (each gloo group keeps
    polling threads alive: hundreds of bring-ups in one process used to starve the machine)."""
    groups = torch.distributed.distributed_c10d._world.pg_map  # torch's registry of live groups
    with megatron_parallel(device="cpu"):
        made = len(groups)
    before_groups, before_threads = len(groups), process_threads()
    assert made > before_groups + 5  # megatron made its sub-groups (the check below is not vacuous)
    for _ in range(3):
        with megatron_parallel(device="cpu"):
            pass
    assert len(groups) == before_groups
    assert process_threads() <= before_threads + 2
