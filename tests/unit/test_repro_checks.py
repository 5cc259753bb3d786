"""The reproduction's checks (harpe_megatron/repro/checks.py) on hand-made result files, and the
evaluation grid they read (passkey prompts of k L - ANSWER_ROOM tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harpe_megatron.data.repro import ANSWER_ROOM
from harpe_megatron.repro.checks import run_checks
from harpe_megatron.repro.protocol import plan_tier

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "repro"


def _result(path: Path, ppl: dict[int, float], passkey: dict[int, float]) -> None:
    path.write_text(json.dumps({"perplexity": [{"length": L, "ppl": v} for L, v in ppl.items()],
                                "per_length": {"passkey": {str(L): v for L, v in passkey.items()}}}))


def test_passkey_prompts_leave_room_for_the_answer_inside_each_window():
    plan = plan_tier("cpu", CONFIGS)
    assert plan.eval_lengths == [128, 256, 512, 1024, 2048]
    assert plan.passkey_lengths == [n - ANSWER_ROOM for n in plan.eval_lengths] == [118, 246, 502, 1014, 2038]
    # the corpus's retrieval documents end at the same room: the longest trained prompt is the in-window one
    assert plan.tier.retrieval_min_length == plan.passkey_lengths[0]


@pytest.mark.parametrize("accuracy, failed", [(92.5, False), (60.0, True), (None, True)])
def test_the_base_must_retrieve_inside_its_window_where_the_tier_asks(tmp_path, accuracy, failed):
    plan = plan_tier("cpu", CONFIGS)
    assert plan.tier.min_in_window_passkey == 90.0
    passkey = {} if accuracy is None else {118: accuracy, 246: 0.0}
    _result(tmp_path / "base.json", {128: 30.0, 512: 45.0}, passkey)
    _result(tmp_path / "harpe.json", {512: 33.0}, {})
    said: list[str] = []
    failures = run_checks(tmp_path, plan, ["base", "harpe"], say=said.append)
    in_window = [f for f in failures if "passkey" in f]
    assert bool(in_window) == failed, failures
    assert len(failures) == len(in_window)  # the perplexity checks pass: 45 >= 1.1 x 30, 33 <= sqrt(30 x 45)
    if accuracy is not None:
        assert any(("FAILED" if failed else "passed") in line and "passkey" in line for line in said)


def test_the_smoke_tier_does_not_ask_for_retrieval(tmp_path):
    plan = plan_tier("smoke", CONFIGS)
    _result(tmp_path / "base.json", {128: 30.0, 512: 45.0}, {118: 0.0})
    assert run_checks(tmp_path, plan, ["base"], say=lambda _: None) == []
