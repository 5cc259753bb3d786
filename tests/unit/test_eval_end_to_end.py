"""End-to-end eval of the exported demo model (runs/tiny_cpu/hf; produced by scripts/demo.sh)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

HF = Path(__file__).resolve().parents[2] / "runs" / "tiny_cpu" / "hf"


@pytest.mark.skipif(not (HF / "config.json").exists(), reason="demo export missing (run scripts/demo.sh)")
def test_tiny_model_writes_json_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    import importlib.util
    spec = importlib.util.spec_from_file_location("eval_cli", HF.parents[2] / "tools" / "eval_long_context.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    text = tmp_path / "text.txt"
    text.write_text((HF.parents[2] / "README.md").read_text()[:3000])
    out = tmp_path / "tiny.json"
    with pytest.warns(UserWarning, match="trained window"):
        rc = cli.main(["run", str(HF), "--out", str(out), "--tasks", "passkey", "--lengths", "128,384",
                       "--depths", "0,100", "--heatmap-dir", str(tmp_path), "--name", "tiny",
                       "--ppl-file", str(text), "--ppl-lengths", "128", "--no-progress"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["trained_window"] == 256 and res["beyond_trained_window"] == [384]
    assert len(res["records"]) == 4
    assert set(res["per_length"]["passkey"]) == {"128", "384"}
    assert all(0 <= r["score"] <= 100 and r["num_tokens"] <= r["length"] for r in res["records"])
    assert res["perplexity"][0]["ppl"] > 1
    png = Path(res["heatmaps"]["passkey"])
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
