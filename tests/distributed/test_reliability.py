"""Fault injection against the real entry point (``python -m harpe_megatron.train``, 2 gloo ranks).

Every run trains the tiny TP=2 model of configs/tiny_cpu.yaml for 12 steps on the demo data; the
faults come from signals, killed processes, truncated files and ``HARPE_FAULT_INJECT``
(harpe_megatron/training/reliability/faults.py). What each test shows is listed in docs/reliability.md.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest

from harpe_megatron.config import load_config
from harpe_megatron.distributed.bringup import free_port
from harpe_megatron.training.reliability.exit_codes import (
    NONFINITE_EXIT_CODE,
    PEER_FAILURE_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
)
from tests.distributed.reliability_launch import (
    Ranks,
    launcher_env,
    leftover_processes,
    metric_lines,
    read_metrics,
    start_launcher,
    steps_since,
    wait_for_text,
)
from tests.helpers import TINY_CPU_CONFIG as CONFIG
from tests.helpers import tiny_run_overrides

pytestmark = pytest.mark.distributed

STEPS = 12
LOSS_ATOL = 5e-5  # as tests/distributed/test_training.py (same layout: in practice bitwise)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_data):
    """Overrides shared by every run, and an uninterrupted run's per-step metrics."""
    root = tmp_path_factory.mktemp("reliability")
    base = tiny_run_overrides(demo_data, STEPS) + [
        "logging.log_interval=1", "checkpoint.save_interval=4", "checkpoint.keep_last=2",
        # generous: the suite shares a small machine; the frozen-rank test sets its own short limit
        "training.hang_timeout_s=60", "training.slow_phase_timeout_s=120",
    ]
    run = root / "reference"
    ranks = Ranks(CONFIG, base + [f"run_dir={run}"], run / "logs")
    assert ranks.wait(timeout=240) == [0, 0], ranks.log(0)
    metrics = read_metrics(run)
    assert sorted(metrics) == list(range(1, STEPS + 1))
    return base, root, metrics


def _assert_resumed_equal(run: Path, reference: dict, first: int, lines_before: int) -> None:
    """The launch that wrote metrics.jsonl after its first ``lines_before`` lines resumed at step
    ``first`` (it trained first..STEPS) and reproduced the uninterrupted run's losses."""
    assert steps_since(run, lines_before) == list(range(first, STEPS + 1))
    metrics = read_metrics(run)
    for s in range(first, STEPS + 1):
        assert metrics[s]["loss"] == pytest.approx(reference[s]["loss"], abs=LOSS_ATOL), f"step {s}"


def _latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


def test_sigterm_on_one_rank_saves_and_resumes(reference):
    """SIGTERM to rank 1 only: both ranks stop after the same step, save it, exit 75; a restart
    resumes there and reproduces the uninterrupted losses."""
    base, root, ref = reference
    run = root / "sigterm"
    overrides = base + [f"run_dir={run}", "checkpoint.save_interval=0"]
    ranks = Ranks(CONFIG, overrides, run / "logs1")
    ranks.wait_for(0, "step      3/", timeout=240)
    ranks.send(1, signal.SIGTERM)
    assert ranks.wait(timeout=120) == [PREEMPTED_EXIT_CODE] * 2, ranks.log(0)
    assert "rank 1: received SIGTERM" in ranks.log(1)
    saved = int(_latest(run).split("_")[1])
    assert 3 <= saved < STEPS
    assert sorted(read_metrics(run)) == list(range(1, saved + 1))  # stopped after the step it saved

    lines = metric_lines(run)
    again = Ranks(CONFIG, overrides, run / "logs2")
    assert again.wait(timeout=240) == [0, 0], again.log(0)
    _assert_resumed_equal(run, ref, saved + 1, lines)


