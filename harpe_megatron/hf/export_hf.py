"""megatron checkpoint -> HF Llama folder (:func:`convert_megatron_to_hf`).

Steps (one function each):

1. :func:`_open_source`: a training save directory (its ``latest``) or one ``iter_*`` directory,
   saved at any TP/PP/CP, is resolved (incomplete ones refused), its pickled parts checked
   (no code-running pickles, checkpoint/safety.py) and its run config read (``config_yaml`` of
   the common state, or ``--config``); the padded vocabulary and stored dtype come from the
   checkpoint's metadata.
2. :func:`_settings`: output dtype, ``max_position_embeddings``, which tokenizer to ship.
3. :func:`_write_weights`: the parameters stream in one by one (checkpoint/dist_stream_read.py,
   through the layout of a TP=1 model built on the ``meta`` device; any saved layout is
   resharded on the way), are checked for NaN/inf, split into their HF tensors as views
   (``llama_names``; vocabulary padding dropped) and written into sharded safetensors, cast on
   the way (hf/safetensors_write.py). Every byte read is checksummed as it is read; afterwards
   the files are verified against the manifest's CRC-32s by reading only what the weights did
   not need (checkpoint/crc.py): the input is read once. Memory: the read-ahead pool (2x the
   largest stored parameter, at least 32 MiB) + one parameter + the writer's 36 MiB of staging
   (ConversionSummary.memory_bound_bytes states the total).
4. :func:`_write_metadata`: ``config.json``, ``generation_config.json``, tokenizer files when a
   sentencepiece model is known, and the HARPE modeling code when heads have different bases.
   BOS/EOS/PAD ids: the exported tokenizer's; without one, those of the HF model the checkpoint
   was imported from (recorded at import); otherwise none are written (a note says so).

Written into a temporary directory next to the output and renamed at the end (nothing is left
behind on failure); a non-empty output is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from harpe_megatron.checkpoint.crc import PieceChecksums, verify_pieces
from harpe_megatron.checkpoint.dist_stream_read import TorchDistStream
from harpe_megatron.checkpoint.layout import CheckpointDamaged, resolve_checkpoint_dir, verify_checksums
from harpe_megatron.checkpoint.safety import check_megatron_checkpoint
from harpe_megatron.checkpoint.stream_io import BufferPool, pipeline_memory_bound
from harpe_megatron.config.loader import config_from_dict
from harpe_megatron.config.model import ModelConfig, PositionalConfig
from harpe_megatron.hf import config as hfc
from harpe_megatron.hf.harpe_llama import SHIPPED_FILES
from harpe_megatron.hf.llama_names import hf_views, megatron_to_hf
from harpe_megatron.hf.output_dir import atomic_output_dir
from harpe_megatron.hf.safetensors_io import parse_size
from harpe_megatron.hf.safetensors_write import SafetensorsShardWriter
from harpe_megatron.hf.session import checkpoint_layout, megatron_cpu_session
from harpe_megatron.hf.summary import ConversionSummary, progress_bar
from harpe_megatron.hf.tokenizer_export import export_tokenizer
from harpe_megatron.model.builder import model_head_bases

__all__ = ["convert_megatron_to_hf", "DEFAULT_MAX_SHARD_SIZE"]

DEFAULT_MAX_SHARD_SIZE = "5GB"
_MIN_PREFETCH_BYTES = 32 << 20
_EMBEDDING_KEY = "embedding.word_embeddings.weight"


@dataclass
class _Source:
    """A checkpoint to export and what it says about itself."""

    ckpt: Path
    common: dict
    tree: dict
    config_source: str
    model: ModelConfig
    positional: PositionalConfig
    tokenizer_model: Optional[str]
    rows: int
    dtype: torch.dtype
    stream: TorchDistStream


@dataclass
class _Settings:
    dtype: torch.dtype
    max_position_embeddings: int
    tokenizer: Optional[Path]
    notes: list[str] = field(default_factory=list)


def _load_run_tree(ckpt: Path, common: dict, config_path: Optional[str]) -> tuple[dict, str]:
    if config_path is not None:
        text, source = Path(config_path).read_text(), str(config_path)
    else:
        text, source = common.get("config_yaml"), f"{ckpt} (config_yaml)"
        if not text:
            raise ValueError(f"{ckpt}: the checkpoint has no config_yaml in its common state; pass --config")
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: invalid YAML (read with yaml.safe_load only): {exc}") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{source}: expected a mapping of config sections")
    return tree, source


def _open_source(ckpt_dir: str | os.PathLike, config_path: Optional[str]) -> _Source:
    """Step 1 (see module docstring)."""
    from megatron.core import dist_checkpointing

    ckpt = resolve_checkpoint_dir(ckpt_dir)  # incomplete (missing / truncated files) refused
    check_megatron_checkpoint(ckpt)  # no pickled part runs code (see checkpoint/safety.py)
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    tree, source = _load_run_tree(ckpt, common, config_path)
    # Only what the export needs: the saved parallel layout is irrelevant (we read at TP=1).
    run_cfg = config_from_dict({k: tree[k] for k in ("model", "positional", "data") if k in tree}, source)
    if run_cfg.positional.rotary_interleaved:
        raise ValueError(f"{source}: positional.rotary_interleaved=true has no HF Llama equivalent")
    stream = TorchDistStream(ckpt)
    shape, dtype = stream.shape_of(_EMBEDDING_KEY), stream.dtype_of(_EMBEDDING_KEY)
    if shape is None:
        raise ValueError(f"{ckpt}: no {_EMBEDDING_KEY} in the checkpoint (is it a model checkpoint?)")
    return _Source(ckpt, common, tree, source, run_cfg.model, run_cfg.positional, run_cfg.data.tokenizer_model,
                   int(shape[0]), dtype, stream)


def _settings(src: _Source, dtype: Optional[str], tokenizer_model, max_position_embeddings: Optional[int]) -> _Settings:
    """Step 2 (see module docstring)."""
    out_dtype = src.dtype if dtype is None else hfc.DTYPES.get(dtype)
    if out_dtype is None:
        raise ValueError(f"dtype must be bf16, fp16 or fp32, got {dtype!r}")
    if max_position_embeddings is not None and max_position_embeddings < 1:
        raise ValueError(f"max_position_embeddings must be >= 1, got {max_position_embeddings}")
    max_pos = max_position_embeddings or max(int((src.tree.get("data") or {}).get("seq_length") or 0),
                                             src.model.pretrained_context_length)
    settings = _Settings(out_dtype, max_pos, None)
    if tokenizer_model is not None:
        settings.tokenizer = Path(tokenizer_model)
        if not settings.tokenizer.is_file():
            raise FileNotFoundError(f"--tokenizer-model {settings.tokenizer} does not exist")
    elif src.tokenizer_model:
        candidate = Path(src.tokenizer_model)
        if candidate.is_file():
            settings.tokenizer = candidate
        else:
            settings.notes.append(f"tokenizer not exported: data.tokenizer_model {candidate} not found "
                                  "(pass --tokenizer-model)")
    return settings


def _finite_or_report(name: str, t: torch.Tensor, bad: list[str]) -> None:
    """Append ``name (count of numel)`` to ``bad`` if ``t`` holds NaN/inf (a min/max reduction: no
    full-size temporaries; the count only on the failure path)."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        bad.append(f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()})")


