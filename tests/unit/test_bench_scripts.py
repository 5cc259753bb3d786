"""The benchmark scripts run end to end on CPU with tiny shapes and write consistent JSON.

(Their figures are not asserted: performance is measured by running them on a device, see
docs/benchmarks.md. What is asserted is that every variant ran and the accounting holds.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str) -> None:
    # a fresh one-process world: nothing inherited from process groups of earlier tests
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / script), *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_rope_bench_tiny(tmp_path):
    out = tmp_path / "rope.json"
    _run("rope.py", "--tiny", "--seq-lens", "64", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    variants = {r["variant"] for r in rows}
    assert {"per-head", "single-base", "megatron unfused", "torch expression", "copy"} <= variants
    for r in rows:
        if "gb_s" in r:
            bytes_per_call = 4 * (64 * 8 * 64) * 2 * 4  # fwd+bwd, q and k, fp32
            assert abs(r["gb_s"] * 1e9 * r["ms"] / 1e3 - bytes_per_call) / bytes_per_call < 1e-6


def test_train_step_bench_tiny(tmp_path):
    out = tmp_path / "step.json"
    _run("train_step.py", "--tiny", "--seq-lens", "64", "--steps", "2", "--warmup", "1", "--with-table",
         "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["single-base", "harpe", "harpe-table"]
    for r in rows:
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0
        assert r["last_loss"] == r["last_loss"]  # finite training ran (not NaN)
    # the three variants train the same initial model on the same batch: HARPE's fused and table
    # paths agree on the first loss (same bases, same weights), the single base differs
    harpe, table = rows[1], rows[2]
    assert abs(harpe["first_loss"] - table["first_loss"]) < 1e-5


def test_doc_attention_bench_tiny(tmp_path):
    out = tmp_path / "doc.json"
    _run("doc_attention.py", "--tiny", "--json", str(out))
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["causal"]["pairs"] == 256 * 257 / 2
    assert rows["document"]["kernel"] == "masked"  # CPU: the block-mask kernel
    # the CP ranks' chunks together are the whole row's attended pairs
    assert rows["document cp rank 0"]["pairs"] + rows["document cp rank 1"]["pairs"] == rows["document"]["pairs"]
    assert 0 < result["saving"]["fraction"] < 1


def test_convert_bench_tiny(tmp_path):
    """scripts/bench/convert.py end to end on tiny shapes: both converters as processes, the round
    trip checked bitwise, every figure present (their values are measured on real sizes only)."""
    out = tmp_path / "convert.json"
    _run("convert.py", "--tiny", "--workdir", str(tmp_path / "work"), "--json", str(out))
    report = json.loads(out.read_text())
    assert report["roundtrip_bitwise_tensors"] == 2 * 9 + 3  # 2 layers x 9 tensors + embedding, norm, lm_head
    assert report["disk"]["read_bytes_per_s"] > 0 and report["disk"]["write_bytes_per_s"] > 0
    for direction in ("hf_to_megatron", "megatron_to_hf"):
        r = report["results"][direction]
        assert r["wall_s"] > r["converter_s"] > 0 and r["peak_rss_bytes"] > 0
    assert not (tmp_path / "work" / "hf_source").exists()  # cleaned up