def test_rank_killed_mid_save_keeps_previous_checkpoint(reference):
    """Rank 1 dies half-way through saving step 8: 'latest' still names step 4, rank 0 exits 76
    naming rank 1, the next start reports the partial directory and resumes from step 4."""
    base, root, ref = reference
    run = root / "crash_in_save"
    ranks = Ranks(CONFIG, base + [f"run_dir={run}"], run / "logs1", fault="crash_in_save@8:1")
    codes = ranks.wait(timeout=240)
    assert codes == [PEER_FAILURE_EXIT_CODE, 137], ranks.log(0)
    assert "rank 1 (host" in ranks.log(0) and "has exited" in ranks.log(0)
    assert leftover_processes(ranks.marker) == []  # no checkpoint-writer helper or tracker outlives a dead rank
    assert _latest(run) == "iter_0000004"
    assert (run / "checkpoints" / "iter_0000008.tmp").is_dir()

    lines = metric_lines(run)
    again = Ranks(CONFIG, base + [f"run_dir={run}"], run / "logs2")
    assert again.wait(timeout=240) == [0, 0], again.log(0)
    assert f"ignoring partial checkpoint {run / 'checkpoints' / 'iter_0000008.tmp'}" in again.log(0)
    _assert_resumed_equal(run, ref, 5, lines)  # from step 4
    assert not (run / "checkpoints" / "iter_0000008.tmp").exists()  # cleared by the next save


def test_nan_loss_skipped_then_abort(reference):
    """NaN loss at step 3: skipped (no update, LR schedule held), counted, training goes on with
    finite losses; NaN at 6, 7, 8 with max_consecutive_nonfinite_steps=2 aborts with exit 77."""
    base, root, ref = reference
    run = root / "nan"
    ranks = Ranks(CONFIG, base + [f"run_dir={run}", "training.max_consecutive_nonfinite_steps=2"], run / "logs",
                  fault="nan_loss@3;nan_loss@6,7,8")
    assert ranks.wait(timeout=240) == [NONFINITE_EXIT_CODE] * 2, ranks.log(0)
    log = ranks.log(0)
    assert ("steps 6-8 all had a non-finite loss or gradients, more than "
            "training.max_consecutive_nonfinite_steps=2") in log
    m = read_metrics(run)
    # metrics.jsonl is strict JSON: the NaN values are null and flagged
    assert m[3]["loss"] is None and m[3]["grad_norm"] is None and m[3]["skipped_steps"] == 1
    assert m[3]["nonfinite"] == {"loss": "nan", "grad_norm": "nan"} and m[3]["nonfinite_streak"] == 1
    assert [s for s in m if m[s]["loss"] is None] == [3, 6, 7, 8]
    for s in (1, 2):
        assert m[s]["loss"] == pytest.approx(ref[s]["loss"], abs=LOSS_ATOL)
    for s in (4, 5):  # finite, and on the reference's curve one update behind: between its losses
        # at steps s-1 and s, within 0.1 (measured: 6.116 at step 4 against 6.133 and 5.955)
        lo, hi = sorted((ref[s - 1]["loss"], ref[s]["loss"]))
        assert math.isfinite(m[s]["loss"]) and lo - 0.1 < m[s]["loss"] < hi + 0.1, (s, m[s]["loss"], lo, hi)
        assert math.isfinite(m[s]["grad_norm"])
    # the LR schedule did not advance at the skipped step: step 4 runs at step 3's LR
    assert m[4]["lr"] == pytest.approx(ref[3]["lr"]) and m[3]["lr"] == pytest.approx(ref[2]["lr"])
    assert m[8]["nonfinite_streak"] == 3 and m[8]["skipped_steps"] == 4
    assert _latest(run) == "iter_0000004"  # the last save before the abort is intact
    assert (run / "exit_code").read_text().startswith(f"{NONFINITE_EXIT_CODE} ")  # the job's code, by rank 0


