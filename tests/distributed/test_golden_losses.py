"""Numerics guard: a short deterministic run of the tiny model reproduces the recorded losses.

``tests/assets/golden_losses_tiny.json`` holds the per-step global losses of the run in
tests/golden_losses.py (configs/tiny_cpu.yaml, TP 2 on 2 gloo ranks, fp32, seed 1234, 5 steps on a
seeded synthetic corpus). A change of the model, the loss, the data order, the optimizer or the
initialisation moves them; a deliberate one is recorded with ``bash scripts/regen_golden_losses.sh``.
"""

from __future__ import annotations

import json

import pytest

from tests.golden_losses import GOLDEN_FILE, STEPS, WORLD, run_golden

pytestmark = pytest.mark.distributed

RTOL = 1e-5  # runs on one machine are bitwise; other CPUs (BLAS kernels) may differ in the last digits


def test_tiny_run_reproduces_the_golden_losses(tmp_path):
    golden = json.loads(GOLDEN_FILE.read_text())
    assert (golden["steps"], golden["world_size"]) == (STEPS, WORLD), "stale golden file: regenerate it"
    losses = run_golden(tmp_path)
    assert losses == pytest.approx(golden["losses"], rel=RTOL), (
        f"losses {losses} differ from {GOLDEN_FILE.name} {golden['losses']}; if the change is deliberate, "
        "run bash scripts/regen_golden_losses.sh")
