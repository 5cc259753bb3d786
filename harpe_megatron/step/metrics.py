"""Throughput accounting (FLOPs, MFU), the console line and the metric sinks.

Model FLOPs, Llama decoder (forward), hidden h, layers L, query heads n, KV groups g, head dim d,
FFN f, vocabulary V, for T tokens whose queries attend P (query, key) pairs in all:

    per layer:  T * 2h(nd + 2gd)     QKV projections
              + T * 2h(nd)           attention output projection
              + P * 4nd              QK^T and PV, *as computed*: 2 matmuls x 2 FLOPs per pair
              + T * 6hf              SwiGLU (gate, up, down)
    once:       T * 2hV              output layer

Causal attention over rows of s tokens counts P = T * s / 2 (each query sees s/2 keys on
average: :func:`training_flops_per_token`). With document masking each query sees only its own
document's earlier keys, P = sum over the documents of a row of s_i (s_i + 1) / 2: the trainer
takes the exact P of every step from the batches (data/documents.py, ``attention_keys``), so
the TFLOP/s and MFU of a masked run count only attention that was done. (The two conventions
differ by T/2 pairs, half a key per query.)

Training = 3x forward (backward costs two forwards). Recomputation is not counted (MFU is model
FLOPs utilisation). MFU = achieved FLOP/s per GPU / peak dense FLOP/s of the device for the
training precision (``logging.peak_tflops`` overrides the built-in table).
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import warnings
from typing import Any, Optional

import torch

from harpe_megatron.config.model import ModelConfig
from harpe_megatron.run_dir import RunDir

__all__ = ["training_flops", "training_flops_per_token", "peak_tflops", "MemoryUse", "memory_gib", "format_step_line", "jsonl_record",
           "MetricSinks"]

# Dense peak TFLOP/s (no sparsity) by device-name fragment and precision.
_PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
}


def training_flops(m: ModelConfig, tokens: float, attention_pairs: float) -> float:
    """Model FLOPs (forward + backward) of ``tokens`` tokens attending ``attention_pairs`` pairs."""
    h, d, n, g = m.hidden_size, m.head_dim, m.num_attention_heads, m.num_query_groups
    dense = 2 * h * (n * d + 2 * g * d) + 2 * h * n * d + 6 * h * m.ffn_hidden_size
    forward = m.num_layers * (dense * tokens + 4 * n * d * attention_pairs) + 2 * h * m.vocab_size * tokens
    return 3.0 * forward


def training_flops_per_token(m: ModelConfig, seq_length: int) -> float:
    """Model FLOPs per trained token (forward + backward) with causal attention over rows of
    ``seq_length`` tokens, see the module docstring."""
    return training_flops(m, 1.0, seq_length / 2)


def peak_tflops(precision: str, override: Optional[float] = None) -> Optional[float]:
    """Peak dense TFLOP/s of the current CUDA device (None on CPU or unknown devices)."""
    if override is not None:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, table in _PEAK_TFLOPS.items():
        if key in name:
            return table[precision]
    return None


@dataclasses.dataclass(frozen=True)
class MemoryUse:
    """A peak memory figure and what it measures."""

    kind: str  # "gpu": peak allocated on the CUDA device; "rss": peak resident set of this process
    gib: float


def memory_gib() -> MemoryUse:
    """The peak allocated GiB on CUDA, else the peak resident set GiB of this process."""
    if torch.cuda.is_available():
        return MemoryUse("gpu", torch.cuda.max_memory_allocated() / 2**30)
    return MemoryUse("rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def format_step_line(step: int, total: int, metrics: dict[str, Any]) -> str:
    """The stable one-line-per-step console format."""
    mfu = metrics.get("mfu")
    memory: MemoryUse = metrics["memory"]
    parts = [
        f"step {step:>6}/{total}",
        f"loss {metrics['loss']:.4f}",
        f"lr {metrics['lr']:.3e}",
        f"grad_norm {metrics['grad_norm']:.3f}",
        f"tokens/s {metrics['tokens_per_s']:,.0f}",
        f"TFLOP/s/GPU {metrics['tflops_per_gpu']:.2f}",
        f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}",
        f"mem({memory.kind}) {memory.gib:.2f} GiB",
    ]
    if metrics.get("skipped"):
        parts.append(f"skipped {metrics['skipped']}")
    return " | ".join(parts)


def jsonl_record(step: int, scalars: dict[str, float]) -> str:
    """One strict-JSON line of ``metrics.jsonl``: a non-finite value is written as ``null`` and
    named with its kind under ``"nonfinite"`` (``{"loss": null, "nonfinite": {"loss": "nan"}}``);
    JSON has no NaN/Infinity and strict parsers (jq, JavaScript, Go) reject them."""
    row: dict[str, Any] = {"step": step}
    nonfinite = {}
    for k, v in scalars.items():
        if math.isfinite(v):
            row[k] = v
        else:
            row[k] = None
            nonfinite[k] = "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if nonfinite:
        row["nonfinite"] = nonfinite
    return json.dumps(row, allow_nan=False)


class MetricSinks:
    """TensorBoard, W&B and a JSONL file of metrics, on the rank built with ``enabled=True``
    (the trainer enables global rank 0; the other ranks' sinks are a no-op).

    ``metrics.jsonl`` is strict JSON, one object per line (see :func:`jsonl_record`).

    Rank 0 can log for the whole run because the losses it is given are global: the trainer sums
    the loss over micro-batches and DP x CP on the last pipeline stage and broadcasts it from the
    last rank to every rank (``step/schedule.py``; evaluation likewise), so under any layout the
    logged loss is the global token-weighted mean. ``memory_gib`` is rank 0's own peak.
    """

    def __init__(self, enabled: bool, run_dir: RunDir, tensorboard: bool, wandb_project: Optional[str],
                 wandb_mode: str, wandb_run_name: Optional[str], config: dict[str, Any]):
        self.enabled = enabled
        self._tb = None
        self._wandb = None
        self._jsonl = None
        if not enabled:
            return
        run_dir.root.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir.metrics, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir.tensorboard))
            except ImportError:
                warnings.warn("logging.tensorboard is true but the tensorboard package is not installed "
                              "(pip install tensorboard); metrics go to metrics.jsonl only")
        if wandb_project and wandb_mode != "disabled":
            try:
                import wandb
            except ImportError as exc:
                raise RuntimeError("logging.wandb_project is set but wandb is not installed "
                                   "(pip install wandb, or set logging.wandb_project: null)") from exc
            self._wandb = wandb.init(project=wandb_project, name=wandb_run_name, mode=wandb_mode,
                                     dir=str(run_dir.root), config=config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._jsonl.write(jsonl_record(step, scalars) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def record(self, step: int, event: dict[str, Any]) -> None:
        """A line of ``metrics.jsonl`` that is not a metric (e.g. what a resume applied: ``{"step":
        12, "resume": {...}}``); rows without ``loss`` are not training steps."""
        if self.enabled:
            self._jsonl.write(json.dumps({"step": step, **event}, allow_nan=False) + "\n")
            self._jsonl.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
