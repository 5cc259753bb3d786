"""A sentencepiece tokenizer as Hugging Face tokenizer files, for an exported model folder.

:func:`export_tokenizer` copies ``tokenizer.model``, writes ``tokenizer_config.json``
(``LlamaTokenizer``, BOS added when the model has one, no EOS) and ``special_tokens_map.json``,
and ``tokenizer.json`` only when a fast tokenizer reproduces sentencepiece's ids exactly on a
mixed sample (otherwise a note says why it is missing). transformers and sentencepiece are
imported when called.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path
from typing import Optional

__all__ = ["export_tokenizer"]

_TOKENIZER_SAMPLE = (
    "Hello world! HARPE gives every head its own RoPE base.\n\n  def f(x):\n\treturn x ** 2  # 12345 67\n"
    "Ünïcödé — 中文 テキスト 😀 …end"
)


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


def export_tokenizer(sp_path: Path, out: Path, max_length: int, notes: list[str]) -> dict[str, Optional[int]]:
    """Write the tokenizer files of ``sp_path`` into ``out`` (see module docstring); notes go to
    ``notes``. Returns the special token ids (``bos``, ``eos``, ``pad``, ``unk``; None if absent)."""
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
