"""scripts/reproduce.sh, smoke tier (docs/reproduction.md): the whole pipeline of public commands
end to end (corpus, base pretraining, HARPE and ABF extension, HF exports, evaluation of the
base, HARPE and ABF, reports), the checks that must hold at any scale (harpe_megatron/repro/checks.py),
and a second run that skips every step. CI budget: 3 minutes on 2 cores for the first run
(docs/reproduction.md records the measured times and the machine's load)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _reproduce(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = ["bash", "scripts/reproduce.sh", "--tier", "smoke", "--data-dir", str(tmp_path / "data"),
           "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results"), *extra]
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_smoke_tier_end_to_end_then_resumes_as_done(tmp_path):
    t0 = time.perf_counter()
    proc = _reproduce(tmp_path)
    first = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    # every step is printed as the public command it runs
    assert "CONFIG=configs/repro/smoke/harpe.yaml GPUS_PER_NODE=1 bash scripts/pretrain_harpe.sh" in out
    assert "tools/eval_long_context.py run" in out
    assert out.count("check passed") == 3 and "FAILED" not in out
    res = tmp_path / "results" / "seed1"
    for arm in ("base", "harpe", "abf"):
        result = json.loads((res / f"{arm}.json").read_text())
        assert [row["length"] for row in result["perplexity"]] == [128, 256, 512, 1024, 2048]
        assert set(result["per_length"]["passkey"]) == {"118", "246", "502", "1014", "2038"}  # k L - ANSWER_ROOM
    table = (res / "table.md").read_text()
    assert "| HARPE |" in table and "paper rank" in table and "ppl avg 128-1024" in table
    for png in ("perplexity.png", "heatmaps_passkey.png", "heatmaps/HARPE_passkey.png"):
        assert (res / png).stat().st_size > 1000, png
    assert "| HARPE |" in (tmp_path / "results" / "summary.md").read_text()
    timings = json.loads((res / "timings.json").read_text())
    assert {"train base", "train harpe", "eval abf"} <= set(timings)
    assert all(t["cpu_s"] >= 0 and t["wall_s"] > 0 for t in timings.values())

    # a second run finds every output and runs only the reports
    proc = _reproduce(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for step in ("train base", "export base", "train harpe", "eval harpe", "eval abf"):
        assert f"[reproduce] {step}: done before, skipped" in proc.stdout
    assert "pretrain_harpe.sh" not in proc.stdout
    print(f"smoke tier: first run {first:.0f} s; " + "; ".join(x for x in out.splitlines() if "check passed" in x))


def test_dry_run_prints_every_arm_as_a_command(tmp_path):
    proc = _reproduce(tmp_path, "--arms", "all", "--seed", "3", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for arm in ("no_rope_change", "harpe", "abf", "abf_multistage", "pi", "yarn", "ntk", "cream", "pose"):
        train = [x for x in lines if f"CONFIG=configs/repro/smoke/{arm}.yaml" in x]
        assert len(train) == 1 and "training.seed=3" in train[0], arm
        assert f"checkpoint.pretrained={tmp_path}/runs/seed3/base/checkpoints" in train[0]
    assert any("--self-extend 8,32" in x and "base/hf" in x for x in lines)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
    bad = _reproduce(tmp_path, "--arms", "harpe,nope", "--dry-run")
    assert bad.returncode == 2 and "unknown arm(s) ['nope']" in bad.stderr
