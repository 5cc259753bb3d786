"""Heatmap PNGs of the length x depth grid (matplotlib, Agg backend, imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def _draw(ax, grid: dict, title: str, trained_window: Optional[int]):
    import numpy as np
    data = np.array([[np.nan if v is None else v for v in row] for row in grid["scores"]], dtype=float)
    im = ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(grid["lengths"])), [str(L) for L in grid["lengths"]], rotation=45)
    ax.set_yticks(range(len(grid["depths"])), [f"{100 * d:g}%" for d in grid["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.0f}", ha="center", va="center", fontsize=7)
    if trained_window:
        inside = [j for j, L in enumerate(grid["lengths"]) if L <= trained_window]
        if inside and len(inside) < len(grid["lengths"]):
            ax.axvline(max(inside) + 0.5, color="black", linestyle="--", linewidth=1.5)
    return im


def plot_grid(grid: dict, path, title: str = "", trained_window: Optional[int] = None) -> Path:
    """One heatmap; a dashed line marks the end of the trained window."""
    return plot_grids([(title, grid, trained_window)], path)


def plot_grids(panels: list[tuple[str, dict, Optional[int]]], path) -> Path:
    """Several heatmaps side by side (e.g. HARPE vs ABF) in one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    width = max(4.0, 0.6 * max(len(g["lengths"]) for _, g, _ in panels) + 2)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 0.45 * max(len(g["depths"]) for _, g, _ in panels) + 2.5),
                             squeeze=False)
    im = None
    for ax, (title, g, window) in zip(axes[0], panels):
        im = _draw(ax, g, title, window)
    fig.colorbar(im, ax=list(axes[0]), label="score")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