def _write_weights(src: _Source, tmp: Path, out_dtype: torch.dtype, max_shard: int, progress: bool) -> dict[str, Any]:
    """Step 3 (see module docstring); returns the index plus ``tensors`` and ``parameters``."""
    layout = checkpoint_layout(src.model, src.positional, src.dtype, src.rows)
    plan = []
    for p in layout.params:
        meta = {p.name: torch.empty(p.shape, dtype=p.dtype, device="meta")}
        plan += [(hf_name, tuple(t.shape), out_dtype) for hf_name, t in megatron_to_hf(meta, src.model).items()]
    largest = layout.largest_param_bytes
    in_pool = BufferPool(max(2 * largest + (1 << 20), _MIN_PREFETCH_BYTES))
    work_pool = BufferPool(largest)
    memory_bound = pipeline_memory_bound(in_pool, work_pool)
    sums = PieceChecksums()
    writer = SafetensorsShardWriter(tmp, plan, max_shard_bytes=max_shard)
    bar = progress_bar(writer.total_bytes, "megatron -> HF", progress)
    bad: list[str] = []
    try:
        for p, tensor, release in src.stream.read(list(layout.params), in_pool, work_pool, sums):
            _finite_or_report(p.name, tensor, bad)
            for hf_name, view in hf_views(p.name, tensor, src.model):
                before = writer.bytes_written
                writer.write(hf_name, view)
                bar.update(writer.bytes_written - before)
            release()
        if bad:
            raise ValueError(f"{src.ckpt}: non-finite weights in {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}; "
                             "refusing to export them")
        index = writer.close()
        verify_pieces(src.ckpt, sums)  # CheckpointDamaged names a damaged file
    finally:
        writer.abort()
        bar.close()
        in_pool.close()
        work_pool.close()
    return {**index, "tensors": len(plan), "parameters": sum(math.prod(s) for _, s, _ in plan),
            "memory_bound": memory_bound}


