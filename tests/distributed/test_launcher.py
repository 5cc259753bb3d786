"""scripts/pretrain_harpe.sh in the three forms users type, each with 2 gloo ranks:

    bash scripts/pretrain_harpe.sh [overrides]                           (starts torchrun itself)
    torchrun --nproc-per-node 2 scripts/pretrain_harpe.sh [overrides]    (torchrun runs it as Python)
    torchrun --nproc-per-node 2 --no-python scripts/pretrain_harpe.sh    (torchrun runs it as a program)

All three train the same tiny model on the same data: the losses in metrics.jsonl must be equal.
The first exits with the job's code: an input error found before training is one line and 2.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harpe_megatron.distributed.bringup import free_port
from tests.distributed.reliability_launch import LAUNCHER, REPO, launcher_env, read_metrics
from tests.helpers import tiny_run_overrides

pytestmark = pytest.mark.distributed

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
STEPS = 3


def _launch(form: str, run_dir: Path, demo_data: dict) -> dict[int, dict]:
    port = str(free_port())
    overrides = tiny_run_overrides(demo_data, STEPS) + [f"run_dir={run_dir}", "checkpoint.save_interval=0"]
    env = launcher_env(str(run_dir), GPUS_PER_NODE="2", MASTER_PORT=port)
    torchrun = [TORCHRUN, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", port]
    command = {
        "bash": ["bash", str(LAUNCHER)],
        "torchrun": [*torchrun, str(LAUNCHER)],
        "torchrun_no_python": [*torchrun, "--no-python", str(LAUNCHER)],
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


def test_launcher_input_error_is_one_line_and_exit_2(demo_data, tmp_path):
    """A missing tokenizer (the data step not run yet): both ranks find it; rank 0 prints one line,
    no traceback, no torchrun report; the launcher exits 2 and nothing is written."""
    run = tmp_path / "run"
    overrides = tiny_run_overrides(demo_data, STEPS) + [f"run_dir={run}",
                                                        f"data.tokenizer_model={tmp_path / 'no.model'}"]
    env = launcher_env(str(run), GPUS_PER_NODE="2", MASTER_PORT=str(free_port()))
    done = subprocess.run(["bash", str(LAUNCHER), *overrides], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"[harpe] error: data.tokenizer_model: {tmp_path / 'no.model'} does not exist"), done.stderr
    assert not run.exists()
