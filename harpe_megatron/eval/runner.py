"""Run synthetic long-context tasks (and perplexity) on a model; write one JSON result file.

A "model" here is any ``generate(prompt: str, max_new_tokens: int) -> str``; :func:`hf_generator`
makes one from a Hugging Face causal LM with greedy decoding. Lengths beyond the model's trained
window (``max_position_embeddings``) are evaluated (that is the point of length extrapolation)
but flagged in the records, the summary and a warning.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from harpe_megatron.eval import scoring, synthetic
from harpe_megatron.eval.heatmap import plot_grid
from harpe_megatron.eval.perplexity import perplexity_by_length
from harpe_megatron.hf.harpe_llama import register
from harpe_megatron.hf.harpe_llama.self_extend_harpe_llama import apply_self_extend, self_extend_of, self_extend_settings

Generate = Callable[[str, int], str]

MAX_NEW_TOKENS = {"passkey": 12, "needle": 24, "niah_single": 24, "niah_single_uuid": 48,
                  "niah_multikey": 24, "niah_multivalue": 96, "niah_multiquery": 96,
                  "variable_tracking": 32, "common_words": 120, "frequent_words": 48}
DEFAULT_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def hf_generator(model, tokenizer, device: str | torch.device = "cpu") -> Generate:
    """Greedy generation with a HF causal LM; returns only the newly generated text."""
    model.eval()

    @torch.no_grad()
    def generate(prompt: str, max_new_tokens: int) -> str:
        ids = torch.tensor([tokenizer.encode(prompt)], device=device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, pad_token_id=pad)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return generate


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def model_source(model: str) -> tuple[str, str]:
    """``(what to load, label)`` for a model argument: an HF folder on disk or a Hub id.

    An existing directory must hold ``config.json``. A name that is not on disk is a Hub id only
    if it looks like one (``name`` or ``org/name``); anything path-like (``/``, ``./``, ``~``,
    several components) that does not exist is an error naming it, never sent to the Hub.
    The label is the folder's name, or the Hub id's last part.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{model}: a directory without config.json is not a Hugging Face model folder")
        return str(path), path.resolve().name
    if path.exists():
        raise ValueError(f"{model}: not a directory (expected an exported Hugging Face folder or a Hub id)")
    if _HUB_ID.match(model) and not model.startswith("."):
        return model, model.rsplit("/", 1)[-1]
    raise FileNotFoundError(f"{model}: no such model folder (and not a Hub id of the form org/name)")


#: Any of these in a folder makes it hold a Hugging Face tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def tokenizer_source(model: str, tokenizer: Optional[str] = None) -> str:
    """What the tokenizer is loaded from: ``tokenizer`` -- a folder with tokenizer files or a Hub
    id -- or else the model (folder or Hub id). Raises ValueError (one line naming the folder and
    the ``--tokenizer`` option) for a folder without any of :data:`TOKENIZER_FILES`,
    FileNotFoundError for a missing path. (The command line also takes a SentencePiece ``.model``
    file, converted to tokenizer files first: ``cli/eval_long_context.py``.)"""
    if tokenizer is None:
        path = Path(model).expanduser()
        if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise ValueError(f"{model}: the model folder holds no tokenizer ({', '.join(TOKENIZER_FILES)}); "
                             f"name one with --tokenizer PATH_OR_DIR")
        return model
    path = Path(tokenizer).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise ValueError(f"--tokenizer {tokenizer}: the folder holds no tokenizer ({', '.join(TOKENIZER_FILES)})")
        return str(path)
    if path.is_file():
        raise ValueError(f"--tokenizer {tokenizer}: expected a folder with tokenizer files, a SentencePiece .model "
                         f"file or a Hub id")
    if _HUB_ID.match(tokenizer) and not tokenizer.startswith("."):
        return tokenizer
    raise FileNotFoundError(f"--tokenizer {tokenizer}: no such file or folder (and not a Hub id of the form org/name)")


