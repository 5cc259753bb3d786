"""What must hold at any scale (the smoke tier's assertions, checked after every tier's run).

Perplexities are the evaluation's sliding-window ones (stride half the length), so every token
scored at 4 L sits at a position in [2 L, 4 L) and sees keys up to 4 L back: 2 to 4 times the
relative distances the base ever trained on. Written in log-perplexity (nats per token):

* The un-extended base fails beyond its window: ``ln ppl_base(4L) - ln ppl_base(L)`` (its
  *excess loss* beyond the window) is at least ``ln BASE_MIN_RATIO``.
* Extension works: HARPE's and single-stage ABF's perplexity at 4 L (inside their 8 L window)
  removes at least half of that excess, ``ln ppl_base(4L) - ln ppl_arm(4L) >= excess / 2``,
  i.e. the arm's perplexity at 4 L is at most the geometric mean of the base's at L and at 4 L
  (checked for those of the two that were run).
* Where the tier asks for it (``Tier.min_in_window_passkey``: the cpu and gpu tiers' 90 %), the
  base retrieves the passkey inside its own window (prompts of L - ``ANSWER_ROOM`` tokens),
  so that retrieval beyond it measures the extension and not a task the base never learned.

Why not "a factor of 2 both ways": how much a model loses beyond its window depends on how much
of its prediction rests on far-away tokens, which grows with scale and training. Llama-2-7B at
4x its window is off by orders of magnitude; a 0.17M-parameter model trained on 1M tokens of code
predicts from its last ~30 tokens (its perplexity with 32 tokens of context is no worse than
with 128) and loses 1.2-1.5x at 4 L whatever its RoPE base or head dim (docs/reproduction.md,
"Checks"). The statements that hold at every scale are relative to the base's own loss: it is
there, clearly beyond the spread between trainings (BASE_MIN_RATIO), and an extension removes
most of it. These say nothing about which method is better; that is what the tiers measure.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from harpe_megatron.repro.protocol import TierPlan

__all__ = ["BASE_MIN_RATIO", "run_checks"]

# The base's perplexity at 4 L over its perplexity at L must be at least this: more than twice the
# +-4.5 % spread of the smoke base's perplexity at L between trainings (docs/reproduction.md, "Checks").
BASE_MIN_RATIO = 1.10


def _ppl(results: Path, arm: str, length: int) -> float | None:
    path = results / f"{arm}.json"
    if not path.is_file():
        return None
    rows = json.loads(path.read_text()).get("perplexity", [])
    return next((float(r["ppl"]) for r in rows if int(r["length"]) == length), None)


def _in_window_passkey(results: Path, length: int) -> float | None:
    """The base's passkey accuracy (%) at prompt length ``length`` (the per_length table)."""
    path = results / "base.json"
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get("per_length", {}).get("passkey", {}).get(str(length))
    return None if value is None else float(value)


def run_checks(results: Path, plan: TierPlan, arms: list[str], say: Callable[[str], None] = print) -> list[str]:
    """Check the results folder of one seed; returns the failures (also said, with the passes)."""
    L, far = plan.length, 4 * plan.length
    base_l, base_far = _ppl(results, "base", L), _ppl(results, "base", far)
    failures, lines = [], []
    if base_l is None or base_far is None:
        failures.append(f"base: no perplexity at {L} and {far} in {results}/base.json")
    else:
        excess = math.log(base_far / base_l)
        lines.append((base_far >= BASE_MIN_RATIO * base_l,
                      f"base: perplexity at {far} = {base_far:.2f} >= {BASE_MIN_RATIO:g} x its perplexity at {L} "
                      f"({base_l:.2f}); excess loss beyond its window {excess:.3f} nats/token"))
        bound = math.sqrt(base_l * base_far)
        for arm in ("harpe", "abf"):
            if arm not in arms:
                continue
            value = _ppl(results, arm, far)
            if value is None:
                failures.append(f"{arm}: no perplexity at {far} in {results}/{arm}.json")
                continue
            removed = math.log(base_far / value) / excess if excess > 0 else float("nan")
            lines.append((value <= bound, f"{arm}: perplexity at {far} = {value:.2f} <= {bound:.2f} (geometric mean "
                                          f"of the base's at {L} and {far}); removes {removed:.0%} of the base's "
                                          f"excess loss"))
    least = plan.tier.min_in_window_passkey
    if least is not None:
        n = plan.passkey_lengths[0]
        acc = _in_window_passkey(results, n)
        if acc is None:
            failures.append(f"base: no passkey accuracy at {n} in {results}/base.json")
        else:
            lines.append((acc >= least, f"base: passkey accuracy inside its window (prompts of {n} tokens) "
                                        f"{acc:.1f} % >= {least:g} %"))
    failures += [text for ok, text in lines if not ok]
    for ok, text in lines:
        say(f"check {'passed' if ok else 'FAILED'}: {text}")
    for text in failures:
        if not any(text == t for _, t in lines):
            say(f"check FAILED: {text}")
    return failures
