"""Markdown report comparing result files (methods) per length, plus side-by-side heatmaps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from harpe_megatron.eval.heatmap import plot_grids


def load(paths) -> list[dict]:
    """The result files (``run``'s JSON); ValueError naming a file that is missing or not one."""
    results = []
    for p in paths:
        try:
            result = json.loads(Path(p).read_text())
        except OSError as exc:
            raise ValueError(f"{p}: cannot be read ({exc.strerror})") from None
        except ValueError as exc:
            raise ValueError(f"{p}: not a result file of 'run' (invalid JSON: {exc})") from None
        if not isinstance(result, dict) or "per_length" not in result:
            raise ValueError(f"{p}: not a result file of 'run' (no per_length)")
        results.append(result)
    return results


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def task_tables(results: list[dict]) -> str:
    """One table per task: rows = lengths, columns = methods; '*' marks lengths beyond a
    method's trained window."""
    names = [r.get("name", f"run{i}") for i, r in enumerate(results)]
    tasks = list(dict.fromkeys(t for r in results for t in r.get("per_length", {})))
    if any(r.get("average") for r in results):
        tasks.append("average")
    out = []
    for task in tasks:
        lengths = sorted({int(L) for r in results for L in (r.get("average", {}) if task == "average"
                                                            else r.get("per_length", {}).get(task, {}))})
        out += [f"### {task}", "", "| length | " + " | ".join(names) + " |",
                "|---:|" + "---:|" * len(names)]
        for L in lengths:
            cells = []
            for r in results:
                d = r.get("average", {}) if task == "average" else r.get("per_length", {}).get(task, {})
                mark = "*" if r.get("trained_window") and L > r["trained_window"] else ""
                cells.append(_fmt(d.get(str(L))) + mark)
            out.append(f"| {L} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def perplexity_tables(results: list[dict]) -> str:
    names = [r.get("name", f"run{i}") for i, r in enumerate(results)]
    if not any(r.get("perplexity") for r in results):
        return ""
    lengths = sorted({row["length"] for r in results for row in r.get("perplexity", [])})
    out = ["### perplexity (lower is better)", "", "| length | " + " | ".join(names) + " |",
           "|---:|" + "---:|" * len(names)]
    for L in lengths:
        cells = []
        for r in results:
            row = next((x for x in r.get("perplexity", []) if x["length"] == L), None)
            cells.append("-" if row is None else f"{row['ppl']:.2f}" + ("*" if row.get("beyond_trained_window") else ""))
        out.append(f"| {L} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def make_report(paths, out_md: Optional[str] = None, heatmap_png: Optional[str] = None) -> str:
    """Markdown comparing the result files; with ``heatmap_png`` also one PNG per grid task with
    the methods side by side, linked from the report."""
    results = load(paths)
    md = ["# Long-context evaluation", "",
          "Scores in % (passkey/needle: exact match; RULER tasks: case-insensitive substring, all answers). "
          "`*` = beyond the model's trained window (`max_position_embeddings`).", "",
          task_tables(results), perplexity_tables(results)]
    if heatmap_png:
        grid_tasks = list(dict.fromkeys(t for r in results for t in r.get("grids", {})))
        for task in grid_tasks:
            panels = [(f"{r.get('name')}: {task}", r["grids"][task], r.get("trained_window"))
                      for r in results if task in r.get("grids", {})]
            png = Path(heatmap_png)
            png = png.with_name(f"{png.stem}_{task}{png.suffix or '.png'}")
            plot_grids(panels, png)
            rel = png.name if out_md and Path(out_md).parent.resolve() == png.parent.resolve() else str(png)
            md += [f"![{task} heatmaps]({rel})", ""]
    text = "\n".join(md)
    if out_md:
        Path(out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(out_md).write_text(text)
    return text