def load_tokenizer(source: str):
    """A Hugging Face tokenizer from :func:`tokenizer_source`'s answer (no code from the folder)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    tokenizer.model_max_length = int(1e30)   # long prompts are intended; silence the length warning
    return tokenizer


def load_hf(model_dir: str, device: str = "cpu", dtype: Optional[str] = None,
            self_extend: Optional[tuple[int, int]] = None, tokenizer: Optional[str] = None):
    """(model, tokenizer, max_position_embeddings) from an exported HF folder; the tokenizer from
    ``tokenizer`` or the folder (:func:`tokenizer_source`).

    Runs no code from the folder (``trust_remote_code=False``): ``harpe_llama`` models use this
    package's own copy of the modeling code, registered with the Auto classes.
    ``self_extend=(group_size, window)`` gives every attention layer Self-Extend (plain Llama or
    harpe_llama; :func:`~harpe_megatron.hf.harpe_llama.self_extend_harpe_llama.apply_self_extend`);
    without it, a ``self_extend`` key in the folder's config is honoured for plain Llama folders
    too (harpe_llama builds it itself; transformers' own Llama class would ignore the key).
    """
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer_source(model_dir, tokenizer)  # a folder without one fails before the model loads
    register()
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[dtype]
    kwargs = {"trust_remote_code": False}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).to(device).eval()
    wanted = self_extend or self_extend_settings(getattr(model.config, "self_extend", None))
    if wanted is not None and self_extend_of(model) != tuple(wanted):
        apply_self_extend(model, *wanted)
    return model, load_tokenizer(tokenizer), getattr(model.config, "max_position_embeddings", None)


def build_samples(tokenizer, tasks: list[str], lengths: list[int], depths: list[float],
                  num_samples: int = 1, seed: int = 0) -> tuple[list[synthetic.Sample], list[dict]]:
    """All samples of the run, plus the (task, length, reason) combinations that could not be built."""
    samples, skipped = [], []
    for task in tasks:
        for length in lengths:
            for d in (depths if task in synthetic.GRID_TASKS else [None]):
                for i in range(num_samples):
                    try:
                        samples.append(synthetic.make_sample(task, tokenizer, length, seed + i, d))
                    except ValueError as e:
                        skipped.append({"task": task, "length": length, "depth": d, "reason": str(e)})
    return samples, skipped


def run_tasks(generate: Generate, tokenizer, tasks: list[str], lengths: list[int],
              depths: Optional[list[float]] = None, num_samples: int = 1, seed: int = 0,
              trained_window: Optional[int] = None, progress: bool = True,
              keep_prompts: bool = False) -> dict:
    """Generate, score and summarise. Returns the result dict (see :func:`write_json`)."""
    depths = DEFAULT_DEPTHS if depths is None else depths
    samples, skipped = build_samples(tokenizer, tasks, lengths, depths, num_samples, seed)
    beyond = sorted({L for L in lengths if trained_window and L > trained_window})
    if beyond:
        warnings.warn(f"lengths {beyond} exceed the model's trained window ({trained_window} tokens); "
                      "they are evaluated and flagged", stacklevel=2)
    records = []
    iterator = samples
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(samples, desc="long-context eval", unit="sample")
    for s in iterator:
        t0 = time.perf_counter()
        pred = generate(s.prompt, MAX_NEW_TOKENS.get(s.task, 64))
        rec = {"task": s.task, "length": s.length, "depth": s.depth, "seed": s.seed,
               "num_tokens": s.num_tokens, "answers": s.answers, "prediction": pred,
               "metric": s.metric, "score": scoring.score_sample(pred, s.answers, s.metric),
               "beyond_trained_window": bool(trained_window and s.length > trained_window),
               "seconds": round(time.perf_counter() - t0, 4)}
        if keep_prompts:
            rec["prompt"] = s.prompt
        records.append(rec)
    per_len = scoring.per_length(records)
    grids = {t: g for t in synthetic.GRID_TASKS if (g := scoring.grid(records, t)) is not None}
    return {"trained_window": trained_window, "beyond_trained_window": beyond,
            "config": {"tasks": tasks, "lengths": lengths, "depths": depths,
                       "num_samples": num_samples, "seed": seed},
            "per_length": {t: {str(L): v for L, v in d.items()} for t, d in per_len.items()},
            "average": {str(L): v for L, v in scoring.overall(
                {t: d for t, d in per_len.items() if t not in synthetic.GRID_TASKS}).items()},
            "grids": grids, "skipped": skipped, "records": records}


class EvalInputError(ValueError):
    """An input that would give meaningless numbers, found by :func:`evaluate` before any task runs."""


def write_json(result: dict, path: str | os.PathLike) -> Path:
    """Write atomically (tmp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    return path


def evaluate(model_dir: str, out_json: str, tasks: list[str], lengths: list[int],
             depths: Optional[list[float]] = None, num_samples: int = 1, seed: int = 0,
             name: Optional[str] = None, device: str = "cpu", dtype: Optional[str] = None,
             ppl_file: Optional[str] = None, ppl_lengths: Optional[list[int]] = None,
             ppl_stride: Optional[int] = None, ppl_stride_fraction: Optional[float] = None,
             ppl_max_tokens: Optional[int] = None, heatmap_dir: Optional[str] = None,
             progress: bool = True, self_extend: Optional[tuple[int, int]] = None,
             tokenizer: Optional[str] = None, tokenizer_label: Optional[str] = None) -> dict:
    """Full evaluation of an exported HF folder: tasks, optional perplexity, JSON (+ heatmaps).
    ``self_extend=(group_size, window)`` evaluates the model with Self-Extend (what the model runs
    with, option or config key, is recorded as ``self_extend``; the default name gets a
    ``+selfextend-gG-wW`` suffix). ``tokenizer``: where the tokenizer comes from when not from the
    folder (:func:`tokenizer_source`); recorded as ``tokenizer``, or ``tokenizer_label`` when given
    (the file a scratch tokenizer folder was made from)."""

    source, label = model_source(model_dir)
    tok_source = tokenizer_source(source, tokenizer)
    model, tokenizer, window = load_hf(source, device, dtype, self_extend, tok_source)
    ppl_ids = None
    if ppl_file:  # before any task runs: a text too short for one scored token is refused
        ppl_ids = torch.tensor(tokenizer.encode(Path(ppl_file).read_text(errors="replace")))[:ppl_max_tokens or None]
        if ppl_ids.numel() < 2:
            raise EvalInputError(f"--ppl-file {ppl_file}: {ppl_ids.numel()} token(s) after tokenization"
                                 f"{' and --ppl-max-tokens' if ppl_max_tokens else ''}; a perplexity needs at least 2")
    self_extend = self_extend_of(model)   # the option, or the folder's config key
    result = run_tasks(hf_generator(model, tokenizer, device), tokenizer, tasks, lengths, depths,
                       num_samples, seed, window, progress) if tasks else {
        "trained_window": window, "per_length": {}, "grids": {}, "records": [], "skipped": []}
    suffix = f"+selfextend-g{self_extend[0]}-w{self_extend[1]}" if self_extend else ""
    result["name"] = name or label + suffix
    result["self_extend"] = ({"group_size": self_extend[0], "window": self_extend[1]}
                             if self_extend else None)
    result["model_dir"] = source
    result["tokenizer"] = tokenizer_label or tok_source
    if ppl_ids is not None:
        result["perplexity"] = perplexity_by_length(
            model, ppl_ids, ppl_lengths or lengths, ppl_stride, ppl_stride_fraction, ppl_max_tokens,
            window, device, progress)
        result["perplexity_file"] = str(ppl_file)
    if heatmap_dir and result["grids"]:
        result["heatmaps"] = {}
        for task, g in result["grids"].items():
            png = Path(heatmap_dir) / f"{result['name']}_{task}.png"
            plot_grid(g, png, title=f"{result['name']}: {task}", trained_window=window)
            result["heatmaps"][task] = str(png)
    write_json(result, out_json)
    return result
