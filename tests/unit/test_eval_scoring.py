"""Scoring rules on hand-made answers, fake models through the harness, perplexity, report."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from harpe_megatron.eval import runner, scoring
from tests.unit.test_eval_synthetic import TOK

UUID = "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b"


@pytest.mark.parametrize("pred,answer,expected", [
    ("12345", "12345", 1.0),
    (" 12345.", "12345", 1.0),
    (" The pass key is 12345. Remember", "12345", 1.0),
    ("12346", "12345", 0.0),          # near miss: one digit off
    ("123456", "12345", 0.0),         # near miss: extra digit (substring would accept)
    ("1234", "12345", 0.0),           # truncated
    ("99 then 12345", "12345", 0.0),  # first number counts
    ("", "12345", 0.0),
    (f"is {UUID.upper()}", UUID, 1.0),
    (f"is {UUID[:-1]}c", UUID, 0.0),
])
def test_exact_match(pred, answer, expected):
    assert scoring.exact_match(pred, answer) == expected


def test_ruler_substring_rule():
    assert scoring.string_match_all("The words are APPLE, river", ["apple", "River"]) == 1.0
    assert scoring.string_match_all("apple only", ["apple", "river"]) == 0.5
    assert scoring.string_match_all("aple rivr", ["apple", "river"]) == 0.0
    assert scoring.string_match_part("apple only", ["apple", "river"]) == 1.0
    assert scoring.score_sample("x 1234567 y 7654321", ["1234567", "7654321"], "substring") == 100.0
    assert scoring.score_sample("1234567", ["1234567", "7654321"], "substring") == 50.0


def test_summaries():
    recs = [{"task": "passkey", "length": 128, "depth": 0.0, "score": 100.0},
            {"task": "passkey", "length": 128, "depth": 1.0, "score": 0.0},
            {"task": "passkey", "length": 256, "depth": 0.0, "score": 100.0},
            {"task": "vt", "length": 128, "depth": None, "score": 50.0}]
    assert scoring.per_length(recs) == {"passkey": {128: 50.0, 256: 100.0}, "vt": {128: 50.0}}
    g = scoring.grid(recs, "passkey")
    assert g == {"lengths": [128, 256], "depths": [0.0, 1.0], "scores": [[100.0, 100.0], [0.0, None]]}
    assert scoring.overall(scoring.per_length(recs)) == {128: 50.0, 256: 100.0}


_READERS = [re.compile(r"The pass key is (\d+)\."),
            re.compile(r"special magic (?:number|uuid)s? for ([\w-]+) is: ([\w-]+)\.")]


def perfect_reader(prompt: str, max_new_tokens: int) -> str:
    """Reads the queried needle(s) back from the prompt (no model involved)."""
    m = _READERS[0].search(prompt)
    if m:
        return " " + m.group(1) + "."
    question = prompt.rsplit("\n", 1)[-1]
    vals = [v for k, v in _READERS[1].findall(prompt) if f" {k} " in question or f" {k}," in question]
    return " " + ", ".join(vals) + "."


NEEDLE_TASKS = ["passkey", "needle", "niah_single", "niah_single_uuid", "niah_multikey",
                "niah_multivalue", "niah_multiquery"]


def test_perfect_fake_model_scores_100_and_blind_one_0():
    lengths, depths = [300, 700], [0.0, 0.5, 1.0]
    good = runner.run_tasks(perfect_reader, TOK, NEEDLE_TASKS, lengths, depths, num_samples=2,
                            trained_window=500, progress=False)
    assert good["records"] and not good["skipped"]
    assert all(r["score"] == 100.0 for r in good["records"])
    for task, d in good["per_length"].items():
        assert d == {"300": 100.0, "700": 100.0}, task
    assert good["grids"]["passkey"]["scores"] == [[100.0, 100.0]] * 3
    assert good["beyond_trained_window"] == [700]
    assert all(r["beyond_trained_window"] == (r["length"] > 500) for r in good["records"])

    bad = runner.run_tasks(lambda p, n: " I do not know 0000000.", TOK, NEEDLE_TASKS, lengths, depths,
                           progress=False)
    assert all(r["score"] == 0.0 for r in bad["records"])


class _UniformLM(torch.nn.Module):
    """Logits all zero: perplexity equals the vocabulary size at any length/stride."""

    def __init__(self, vocab=50):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return type("O", (), {"logits": torch.zeros(ids.shape[0], ids.shape[1], self.vocab)})()


def test_perplexity_sliding_window_counts_every_token_once():
    from harpe_megatron.eval.perplexity import perplexity_by_length, sliding_window_nll
    ids = torch.randint(0, 50, (1000,))
    for L, s in [(128, 128), (128, 32), (256, 100), (2000, 2000)]:
        nll, count = sliding_window_nll(_UniformLM(), ids, L, s)
        # overlapping windows score every token but the first exactly once; non-overlapping
        # chunks (stride == length) cannot score each chunk's first token (no context)
        assert count == (1000 - math.ceil(1000 / L) if s == L else 999), (L, s)
        assert math.isclose(nll / count, math.log(50), rel_tol=1e-5)
    rows = perplexity_by_length(_UniformLM(), ids, [64, 512], stride_fraction=0.5, trained_window=256)
    assert [r["stride"] for r in rows] == [32, 256]
    assert [r["beyond_trained_window"] for r in rows] == [False, True]
    assert all(math.isclose(r["ppl"], 50, rel_tol=1e-4) for r in rows)


def test_report_compares_methods(tmp_path):
    pytest.importorskip("matplotlib")
    from harpe_megatron.eval.report import make_report
    paths = []
    for name, fn in [("oracle", perfect_reader), ("blind", lambda p, n: "")]:
        res = runner.run_tasks(fn, TOK, ["passkey", "niah_single"], [300, 600], [0.0, 1.0],
                               trained_window=400, progress=False)
        res["name"] = name
        paths.append(runner.write_json(res, tmp_path / f"{name}.json"))
    md = make_report(paths, tmp_path / "report.md", tmp_path / "report.png")
    assert "| length | oracle | blind |" in md
    assert "| 600 | 100.0* | 0.0* |" in md and "| 300 | 100.0 | 0.0 |" in md
    assert (tmp_path / "report_passkey.png").stat().st_size > 1000
    assert json.loads(Path(paths[0]).read_text())["name"] == "oracle"
