"""What must hold at any scale (the smoke tier's assertions, checked after every tier's run).

* The un-extended base fails beyond its window: its perplexity at 4 L is at least ``FACTOR``
  times its perplexity at L (RoPE angles it never saw).
* Extension works: HARPE's and single-stage ABF's perplexity at 4 L (inside their 8 L window) is
  at most the base's there divided by ``FACTOR`` (checked for those of the two that were run).

These say nothing about which method is better; that is the comparison the tiers measure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from harpe_megatron.repro.protocol import TierPlan

__all__ = ["FACTOR", "run_checks"]

FACTOR = 2.0


def _ppl(results: Path, arm: str, length: int) -> float | None:
    path = results / f"{arm}.json"
    if not path.is_file():
        return None
    rows = json.loads(path.read_text()).get("perplexity", [])
    return next((float(r["ppl"]) for r in rows if int(r["length"]) == length), None)


def run_checks(results: Path, plan: TierPlan, arms: list[str], say: Callable[[str], None] = print) -> list[str]:
    """Check the results folder of one seed; returns the failures (also said, with the passes)."""
    L, far = plan.length, 4 * plan.length
    base_l, base_far = _ppl(results, "base", L), _ppl(results, "base", far)
    failures, lines = [], []
    if base_l is None or base_far is None:
        failures.append(f"base: no perplexity at {L} and {far} in {results}/base.json")
    else:
        ok = base_far >= FACTOR * base_l
        lines.append((ok, f"base: perplexity at {far} = {base_far:.2f} >= {FACTOR:g} x its perplexity at {L} "
                          f"({base_l:.2f})"))
    for arm in ("harpe", "abf"):
        if arm not in arms or base_far is None:
            continue
        value = _ppl(results, arm, far)
        if value is None:
            failures.append(f"{arm}: no perplexity at {far} in {results}/{arm}.json")
            continue
        lines.append((value <= base_far / FACTOR, f"{arm}: perplexity at {far} = {value:.2f} <= base's there "
                                                  f"({base_far:.2f}) / {FACTOR:g}"))
    failures += [text for ok, text in lines if not ok]
    for ok, text in lines:
        say(f"check {'passed' if ok else 'FAILED'}: {text}")
    for text in failures:
        if not any(text == t for _, t in lines):
            say(f"check FAILED: {text}")
    return failures
