"""The sentencepiece tokenizer: Llama conventions, training determinism, atomic outputs, errors."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from harpe_megatron.data.tokenizer import SentencePieceTokenizer, train_sentencepiece


def corpus_texts() -> list[str]:
    """A few standard-library modules: real text on every machine with Python."""
    return [Path(m.__file__).read_text(encoding="utf-8") for m in (argparse, json.decoder, json.encoder, os, shutil)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> SentencePieceTokenizer:
    return train_sentencepiece(corpus_texts(), tmp_path_factory.mktemp("tok") / "tok", vocab_size=400)


def test_llama_special_ids(tokenizer):
    assert tokenizer.vocab_size == 400
    assert (tokenizer.unk, tokenizer.bos, tokenizer.eos, tokenizer.eod) == (0, 1, 2, 2)
    with pytest.raises(NotImplementedError, match="no pad id"):
        tokenizer.pad
    assert tokenizer.vocab["<unk>"] == 0 and tokenizer.inv_vocab[1] == "<s>"


def test_tokenize_without_bos_eos_and_round_trip(tokenizer):
    text = "def main(argv):\n    return 42  # ünïcødé ✓ 你好"
    ids = tokenizer.tokenize(text)
    assert ids and ids[0] != tokenizer.bos and ids[-1] != tokenizer.eos
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.detokenize(ids) == text  # byte fallback: nothing is lost
    assert "<0x0A>" in [tokenizer.id_to_piece(i) for i in ids]  # newline via a byte piece, as in Llama


def test_training_deterministic_and_atomic(tmp_path, tokenizer):
    again = train_sentencepiece(corpus_texts(), tmp_path / "again", vocab_size=400)
    assert Path(again.model_path).read_bytes() == Path(tokenizer.model_path).read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["again.model", "again.vocab"]  # no temporary files left
    vocab = (tmp_path / "again.vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 400 and vocab[0].split("\t")[0] == "<unk>"


def test_training_from_files(tmp_path):
    f = tmp_path / "plain.txt"
    f.write_text("\n".join(corpus_texts()[:2]), encoding="utf-8")
    tok = train_sentencepiece(None, tmp_path / "fromfile", vocab_size=400, files=[f])
    assert tok.vocab_size == 400
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_sentencepiece(None, tmp_path / "x", vocab_size=300, files=[tmp_path / "missing.txt"])


def test_identity_independent_of_path_and_picklable(tmp_path, tokenizer):
    copy = tmp_path / "elsewhere.model"
    shutil.copy(tokenizer.model_path, copy)
    assert SentencePieceTokenizer(copy).unique_identifiers == tokenizer.unique_identifiers
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.tokenize("hello world") == tokenizer.tokenize("hello world")


def test_missing_or_invalid_model_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none.model")):
        SentencePieceTokenizer(tmp_path / "none.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match=rf"{bad} is not a valid sentencepiece model"):
        SentencePieceTokenizer(bad)
