"""Scoring: exact match for passkey / needle grid, RULER's case-insensitive substring rule,
per-length and length x depth summaries."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable, Optional

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_NUMBER = re.compile(r"\d+")


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the first number (or UUID, if the answer is one) in ``prediction`` equals
    ``answer`` exactly, else 0.0. "12345." and " The pass key is 12345" match 12345;
    "123456", "12346" and "1234" do not (a substring rule would accept "123456")."""
    pattern = _UUID if _UUID.fullmatch(answer.strip()) else _NUMBER
    found = pattern.search(prediction)
    return float(found is not None and found.group(0).lower() == answer.strip().lower())


def string_match_all(prediction: str, answers: Iterable[str]) -> float:
    """RULER 'string_match_all' for one sample: fraction of answers found in the prediction as
    case-insensitive substrings (1.0 when all are)."""
    answers = list(answers)
    if not answers:
        return 0.0
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def string_match_part(prediction: str, answers: Iterable[str]) -> float:
    """RULER 'string_match_part' (QA tasks): 1.0 when any answer is a case-insensitive substring."""
    pred = prediction.lower()
    return float(any(a.lower() in pred for a in answers))


def score_sample(prediction: str, answers: list[str], metric: str) -> float:
    """Score in [0, 100]: ``exact`` (every answer by exact_match) or ``substring`` (RULER all)."""
    if metric == "exact":
        return 100.0 * sum(exact_match(prediction, a) for a in answers) / max(1, len(answers))
    if metric == "substring":
        return 100.0 * string_match_all(prediction, answers)
    raise ValueError(f"unknown metric {metric!r}")


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def per_length(records: list[dict]) -> dict[str, dict[int, float]]:
    """{task: {length: mean score}} over records with keys task, length, score."""
    acc: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        acc[r["task"]][int(r["length"])].append(r["score"])
    return {t: {L: _mean(v) for L, v in sorted(d.items())} for t, d in acc.items()}


def grid(records: list[dict], task: str) -> Optional[dict]:
    """{lengths, depths, scores[depth_i][length_j]} for a grid task (None if no records)."""
    rs = [r for r in records if r["task"] == task and r.get("depth") is not None]
    if not rs:
        return None
    lengths = sorted({int(r["length"]) for r in rs})
    depths = sorted({float(r["depth"]) for r in rs})
    cells: dict[tuple, list[float]] = defaultdict(list)
    for r in rs:
        cells[(float(r["depth"]), int(r["length"]))].append(r["score"])
    scores = [[_mean(cells.get((d, L), [])) for L in lengths] for d in depths]
    return {"lengths": lengths, "depths": depths, "scores": scores}


def overall(per_len: dict[str, dict[int, float]]) -> dict[int, float]:
    """Mean over tasks per length (RULER's average column)."""
    acc: dict[int, list[float]] = defaultdict(list)
    for d in per_len.values():
        for L, v in d.items():
            if v is not None:
                acc[L].append(v)
    return {L: _mean(v) for L, v in sorted(acc.items())}
