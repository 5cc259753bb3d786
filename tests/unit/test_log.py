"""The one logging channel: prefix by rank, INFO on rank 0 only by default, errors to stderr."""

from __future__ import annotations

import logging

import pytest

from harpe_megatron.log import ROOT_LOGGER, get_logger, setup_logging


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger(ROOT_LOGGER)
    saved = list(root.handlers), root.level, root.propagate
    yield
    root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


def test_module_names_map_under_the_harpe_logger():
    assert get_logger("harpe_megatron.training.trainer").name == "harpe.training.trainer"


def test_rank_zero_prints_info_to_stdout_and_errors_to_stderr(capsys):
    setup_logging(rank=0)
    get_logger("harpe_megatron.x").info("step 1")
    get_logger("harpe_megatron.x").error("error: boom")
    out, err = capsys.readouterr()
    assert out == "[harpe] step 1\n"
    assert err == "[harpe] error: boom\n"


def test_other_ranks_print_warnings_only_unless_asked(capsys, monkeypatch):
    setup_logging(rank=3)
    log = get_logger("harpe_megatron.x")
    log.info("hidden")
    log.warning("seen")
    out, err = capsys.readouterr()
    assert (out, err) == ("", "[harpe rank 3] seen\n")
    monkeypatch.setenv("HARPE_LOG_ALL_RANKS", "1")
    setup_logging(rank=3)
    log.info("now seen")
    assert capsys.readouterr().out == "[harpe rank 3] now seen\n"


def test_setup_is_idempotent(capsys):
    setup_logging(rank=0)
    setup_logging(rank=0)
    get_logger("harpe_megatron.x").info("once")
    assert capsys.readouterr().out == "[harpe] once\n"
