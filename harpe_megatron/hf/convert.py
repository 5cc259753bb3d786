"""HF Llama <-> megatron distributed checkpoints, as library functions (the tools/ scripts wrap them).

:func:`convert_hf_to_megatron`
    HF folder -> ``OUT/iter_0000000/`` (a megatron dist checkpoint holding the model's sharded
    state and the common entries ``iteration``, ``consumed_samples``, ``config_yaml``,
    ``conversion``) + ``OUT/latest`` + ``OUT/config.yaml``: the layout of a training save, so
    ``checkpoint.pretrained: OUT`` loads it (at any TP/PP whose padded vocabulary equals the one
    recorded for ``tp``, see below). One full-size model (TP=1, on CPU, never initialised) is
    built and filled one HF tensor at a time; megatron's ``dist_checkpointing.save`` writes it.

:func:`convert_megatron_to_hf`
    A training save directory (its ``latest``) or one ``iter_*`` directory, saved at any
    TP/PP/CP, is loaded into a TP=1 model in this process (dist checkpointing reshards), mapped
    to HF names tensor by tensor and streamed into sharded safetensors, with ``config.json``,
    ``generation_config.json``, the HARPE modeling code when heads have different bases, and
    tokenizer files when a sentencepiece model is known.

Both write into a temporary directory next to the output and rename it at the end (nothing is
left behind on failure) and refuse a non-empty output unless ``overwrite``.

Vocabulary padding: megatron pads the vocabulary to a multiple of
``make_vocab_size_divisible_by x TP``. The HF -> megatron direction pads for the requested TP;
a model at another TP loads the checkpoint when its padded size is the same (e.g. Llama-2's 32000
rows for TP 1 and 2). The export reads the padded size from the checkpoint and drops the padding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state
from torch.distributed.checkpoint.api import CheckpointException

from harpe_megatron.checkpoint.layout import (
    LATEST_FILE,
    checkpoint_files,
    checkpoint_name,
    file_crc32,
    resolve_checkpoint_dir,
    verify_checksums,
    write_manifest,
)
from harpe_megatron.checkpoint.safety import check_megatron_checkpoint, load_dcp_metadata
from harpe_megatron.checkpoint.save_load import describe_checkpoint_error
from harpe_megatron.config.loader import ConfigError, apply_overrides, config_from_dict, config_to_dict
from harpe_megatron.config.model import (
    ModelConfig,
    ParallelConfig,
    PositionalConfig,
    padded_vocab_size,
    validate_model_setup,
)
from harpe_megatron.distributed.bringup import free_port, init_process_group, megatron_parallel
from harpe_megatron.hf import config as hfc
from harpe_megatron.hf.harpe_llama import SHIPPED_FILES
from harpe_megatron.hf.llama_names import expected_hf_shapes, iter_hf_to_megatron, megatron_to_hf
from harpe_megatron.hf.safetensors_io import (
    HFCheckpointError,
    HFCheckpointReader,
    SafetensorsShardWriter,
    atomic_output_dir,
    parse_size,
)
from harpe_megatron.model.builder import build_model, model_head_bases, transformer_config

__all__ = [
    "ConversionSummary",
    "convert_hf_to_megatron",
    "convert_megatron_to_hf",
    "megatron_cpu_session",
    "build_full_model",
    "DEFAULT_MAX_SHARD_SIZE",
]

DEFAULT_MAX_SHARD_SIZE = "5GB"
_CONVERTED_ITERATION = 0
# model.* keys an HF -> megatron conversion may override (the others come from config.json).
_MODEL_OVERRIDABLE = ("make_vocab_size_divisible_by", "pretrained_context_length", "init_method_std")
# Tensors of HF checkpoints that a Llama model does not use (old transformers saved inv_freq).
_IGNORED_HF_TENSORS = (r"(^|\.)rotary_emb\.inv_freq$",)
_TOKENIZER_SAMPLE = (
    "Hello world! HARPE gives every head its own RoPE base.\n\n  def f(x):\n\treturn x ** 2  # 12345 67\n"
    "Ünïcödé — 中文 テキスト 😀 …end"
)


@dataclass
class ConversionSummary:
    """What a conversion did (``str()`` is the report the tools print)."""

    direction: str
    output: Path
    tensors: int
    parameters: int
    bytes: int
    seconds: float
    dtype: str
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"converted {self.direction} in {self.seconds:.1f}s",
            f"  output      {self.output}",
            f"  tensors     {self.tensors:,}",
            f"  parameters  {self.parameters:,}",
            f"  bytes       {_human(self.bytes)} ({self.dtype})",
        ]
        lines += [f"  {k:<11} {v}" for k, v in self.details.items()]
        lines += [f"  note        {n}" for n in self.notes]
        return "\n".join(lines)


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{n} B"


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# megatron on CPU, one process
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def megatron_cpu_session() -> Iterator[None]:
    """megatron parallel state for TP=PP=CP=1 in this process, on CPU (also on GPU machines).

    Reuses a 1-rank process group if one exists (else creates a gloo one and destroys it after).
    Must not be entered while a megatron parallel state is already initialised.
    """
    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("checkpoint conversion must run outside an initialised megatron parallel state")
    if dist.is_initialized() and dist.get_world_size() != 1:
        raise RuntimeError(f"checkpoint conversion runs in one process; this process group has "
                           f"{dist.get_world_size()} ranks")
    created = init_process_group("cpu", rank=0, world_size=1, port=None if dist.is_initialized() else free_port())
    try:
        with megatron_parallel(device="cpu"):
            yield
    finally:
        if created:
            dist.destroy_process_group()


def build_full_model(m: ModelConfig, positional: PositionalConfig, dtype: torch.dtype, vocab_rows: int):
    """A TP=1 HarpeGPTModel on CPU with ``vocab_rows`` embedding rows; parameters left uninitialised."""

    if vocab_rows < m.vocab_size:
        raise ValueError(f"padded vocabulary {vocab_rows} is smaller than model.vocab_size {m.vocab_size}")
    # padded_vocab_size(v, 1, rows) == rows for any v <= rows: this gives the model exactly that many rows.
    sized = dataclasses.replace(m, make_vocab_size_divisible_by=vocab_rows)
    cfg = transformer_config(sized, ParallelConfig(), params_dtype=dtype, use_cpu_initialization=True,
                             positional=positional, perform_initialization=False)
    model = build_model(sized, positional, cfg, max_sequence_length=m.pretrained_context_length,
                        use_transformer_engine=False)
    return model.eval()


# --------------------------------------------------------------------------------------------
# HF -> megatron
# --------------------------------------------------------------------------------------------


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
        with atomic_output_dir(out_dir, overwrite, protect=[hf_dir]) as tmp, megatron_cpu_session():
            model = build_full_model(m, positional, target, rows)
            params = dict(model.named_parameters())
            filled: set[str] = set()
            sources: list[str] = []
            bar = _progress(total_bytes, "HF -> megatron", progress)

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


# --------------------------------------------------------------------------------------------
# megatron -> HF
# --------------------------------------------------------------------------------------------


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


def _sp_token_ids(sp) -> dict[str, Optional[int]]:
    def idx(value: int) -> Optional[int]:
        return value if value >= 0 else None

    return {"bos": idx(sp.bos_id()), "eos": idx(sp.eos_id()), "pad": idx(sp.pad_id()), "unk": idx(sp.unk_id())}


def _has_protobuf() -> bool:
    try:
        return importlib.util.find_spec("google.protobuf") is not None
    except ModuleNotFoundError:
        return False


def _fast_tokenizer(sp_path: Path, tokenizer_config: dict, scratch: Path):
    """A transformers fast Llama tokenizer for ``sp_path``: converted by transformers (needs
    protobuf), else built from the sentencepiece vocabulary and BPE merges. None if neither works."""
    from transformers import AutoTokenizer

    folder = scratch / "tok"
    folder.mkdir()
    shutil.copyfile(sp_path, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if _has_protobuf():  # transformers' sentencepiece converter needs it
            try:
                return AutoTokenizer.from_pretrained(str(folder))
            except Exception:
                pass
        try:
            import sentencepiece as spm
            from transformers import LlamaTokenizer
            from transformers.tokenization_utils_base import generate_merges

            sp = spm.SentencePieceProcessor(model_file=str(sp_path))
            vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
            kwargs = {k: v for k, v in tokenizer_config.items() if k != "tokenizer_class"}
            return LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), **kwargs)
        except Exception:
            return None


def _export_tokenizer(sp_path: Path, out: Path, max_length: int, notes: list[str]) -> dict[str, Optional[int]]:
    """Copy ``tokenizer.model``, write LlamaTokenizer configs and, when it reproduces sentencepiece
    exactly, ``tokenizer.json``. Returns the special token ids."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    ids = _sp_token_ids(sp)
    shutil.copyfile(sp_path, out / "tokenizer.model")
    special = {f"{k}_token": sp.id_to_piece(v) for k, v in ids.items() if v is not None}
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        **special,
        "add_bos_token": ids["bos"] is not None,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": int(max_length),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    scratch = out / ".tokenizer_scratch"
    scratch.mkdir()
    try:
        fast = _fast_tokenizer(sp_path, tokenizer_config, scratch)
        reference = ([ids["bos"]] if ids["bos"] is not None else []) + sp.encode(_TOKENIZER_SAMPLE)
        if fast is not None and fast(_TOKENIZER_SAMPLE, verbose=False)["input_ids"] == reference:
            fast.save_pretrained(str(scratch / "saved"))
            shutil.copyfile(scratch / "saved" / "tokenizer.json", out / "tokenizer.json")
        else:
            notes.append("tokenizer.json not written (no exact fast conversion of the sentencepiece model); "
                         "AutoTokenizer then needs the protobuf package to read tokenizer.model")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return ids


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
            bar = _progress(writer.total_bytes, "megatron -> HF", progress)
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
            ids = _export_tokenizer(sp_path, tmp, max_pos, notes)
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
