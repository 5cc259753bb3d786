"""SentencePiece tokenizer for megatron-core datasets, and training a small Llama-style one.

Conventions (those of the Llama-2 ``tokenizer.model``): ``unk = 0``, ``bos = 1``, ``eos = 2``, no
pad id. :meth:`SentencePieceTokenizer.tokenize` returns the ids of the text alone, without BOS or
EOS; the preprocessor (:mod:`harpe_megatron.data.indexed`) appends EOS (megatron's ``eod``) to
every document and adds BOS only when asked. The tokenizer has no pad id unless the model file
defines one, so megatron's GPT dataset falls back to its own out-of-vocabulary pad value (-1).

:func:`train_sentencepiece` trains the demo tokenizer: BPE with byte fallback (every string is
encodable, unknown characters become ``<0x..>`` byte pieces), digits split, whitespace kept as
is, the same special ids as Llama. Training is deterministic for a given input and settings
(fixed random seed, bounded sample of sentences); outputs are written atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm
from megatron.core.tokenizers import MegatronTokenizerBase

from harpe_megatron.compat import check_megatron
from harpe_megatron.data.atomic_files import write_bytes_atomic

check_megatron()  # supported megatron-core, internals we subclass present (compat.py)

__all__ = ["SentencePieceTokenizer", "train_sentencepiece"]


class SentencePieceTokenizer(MegatronTokenizerBase):
    """A sentencepiece ``.model`` file behind megatron-core's tokenizer interface
    (``megatron.core.tokenizers.MegatronTokenizerBase``, the same class in 0.16.1 and 0.19).

    What megatron's ``GPTDataset`` reads: ``vocab_size``, ``eod`` (= ``eos``), ``pad`` (raises
    when the model has none, so megatron uses its own pad value) and ``unique_identifiers``
    (part of the hash naming the dataset index cache; here the class, the model's content hash
    and its size, so the same model under another path reuses the cache).

    Picklable (workers of the preprocessor receive it): the model is reloaded from its path.
    """

    def __init__(self, model_path: str | os.PathLike):
        # MegatronTokenizerBase.__init__ only copies a library config dict onto the instance; we
        # have no such dict and record our own identifiers instead, so it is not called.
        self.model_path = str(model_path)
        self._load()

    def _load(self) -> None:
        path = Path(self.model_path)
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece tokenizer model not found: {self.model_path}")
        data = path.read_bytes()
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError with terse messages
            raise ValueError(f"{self.model_path} is not a valid sentencepiece model: {exc}") from None
        if sp.eos_id() < 0:
            raise ValueError(f"{self.model_path}: the model defines no EOS id (needed as end-of-document)")
        self._sp = sp
        self._vocab: dict[str, int] | None = None
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__),
             ("model_sha256", hashlib.sha256(data).hexdigest()),
             ("vocab_size", sp.vocab_size())]
        )
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)

    def __getstate__(self) -> dict:
        return {"model_path": self.model_path}

    def __setstate__(self, state: dict) -> None:
        self.model_path = state["model_path"]
        self._load()

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"

    # --- encoding -------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text`` (no BOS, no EOS)."""
        return self._sp.encode(text, out_type=int)

    def detokenize(self, ids: Sequence[int] | Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError(f"{self.model_path}: a plain sentencepiece model has no chat template")

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    # --- vocabulary -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def vocab(self) -> dict[str, int]:
        if self._vocab is None:
            self._vocab = {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}
        return self._vocab

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: p for p, i in self.vocab.items()}

    # --- special ids ----------------------------------------------------------------------------
    @property
    def eod(self) -> int:
        """End of document: the EOS id (appended to every document by the preprocessor)."""
        return self._sp.eos_id()

    @property
    def eos(self) -> int:
        return self._sp.eos_id()

    @property
    def bos(self) -> int:
        if self._sp.bos_id() < 0:
            raise NotImplementedError(f"{self.model_path}: the model defines no BOS id")
        return self._sp.bos_id()

    @property
    def unk(self) -> int:
        return self._sp.unk_id()

    @property
    def pad(self) -> int:
        if self._sp.pad_id() < 0:
            raise NotImplementedError(f"{self.model_path}: the model defines no pad id (Llama-2 has none)")
        return self._sp.pad_id()


def _sentences(texts: Iterable[str], max_sentence_bytes: int) -> Iterable[str]:
    """Non-empty lines of the texts (what sentencepiece trains on), overly long ones cut."""
    for text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            if len(line) > max_sentence_bytes // 4:  # characters can take up to 4 bytes
                encoded = line.encode("utf-8")
                if len(encoded) > max_sentence_bytes:
                    line = encoded[:max_sentence_bytes].decode("utf-8", errors="ignore")
            yield line


def train_sentencepiece(
    texts: Iterable[str] | None = None,
    out_prefix: str | os.PathLike = "tokenizer",
    vocab_size: int = 512,
    *,
    files: Sequence[str | os.PathLike] | None = None,
    input_sentence_size: int = 200_000,
    character_coverage: float = 0.9995,
    max_sentence_bytes: int = 4192,
    seed: int = 1234,
    num_threads: int = 2,
) -> SentencePieceTokenizer:
    """Train a Llama-style BPE sentencepiece model; writes ``<out_prefix>.model`` and ``.vocab``.

    Input: ``texts`` (an iterable of documents) and/or ``files`` (plain-text files), split into
    non-empty lines, each one training sentence. At most ``input_sentence_size`` sentences are
    used (a seeded sample when there are more). Settings: BPE, ``byte_fallback``, ``split_digits``,
    identity normalisation, whitespace kept, ``unk=0 bos=1 eos=2``, no pad. ``vocab_size``
    includes the 3 special and 256 byte pieces plus one piece per character that
    ``character_coverage`` keeps (about 80-150 for English text and code); sentencepiece's error
    says how many it needs when the size is too small.

    Both files are written under temporary names and renamed (``.vocab`` first, then ``.model``),
    so an interrupted run never leaves a ``.model`` that is half written. Returns the tokenizer.
    """
    if texts is None and not files:
        raise ValueError("train_sentencepiece: give texts and/or files")
    if vocab_size <= 259 + 3:
        raise ValueError(f"vocab_size must exceed the 259 special and byte pieces by some margin, got {vocab_size}")
    sources: list[Iterable[str]] = []
    if texts is not None:
        sources.append(texts)
    for f in files or ():
        if not Path(f).is_file():
            raise FileNotFoundError(f"tokenizer training file not found: {f}")
        sources.append([Path(f).read_text(encoding="utf-8", errors="replace")])
    lines = [line for src in sources for line in _sentences(src, max_sentence_bytes)]
    if not lines:
        raise ValueError("train_sentencepiece: the input has no non-empty line")

    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            character_coverage=character_coverage,
            max_sentence_length=max_sentence_bytes,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise ValueError(f"sentencepiece training for {out_prefix}.model failed: {exc}") from None
    data = model.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=data)
    vocab_text = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))
    model_path = out_prefix.with_name(out_prefix.name + ".model")
    write_bytes_atomic(out_prefix.with_name(out_prefix.name + ".vocab"), vocab_text.encode("utf-8"))
    write_bytes_atomic(model_path, data)
    return SentencePieceTokenizer(model_path)
