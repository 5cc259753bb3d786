"""``scripts/slurm/pretrain_harpe.sbatch`` on a real Slurm cluster: two emulated nodes on this host,
one rank per node (the tiny TP=2 model split across the nodes, gloo), the template itself with
CPU settings on sbatch's command line and in the environment.

Every job's per-step losses, across all its launches, must equal those of the same run on one
node without interruption (``one_node_reference``), bitwise. What each test shows, and the times it
measures, are in docs/reliability.md ("Slurm and multi-node").
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from harpe_megatron.distributed.bringup import free_port
from harpe_megatron.training.reliability.exit_codes import PEER_FAILURE_EXIT_CODE, PREEMPTED_EXIT_CODE
from tests.distributed.reliability_launch import (
    LAUNCH_MARKER,
    REPO,
    launcher_env,
    multinode_overrides,
    processes_with_env,
    read_metrics,
    wait_for_text,
)
from tests.slurm.conftest import GRACE_TIME_S

pytestmark = pytest.mark.distributed

SBATCH = REPO / "scripts" / "slurm" / "pretrain_harpe.sbatch"
# A lost rank is named by the watchdog within 3 x its heartbeat interval + 1 s of the failed
# collective (16 s with training.hang_timeout_s=60, docs/reliability.md); then the launcher exits.
LOST_NODE_BOUND_S = 16 + 10


def _submit(slurm, out: Path, marker: str, *args: str) -> int:
    """The template on 2 nodes x 1 rank (no GPUs, one CPU per task, 30 min), output to ``out``."""
    env = launcher_env(marker, GPUS_PER_NODE="1", MASTER_PORT=str(free_port()))
    return slurm.sbatch("--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=30", f"--output={out}",
                        f"--job-name={marker}", *args, cwd=REPO, env=env)


def _count(out: Path, text: str) -> int:
    return out.read_text(errors="replace").count(text) if out.exists() else 0


def _wait_count(out: Path, text: str, n: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while _count(out, text) < n:
        assert time.monotonic() < deadline, f"{text!r} not {n} times in {out} after {timeout:.0f} s:\n" \
                                            f"{out.read_text(errors='replace')[-3000:] if out.exists() else ''}"
        time.sleep(0.2)
    return time.monotonic()


def _step(n: int) -> str:
    return f"step {n:6d}/"


def _latest(run: Path) -> int:
    return int((run / "checkpoints" / "latest").read_text().split("_")[1])


def _ranks_of(job: int) -> list[int]:
    """Pids of the job's rank processes (not the launchers)."""
    pids = []
    for pid in processes_with_env("SLURM_JOB_ID", str(job)):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"harpe_megatron.train" in argv and b"harpe_megatron.cli.launch" not in argv:
            pids.append(pid)
    return pids


def _assert_losses_equal(run: Path, reference: dict) -> None:
    losses = {s: m["loss"] for s, m in read_metrics(run).items()}
    assert losses == {s: m["loss"] for s, m in reference.items()}


def _assert_nothing_left(job: int, marker: str) -> None:
    deadline = time.monotonic() + 15
    while (left := processes_with_env("SLURM_JOB_ID", str(job)) + processes_with_env(LAUNCH_MARKER, marker)) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == [], f"processes of job {job} outlived it: {left}"


