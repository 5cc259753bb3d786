"""Both converters hold the stated memory bound whatever the model size (a test of scaling).

Two random HF Llamas of the same widths, 3 and 21 layers (48 and 242 MiB in safetensors shards
of 20 MB: the larger model is 5x the smaller, 12x its shard size and over twice the bound), are converted both
ways, each conversion in its own worker process (tests/unit/convert_memory_worker.py: warm-up on
the small model, freed heap returned, then the peak resident memory above the resident set just
before the conversion; one process per conversion so an earlier one's retained heap cannot hide
this one's growth, which made the old one-process reading 0 in one CI run). Asserted: the growth stays within
the bound the converter states (``ConversionSummary.memory_bound_bytes``: read-ahead pool + one
tensor + staging blocks + a fixed allowance, docs/conversion.md "Memory"), the bound is the same
for both models, and the larger model is several times the bound: a converter that held the
model would fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20


def _llama(layers: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(layers)
    return LlamaForCausalLM(cfg)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (peak RSS reset)")
def test_peak_memory_is_bounded_independent_of_model_size(tmp_path):
    sizes = {}
    for name, layers in (("small", 3), ("large", 21)):
        _llama(layers).save_pretrained(tmp_path / name, max_shard_size="20MB")
        sizes[name] = sum(f.stat().st_size for f in (tmp_path / name).glob("*.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env = {k: v for k, v in env.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = {}
    for name in ("small", "large"):
        for direction, src, dst in (("import", tmp_path / name, tmp_path / f"{name}_mg"),
                                    ("export", tmp_path / f"{name}_mg", tmp_path / f"{name}_hf")):
            out = tmp_path / f"{direction}_{name}.json"
            proc = subprocess.run([sys.executable, "-m", "tests.unit.convert_memory_worker", str(out), direction,
                                   str(src), str(dst), str(tmp_path / "small"), str(tmp_path / "warm")],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, proc.stderr[-4000:]
            r[f"{direction}_{name}"] = json.loads(out.read_text())
    for key, m in r.items():
        print(f"\n[convert-memory] {key}: model {sizes[key.split('_')[1]] / MIB:.0f} MiB, peak growth "
              f"{m['growth'] / MIB:.1f} MiB, stated bound {m['bound'] / MIB:.0f} MiB")
        assert 0 < m["growth"] <= m["bound"], key
    for direction in ("import", "export"):
        assert r[f"{direction}_small"]["bound"] == r[f"{direction}_large"]["bound"]
        assert sizes["large"] >= 2 * r[f"{direction}_large"]["bound"]  # holding the model would not fit