def test_dead_rank_makes_the_other_exit(reference):
    """Rank 1 exits at step 5: rank 0 does not hang; it exits 76 naming rank 1."""
    base, root, _ = reference
    run = root / "dead"
    ranks = Ranks(CONFIG, base + [f"run_dir={run}"], run / "logs", fault="exit@5:1")
    died = ranks.wait_for(1, "rank 1 exits at step 5", timeout=240)
    assert ranks.wait(timeout=60) == [PEER_FAILURE_EXIT_CODE, 1], ranks.log(0)
    assert time.monotonic() - died < 30
    assert "because rank 1 (host" in ranks.log(0) and "last at step 5 in train) has exited" in ranks.log(0)
    assert leftover_processes(ranks.marker) == []
    assert (run / "exit_code").read_text().startswith(f"{PEER_FAILURE_EXIT_CODE} ")


def test_frozen_rank_makes_the_other_exit(reference):
    """Rank 1 freezes (SIGSTOP, heartbeat included) at step 5: after training.hang_timeout_s=8
    rank 0's watchdog names rank 1 and exits 76."""
    base, root, _ = reference
    run = root / "frozen"
    ranks = Ranks(CONFIG, base + [f"run_dir={run}", "training.hang_timeout_s=8"], run / "logs", fault="hang@5:1")
    try:
        frozen = ranks.wait_for(1, "rank 1 freezes at step 5", timeout=240)
        assert ranks.wait(timeout=60, ranks=[0]) == [PEER_FAILURE_EXIT_CODE], ranks.log(0)
        assert 7 <= time.monotonic() - frozen < 60
    finally:
        ranks.kill()
    log = ranks.log(0)
    assert "watchdog: rank 0" in log and "made no progress" in log and "training.hang_timeout_s" in log
    assert "suspect rank 1 (host" in log and "sent no heartbeat" in log


