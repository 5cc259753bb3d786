"""Throughput accounting and metric sinks."""

from __future__ import annotations

import dataclasses
import json

import pytest

from harpe_megatron.config.presets import get_preset
from harpe_megatron.run_dir import RunDir
from harpe_megatron.step.metrics import MemoryUse, MetricSinks, format_step_line, training_flops_per_token


def test_llama2_7b_flops_at_128k_match_the_published_estimate():
    """Llama-2-7B at 128k costs ~1.4e11 training FLOPs/token, ~70% of it attention: 6 x 6.5e9 weights plus
    3 (forward + backward) x 2 x 131072 x 4096 x 32 layers for causal attention (s/2 keys per query)."""
    m = get_preset("llama2-7b")
    total = training_flops_per_token(m, 131072)
    no_attention = training_flops_per_token(m, 0)
    assert total == pytest.approx(1.4e11, rel=0.05)
    assert (total - no_attention) / total == pytest.approx(0.70, abs=0.03)
    # without attention it is the classic 6 x parameters (minus the input embedding, a lookup)
    params = 6_738_415_616 - m.vocab_size * m.hidden_size
    assert no_attention == pytest.approx(6 * params, rel=0.01)
    gqa = dataclasses.replace(m, num_query_groups=8)
    assert training_flops_per_token(gqa, 4096) < training_flops_per_token(m, 4096)


def test_step_line_format():
    line = format_step_line(3, 10, {"loss": 2.5, "lr": 1e-4, "grad_norm": 0.5, "tokens_per_s": 12345.6,
                                    "tflops_per_gpu": 400.0, "mfu": 0.404, "memory": MemoryUse("gpu", 61.2)})
    assert line == ("step      3/10 | loss 2.5000 | lr 1.000e-04 | grad_norm 0.500 | tokens/s 12,346 | "
                    "TFLOP/s/GPU 400.00 | MFU 40.4% | mem(gpu) 61.20 GiB")


def test_metric_sinks_write_jsonl_and_tensorboard(tmp_path):
    sinks = MetricSinks(enabled=True, run_dir=RunDir(tmp_path), tensorboard=True, wandb_project=None,
                        wandb_mode="offline", wandb_run_name=None, config={})
    sinks.log(1, {"loss": 2.5, "lr": 1e-4})
    sinks.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 2.5, "lr": 1e-4}
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    off = MetricSinks(enabled=False, run_dir=RunDir(tmp_path / "other"), tensorboard=True, wandb_project=None,
                      wandb_mode="offline", wandb_run_name=None, config={})
    off.log(1, {"loss": 1.0})
    assert not (tmp_path / "other").exists()  # non-logging ranks write nothing


def test_metrics_jsonl_is_strict_json_with_nonfinite_values_flagged(tmp_path):
    sinks = MetricSinks(enabled=True, run_dir=RunDir(tmp_path), tensorboard=False, wandb_project=None,
                        wandb_mode="disabled", wandb_run_name=None, config={})
    sinks.log(3, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-4, "mfu": None})
    sinks.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    row = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert row == {"step": 3, "loss": None, "grad_norm": None, "lr": 1e-4,
                   "nonfinite": {"loss": "nan", "grad_norm": "inf"}}
