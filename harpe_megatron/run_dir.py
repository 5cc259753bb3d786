"""The run directory: every path a run implies, named in one place.

::

    <run_dir>/config.yaml      the resolved config the run trains under (rank 0 writes it once the
                               resume checks and the checkpoint load succeeded; training/config_history.py)
    <run_dir>/config.<N>.yaml  an earlier one, in effect from step N (kept when the config changed)
    <run_dir>/metrics.jsonl    one strict-JSON object per step (step/metrics.py)
    <run_dir>/tensorboard/     TensorBoard event files (``logging.tensorboard``)
    <run_dir>/wandb/           W&B's own files (``logging.wandb_project``; W&B names this folder)
    <run_dir>/checkpoints/     the save directory, unless ``checkpoint.save`` points elsewhere; its
                               inside (``iter_*``, ``latest``, manifests) is checkpoint/layout.py's
    <run_dir>/.harpe.lock      held by rank 0 for the run's life (training/reliability/run_lock.py)
    <run_dir>/exit_code        the job's exit code, ``<code> <meaning>``: rank 0 removes it when a
                               launch starts and writes it when it exits
                               (training/reliability/exit_record.py; the codes: exit_codes.py)
    <run_dir>/<i>_<name>/      stage ``i`` of a multi-stage schedule, itself a run directory

Nothing here touches the disk: :class:`RunDir` only composes paths, so every module that reads or
writes one of these asks it instead of joining names of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["RunDir", "CONFIG_FILE", "METRICS_FILE", "TENSORBOARD_DIR", "CHECKPOINTS_DIR", "LOCK_FILE",
           "EXIT_CODE_FILE"]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
LOCK_FILE = ".harpe.lock"
EXIT_CODE_FILE = "exit_code"


class RunDir:
    """The paths of the run directory ``root`` (see the module docstring)."""

    __slots__ = ("root",)

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    @property
    def config(self) -> Path:
        """The resolved config of the run."""
        return self.root / CONFIG_FILE

    def earlier_config(self, label: str) -> Path:
        """An earlier resolved config of the run, ``config.<label>.yaml`` (label: the first step it
        applied to)."""
        return self.root / f"config.{label}.yaml"

    @property
    def metrics(self) -> Path:
        """The per-step metrics, one JSON object a line."""
        return self.root / METRICS_FILE

    @property
    def tensorboard(self) -> Path:
        """TensorBoard's event files."""
        return self.root / TENSORBOARD_DIR

    @property
    def checkpoints(self) -> Path:
        """The default save directory (``checkpoint.save`` unset)."""
        return self.root / CHECKPOINTS_DIR

    @property
    def lock(self) -> Path:
        """The file whose lock says a run is using this directory."""
        return self.root / LOCK_FILE

    @property
    def exit_code(self) -> Path:
        """Where the job's exit code is recorded."""
        return self.root / EXIT_CODE_FILE

    def stage(self, index: int, name: str) -> RunDir:
        """The run directory of stage ``index`` (named ``name``) of a multi-stage schedule."""
        return RunDir(self.root / f"{index}_{name}")
