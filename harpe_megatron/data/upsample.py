"""Length upsampling (Fu et al. 2024, "Data Engineering for Scaling Language Models to 128K Context").

The rule, applied identically inside every source: a document shorter than ``short_threshold``
tokens is kept with probability ``short_keep_prob``; every longer document is kept. Dropping
most short documents raises the share of tokens that sit in long documents (what long-context
continual pretraining needs) without inventing data, and because the same rule runs inside each
source no source is singled out; sources whose documents are mostly short still lose some of
their share, which the report shows (per-source weights can restore it at blending time).

Length of a document = the tokens stored for it (text tokens plus the appended EOS, plus BOS when
the preprocessor adds one). "Short" means ``length < short_threshold``; "long" means
``length >= short_threshold``. ``short_threshold = 0`` (or ``short_keep_prob = 1``) keeps all.

Determinism: the keep/drop decision for document ``i`` is a function of ``(seed, i)`` only (a
hash mapped to ``[0, 1)``), not of processing order, worker count or other documents.

:class:`UpsamplingReport` accumulates, per source and in total, before and after the rule:
document and token counts, each source's share of all tokens, the share of tokens in long
documents and a length histogram (documents and tokens per bin), as a dict (``to_dict``, the
``<prefix>.report.json`` of the preprocessor) and as a text table (``render``).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["DEFAULT_BIN_EDGES", "LengthUpsampler", "UpsamplingReport", "bin_labels", "render_report"]

# Histogram bin edges in tokens: <1k, 1k-2k, 2k-4k, ..., 64k-128k, >=128k.
DEFAULT_BIN_EDGES: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


@dataclass(frozen=True)
class LengthUpsampler:
    """The keep rule; ``keep(index, length)`` decides for document ``index`` of ``length`` tokens."""

    short_threshold: int = 4096
    short_keep_prob: float = 0.1
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.short_threshold < 0:
            raise ValueError(f"short_threshold must be >= 0 tokens, got {self.short_threshold}")
        if not 0.0 <= self.short_keep_prob <= 1.0:
            raise ValueError(f"short_keep_prob must be in [0, 1], got {self.short_keep_prob}")

    @classmethod
    def keep_all(cls, short_threshold: int = 4096, seed: int = 1234) -> "LengthUpsampler":
        """Keep every document; ``short_threshold`` still defines "long" in the report."""
        return cls(short_threshold=short_threshold, short_keep_prob=1.0, seed=seed)

    @property
    def active(self) -> bool:
        return self.short_threshold > 0 and self.short_keep_prob < 1.0

    def draw(self, index: int) -> float:
        """The uniform number in ``[0, 1)`` attached to document ``index`` (depends on the seed)."""
        digest = hashlib.blake2b(struct.pack("<qq", self.seed, index), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2.0**64

    def is_short(self, length: int) -> bool:
        return length < self.short_threshold

    def keep(self, index: int, length: int) -> bool:
        if not self.is_short(length):
            return True
        return self.draw(index) < self.short_keep_prob


def _fmt_tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


def bin_labels(edges: Sequence[int]) -> list[str]:
    """``['<1k', '1k-2k', ..., '>=128k']`` for the given ascending edges."""
    labels = [f"<{_fmt_tokens(edges[0])}"]
    labels += [f"{_fmt_tokens(a)}-{_fmt_tokens(b)}" for a, b in zip(edges[:-1], edges[1:])]
    labels.append(f">={_fmt_tokens(edges[-1])}")
    return labels


class _Stats:
    __slots__ = ("documents", "tokens", "long_tokens", "hist_docs", "hist_tokens")

    def __init__(self, nbins: int):
        self.documents = 0
        self.tokens = 0
        self.long_tokens = 0
        self.hist_docs = [0] * nbins
        self.hist_tokens = [0] * nbins

    def add(self, length: int, long: bool, b: int) -> None:
        self.documents += 1
        self.tokens += length
        self.long_tokens += length if long else 0
        self.hist_docs[b] += 1
        self.hist_tokens[b] += length

    def to_dict(self, all_tokens: int) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "token_share": self.tokens / all_tokens if all_tokens else 0.0,
            "long_tokens": self.long_tokens,
            "long_token_share": self.long_tokens / self.tokens if self.tokens else 0.0,
            "histogram": {"documents": list(self.hist_docs), "tokens": list(self.hist_tokens)},
        }


class UpsamplingReport:
    """Per-source statistics before/after the rule; feed every document with :meth:`add`."""

    def __init__(self, upsampler: LengthUpsampler, bin_edges: Sequence[int] = DEFAULT_BIN_EDGES):
        edges = [int(e) for e in bin_edges]
        if not edges or any(b <= a for a, b in zip(edges[:-1], edges[1:])) or edges[0] <= 0:
            raise ValueError(f"bin_edges must be positive and strictly ascending, got {list(bin_edges)}")
        self.upsampler = upsampler
        self.bin_edges = edges
        self._before: dict[str, _Stats] = {}
        self._after: dict[str, _Stats] = {}

    def _bin(self, length: int) -> int:
        for i, edge in enumerate(self.bin_edges):
            if length < edge:
                return i
        return len(self.bin_edges)

    def add(self, source: str, length: int, kept: bool) -> None:
        """Record one document of ``length`` tokens from ``source``, kept or dropped."""
        nbins = len(self.bin_edges) + 1
        if source not in self._before:
            self._before[source] = _Stats(nbins)
            self._after[source] = _Stats(nbins)
        long = not self.upsampler.is_short(length)
        b = self._bin(length)
        self._before[source].add(length, long, b)
        if kept:
            self._after[source].add(length, long, b)

    @property
    def sources(self) -> list[str]:
        return sorted(self._before)

    def _total(self, stats: dict[str, _Stats]) -> _Stats:
        total = _Stats(len(self.bin_edges) + 1)
        for s in stats.values():
            total.documents += s.documents
            total.tokens += s.tokens
            total.long_tokens += s.long_tokens
            total.hist_docs = [a + b for a, b in zip(total.hist_docs, s.hist_docs)]
            total.hist_tokens = [a + b for a, b in zip(total.hist_tokens, s.hist_tokens)]
        return total

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``rule``, ``bins``, ``sources[name]`` and ``total``, each ``{before, after}``."""
        tb, ta = self._total(self._before), self._total(self._after)
        u = self.upsampler
        return {
            "rule": {
                "short_threshold": u.short_threshold,
                "short_keep_prob": u.short_keep_prob,
                "seed": u.seed,
                "active": u.active,
                "length": "tokens stored per document (text + EOS [+ BOS])",
            },
            "bins": bin_labels(self.bin_edges),
            "bin_edges": list(self.bin_edges),
            "sources": {
                name: {"before": self._before[name].to_dict(tb.tokens),
                       "after": self._after[name].to_dict(ta.tokens)}
                for name in self.sources
            },
            "total": {"before": tb.to_dict(tb.tokens), "after": ta.to_dict(ta.tokens)},
        }

    def render(self) -> str:
        """The report as text tables (summary per source, then length histograms)."""
        return render_report(self.to_dict())


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def render_report(report: dict[str, Any]) -> str:
    """Render a report dict (``UpsamplingReport.to_dict()`` or a loaded ``.report.json``)."""
    rule = report["rule"]
    out = []
    if rule["active"]:
        out.append(
            f"Length upsampling (Fu et al. 2024): documents < {rule['short_threshold']} tokens kept "
            f"with p={rule['short_keep_prob']:g} (seed {rule['seed']}), longer ones all kept; "
            f"'long' = >= {rule['short_threshold']} tokens."
        )
    else:
        out.append(f"Length upsampling off: every document kept ('long' = >= {rule['short_threshold']} tokens).")
    header = ["source", "docs", "-> kept", "tokens", "-> kept", "share", "-> kept", "long-doc tokens", "-> kept"]
    rows = []
    entries = list(report["sources"].items()) + [("TOTAL", report["total"])]
    for name, st in entries:
        b, a = st["before"], st["after"]
        rows.append([name, f"{b['documents']:,}", f"{a['documents']:,}", f"{b['tokens']:,}", f"{a['tokens']:,}",
                     _pct(b["token_share"]), _pct(a["token_share"]),
                     _pct(b["long_token_share"]), _pct(a["long_token_share"])])
    out += _table(header, rows)
    for name, st in entries:
        out.append("")
        out.append(f"length histogram: {name} (documents and tokens per bin, before -> after)")
        hb, ha = st["before"]["histogram"], st["after"]["histogram"]
        rows = [[label, f"{hb['documents'][i]:,}", f"{ha['documents'][i]:,}",
                 f"{hb['tokens'][i]:,}", f"{ha['tokens'][i]:,}"]
                for i, label in enumerate(report["bins"])]
        out += _table(["tokens", "docs", "-> kept", "tokens", "-> kept"], rows)
    return "\n".join(out)