def test_time_limit_warning_and_preemption_requeue_and_resume(slurm, demo_data, one_node_reference, tmp_path):
    """One job, three launches across both nodes:

    1. the time-limit warning (the template's --signal=B:USR1@300; the test shortens the job's
       limit to 5 min once training runs, so the warning is due at Slurm's next check, and holds
       the ranks still until it comes, up to 30 s, so that the short run cannot end first): every
       rank saves, the job requeues itself (75) and the next launch resumes from `latest`;
    2. preemption by a job of the higher-priority partition (SIGTERM): every rank saves within
       GraceTime, Slurm requeues the job; the preempting job has a config error: one line, exit 2,
       not requeued;
    3. the last launch finishes. Losses equal the one-node run's."""
    run, out, marker = tmp_path / "run", tmp_path / "job.out", f"slurm-{tmp_path.name}"
    times = {}
    job = _submit(slurm, out, marker, str(SBATCH), *multinode_overrides(demo_data, run))

    # launch 1: the time limit comes near
    wait_for_text(out, _step(4), timeout=300)
    ranks = _ranks_of(job)
    assert len(ranks) == 2, ranks
    for pid in ranks:
        os.kill(pid, signal.SIGSTOP)
    shortened = time.monotonic()
    try:
        slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=5")
        warned = wait_for_text(out, "[sbatch] SIGUSR1", timeout=90)
    finally:
        for pid in ranks:
            os.kill(pid, signal.SIGCONT)
    times["time limit shortened -> warning (Slurm's check period)"] = warned - shortened
    saved = _wait_count(out, f"[pretrain_harpe] exit {PREEMPTED_EXIT_CODE} ", 2, timeout=120)
    times["warning -> every rank saved, launcher exit 75"] = saved - warned
    slurm.wait_job(job, {"PENDING"}, timeout=60, restarts=1)
    requeued = time.monotonic()
    times["saved -> requeued by the template"] = requeued - saved
    slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=30")  # the next launch is not near its limit
    first = _latest(run)
    assert 4 <= first < 16
    resumed = _wait_count(out, f"resumed from {run / 'checkpoints' / f'iter_{first:07d}'} ", 1, timeout=300)
    times["requeued -> resumed (cred_expire 10 s + start-up)"] = resumed - requeued

    # launch 2: preempted by a job of the urgent partition (with a config error)
    _wait_count(out, _step(first + 2), 1, timeout=300)
    bad_out = tmp_path / "urgent.out"
    urgent = _submit(slurm, bad_out, f"{marker}-urgent", "--partition=urgent", str(SBATCH),
                     *multinode_overrides(demo_data, tmp_path / "urgent_run"), "training.lr=oops")
    preempted = time.monotonic()
    saved = _wait_count(out, f"[pretrain_harpe] exit {PREEMPTED_EXIT_CODE} ", 4, timeout=120)
    times["preemption -> every rank saved, launcher exit 75"] = saved - preempted
    assert saved - preempted < GRACE_TIME_S
    assert _count(out, "received SIGTERM") >= 2
    slurm.wait_job(job, {"PENDING"}, timeout=GRACE_TIME_S + 30, restarts=2)
    times["preemption -> requeued"] = time.monotonic() - preempted
    second = _latest(run)
    assert first < second < 16
    info = slurm.wait_job(urgent, {"FAILED", "COMPLETED"}, timeout=300)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), info
    text = bad_out.read_text()
    assert text.count("config error:") == 1 and "training.lr: expected a number, got 'oops'" in text, text
    assert "Traceback" not in text and not (tmp_path / "urgent_run").exists()

    # launch 3: resumes and finishes
    resumed = _wait_count(out, f"resumed from {run / 'checkpoints' / f'iter_{second:07d}'} ", 1, timeout=300)
    times["preemption -> resumed (the preempting job ran first)"] = resumed - preempted
    info = slurm.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "2"), out.read_text()[-3000:]
    assert (run / "exit_code").read_text().startswith("0 ")
    _assert_losses_equal(run, one_node_reference)
    _assert_nothing_left(job, marker)
    print("\n" + "\n".join(f"  {k}: {v:.1f} s" for k, v in times.items()))


def test_scancel_and_a_lost_node_keep_a_loadable_checkpoint(slurm, demo_data, one_node_reference, tmp_path):
    """scancel: every rank saves (SIGTERM), the job ends CANCELLED and is not requeued, nothing is
    left. A new job resumes from that checkpoint; its second node dies (slurmd, step daemon and
    rank killed): the rank on the first node exits 76 within the watchdog's bound naming rank 1,
    Slurm requeues the job (node failure), and once the node is back the job resumes from
    `latest` and finishes. Losses equal the one-node run's."""
    run, marker = tmp_path / "run", f"slurm-{tmp_path.name}"
    times = {}
    out = tmp_path / "cancelled.out"
    job = _submit(slurm, out, marker, str(SBATCH), *multinode_overrides(demo_data, run))
    wait_for_text(out, _step(6), timeout=300)
    slurm.run("scancel", str(job))
    cancelled = time.monotonic()
    saved = _wait_count(out, f"exiting with code {PREEMPTED_EXIT_CODE}", 2, timeout=120)
    times["scancel -> both ranks saved"] = saved - cancelled
    info = slurm.wait_job(job, {"CANCELLED"}, timeout=120)
    times["scancel -> job ended"] = time.monotonic() - cancelled
    assert info["Restarts"] == "0" and _count(out, "requeueing") == 0, out.read_text()[-3000:]
    assert _count(out, f"exiting with code {PREEMPTED_EXIT_CODE}") == 2, out.read_text()[-3000:]  # both ranks saved
    _assert_nothing_left(job, marker)
    kept = _latest(run)
    assert 6 <= kept < 16

    out = tmp_path / "node_lost.out"
    job = _submit(slurm, out, marker, str(SBATCH), *multinode_overrides(demo_data, run))
    _wait_count(out, f"resumed from {run / 'checkpoints' / f'iter_{kept:07d}'} ", 1, timeout=300)
    next_save = (kept // 4 + 1) * 4
    wait_for_text(out, _step(next_save + 1), timeout=300)
    slurm.kill_node("n2")
    lost = time.monotonic()
    ended = _wait_count(out, f"[pretrain_harpe] exit {PEER_FAILURE_EXIT_CODE} ", 1, timeout=120)
    times["node lost -> rank 0 exits 76"] = ended - lost
    assert ended - lost < LOST_NODE_BOUND_S
    assert re.search(r"because rank 1 \(host \S+, pid \d+, last at step \d+ in \w+\) has exited", out.read_text())
    slurm.wait_job(job, {"PENDING"}, timeout=120, restarts=1)
    times["node lost -> node DOWN, job requeued (SlurmdTimeout 10 s)"] = time.monotonic() - lost
    assert processes_with_env("SLURMD_NODENAME", "n2") == []
    assert _latest(run) >= next_save
    slurm.restart_node("n2")
    restarted = time.monotonic()
    _wait_count(out, "resumed from", 1 + 1, timeout=300)
    times["node back -> resumed"] = time.monotonic() - restarted
    info = slurm.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), out.read_text()[-3000:]
    _assert_losses_equal(run, one_node_reference)
    _assert_nothing_left(job, marker)
    print("\n" + "\n".join(f"  {k}: {v:.1f} s" for k, v in times.items()))
