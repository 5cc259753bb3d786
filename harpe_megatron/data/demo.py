"""A small real corpus from text already on the machine: JSONL, tokenizer, upsampled indexed data.

Sources (each document labelled with its ``source``; a source that is absent is skipped):

``python_source``      modules of this Python's standard library (``.py`` files, test suites
                       excluded), one file per document, about 2 MB;
``python_docstrings``  the docstrings (module, classes, functions) of *other* standard-library
                       modules, one module per document, about 0.8 MB;
``licenses``           ``/usr/share/common-licenses/*`` and the distinct
                       ``/usr/share/doc/*/copyright`` files, one file per document, about 1.2 MB.

Files are picked in a seeded hash order of their names (a spread over the whole library, not the
first letters of the alphabet) until a source's byte budget is reached; a document longer than
60,000 characters is cut at a line end. The documents of all sources are shuffled (seeded) so
that megatron's train/valid split, which cuts the document range, sees every source.

:func:`prepare_demo_data` writes, under ``out_dir``:

``corpus.jsonl``                        ``{"text", "source", "origin"}`` per line
``tokenizer.model`` / ``.vocab``        a Llama-style BPE sentencepiece model (default 512 pieces)
``demo_text_document.{bin,idx}``        the indexed dataset, upsampled (below)
``demo_text_document.report.json``      the upsampling report
``demo_manifest.json``                  the settings; written last (marks a complete build)

Upsampling is the Fu et al. rule scaled to the demo's short documents and 256-token sequences:
documents under 512 tokens are kept with probability 0.1, all longer ones kept; the histogram
bins run from 128 to 8k tokens. Everything is deterministic for given settings. Calling it again
with the same settings does nothing; different settings on an existing build need
``overwrite=True``.
"""

from __future__ import annotations

import ast
import hashlib
import os
import random
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from harpe_megatron.data.atomic_files import write_json_atomic, write_jsonl_atomic
from harpe_megatron.data.build_manifest import matches_build
from harpe_megatron.data.indexed import write_indexed_dataset
from harpe_megatron.data.jsonl import read_documents
from harpe_megatron.data.tokenizer import train_sentencepiece
from harpe_megatron.data.upsample import LengthUpsampler, render_report

__all__ = [
    "DEMO_BIN_EDGES",
    "DEMO_KEEP_PROB",
    "DEMO_PREFIX_NAME",
    "DEMO_SHORT_THRESHOLD",
    "DemoData",
    "collect_demo_documents",
    "cut_document",
    "demo_outputs",
    "prepare_demo_data",
    "read_text",
    "stdlib_files",
]

DEMO_PREFIX_NAME = "demo_text_document"
DEMO_SHORT_THRESHOLD = 512
DEMO_KEEP_PROB = 0.1
DEMO_BIN_EDGES = (128, 256, 512, 1024, 2048, 4096, 8192)
# Byte budgets per source (about 4 MB of text in all: ~1.5M tokens at 512 pieces).
SOURCE_BUDGETS = {"python_source": 2_000_000, "python_docstrings": 800_000, "licenses": 1_200_000}
MAX_DOC_CHARS = 60_000
MIN_DOC_CHARS = 40
_MANIFEST_VERSION = 1
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class DemoData:
    """Paths of a prepared demo build."""

    out_dir: str
    corpus: str
    tokenizer: str  # the .model file
    prefix: str  # indexed-dataset prefix (no .bin/.idx)
    report: str
    manifest: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def demo_outputs(out_dir: str | os.PathLike) -> DemoData:
    d = Path(out_dir)
    prefix = d / DEMO_PREFIX_NAME
    return DemoData(out_dir=str(d), corpus=str(d / "corpus.jsonl"), tokenizer=str(d / "tokenizer.model"),
                    prefix=str(prefix), report=str(prefix) + ".report.json", manifest=str(d / "demo_manifest.json"))


def _order_key(seed: int, name: str) -> bytes:
    return hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()