def _token_ids(src: _Source, tokenizer_ids: Optional[dict], notes: list[str]) -> dict[str, Optional[int]]:
    """BOS/EOS/PAD ids: the exported tokenizer's, else the imported HF model's, else none."""
    if tokenizer_ids is not None:
        return {k: tokenizer_ids[k] for k in ("bos", "eos", "pad")}
    hf_source = (src.common.get("conversion") or {}).get("hf_config") or {}
    ids = {k: hf_source.get(f"{k}_token_id") for k in ("bos", "eos", "pad")}
    if ids["bos"] is None and ids["eos"] is None:
        notes.append("no tokenizer and no original HF config: bos/eos token ids not set (pass --tokenizer-model)")
    return ids


def _write_metadata(src: _Source, settings: _Settings, tmp: Path, head_bases: list[float]) -> tuple[dict, str]:
    """Step 4 (see module docstring); returns ``(config.json, tokenizer description)``."""
    tokenizer_ids, tokenizer_files = None, "none"
    if settings.tokenizer is not None:
        tokenizer_ids = export_tokenizer(settings.tokenizer, tmp, settings.max_position_embeddings, settings.notes)
        tokenizer_files = "tokenizer.model" + (" + tokenizer.json" if (tmp / "tokenizer.json").is_file() else "")
    ids = _token_ids(src, tokenizer_ids, settings.notes)
    config = hfc.hf_config_dict(src.model, head_bases, src.positional.scaling, settings.dtype,
                                settings.max_position_embeddings, ids["bos"], ids["eos"], ids["pad"])
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = hfc.generation_config_dict(ids["bos"], ids["eos"], ids["pad"])
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if len(set(head_bases)) > 1:
        for f in SHIPPED_FILES:
            shutil.copyfile(f, tmp / f.name)
    return config, tokenizer_files


def _explain_failure(ckpt: Path, exc: BaseException) -> BaseException:
    """A read or decode failure in a checkpoint whose bytes differ from its manifest is reported as
    the damaged file (one full checksum pass, on this failure path only)."""
    if isinstance(exc, CheckpointDamaged):
        return exc
    try:
        verify_checksums(ckpt)
    except CheckpointDamaged as damaged:
        return damaged
    except OSError:
        pass
    return exc


def convert_megatron_to_hf(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: Optional[str] = None,
    tokenizer_model: Optional[str | os.PathLike] = None,
    config_path: Optional[str | os.PathLike] = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    max_position_embeddings: Optional[int] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionSummary:
    """Export a megatron checkpoint to an HF folder (see module docstring).

    Args:
        dtype: ``bf16``/``fp16``/``fp32``; default: the checkpoint's parameter dtype.
        tokenizer_model: sentencepiece model to ship (default: the run config's
            ``data.tokenizer_model`` when that file exists).
        config_path: a RunConfig YAML to use instead of the checkpoint's ``config_yaml``.
        max_position_embeddings: default: the larger of ``data.seq_length`` (when the config has
            a data section) and ``model.pretrained_context_length``.
    """
    start = time.monotonic()
    src = _open_source(ckpt_dir, None if config_path is None else str(config_path))
    settings = _settings(src, dtype, tokenizer_model, max_position_embeddings)
    head_bases = model_head_bases(src.model, src.positional)
    max_shard = parse_size(max_shard_size)
    with atomic_output_dir(out_dir, overwrite, protect=[src.ckpt, ckpt_dir]) as tmp:
        with megatron_cpu_session():
            try:
                weights = _write_weights(src, tmp, settings.dtype, max_shard, progress)
            except Exception as exc:  # noqa: BLE001 - re-raised, as the damaged file when that is the cause
                explained = _explain_failure(src.ckpt, exc)
                if explained is exc:
                    raise
                raise explained from None
        config, tokenizer_files = _write_metadata(src, settings, tmp, head_bases)
    per_head = len(set(head_bases)) > 1
    return ConversionSummary(
        direction="megatron -> HF", output=Path(out_dir), tensors=weights["tensors"], parameters=weights["parameters"],
        bytes=weights["metadata"]["total_size"], seconds=time.monotonic() - start, dtype=hfc.dtype_name(settings.dtype),
        details={"source": str(src.ckpt),
                 "model_type": config["model_type"] + (" (trust_remote_code=True)" if per_head else ""),
                 "shards": str(len(set(weights["weight_map"].values()))),
                 "tokenizer": tokenizer_files},
        memory_bound_bytes=weights["memory_bound"],
        notes=settings.notes,
    )
