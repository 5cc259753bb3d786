"""The reproduction corpus (docs/reproduction.md): text split into training and held-out
documents, plus synthetic retrieval documents, as megatron indexed datasets.

Text: this Python's standard-library modules (one file per document, the demo's source,
:func:`~harpe_megatron.data.demo.stdlib_files`), or the documents of JSONL files given as
``inputs`` (e.g. a SlimPajama sample on a GPU machine), in a seeded hash order. Walking that
order, a document of at least ``heldout_min_chars`` characters goes to the held-out set until it
holds ``heldout_chars``; every other document is training text until ``text_chars`` are taken.
Held-out text never enters training; it is written as one plain-text file (documents separated by
a blank line) for the sliding-window perplexity of ``tools/eval_long_context.py run --ppl-file``.

Retrieval documents: ``retrieval_doc(tokenize, length, seed, depth)`` returns one document of at
most ``length`` tokens (a task sample with its answer; the caller chooses the task, see
``harpe_megatron/repro/``). Two disjoint sets are drawn, one for pretraining and one for the
extension, each ``retrieval_docs`` documents with task lengths uniform in
``[retrieval_min_length, length - 10]`` (10 tokens of room for BOS, the answer and EOS) and depths
uniform in [0, 1] (a length too short for the task's fixed text grows until it fits), seeds
``10^6 + i`` (pretraining) and ``2 * 10^6 + i`` (extension), far from the evaluation's seeds
(0, 1, ...). About a tenth of the tokenizer's training text is more of them (seeds ``3 * 10^6 + i``).
Each retrieval document is padded with newlines after its answer to exactly L tokens with BOS
and EOS: megatron's GPT dataset cuts a prefix's concatenated documents into samples of L tokens
(8 L in the extension), so documents of exactly L tokens are never cut apart from their question
(at ~100 of 128 tokens, unpadded, about 3 in 4 would be).

Outputs under ``out_dir`` (``repro_manifest.json`` last, marking a complete build with its
settings; the same settings again do nothing):

``text_train.jsonl``, ``heldout.txt``, ``retrieval_{pretrain,extend}.jsonl``  the documents
``tokenizer.model`` / ``.vocab``   BPE sentencepiece (:func:`train_sentencepiece`) trained on the
                                   training text and a sample of retrieval documents
``text_document``                  training text, every document (pretraining)
``text_long_document``             the same text with Fu et al.'s length upsampling at the target
                                   window: documents shorter than ``target`` tokens kept with
                                   probability 0.1 (the long-context continual-pretraining data)
``retrieval_{pretrain,extend}_document``  the retrieval documents, all kept

Every document is written as ``[BOS] text EOS`` (``add_bos``), as the evaluation's prompts begin.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from harpe_megatron.data.atomic_files import write_json_atomic, write_jsonl_atomic, write_text_atomic
from harpe_megatron.data.build_manifest import matches_build
from harpe_megatron.data.demo import cut_document, read_text, stdlib_files
from harpe_megatron.data.indexed import write_indexed_dataset
from harpe_megatron.data.jsonl import Document, read_documents
from harpe_megatron.data.tokenizer import train_sentencepiece
from harpe_megatron.data.upsample import LengthUpsampler

__all__ = ["ANSWER_ROOM", "ReproData", "ReproDataSettings", "RetrievalDoc", "collect_text", "prepare_repro_data", "repro_outputs"]

# (tokenize, length in tokens, seed, depth in [0, 1]) -> document text of at most `length` tokens
RetrievalDoc = Callable[[Callable[[str], list], int, int, float], str]
_MANIFEST_VERSION = 1
_RETRIEVAL_SEED = {"pretrain": 1_000_000, "extend": 2_000_000, "tokenizer": 3_000_000}
ANSWER_ROOM = 10  # tokens after a task's prompt for BOS, the answer and EOS; the evaluation's passkey
# prompts are this much shorter than the window so that prompt and answer fit in it (repro/protocol.py)
_TOKENIZER_SHARE = 0.1  # retrieval documents' share of the tokenizer's training characters


@dataclass(frozen=True)
class ReproDataSettings:
    """What the corpus is built from; recorded in the manifest (a change means a rebuild)."""

    length: int  # L: the pretraining window, in tokens
    target: int  # the extension window (8 L)
    vocab_size: int
    text_chars: int  # training text budget, characters
    heldout_chars: int  # held-out text budget, characters
    heldout_min_chars: int  # a held-out document is at least this long
    retrieval_docs: int  # per set (pretraining, extension)
    retrieval_min_length: int  # shortest retrieval document, tokens
    seed: int = 1234
    inputs: list[str] = field(default_factory=list)  # JSONL files instead of the standard library

    def __post_init__(self) -> None:
        if not 0 < self.retrieval_min_length <= self.length - ANSWER_ROOM:
            raise ValueError(f"retrieval_min_length must be in [1, length - {ANSWER_ROOM}] = "
                             f"[1, {self.length - ANSWER_ROOM}], got {self.retrieval_min_length}")
        if self.target < self.length:
            raise ValueError(f"target ({self.target}) must be >= length ({self.length})")
        for key in ("vocab_size", "text_chars", "heldout_chars", "heldout_min_chars", "retrieval_docs"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")


@dataclass(frozen=True)
class ReproData:
    """Paths of a build."""

    out_dir: str
    tokenizer: str
    heldout: str
    text: str  # indexed-dataset prefixes (no .bin/.idx)
    text_long: str
    retrieval_pretrain: str
    retrieval_extend: str
    manifest: str


def repro_outputs(out_dir: str | os.PathLike) -> ReproData:
    d = Path(out_dir)
    return ReproData(out_dir=str(d), tokenizer=str(d / "tokenizer.model"), heldout=str(d / "heldout.txt"),
                     text=str(d / "text_document"), text_long=str(d / "text_long_document"),
                     retrieval_pretrain=str(d / "retrieval_pretrain_document"),
                     retrieval_extend=str(d / "retrieval_extend_document"), manifest=str(d / "repro_manifest.json"))


def _candidates(settings: ReproDataSettings) -> Iterator[tuple[str, str]]:
    """(origin, text) in the seeded order."""
    if settings.inputs:
        docs = list(read_documents(settings.inputs))
        random.Random(settings.seed).shuffle(docs)
        for d in docs:
            yield d.where, d.text
        return
    for rel, path in stdlib_files(settings.seed):
        text = read_text(path)
        if text is not None:
            yield f"stdlib/{rel}", text


def collect_text(settings: ReproDataSettings) -> tuple[list[dict], list[dict]]:
    """(training documents, held-out documents), each ``{"text", "source", "origin"}``."""
    train, heldout, train_chars, heldout_chars = [], [], 0, 0
    source = "text" if settings.inputs else "python_source"
    for origin, text in _candidates(settings):
        text = cut_document(text)
        if len(text.strip()) < 40:
            continue
        if heldout_chars < settings.heldout_chars and len(text) >= settings.heldout_min_chars:
            heldout.append({"text": text, "source": source, "origin": origin})
            heldout_chars += len(text)
        elif train_chars < settings.text_chars:
            train.append({"text": text, "source": source, "origin": origin})
            train_chars += len(text)
        if train_chars >= settings.text_chars and heldout_chars >= settings.heldout_chars:
            break
    if heldout_chars < settings.heldout_chars:
        raise ValueError(f"only {heldout_chars} characters of held-out text in documents of >= "
                         f"{settings.heldout_min_chars} characters (wanted {settings.heldout_chars}); "
                         "give more or longer input documents")
    if not train:
        raise ValueError("no training text found")
    return train, heldout


def _retrieval_texts(make: RetrievalDoc, tokenize: Callable[[str], list], settings: ReproDataSettings,
                     which: str, count: int, exact: bool = True) -> list[str]:
    """``count`` documents; a drawn length too short for the task's fixed text grows by 8 tokens
    until it fits (an error when not even ``length - 10`` does). ``exact``: newlines after the
    answer make every document, with BOS and EOS, exactly ``length`` tokens (see the module
    docstring)."""
    rng = random.Random(f"{settings.seed}:{which}")
    hi = settings.length - ANSWER_ROOM
    out = []
    for i in range(count):
        length, depth = rng.randint(settings.retrieval_min_length, hi), rng.random()
        while True:
            try:
                text = make(tokenize, length, _RETRIEVAL_SEED[which] + i, depth)
                break
            except ValueError as exc:
                if length >= hi:
                    raise ValueError(f"retrieval documents do not fit in {hi} tokens (the window {settings.length} "
                                     f"less {ANSWER_ROOM}): {exc}") from None
                length = min(hi, length + 8)
        if exact:
            text = _pad(text, tokenize, settings.length - 2)
        out.append(text)
    return out


def _pad(text: str, tokenize: Callable[[str], list], tokens: int) -> str:
    """``text`` followed by newlines up to exactly ``tokens`` tokens."""
    padded = text + "\n" * max(0, tokens - len(tokenize(text)))
    while len(tokenize(padded)) < tokens:  # several newlines merged into one piece
        padded += "\n"
    if len(tokenize(padded)) != tokens:
        raise ValueError(f"cannot pad a retrieval document to exactly {tokens} tokens with newlines")
    return padded


def _documents(texts: Iterable[str], source: str, origin: str) -> Iterator[Document]:
    for i, text in enumerate(texts):
        yield Document(index=i, text=text, source=source, path=origin, line=i + 1)


def _settings_dict(settings: ReproDataSettings) -> dict:
    return {"version": _MANIFEST_VERSION, **dataclasses.asdict(settings)}


def prepare_repro_data(out_dir: str | os.PathLike, settings: ReproDataSettings, retrieval_doc: RetrievalDoc,
                       overwrite: bool = False, progress: bool = False,
                       log: Callable[[str], None] = print) -> ReproData:
    """Build (or find) the corpus under ``out_dir``; see the module docstring.

    Raises ``FileExistsError`` when a complete build with other settings is there, unless
    ``overwrite``; ``ValueError`` when the input has too little (long) text.
    """
    out = repro_outputs(out_dir)
    wanted = _settings_dict(settings)
    if not overwrite and matches_build(out.manifest, wanted, "the corpus there",
                                       f"delete {out.out_dir} or pass --overwrite to rebuild it"):
        log(f"[repro data] already prepared in {out.out_dir}; nothing to do")
        return out
    Path(out.out_dir).mkdir(parents=True, exist_ok=True)
    if os.path.exists(out.manifest):
        os.remove(out.manifest)
    t0 = time.perf_counter()
    train, heldout = collect_text(settings)
    d = Path(out.out_dir)
    write_jsonl_atomic(d / "text_train.jsonl", train)
    write_text_atomic(out.heldout, "\n\n".join(doc["text"] for doc in heldout))
    mb = lambda docs: sum(len(x["text"]) for x in docs) / 1e6  # noqa: E731
    log(f"[repro data] text: {len(train)} training documents ({mb(train):.2f} MB), {len(heldout)} held-out "
        f"({mb(heldout):.2f} MB) [{time.perf_counter() - t0:.1f}s]")

    # The tokenizer learns the retrieval documents' words too, from about a tenth of its text (as
    # in the training mixture); their lengths here are rough (5 characters counted as one token)
    # since there is no tokenizer yet.
    proxy = lambda text: [0] * (len(text) // 5)  # noqa: E731
    one = len(_retrieval_texts(retrieval_doc, proxy, settings, "tokenizer", 1, exact=False)[0])
    n_sample = int(_TOKENIZER_SHARE / (1 - _TOKENIZER_SHARE) * sum(len(doc["text"]) for doc in train) / max(1, one))
    sample = _retrieval_texts(retrieval_doc, proxy, settings, "tokenizer", n_sample, exact=False)
    tokenizer = train_sentencepiece([doc["text"] for doc in train] + sample, d / "tokenizer",
                                    vocab_size=settings.vocab_size, seed=settings.seed)
    log(f"[repro data] tokenizer {out.tokenizer}: {tokenizer.vocab_size} pieces [{time.perf_counter() - t0:.1f}s]")

    counts = {}
    jobs: list[tuple[str, Sequence[str], str, LengthUpsampler | None]] = [
        (out.text, [doc["text"] for doc in train], train[0]["source"], None),
        (out.text_long, [doc["text"] for doc in train], train[0]["source"],
         LengthUpsampler(short_threshold=settings.target, short_keep_prob=0.1, seed=settings.seed)),
    ]
    for which, prefix in (("pretrain", out.retrieval_pretrain), ("extend", out.retrieval_extend)):
        texts = _retrieval_texts(retrieval_doc, tokenizer.tokenize, settings, which, settings.retrieval_docs)
        write_jsonl_atomic(d / f"retrieval_{which}.jsonl", [{"text": t, "source": "retrieval"} for t in texts])
        jobs.append((prefix, texts, "retrieval", None))
    for prefix, texts, source, upsampler in jobs:
        result = write_indexed_dataset(_documents(texts, source, Path(prefix).name), tokenizer, prefix,
                                       upsampler=upsampler, add_bos=True, overwrite=True, progress=progress)
        counts[Path(prefix).name] = {"documents": result.documents, "tokens": result.tokens}
        log(f"[repro data] {prefix}: {result.documents} documents, {result.tokens:,} tokens")
    write_json_atomic(out.manifest, {"settings": wanted, "datasets": counts,
                                      "heldout_documents": [doc["origin"] for doc in heldout]})
    log(f"[repro data] done in {time.perf_counter() - t0:.1f}s: {out.out_dir}")
    return out
