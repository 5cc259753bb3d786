"""HF Llama folder -> megatron distributed checkpoint (:func:`convert_hf_to_megatron`).

The output is ``OUT/iter_0000000/`` (a megatron dist checkpoint holding the model's sharded state
and the common entries ``iteration``, ``consumed_samples``, ``config_yaml``, ``conversion``) +
``OUT/latest`` + ``OUT/config.yaml``: the layout of a training save (made by the same writer of
checkpoint directories, checkpoint/directory.py), so ``checkpoint.pretrained: OUT`` loads it.
The architecture comes from ``config.json``; overrides may set ``positional.*`` and a few
``model.*`` keys only.

Streaming: the checkpoint layout is that of a TP=1 model built on the ``meta`` device (no
memory); HF tensors are read ahead on a background thread into pooled buffers, combined into
megatron tensors through the name map of ``llama_names`` (q/k/v merged per KV group, gate/up
concatenated, vocabulary padded, dtype cast: into a reused buffer; anything else used as read)
and written one by one (checkpoint/dist_stream_write.py). Peak memory above the process's
baseline: the read-ahead pool (2x the largest group of HF tensors that make one megatron
tensor, at least 32 MiB) + one megatron tensor + the writer's 36 MiB of staging, whatever the
model or shard size (``.bin`` inputs are mapped a shard at a time: add the largest shard).

Vocabulary padding: megatron pads the vocabulary to a multiple of
``make_vocab_size_divisible_by x TP``; this pads for the requested TP. A model at another TP loads
the checkpoint when its padded size is the same (e.g. Llama-2's 32000 rows for TP 1 and 2).

Written into a temporary directory next to the output and renamed at the end (nothing is left
behind on failure); a non-empty output is refused unless ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import yaml

from harpe_megatron.checkpoint.directory import begin_checkpoint, publish_checkpoint
from harpe_megatron.checkpoint.dist_stream_write import ProducedTensor, write_torch_dist
from harpe_megatron.checkpoint.layout import checkpoint_name
from harpe_megatron.checkpoint.stream_io import Buffer, BufferPool, pipeline_memory_bound
from harpe_megatron.config.loader import ConfigError, apply_overrides, config_from_dict, config_to_dict
from harpe_megatron.config.model import ParallelConfig, padded_vocab_size, validate_model_setup
from harpe_megatron.hf import config as hfc
from harpe_megatron.hf.llama_names import expected_hf_shapes, hf_groups, iter_hf_to_megatron
from harpe_megatron.hf.output_dir import atomic_output_dir
from harpe_megatron.hf.safetensors_io import HFCheckpointReader
from harpe_megatron.hf.session import checkpoint_layout, megatron_cpu_session
from harpe_megatron.hf.summary import ConversionSummary, progress_bar

__all__ = ["convert_hf_to_megatron"]

_CONVERTED_ITERATION = 0
_MIN_PREFETCH_BYTES = 32 << 20  # read ahead at least this much (many small tensors in a row)
# model.* keys an HF -> megatron conversion may override (the others come from config.json).
_MODEL_OVERRIDABLE = ("make_vocab_size_divisible_by", "pretrained_context_length", "init_method_std")
# Tensors of HF checkpoints that a Llama model does not use (old transformers saved inv_freq).
_IGNORED_HF_TENSORS = (r"(^|\.)rotary_emb\.inv_freq$",)


def _override_key(item: str) -> str:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.path=value (e.g. positional.bases.strategy=paper)")
    return item.split("=", 1)[0].strip()


def _apply_conversion_overrides(tree: dict, overrides: Sequence[str]) -> None:
    keys = [_override_key(o) for o in overrides]
    for key, item in zip(keys, overrides):
        ok = key.startswith("positional.") or (key.startswith("model.") and key[len("model."):] in _MODEL_OVERRIDABLE)
        if not ok:
            raise ConfigError(
                f"override {item!r}: only positional.* and model.{{{', '.join(_MODEL_OVERRIDABLE)}}} can be "
                "overridden; the architecture comes from the HF config.json"
            )
    # A new strategy / scaling type starts from its own defaults, not the HF-derived fields.
    if any(k in ("positional.bases", "positional.bases.strategy") for k in keys):
        tree["positional"]["bases"] = {}
    if any(k in ("positional.scaling", "positional.scaling.type") for k in keys):
        tree["positional"]["scaling"] = {}
    apply_overrides(tree, list(overrides))


def _resolve_hf_config(hf_dir: Path, tp: int, pp: int, overrides: Sequence[str]):
    source = str(hf_dir / "config.json")
    hf_cfg = hfc.read_hf_config(hf_dir)
    tree = hfc.megatron_trees_from_hf(hf_cfg, source)
    _apply_conversion_overrides(tree, overrides)
    run_cfg = config_from_dict(tree, source + (f" (with overrides {list(overrides)})" if overrides else ""))
    m, positional = run_cfg.model, run_cfg.positional
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    try:
        validate_model_setup(m, parallel)
        if m.ffn_hidden_size % tp:
            raise ValueError(f"model.ffn_hidden_size ({m.ffn_hidden_size}) must be divisible by "
                             f"parallel.tensor_model_parallel_size ({tp})")
    except ValueError as exc:
        raise ConfigError(f"{source}: --tp {tp} --pp {pp}: {exc}") from None
    if positional.rotary_interleaved:
        raise ConfigError("positional.rotary_interleaved=true does not fit HF Llama weights (rotate-half layout)")
    resolved = config_to_dict(run_cfg)
    written = {"model": resolved["model"], "positional": resolved["positional"],
               "parallel": dataclasses.asdict(parallel)}
    return hf_cfg, m, positional, written


def _source_dtype(reader: HFCheckpointReader, names: Sequence[str]) -> torch.dtype:
    dtypes = {reader.info(n).dtype for n in names}
    if len(dtypes) == 1 and next(iter(dtypes)) in (torch.float32, torch.bfloat16, torch.float16):
        return next(iter(dtypes))
    return torch.float32


def _megatron_tensors(reader: HFCheckpointReader, m, rows: int, dtype: torch.dtype, in_pool: BufferPool,
                      work_pool: BufferPool) -> Iterator[ProducedTensor]:
    """The megatron tensors, in checkpoint order, made from the HF tensors as they stream in:
    ``(name, tensor, release)``. A tensor that is its HF tensor unchanged is that buffer itself;
    merged, padded or cast ones are written into a buffer of ``work_pool``."""
    stream = reader.stream(list(expected_hf_shapes(m)), in_pool)
    inputs: list[tuple[torch.Tensor, Callable[[], None]]] = []
    outputs: list[Buffer] = []

    def get(name: str) -> torch.Tensor:
        got, tensor, release = next(stream)
        if got != name:  # pragma: no cover - the order is ours on both sides
            raise AssertionError(f"read {got!r}, expected {name!r}")
        inputs.append((tensor, release))
        return tensor

    def alloc(shape: tuple[int, ...]) -> torch.Tensor:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        outputs.append(work_pool.acquire(nbytes))
        return outputs[-1].view(nbytes, dtype).view(shape)

    try:
        for name, tensor in iter_hf_to_megatron(get, m, rows, alloc):
            held_in, held_out = list(inputs), list(outputs)
            inputs.clear()
            outputs.clear()
            if held_in and tensor is held_in[0][0]:  # the HF tensor itself
                for buf in held_out:
                    buf.release()
                releases = [r for _, r in held_in]
            else:
                for _, release in held_in:
                    release()
                releases = [buf.release for buf in held_out]
            yield name, tensor, lambda rs=releases: [r() for r in rs]
    finally:
        stream.close()


def convert_hf_to_megatron(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tp: int = 1,
    pp: int = 1,
    overrides: Sequence[str] = (),
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionSummary:
    """Convert an HF Llama folder into a megatron checkpoint directory (see module docstring).

    Args:
        tp, pp: the layout the checkpoint is meant for: validated against the model and
            recorded (the vocabulary is padded for ``tp``); the checkpoint itself is resharded on load.
        overrides: dotted ``positional.*`` (and a few ``model.*``) settings, e.g.
            ``["positional.bases={strategy: paper}"]``; default: one base = ``rope_theta``.
        dtype: ``auto`` (the HF tensors' dtype; fp32 if mixed), ``bf16``, ``fp16`` or ``fp32``.
    """
    start = time.monotonic()
    hf_dir = Path(hf_dir)
    if tp < 1 or pp < 1:
        raise ValueError(f"--tp and --pp must be >= 1, got {tp}, {pp}")
    hf_cfg, m, positional, written = _resolve_hf_config(hf_dir, tp, pp, overrides)
    expected = expected_hf_shapes(m)
    ignore = list(_IGNORED_HF_TENSORS)
    if not m.untie_embeddings_and_output_weights:
        ignore.append(r"^lm_head\.weight$")  # tied: HF ignores a stored copy too
    rows = padded_vocab_size(m.vocab_size, tp, m.make_vocab_size_divisible_by)
    config_yaml = yaml.safe_dump(written, sort_keys=False)

    with HFCheckpointReader(hf_dir) as reader:
        reader.check(expected, ignore)
        source_dtype = _source_dtype(reader, list(expected))
        source_format = reader.format
        target = source_dtype if dtype == "auto" else hfc.DTYPES.get(dtype)
        if target is None:
            raise ValueError(f"dtype must be auto, bf16, fp16 or fp32, got {dtype!r}")
        total_bytes = sum(reader.info(n).nbytes for n in expected)
        with atomic_output_dir(out_dir, overwrite, protect=[hf_dir], converted_ok=True) as tmp, megatron_cpu_session():
            groups = hf_groups(m)
            layout = checkpoint_layout(m, positional, target, rows).in_order(list(groups))
            largest_in = max(sum(reader.info(n).nbytes for n in group) for group in groups.values())
            in_pool = BufferPool(max(2 * largest_in, _MIN_PREFETCH_BYTES))
            work_pool = BufferPool(layout.largest_param_bytes)
            common = {
                "iteration": _CONVERTED_ITERATION,
                "consumed_samples": 0,
                "config_yaml": config_yaml,
                "conversion": {
                    "source": str(hf_dir.resolve()),
                    "source_format": reader.format,
                    "source_dtype": hfc.dtype_name(source_dtype),
                    "dtype": hfc.dtype_name(target),
                    "tensor_model_parallel_size": tp,
                    "pipeline_model_parallel_size": pp,
                    "padded_vocab_size": rows,
                    "hf_config": hf_cfg,
                },
            }
            memory_bound = pipeline_memory_bound(in_pool, work_pool)
            written_bytes = sum(p.nbytes for p in layout.params)
            bar = progress_bar(written_bytes, "HF -> megatron", progress)
            try:
                iter_tmp = begin_checkpoint(tmp, _CONVERTED_ITERATION)
                crcs = write_torch_dist(iter_tmp, layout, _megatron_tensors(reader, m, rows, target, in_pool, work_pool),
                                        common, on_bytes=bar.update)
                publish_checkpoint(tmp, _CONVERTED_ITERATION, crcs)
            finally:
                bar.close()
                in_pool.close()
                work_pool.close()
            (tmp / "config.yaml").write_text(config_yaml)
    num_params = sum(math.prod(shape) for shape in expected.values())
    rope = {k: written["positional"][k] for k in ("bases", "scaling") if k in written["positional"]}
    return ConversionSummary(
        direction="HF -> megatron", output=Path(out_dir), tensors=len(expected), parameters=num_params,
        bytes=total_bytes, seconds=time.monotonic() - start, dtype=hfc.dtype_name(target),
        details={"layout": f"{checkpoint_name(_CONVERTED_ITERATION)}/ + latest + config.yaml "
                           f"({len(layout.params)} megatron tensors)",
                 "parallel": f"validated for TP={tp} PP={pp}; vocabulary padded {m.vocab_size} -> {rows}",
                 "rope": json.dumps(rope)},
        memory_bound_bytes=memory_bound,
        memory_extra="" if source_format == "safetensors" else " (plus the largest .bin shard, memory-mapped)",
    )
