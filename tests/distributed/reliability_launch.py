"""Start ``python -m harpe_megatron.train`` as N separate rank processes, like torchrun does.

Each rank gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT and its own log file,
so a test can send a signal to one rank, kill it, or read its exit code (torchrun would turn every
worker failure into its own exit code 1 and forward signals itself).

Every process of a launch (ranks and whatever they start) carries ``HARPE_TEST_LAUNCH=<marker>`` in
its environment, so :func:`leftover_processes` finds those that outlived the launch (orphans are
re-parented, so the process tree cannot tell).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from harpe_megatron.distributed.bringup import free_port
from tests.helpers import TINY_CPU_CONFIG, tiny_run_overrides

__all__ = ["LAUNCHER", "LAUNCH_MARKER", "Ranks", "launcher_env", "leftover_processes", "metric_lines",
           "multinode_overrides", "processes_with_env", "read_metrics", "start_launcher", "steps_since",
           "wait_for_text"]

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "scripts" / "pretrain_harpe.sh"
LAUNCH_MARKER = "HARPE_TEST_LAUNCH"
MULTINODE_STEPS = 16


def multinode_overrides(demo_data: dict, run_dir: Path) -> list[str]:
    """The run every multi-node test trains (tests/distributed/test_multinode.py, tests/slurm/): the
    tiny TP=2 model of configs/tiny_cpu.yaml on 2 ranks (one node of 2, or two nodes of 1),
    MULTINODE_STEPS steps, a checkpoint every 4, no memory plan (it only costs start-up time)."""
    return tiny_run_overrides(demo_data, MULTINODE_STEPS) + [
        "logging.log_interval=1", "checkpoint.save_interval=4", "checkpoint.keep_last=2", 'training.preflight="off"',
        "training.hang_timeout_s=60", "training.slow_phase_timeout_s=180", f"run_dir={run_dir}",
    ]


def launcher_env(marker: str, **env: str) -> dict[str, str]:
    """Environment for ``bash scripts/pretrain_harpe.sh`` in a test: this interpreter, the tiny CPU
    config, one thread per rank, ``HARPE_TEST_LAUNCH=marker``; nothing inherited that would change
    the launch (rank, node and fault variables)."""
    out = dict(os.environ, PYTHON=sys.executable, CONFIG=TINY_CPU_CONFIG, OMP_NUM_THREADS="1",
               **{LAUNCH_MARKER: marker})
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "HARPE_FAULT_INJECT", "MASTER_ADDR", "MASTER_PORT", "NNODES",
                 "NODE_RANK", "GPUS_PER_NODE", "LOGLEVEL"):
        out.pop(name, None)
    out.update(env)
    return out


def start_launcher(overrides: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """``bash scripts/pretrain_harpe.sh overrides`` with its output (both streams) in ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(["bash", str(LAUNCHER), *overrides], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def wait_for_text(path: Path, text: str, timeout: float, alive: Optional[subprocess.Popen] = None) -> float:
    """Block until ``text`` is in the file (while ``alive`` runs, if given); returns time.monotonic()."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text(errors="replace")):
        tail = path.read_text(errors="replace")[-3000:] if path.exists() else "(no file)"
        assert alive is None or alive.poll() is None, f"exited {alive.returncode} before {text!r}:\n{tail}"
        assert time.monotonic() < deadline, f"{text!r} not in {path} after {timeout:.0f} s:\n{tail}"
        time.sleep(0.1)
    return time.monotonic()


def processes_with_env(name: str, value: str) -> list[int]:
    """Pids of live (not zombie) processes whose environment has ``name=value``."""
    needle = f"{name}={value}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0") and \
                    (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":  # Z: exited, not reaped
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def leftover_processes(marker: str, grace_s: float = 10.0) -> list[str]:
    """``"pid cmdline"`` of live processes whose environment has ``HARPE_TEST_LAUNCH=marker``,
    after giving them ``grace_s`` seconds to exit."""
    deadline = time.monotonic() + grace_s
    while True:
        found = []
        for pid in processes_with_env(LAUNCH_MARKER, marker):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            found.append(f"{pid} {cmdline[:200]}")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


class Ranks:
    """``world`` rank processes of one training launch; logs in ``log_dir/rank_<r>.log``."""

    def __init__(self, config: str, overrides: list[str], log_dir: Path, world: int = 2,
                 fault: Optional[str] = None):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.marker = str(log_dir)
        port = free_port()
        self.logs = [log_dir / f"rank_{r}.log" for r in range(world)]
        self.procs: list[subprocess.Popen] = []
        for r in range(world):
            env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                       **{LAUNCH_MARKER: self.marker})
            env.pop("HARPE_FAULT_INJECT", None)
            if fault:
                env["HARPE_FAULT_INJECT"] = fault
            with open(self.logs[r], "w") as out:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "harpe_megatron.train", "--config", config, *overrides],
                    cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text()

    def wait_for(self, rank: int, text: str, timeout: float) -> float:
        """Block until ``text`` appears in the rank's log; returns time.monotonic() then."""
        deadline = time.monotonic() + timeout
        while text not in self.log(rank):
            if self.procs[rank].poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"rank {rank} never printed {text!r}; its log:\n{self.log(rank)[-3000:]}")
            time.sleep(0.05)
        return time.monotonic()

    def send(self, rank: int, sig: signal.Signals) -> None:
        self.procs[rank].send_signal(sig)

    def wait(self, timeout: float, ranks: Optional[list[int]] = None) -> list[Optional[int]]:
        """Exit codes of ``ranks`` (default all) once they exit; kills everything after ``timeout``."""
        ranks = list(range(len(self.procs))) if ranks is None else ranks
        deadline = time.monotonic() + timeout
        for r in ranks:
            try:
                self.procs[r].wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                logs = "\n".join(f"--- rank {q} ---\n{self.log(q)[-3000:]}" for q in range(len(self.procs)))
                raise AssertionError(f"rank {r} did not exit within {timeout:.0f} s\n{logs}") from None
        return [self.procs[r].returncode for r in ranks]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _not_strict_json(constant: str):
    raise ValueError(f"metrics.jsonl holds {constant}, which is not JSON")


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """step -> metrics from ``<run_dir>/metrics.jsonl`` (a later launch's line for a step wins)."""
    rows: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line, parse_constant=_not_strict_json)
        if "loss" in row:
            rows.setdefault(row["step"], {}).update(row)
    return rows



def metric_lines(run_dir: Path) -> int:
    """How many lines ``<run_dir>/metrics.jsonl`` has (0 if it does not exist yet)."""
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def steps_since(run_dir: Path, lines_before: int) -> list[int]:
    """The steps of the training lines written after the first ``lines_before`` lines: what one
    launch trained (its first is the step after the one it resumed from)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()[lines_before:]
    rows = [json.loads(line, parse_constant=_not_strict_json) for line in lines]
    return [row["step"] for row in rows if "loss" in row]