def read_text(path: Path) -> str | None:
    """The file's text (UTF-8, else Latin-1), or None when it cannot be read."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def cut_document(text: str) -> str:
    """``text`` cut to at most ``MAX_DOC_CHARS`` characters, at a line end when there is one."""
    if len(text) <= MAX_DOC_CHARS:
        return text
    end = text.rfind("\n", 0, MAX_DOC_CHARS)
    return text[: end if end > MAX_DOC_CHARS // 2 else MAX_DOC_CHARS]


def stdlib_files(seed: int) -> list[tuple[str, Path]]:
    """``(path relative to the standard library, path)`` of this Python's standard-library
    modules (test suites and site-packages excluded), in a seeded hash order of their names."""
    root = Path(sysconfig.get_paths().get("stdlib") or os.path.dirname(os.__file__))
    if not root.is_dir():
        return []
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in filenames:
            if name.endswith(".py"):
                p = Path(dirpath) / name
                files.append((p.relative_to(root).as_posix(), p))
    files.sort(key=lambda f: _order_key(seed, f[0]))
    return files


def _docstrings(source: str) -> str:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                parts.append(doc)
    return "\n\n".join(parts)


def _license_files(seed: int) -> list[tuple[str, Path]]:
    files = []
    common = Path("/usr/share/common-licenses")
    if common.is_dir():
        files += [(str(p), p) for p in sorted(common.iterdir()) if p.is_file()]
    doc = Path("/usr/share/doc")
    if doc.is_dir():
        files += [(str(p), p) for p in sorted(doc.glob("*/copyright")) if p.is_file()]
    files.sort(key=lambda f: _order_key(seed, f[0]))
    return files


def _take(budget: int, limit: int | None, candidates: Iterator[tuple[str, str]], source: str) -> list[dict]:
    docs, used, seen = [], 0, set()
    for origin, text in candidates:
        if limit is not None and len(docs) >= limit:
            break
        if used >= budget:
            break
        text = cut_document(text)
        if len(text.strip()) < MIN_DOC_CHARS:
            continue
        digest = hashlib.sha1(text.encode("utf-8", errors="replace")).digest()
        if digest in seen:  # many copyright files repeat the same text
            continue
        seen.add(digest)
        docs.append({"text": text, "source": source, "origin": origin})
        used += len(text)
    return docs


def collect_demo_documents(max_docs: int | None = None, seed: int = 1234) -> list[dict]:
    """The demo documents (dicts with ``text``, ``source``, ``origin``), shuffled.

    ``max_docs`` caps the total, split evenly over the sources. Raises ``RuntimeError`` if no
    source is found on this machine.
    """
    per_source = None if max_docs is None else max(1, max_docs // len(SOURCE_BUDGETS))
    stdlib = stdlib_files(seed)

    def source_files() -> Iterator[tuple[str, str]]:
        for rel, path in stdlib:
            text = read_text(path)
            if text is not None:
                yield f"stdlib/{rel}", text

    source_docs = _take(SOURCE_BUDGETS["python_source"], per_source, source_files(), "python_source")
    taken = {d["origin"] for d in source_docs}

    def docstring_modules() -> Iterator[tuple[str, str]]:
        for rel, path in stdlib:
            if f"stdlib/{rel}" in taken:
                continue
            text = read_text(path)
            if text is not None:
                yield f"stdlib/{rel}#docstrings", _docstrings(text)

    doc_docs = _take(SOURCE_BUDGETS["python_docstrings"], per_source, docstring_modules(), "python_docstrings")

    def licenses() -> Iterator[tuple[str, str]]:
        for origin, path in _license_files(seed):
            text = read_text(path)
            if text is not None:
                yield origin, text

    lic_docs = _take(SOURCE_BUDGETS["licenses"], per_source, licenses(), "licenses")
    docs = source_docs + doc_docs + lic_docs
    if not docs:
        raise RuntimeError("no demo text found on this machine (Python standard library sources, "
                           "/usr/share/common-licenses, /usr/share/doc/*/copyright)")
    random.Random(seed).shuffle(docs)
    return docs


def _settings(vocab_size: int, max_docs: int | None, seed: int) -> dict:
    return {"version": _MANIFEST_VERSION, "vocab_size": vocab_size, "max_docs": max_docs, "seed": seed,
            "short_threshold": DEMO_SHORT_THRESHOLD, "short_keep_prob": DEMO_KEEP_PROB,
            "bin_edges": list(DEMO_BIN_EDGES), "source_budgets": dict(SOURCE_BUDGETS)}


def prepare_demo_data(
    out_dir: str | os.PathLike,
    vocab_size: int = 512,
    max_docs: int | None = None,
    seed: int = 1234,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
    log: Callable[[str], None] = print,
) -> DemoData:
    """Build (or find) the demo corpus, tokenizer and indexed dataset under ``out_dir``.

    Returns the paths. Does nothing when a complete build with the same settings exists; raises
    ``FileExistsError`` when one with other settings exists, unless ``overwrite``.
    """
    out = demo_outputs(out_dir)
    settings = _settings(vocab_size, max_docs, seed)
    files = [out.corpus, out.tokenizer, out.prefix + ".bin", out.prefix + ".idx", out.report]
    if not overwrite and all(os.path.isfile(f) for f in files) and matches_build(
            out.manifest, settings, "the demo data there", "pass overwrite=True / --overwrite to rebuild it"):
        log(f"[demo data] already prepared in {out.out_dir} (corpus.jsonl, tokenizer.model, "
            f"{DEMO_PREFIX_NAME}.bin/.idx); nothing to do")
        return out
    # Imported here: megatron-core takes seconds to import, the check above does not need it.

    # A missing manifest means no build or an interrupted one: (re)build everything.
    Path(out.out_dir).mkdir(parents=True, exist_ok=True)
    if os.path.exists(out.manifest):
        os.remove(out.manifest)
    t0 = time.perf_counter()

    docs = collect_demo_documents(max_docs=max_docs, seed=seed)
    write_jsonl_atomic(out.corpus, docs)
    by_source: dict[str, list[int]] = {}
    for d in docs:
        n = by_source.setdefault(d["source"], [0, 0])
        n[0] += 1
        n[1] += len(d["text"].encode("utf-8"))
    total_bytes = sum(n[1] for n in by_source.values())
    log(f"[demo data] corpus {out.corpus}: {len(docs)} documents, {total_bytes / 1e6:.2f} MB ("
        + ", ".join(f"{s}: {n[0]} docs, {n[1] / 1e6:.2f} MB" for s, n in sorted(by_source.items()))
        + f") [{time.perf_counter() - t0:.1f}s]")

    t1 = time.perf_counter()
    tokenizer = train_sentencepiece((d["text"] for d in docs), Path(out.tokenizer).with_suffix(""),
                                    vocab_size=vocab_size, seed=seed)
    log(f"[demo data] tokenizer {out.tokenizer}: BPE, {tokenizer.vocab_size} pieces "
        f"[{time.perf_counter() - t1:.1f}s]")

    t2 = time.perf_counter()
    upsampler = LengthUpsampler(short_threshold=DEMO_SHORT_THRESHOLD, short_keep_prob=DEMO_KEEP_PROB, seed=seed)
    if workers is None:
        workers = 1 if len(docs) < 2000 else min(2, os.cpu_count() or 1)
    result = write_indexed_dataset(read_documents([out.corpus]), tokenizer, out.prefix, upsampler=upsampler,
                                   bin_edges=DEMO_BIN_EDGES, workers=workers, overwrite=True, progress=progress)
    log(render_report(result.report))
    log(f"[demo data] indexed dataset {out.prefix}.bin/.idx: {result.documents} documents, "
        f"{result.tokens:,} tokens ({result.dtype}); report {out.report} [{time.perf_counter() - t2:.1f}s]")
    write_json_atomic(out.manifest, {"settings": settings, "documents": result.documents, "tokens": result.tokens,
                                     "corpus_documents": len(docs), "corpus_bytes": total_bytes})
    log(f"[demo data] done in {time.perf_counter() - t0:.1f}s: {out.out_dir}")
    return out
