"""scripts/pretrain_harpe.sh in the three forms users type, each with 2 gloo ranks:

    bash scripts/pretrain_harpe.sh [overrides]                           (starts torchrun itself)
    torchrun --nproc-per-node 2 scripts/pretrain_harpe.sh [overrides]    (torchrun runs it as Python)
    torchrun --nproc-per-node 2 --no-python scripts/pretrain_harpe.sh    (torchrun runs it as a program)

All three train the same tiny model on the same data: the losses in metrics.jsonl must be equal.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harpe_megatron.distributed.bringup import free_port
from tests.distributed.reliability_launch import REPO, read_metrics
from tests.helpers import TINY_CPU_CONFIG, tiny_run_overrides

pytestmark = pytest.mark.distributed

LAUNCHER = str(REPO / "scripts" / "pretrain_harpe.sh")
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
STEPS = 3


def _launch(form: str, run_dir: Path, demo_data: dict) -> dict[int, dict]:
    port = str(free_port())
    overrides = tiny_run_overrides(demo_data, STEPS) + [f"run_dir={run_dir}", "checkpoint.save_interval=0"]
    env = dict(os.environ, CONFIG=TINY_CPU_CONFIG, PYTHON=sys.executable, GPUS_PER_NODE="2", MASTER_PORT=port,
               OMP_NUM_THREADS="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "HARPE_FAULT_INJECT"):
        env.pop(name, None)
    torchrun = [TORCHRUN, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", port]
    command = {
        "bash": ["bash", LAUNCHER],
        "torchrun": [*torchrun, LAUNCHER],
        "torchrun_no_python": [*torchrun, "--no-python", LAUNCHER],
    }[form] + overrides
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command[:6])} ... exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return read_metrics(run_dir)


def test_three_launch_forms_train_the_same(demo_data, tmp_path):
    losses = {}
    for form in ("bash", "torchrun", "torchrun_no_python"):
        records = _launch(form, tmp_path / form, demo_data)
        assert sorted(records) == list(range(1, STEPS + 1)), form
        losses[form] = [records[step]["loss"] for step in sorted(records)]
    assert losses["torchrun"] == losses["bash"] and losses["torchrun_no_python"] == losses["bash"], losses
