"""Shared fixtures: a one-rank gloo process group for in-process megatron tests, tiny models."""

from __future__ import annotations

import pytest
import torch

from harpe_megatron.distributed.bringup import free_port, init_process_group
from tests.distributed.reliability_launch import (
    MULTINODE_STEPS,
    launcher_env,
    multinode_overrides,
    read_metrics,
    start_launcher,
)
from tests.helpers import process_threads


@pytest.fixture(scope="session")
def single_rank():
    """A gloo process group of one rank for this pytest process (megatron needs one)."""
    init_process_group("cpu", rank=0, world_size=1, port=free_port())
    yield


# Threads this pytest process may hold after a test module; it holds ~20 normally. Leaked gloo
# groups keep ~3 polling threads each, and a few thousand of them starved the multi-rank tests
# (docs/cpu_harness.md, "Sub-groups are destroyed on exit").
MAX_THREADS = 200


@pytest.fixture(scope="module", autouse=True)
def _no_thread_build_up(request):
    yield
    threads = process_threads()
    assert threads <= MAX_THREADS, (
        f"this pytest process holds {threads} threads after {request.module.__name__} (at most "
        f"{MAX_THREADS}): something keeps process groups or workers alive across tests")


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


@pytest.fixture(scope="session")
def one_node_reference(demo_data, tmp_path_factory):
    """Per-step metrics of the multi-node tests' run (tests/distributed/reliability_launch.py:
    multinode_overrides) on one node: ``bash scripts/pretrain_harpe.sh`` with 2 ranks, uninterrupted."""
    run = tmp_path_factory.mktemp("one_node") / "run"
    log = run.parent / "launcher.log"
    proc = start_launcher(multinode_overrides(demo_data, run), log,
                          launcher_env(str(run), GPUS_PER_NODE="2", MASTER_PORT=str(free_port())))
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    metrics = read_metrics(run)
    assert sorted(metrics) == list(range(1, MULTINODE_STEPS + 1))
    return metrics
