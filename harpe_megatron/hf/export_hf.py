"""megatron checkpoint -> HF Llama folder (:func:`convert_megatron_to_hf`).

A training save directory (its ``latest``) or one ``iter_*`` directory, saved at any TP/PP/CP, is
checked (manifest CRCs, no code-running pickles), loaded into a TP=1 model in this process (dist
checkpointing reshards), mapped to HF names tensor by tensor (``llama_names``; the vocabulary
padding, whose size is read from the checkpoint, is dropped) and streamed into sharded
safetensors, with ``config.json``, ``generation_config.json``, the HARPE modeling code when heads
have different bases, and tokenizer files when a sentencepiece model is known.

Written into a temporary directory next to the output and renamed at the end (nothing is left
behind on failure); a non-empty output is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
import yaml
from torch.distributed.checkpoint.api import CheckpointException

from harpe_megatron.checkpoint.layout import resolve_checkpoint_dir, verify_checksums
from harpe_megatron.checkpoint.safety import check_megatron_checkpoint, load_dcp_metadata
from harpe_megatron.checkpoint.save_load import describe_checkpoint_error
from harpe_megatron.config.loader import config_from_dict
from harpe_megatron.hf import config as hfc
from harpe_megatron.hf.harpe_llama import SHIPPED_FILES
from harpe_megatron.hf.llama_names import megatron_to_hf
from harpe_megatron.hf.output_dir import atomic_output_dir
from harpe_megatron.hf.safetensors_io import SafetensorsShardWriter, parse_size
from harpe_megatron.hf.session import build_full_model, megatron_cpu_session
from harpe_megatron.hf.summary import ConversionSummary, progress_bar
from harpe_megatron.hf.tokenizer_export import export_tokenizer
from harpe_megatron.model.builder import model_head_bases

__all__ = ["convert_megatron_to_hf", "DEFAULT_MAX_SHARD_SIZE"]

DEFAULT_MAX_SHARD_SIZE = "5GB"


def _check_finite(state: dict[str, torch.Tensor], ckpt: Path) -> None:
    """Refuse to export weights holding NaN/inf (a diverged or damaged checkpoint), naming them."""
    bad = []
    for name, t in state.items():
        if t.is_floating_point():
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad.append(f"{name} ({n} of {t.numel()})")
    if bad:
        raise ValueError(f"{ckpt}: non-finite weights in {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}; "
                         "refusing to export them")


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
    from megatron.core import dist_checkpointing

    start = time.monotonic()
    ckpt = resolve_checkpoint_dir(ckpt_dir)
    verify_checksums(ckpt)  # CheckpointDamaged names a file whose bytes differ from the manifest's CRC-32
    check_megatron_checkpoint(ckpt)  # no pickled part runs code (see checkpoint/safety.py)
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    tree, source = _load_run_tree(ckpt, common, None if config_path is None else str(config_path))
    # Only what the export needs: the saved parallel layout is irrelevant (we load at TP=1).
    run_cfg = config_from_dict({k: tree[k] for k in ("model", "positional", "data") if k in tree}, source)
    m, positional = run_cfg.model, run_cfg.positional
    if positional.rotary_interleaved:
        raise ValueError(f"{source}: positional.rotary_interleaved=true has no HF Llama equivalent")

    # torch's own checkpoint metadata, read with the restricted unpickler (megatron's
    # load_tensors_metadata breaks on torch >= 2.15, whose TensorProperties gained ``strides``).
    emb = load_dcp_metadata(ckpt).state_dict_metadata.get("embedding.word_embeddings.weight")
    if emb is None or not hasattr(emb, "size"):
        raise ValueError(f"{ckpt}: no embedding.word_embeddings.weight in the checkpoint (is it a model checkpoint?)")
    rows, ckpt_dtype = int(emb.size[0]), emb.properties.dtype
    out_dtype = ckpt_dtype if dtype is None else hfc.DTYPES.get(dtype)
    if out_dtype is None:
        raise ValueError(f"dtype must be bf16, fp16 or fp32, got {dtype!r}")
    head_bases = model_head_bases(m, positional)
    per_head = len(set(head_bases)) > 1
    if max_position_embeddings is not None and max_position_embeddings < 1:
        raise ValueError(f"max_position_embeddings must be >= 1, got {max_position_embeddings}")
    max_pos = max_position_embeddings or max(int((tree.get("data") or {}).get("seq_length") or 0),
                                             m.pretrained_context_length)

    notes: list[str] = []
    sp_path = None
    if tokenizer_model is not None:
        sp_path = Path(tokenizer_model)
        if not sp_path.is_file():
            raise FileNotFoundError(f"--tokenizer-model {sp_path} does not exist")
    elif run_cfg.data.tokenizer_model:
        candidate = Path(run_cfg.data.tokenizer_model)
        if candidate.is_file():
            sp_path = candidate
        else:
            notes.append(f"tokenizer not exported: data.tokenizer_model {candidate} not found "
                         "(pass --tokenizer-model)")
    hf_source = (common.get("conversion") or {}).get("hf_config") or {}
    token_ids = {"bos": hf_source.get("bos_token_id", 1), "eos": hf_source.get("eos_token_id", 2),
                 "pad": hf_source.get("pad_token_id")}
    max_shard = parse_size(max_shard_size)

    with atomic_output_dir(out_dir, overwrite, protect=[ckpt, ckpt_dir]) as tmp:
        with megatron_cpu_session():
            model = build_full_model(m, positional, ckpt_dtype, rows)
            try:
                loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt))
            except (Exception, CheckpointException) as exc:  # torch's CheckpointException is a BaseException
                raise ValueError(f"{ckpt}: cannot read the checkpoint ({describe_checkpoint_error(exc)})") from None
            model.load_state_dict(loaded["model"])
            del loaded
            state = {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
            _check_finite(state, ckpt)
            plan = []
            for name, t in state.items():
                meta = {name: torch.empty(t.shape, dtype=t.dtype, device="meta")}
                plan += [(hf_name, tuple(ht.shape), out_dtype) for hf_name, ht in megatron_to_hf(meta, m).items()]
            writer = SafetensorsShardWriter(tmp, plan, max_shard_bytes=max_shard)
            bar = progress_bar(writer.total_bytes, "megatron -> HF", progress)
            try:
                for name, t in state.items():
                    for hf_name, ht in megatron_to_hf({name: t}, m).items():
                        before = writer.bytes_written
                        writer.write(hf_name, ht.to(out_dtype))
                        bar.update(writer.bytes_written - before)
                index = writer.close()
            finally:
                writer.abort()
                bar.close()
            num_params = sum(math.prod(shape) for _, shape, _ in plan)
            del state, model
        tokenizer_files = "none"
        if sp_path is not None:
            ids = export_tokenizer(sp_path, tmp, max_pos, notes)
            token_ids = {"bos": ids["bos"], "eos": ids["eos"], "pad": ids["pad"]}
            tokenizer_files = "tokenizer.model" + (" + tokenizer.json" if (tmp / "tokenizer.json").is_file() else "")
        config = hfc.hf_config_dict(m, head_bases, positional.scaling, out_dtype, max_pos, token_ids["bos"], token_ids["eos"],
                                    token_ids["pad"])
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = hfc.generation_config_dict(token_ids["bos"], token_ids["eos"], token_ids["pad"])
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if per_head:
            for f in SHIPPED_FILES:
                shutil.copyfile(f, tmp / f.name)
    return ConversionSummary(
        direction="megatron -> HF", output=Path(out_dir), tensors=len(plan), parameters=num_params,
        bytes=index["metadata"]["total_size"], seconds=time.monotonic() - start, dtype=hfc.dtype_name(out_dtype),
        details={"source": str(ckpt),
                 "model_type": config["model_type"] + (" (trust_remote_code=True)" if per_head else ""),
                 "shards": str(len(set(index["weight_map"].values()))),
                 "tokenizer": tokenizer_files},
        notes=notes,
    )
