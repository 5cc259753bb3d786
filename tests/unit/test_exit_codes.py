"""The job's exit code from its ranks' codes, and where the ranks record theirs
(harpe_megatron/training/reliability/exit_codes.py, exit_record.py, cli/launch.py)."""

from __future__ import annotations

import pytest

from harpe_megatron.cli.launch import node_exit_code
from harpe_megatron.training.reliability import exit_record
from harpe_megatron.training.reliability.exit_codes import job_exit_code
from harpe_megatron.training.reliability.exit_record import (
    EXIT_CODE_DIR_ENV,
    begin_exit_record,
    read_launch_codes,
    record_exit_code,
)


@pytest.mark.parametrize("codes, job", [
    ([0, 0], 0),
    ([75, 75], 75),
    ([2, 2], 2),
    ([2, None], 2),  # rank 0 found the config error first; torchrun stopped rank 1 with SIGTERM
    ([77, None], 77),
    ([76, None], 76),  # the survivor names the lost rank
    ([76, 1], 76),  # a rank crashed (traceback, 1); the other lost it
    ([75, None], 1),  # preempted needs every rank: one ended without a code
    ([75, 0], 1),
    ([0, None], 1),
    ([1, 1], 1),
    ([137, 137], 1),  # not one of ours
    ([], 1),
])
def test_job_exit_code(codes, job):
    assert job_exit_code(codes) == job


def test_node_exit_code_combines_records_and_torchruns_failures():
    # torchrun returned: every rank exited 0
    assert node_exit_code({}, {}, torchrun_ok=True)[0] == 0
    # torchrun's failures (negative: killed by that signal) fill in ranks without a record
    assert node_exit_code({0: 2}, {0: 2, 1: -15}, torchrun_ok=False) == (2, {0: 2, 1: None})
    assert node_exit_code({0: 75, 1: 75}, {}, torchrun_ok=False) == (75, {0: 75, 1: 75})  # torchrun signalled
    assert node_exit_code({}, {0: 1}, torchrun_ok=False) == (1, {0: 1})  # died before recording
    assert node_exit_code({}, {}, torchrun_ok=False)[0] == 1  # torchrun failed before any rank ran


@pytest.fixture
def fresh_record(monkeypatch):
    monkeypatch.setattr(exit_record, "_run_dir_record", None)
    for name in (EXIT_CODE_DIR_ENV, "RANK"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_every_rank_records_in_the_launch_directory(fresh_record, tmp_path):
    fresh_record.setenv(EXIT_CODE_DIR_ENV, str(tmp_path))
    for rank, code in ((0, 75), (1, 75), (3, 76)):
        fresh_record.setenv("RANK", str(rank))
        record_exit_code(code)
    assert read_launch_codes(tmp_path) == {0: 75, 1: 75, 3: 76}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank_0", "rank_1", "rank_3"]  # no temporary left


def test_rank_0_records_in_the_run_dir_and_clears_it_at_start(fresh_record, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "exit_code").write_text("75 preempted ...\n")  # the previous launch's
    fresh_record.setenv("RANK", "1")
    begin_exit_record(run)
    assert (run / "exit_code").exists()  # only rank 0 owns the record
    fresh_record.setenv("RANK", "0")
    begin_exit_record(run)
    assert not (run / "exit_code").exists()  # this launch has not ended: no code yet
    record_exit_code(2, in_run_dir=False)  # e.g. refused: another run holds the run_dir
    assert not (run / "exit_code").exists()
    record_exit_code(77)
    assert (run / "exit_code").read_text() == "77 too many non-finite steps in a row; the last checkpoint is intact\n"


def test_no_run_dir_is_created_for_a_record(fresh_record, tmp_path):
    begin_exit_record(tmp_path / "missing")
    record_exit_code(2)
    assert not (tmp_path / "missing").exists()
