"""HF Llama folder -> megatron distributed checkpoint (:func:`convert_hf_to_megatron`).

The output is ``OUT/iter_0000000/`` (a megatron dist checkpoint holding the model's sharded state
and the common entries ``iteration``, ``consumed_samples``, ``config_yaml``, ``conversion``) +
``OUT/latest`` + ``OUT/config.yaml``: the layout of a training save, so ``checkpoint.pretrained:
OUT`` loads it. One full-size model (TP=1, on CPU, never initialised) is built and filled one HF
tensor at a time through the name map of ``llama_names``; megatron's ``dist_checkpointing.save``
writes it. The architecture comes from ``config.json``; overrides may set ``positional.*`` and a
few ``model.*`` keys only.

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
from typing import Sequence

import torch
import yaml

from harpe_megatron.checkpoint.layout import LATEST_FILE, checkpoint_files, checkpoint_name, file_crc32, write_manifest
from harpe_megatron.config.loader import ConfigError, apply_overrides, config_from_dict, config_to_dict
from harpe_megatron.config.model import ParallelConfig, padded_vocab_size, validate_model_setup
from harpe_megatron.hf import config as hfc
from harpe_megatron.hf.llama_names import expected_hf_shapes, iter_hf_to_megatron
from harpe_megatron.hf.output_dir import atomic_output_dir
from harpe_megatron.hf.safetensors_io import HFCheckpointError, HFCheckpointReader
from harpe_megatron.hf.session import build_full_model, megatron_cpu_session
from harpe_megatron.hf.summary import ConversionSummary, progress_bar

__all__ = ["convert_hf_to_megatron"]

_CONVERTED_ITERATION = 0
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
    from megatron.core import dist_checkpointing

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
        target = source_dtype if dtype == "auto" else hfc.DTYPES.get(dtype)
        if target is None:
            raise ValueError(f"dtype must be auto, bf16, fp16 or fp32, got {dtype!r}")
        total_bytes = sum(reader.info(n).nbytes for n in expected)
        with atomic_output_dir(out_dir, overwrite, protect=[hf_dir], converted_ok=True) as tmp, megatron_cpu_session():
            model = build_full_model(m, positional, target, rows)
            params = dict(model.named_parameters())
            filled: set[str] = set()
            sources: list[str] = []
            bar = progress_bar(total_bytes, "HF -> megatron", progress)

            def get(name: str) -> torch.Tensor:
                info = reader.info(name)
                t = reader.get(name)
                sources.append(f"{name} ({info.file.name})")
                bar.update(info.nbytes)
                return t

            def put(name: str, tensor: torch.Tensor) -> None:
                where = ", ".join(sources)
                sources.clear()
                param = params.get(name)
                if param is None:
                    raise HFCheckpointError(f"megatron model has no parameter {name!r} (from {where})")
                if name in filled:
                    raise HFCheckpointError(f"megatron parameter {name!r} filled twice (from {where})")
                if tensor.shape != param.shape:
                    raise HFCheckpointError(f"{where}: shape {list(tensor.shape)} does not fit {name!r} "
                                            f"{list(param.shape)}")
                param.copy_(tensor)
                filled.add(name)

            with torch.no_grad():
                for name, tensor in iter_hf_to_megatron(get, m, rows):  # vocabulary rows padded to ``rows``
                    put(name, tensor)
            bar.close()
            reader.close()  # unmap the last shard before megatron's save allocates
            unfilled = sorted(set(params) - filled)
            if unfilled:
                raise HFCheckpointError(f"megatron parameters not filled from the HF checkpoint: {unfilled[:6]}")
            num_params = sum(math.prod(shape) for shape in expected.values())
            num_megatron = len(params)
            del params
            iter_dir = tmp / checkpoint_name(_CONVERTED_ITERATION)
            iter_dir.mkdir()
            state = {
                "model": model.sharded_state_dict(),
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
            dist_checkpointing.save(state, str(iter_dir))
            del state, model
            write_manifest(iter_dir, {n: file_crc32(iter_dir / n) for n in checkpoint_files(iter_dir)})
            (tmp / LATEST_FILE).write_text(iter_dir.name + "\n")
            (tmp / "config.yaml").write_text(config_yaml)
    rope = {k: written["positional"][k] for k in ("bases", "scaling") if k in written["positional"]}
    return ConversionSummary(
        direction="HF -> megatron", output=Path(out_dir), tensors=len(expected), parameters=num_params,
        bytes=total_bytes, seconds=time.monotonic() - start, dtype=hfc.dtype_name(target),
        details={"layout": f"{checkpoint_name(_CONVERTED_ITERATION)}/ + latest + config.yaml "
                           f"({num_megatron} megatron tensors)",
                 "parallel": f"validated for TP={tp} PP={pp}; vocabulary padded {m.vocab_size} -> {rows}",
                 "rope": json.dumps(rope)},
    )
