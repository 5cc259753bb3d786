"""One table and one plot over many result files: methods x lengths, seeds aggregated.

Result files (``tools/eval_long_context.py run``) with the same ``name`` are runs of one method
(e.g. seeds): every cell shows their mean, followed by ``±h`` (h = half the min-max range) when
there are several. Rows are the names in the order first seen; columns are perplexity per length,
then each task's score per length, then averages over ``avg_lengths`` (default: every length)
with the rank they give (1 = best: lowest perplexity, highest score; equal values as shown share
a rank), then ``reference``'s
columns (e.g. another paper's numbers for the same methods).

:func:`plot_perplexity` draws perplexity against length, one line per name (the mean; a band
spans min-max across its files), log-log, with the trained windows dashed.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import fmean
from typing import Optional, Sequence

__all__ = ["group_by_name", "line_style", "plot_perplexity", "summary_table", "write_summary"]


def group_by_name(results: Sequence[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for i, r in enumerate(results):
        groups.setdefault(r.get("name") or f"run{i}", []).append(r)
    return groups


def _ppl(r: dict) -> dict[int, float]:
    return {int(row["length"]): float(row["ppl"]) for row in r.get("perplexity", [])}


def _task(r: dict, task: str) -> dict[int, float]:
    return {int(L): float(v) for L, v in r.get("per_length", {}).get(task, {}).items() if v is not None}


def _cell(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    mean = fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ±{(max(values) - min(values)) / 2:.{digits}f}"


def _ranks(means: dict[str, Optional[float]], higher_is_better: bool, digits: int) -> dict[str, str]:
    """Competition ranks (1 = best); values equal at the shown precision share a rank."""
    shown = {n: round(v, digits) for n, v in means.items() if v is not None}
    better = (lambda a, b: a > b) if higher_is_better else (lambda a, b: a < b)
    return {n: (str(1 + sum(better(w, shown[n]) for w in shown.values())) if n in shown else "-") for n in means}


def summary_table(results: Sequence[dict], avg_lengths: Optional[Sequence[int]] = None,
                  reference: Optional[dict[str, dict[str, str]]] = None) -> str:
    """The markdown table described in the module docstring."""
    groups = group_by_name(results)
    tasks = list(dict.fromkeys(t for r in results for t in r.get("per_length", {})))
    metrics = [("ppl", "ppl", _ppl, 2, False)] + [(t, t, lambda r, t=t: _task(r, t), 1, True) for t in tasks]
    columns: list[str] = []
    rows: dict[str, list[str]] = {n: [] for n in groups}
    for label, _, get, digits, higher in metrics:
        lengths = sorted({L for r in results for L in get(r)})
        if not lengths:
            continue
        columns += [f"{label} {L}" for L in lengths]
        for name, runs in groups.items():
            rows[name] += [_cell([get(r)[L] for r in runs if L in get(r)], digits) for L in lengths]
        use = [L for L in lengths if avg_lengths is None or L in avg_lengths]
        means: dict[str, Optional[float]] = {}
        for name, runs in groups.items():
            per_run = [fmean(get(r)[L] for L in use) for r in runs if all(L in get(r) for L in use)]
            means[name] = fmean(per_run) if per_run and use else None
            rows[name].append(_cell(per_run, digits) if use else "-")
        span = f"{use[0]}-{use[-1]}" if use else "-"
        columns += [f"{label} avg {span}", f"rank ({label})"]
        ranks = _ranks(means, higher, digits)
        for name in groups:
            rows[name].append(ranks[name])
    ref_columns = list(dict.fromkeys(c for cols in (reference or {}).values() for c in cols))
    columns += ref_columns
    for name in groups:
        rows[name] += [(reference or {}).get(name, {}).get(c, "-") for c in ref_columns]
    seeds = {len(runs) for runs in groups.values()}
    out = ["| method | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    out += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()]
    if seeds != {1}:
        out += ["", f"Each cell: mean over runs of one name ({', '.join(str(n) for n in sorted(seeds))} runs) "
                "±half their min-max range."]
    return "\n".join(out) + "\n"


_MARKERS = "osD^vP*Xph<>"


def line_style(index: int, count: int) -> tuple:
    """(color, marker) of line ``index`` of ``count``: no two lines alike up to 20 (tab10's colours
    repeat after 10, so more lines take tab20's), and the marker changes with every line too."""
    import matplotlib
    cmap = matplotlib.colormaps["tab10" if count <= 10 else "tab20"]
    return cmap(index % cmap.N), _MARKERS[index % len(_MARKERS)]


def plot_perplexity(results: Sequence[dict], path, title: str = "perplexity by context length") -> Path:
    """Perplexity vs length, one line per name (see the module docstring)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    groups = group_by_name(results)
    for i, (name, runs) in enumerate(groups.items()):
        lengths = sorted({L for r in runs for L in _ppl(r)})
        if not lengths:
            continue
        values = [[_ppl(r)[L] for r in runs if L in _ppl(r)] for L in lengths]
        color, marker = line_style(i, len(groups))
        line, = ax.plot(lengths, [fmean(v) for v in values], marker=marker, color=color, label=name)
        if len(runs) > 1:
            ax.fill_between(lengths, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                            alpha=0.2)
    for window in sorted({r["trained_window"] for r in results if r.get("trained_window")}):
        ax.axvline(window, color="gray", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens); dashed: trained windows")
    ax.set_ylabel("perplexity (held-out text)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_summary(paths: Sequence[str], out_md: Optional[str] = None, ppl_png: Optional[str] = None,
                  avg_lengths: Optional[Sequence[int]] = None, reference_json: Optional[str] = None) -> str:
    """Summary markdown (table, and the plot when ``ppl_png``) for result files; returns the text."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    reference = json.loads(Path(reference_json).read_text()) if reference_json else None
    md = ["# Summary", "", summary_table(results, avg_lengths, reference)]
    if ppl_png:
        png = plot_perplexity(results, ppl_png)
        rel = png.name if out_md and Path(out_md).parent.resolve() == png.parent.resolve() else str(png)
        md += [f"![perplexity by length]({rel})", ""]
    text = "\n".join(md)
    if out_md:
        Path(out_md).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(out_md).with_suffix(".md.tmp")
        tmp.write_text(text)
        tmp.replace(out_md)
    return text
