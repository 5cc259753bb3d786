"""What a conversion reports: :class:`ConversionSummary` and the byte-weighted progress bar."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

__all__ = ["ConversionSummary", "progress_bar"]


@dataclass
class ConversionSummary:
    """What a conversion did (``str()`` is the report the tools print)."""

    direction: str
    output: Path
    tensors: int
    parameters: int
    bytes: int
    seconds: float
    dtype: str
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    memory_bound_bytes: int = 0  # stated peak memory above the process baseline (0: not stated)
    memory_extra: str = ""  # what the bound does not cover (e.g. memory-mapped .bin shards)

    def __str__(self) -> str:
        lines = [
            f"converted {self.direction} in {self.seconds:.1f}s",
            f"  output      {self.output}",
            f"  tensors     {self.tensors:,}",
            f"  parameters  {self.parameters:,}",
            f"  bytes       {_human(self.bytes)} ({self.dtype})",
        ]
        lines += [f"  {k:<11} {v}" for k, v in self.details.items()]
        if self.memory_bound_bytes:
            lines.append(f"  memory      peak above the process baseline <= {_human(self.memory_bound_bytes)}, "
                         f"whatever the model size{self.memory_extra}")
        lines += [f"  note        {n}" for n in self.notes]
        return "\n".join(lines)


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{n} B"


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """A progress bar over ``total`` bytes (disabled unless ``enabled``)."""
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                dynamic_ncols=True)