def test_truncated_checkpoint_file_falls_back_to_previous(reference):
    """A truncated file in the newest checkpoint: the start names it and resumes from the one
    before (losses as uninterrupted); a damaged file of the right size fails the load naming the
    checkpoint."""
    base, root, ref = reference
    run = root / "truncated"
    shutil.copytree(root / "reference" / "checkpoints", run / "checkpoints")
    assert _latest(run) == "iter_0000012"
    victim = run / "checkpoints" / "iter_0000012" / "__0_0.distcp"
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    overrides = base + [f"run_dir={run}"]
    ranks = Ranks(CONFIG, overrides, run / "logs1")
    assert ranks.wait(timeout=240) == [0, 0], ranks.log(0)
    log = ranks.log(0)
    assert (f"ignoring partial checkpoint {run / 'checkpoints' / 'iter_0000012'}: it has a truncated or damaged "
            f"file __0_0.distcp: {size // 2} bytes, harpe_manifest.json says {size}") in log
    assert "names 'iter_0000012', which has a truncated" in log
    _assert_resumed_equal(run, ref, 9, 0)  # from iter_0000008, the newest complete checkpoint

    # Same size, flipped exponent bits (bit rot): the manifest's CRC-32 names the file; the load
    # fails on every rank with one line, instead of resuming with weights from the optimizer's copy.
    newest = run / "checkpoints" / _latest(run)
    damaged = newest / "__0_0.distcp"
    with open(damaged, "r+b") as f:
        f.seek(damaged.stat().st_size // 2)
        chunk = bytearray(f.read(64))
        for i in range(3, len(chunk), 4):  # the high byte of each little-endian fp32: sign + exponent
            chunk[i] ^= 0x3C
        f.seek(damaged.stat().st_size // 2)
        f.write(chunk)
    record = (run / "config.yaml").read_text()
    # a config change a successful load would record
    failed = Ranks(CONFIG, overrides + ["logging.log_interval=2"], run / "logs2")
    assert failed.wait(timeout=240) == [1, 1], failed.log(0)
    for r in (0, 1):
        log = failed.log(r)
        assert (f"[harpe] error: checkpoint {newest} is damaged: {damaged}: damaged: its CRC-32 is ") in log, log
        assert f"Move {newest.name} out of {newest.parent}" in log and "Traceback" not in log
    assert (run / "config.yaml").read_text() == record  # a failed load leaves the run's record as it was
    assert sorted(p.name for p in run.glob("config*.yaml")) == ["config.yaml"]


def _cosine_lr(cfg, step: int, decay_steps: int) -> float:
    """The LR the step line reports after ``step`` (megatron's scheduler has then taken ``step``
    steps): linear warm-up, then cosine from ``training.lr`` to ``min_lr`` over ``decay_steps``."""
    t = cfg.training
    if step <= t.lr_warmup_iters:
        return t.lr * step / t.lr_warmup_iters
    ratio = (step - t.lr_warmup_iters) / (decay_steps - t.lr_warmup_iters)
    return t.min_lr + (t.lr - t.min_lr) * 0.5 * (1 + math.cos(math.pi * min(ratio, 1.0)))


def test_extending_a_finished_run_needs_the_schedule_override(reference):
    """A finished 12-step cosine run resumed with training.train_iters=14: refused on every rank
    (exit 2, one line naming the key, both values and the override) with the run's record
    untouched; with training.on_resume_change.schedule=config steps 13-14 follow the config's
    schedule (before, they kept the checkpoint's: min_lr), metrics.jsonl says what was applied and
    the earlier config is kept as config.1.yaml; a longer data.seq_length (by choice) resumes at
    the tokens already trained on."""
    base, root, ref = reference
    run = root / "extended"
    shutil.copytree(root / "reference", run, ignore=shutil.ignore_patterns("logs"))
    ckpt = run / "checkpoints" / "iter_0000012"
    record, lines = (run / "config.yaml").read_text(), metric_lines(run)
    assert record.startswith("# harpe: the resolved config of this run from step 1 on")
    cfg = load_config(CONFIG, base)
    assert cfg.training.lr_decay_style == "cosine" and cfg.training.lr_decay_iters is None
    assert ref[12]["lr"] == pytest.approx(_cosine_lr(cfg, 12, 12), rel=1e-9) == cfg.training.min_lr

    refused = Ranks(CONFIG, base + [f"run_dir={run}", "training.train_iters=14"], run / "logs1")
    assert refused.wait(timeout=240) == [2, 2], refused.log(0)
    log = refused.log(0)  # an error before training: one line, from rank 0
    assert (f"config error: resuming {ckpt} (step 12): training.train_iters is 14 in the config but 12 in the "
            "checkpoint: the learning-rate schedule or optimizer settings of the continued run would change. To "
            "go on, set training.on_resume_change.schedule=config") in log, log[-3000:]
    assert "Traceback" not in log + refused.log(1) and "config error" not in refused.log(1)
    assert (run / "config.yaml").read_text() == record and metric_lines(run) == lines
    assert sorted(p.name for p in run.glob("config*.yaml")) == ["config.yaml"]

    extended = Ranks(CONFIG, base + [f"run_dir={run}", "training.train_iters=14",
                                     "training.on_resume_change.schedule=config"], run / "logs2")
    assert extended.wait(timeout=240) == [0, 0], extended.log(0)
    assert steps_since(run, lines) == [13, 14]
    metrics = read_metrics(run)
    for s in (13, 14):
        assert metrics[s]["lr"] == pytest.approx(_cosine_lr(cfg, s, 14), rel=1e-9), s
    assert metrics[13]["lr"] > cfg.training.min_lr * 1.1
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()[lines:]]
    assert rows[0] == {"step": 12, "resume": {
        "checkpoint": str(ckpt), "step": 12, "consumed_samples": {"checkpoint": 96, "continued": 96},
        "changes": [{"key": "training.train_iters", "family": "schedule", "checkpoint": 12, "config": 14,
                     "applied": "config"}]}}
    assert ("resume: training.train_iters is 14 in the config, 12 in the checkpoint: the config's applies from "
            "step 13") in extended.log(0)
    assert (run / "config.1.yaml").read_text() == record
    now = (run / "config.yaml").read_text()
    assert now.startswith("# harpe: the resolved config of this run from step 13 on")
    assert load_config(run / "config.yaml").training.train_iters == 14

    # Sequences twice as long, by choice: the data position is re-timed to the tokens trained on
    # (112 samples of 64 tokens -> 56 of 128), not kept as a sample count of other data.
    lines = metric_lines(run)
    longer = Ranks(CONFIG, base + [f"run_dir={run}", "training.train_iters=16", "data.seq_length=128",
                                   "training.on_resume_change=config"], run / "logs3")
    assert longer.wait(timeout=240) == [0, 0], longer.log(0)
    assert steps_since(run, lines) == [15, 16]
    resume = json.loads((run / "metrics.jsonl").read_text().splitlines()[lines])["resume"]
    assert resume["consumed_samples"] == {"checkpoint": 112, "continued": 56}
    assert {(c["key"], c["checkpoint"], c["config"]) for c in resume["changes"]} == {
        ("training.train_iters", 14, 16), ("data.seq_length", 64, 128)}
    assert "at step 14 (56 samples consumed)" in longer.log(0)
    assert (run / "config.13.yaml").read_text() == now


def _launch_torchrun(run: Path, log: Path, overrides: list[str], fault: Optional[str] = None) -> subprocess.Popen:
    """scripts/pretrain_harpe.sh (torchrun) with 2 ranks; output to ``log``."""
    env = launcher_env(run.name, GPUS_PER_NODE="2", MASTER_PORT=str(free_port()))
    if fault:
        env["HARPE_FAULT_INJECT"] = fault
    return start_launcher([*overrides, f"run_dir={run}"], log, env)


@pytest.mark.parametrize("when", ["before_any_save", "after_a_save", "during_a_save"])
def test_torchrun_launcher_forwards_sigusr1(reference, tmp_path, when):
    """scripts/pretrain_harpe.sh under torchrun: SIGUSR1 to torchrun alone reaches both ranks
    (torchrun forwards it to each rank's whole process group and waits for them), which save and
    exit 75, and so does the launcher (the job's code; torchrun alone would exit 1). Also once a periodic checkpoint exists (megatron's writer used to
    keep a helper process per rank that died of the forwarded signal, failing the save) and while
    a periodic save is in progress; no process of the launch outlives it."""
    base, root, _ = reference
    run = root / f"torchrun_{when}"
    log = tmp_path / "torchrun.log"
    interval = 0 if when == "before_any_save" else 4
    fault = "slow_save@8" if when == "during_a_save" else None
    proc = _launch_torchrun(run, log, base + ["training.train_iters=40", f"checkpoint.save_interval={interval}"],
                            fault=fault)
    wait_for = {"before_any_save": "step      3/", "after_a_save": "step      6/",
                "during_a_save": "rank 0 pauses while saving"}[when]
    try:
        wait_for_text(log, wait_for, timeout=240, alive=proc)
        proc.send_signal(signal.SIGUSR1)  # the script exec'd torchrun: this is torchrun's pid
        assert proc.wait(timeout=120) == PREEMPTED_EXIT_CODE, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    # torch's elastic metrics wrapper (torch/distributed/elastic/metrics/api.py) assigns its timer
    # inside ``try:``; a signal handled just before that assignment surfaces as this
    # UnboundLocalError instead of torchrun's SignalException, and torchrun then stops the workers
    # with SIGTERM instead of forwarding SIGUSR1 (seen once in CI, torch 2.13). Both are preemption
    # signals: the ranks must save and exit 75 either way (the launcher's line names the error).
    torch_race = "UnboundLocalError: cannot access local variable 'start'" in text
    forwarded = "SIGTERM" if torch_race else "SIGUSR1"
    assert f"rank 0: received {forwarded}" in text and f"rank 1: received {forwarded}" in text, text[-3000:]
    assert text.count("exiting with code 75") == 2, text[-3000:]
    # after the race the launcher's last line names torchrun's error; the ranks must still report none
    assert "[harpe] error" not in text if torch_race else "Error" not in text, text[-3000:]
    saved = int(_latest(run).split("_")[1])
    assert {"before_any_save": 3, "after_a_save": 6, "during_a_save": 9}[when] <= saved < 40
    assert not any(p.name.endswith(".tmp") for p in (run / "checkpoints").iterdir())
    assert leftover_processes(run.name) == []


def test_disk_full_during_save_removes_the_partial_save(reference):
    """Rank 1's write of step 8 fails with ENOSPC (torch's CheckpointException, a BaseException):
    both ranks exit 1 with one line naming the checkpoint, the rank and the cause; iter_8.tmp is
    removed, 'latest' still names iter_4 and the next start resumes from it."""
    base, root, ref = reference
    run = root / "disk_full"
    ranks = Ranks(CONFIG, base + [f"run_dir={run}"], run / "logs1", fault="disk_full@8:1")
    assert ranks.wait(timeout=240) == [1, 1], ranks.log(0)
    line = (f"[harpe] error: saving checkpoint iter_0000008 into {run / 'checkpoints' / 'iter_0000008.tmp'} failed on "
            "rank 1: OSError: [Errno 28] No space left on device: ")
    for r in (0, 1):
        log = ranks.log(r)
        assert line in log and "; iter_0000008.tmp removed; 'latest' still names iter_0000004" in log, log[-3000:]
        assert "Traceback" not in log
    assert _latest(run) == "iter_0000004"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_0000004", "latest"]
    assert leftover_processes(ranks.marker) == []

    lines = metric_lines(run)
    again = Ranks(CONFIG, base + [f"run_dir={run}"], run / "logs2")
    assert again.wait(timeout=240) == [0, 0], again.log(0)
    _assert_resumed_equal(run, ref, 5, lines)  # from 'latest' = iter_0000004


def test_second_run_on_the_same_run_dir_is_refused(reference):
    """While a run holds its run_dir, a second launch on it exits 2 on every rank, rank 0 with one
    line naming the holder, and writes nothing; once the holder is killed (kill -9: no clean-up), the
    next launch takes the lock over, saying whose it was, and no process of the killed run is left."""
    base, root, _ = reference
    run = root / "locked"
    overrides = base + [f"run_dir={run}", "training.train_iters=400", "checkpoint.save_interval=0"]
    first = Ranks(CONFIG, overrides, run / "logs1")
    try:
        first.wait_for(0, "step      2/", timeout=240)
        second = Ranks(CONFIG, overrides, run / "logs2")
        assert second.wait(timeout=120) == [2, 2], second.log(0)
        log = second.log(0)
        assert (f"[harpe] error: run_dir {run} is in use by another run (host ") in log, log[-3000:]
        assert f"pid {first.procs[0].pid}" in log and "set another run_dir" in log
        assert "in use" not in second.log(1) and "Traceback" not in log + second.log(1)
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, len(steps) + 1))  # only the first run's lines
    finally:
        for p in first.procs:
            p.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert leftover_processes(first.marker) == []
    third = Ranks(CONFIG, base + [f"run_dir={run}", "training.train_iters=2", "checkpoint.save_interval=0"],
                  run / "logs3")
    assert third.wait(timeout=240) == [0, 0], third.log(0)
    log = third.log(0)
    assert "taking over the lock left by a run that did not end cleanly" in log
    assert f"pid {first.procs[0].pid}" in log
    assert (run / ".harpe.lock").read_text() == ""  # a clean end leaves no record


def test_world_size_the_batch_cannot_divide_is_one_line_exit_2(reference):
    """A global batch that the world's data-parallel size cannot divide: every rank finds it and
    exits 2 before the run directory exists; rank 0 prints the one 'config error' line."""
    base, root, _ = reference
    run = root / "bad_batch"
    ranks = Ranks(CONFIG, base + [f"run_dir={run}", "training.micro_batch_size=3"], root / "bad_batch_logs")
    assert ranks.wait(timeout=120) == [2, 2], ranks.log(0)
    assert ("config error: training.global_batch_size (8) must be divisible by training.micro_batch_size (3) "
            "x data-parallel size (1)") in ranks.log(0), ranks.log(0)[-3000:]
    assert "config error" not in ranks.log(1) and "Traceback" not in ranks.log(0) + ranks.log(1)
    assert not run.exists()
