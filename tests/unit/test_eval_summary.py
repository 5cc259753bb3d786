"""report --summary: methods x lengths, seeds averaged with their spread, ranks, reference columns."""

from __future__ import annotations

import json

import pytest

from harpe_megatron.cli.eval_long_context import main as eval_main
from harpe_megatron.eval.summary import line_style, summary_table


def _result(name, ppl, passkey, window=1024):
    return {"name": name, "trained_window": window,
            "perplexity": [{"length": L, "ppl": v, "beyond_trained_window": L > window} for L, v in ppl.items()],
            "per_length": {"passkey": {str(L): v for L, v in passkey.items()}}}


def _rows(text):
    lines = [line for line in text.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return head, {cells[0]: dict(zip(head, cells)) for cells in
                  ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def test_seeds_are_averaged_with_half_range_and_ranked():
    results = [_result("A", {128: 4.0, 256: 6.0}, {128: 100.0, 256: 50.0}),
               _result("A", {128: 5.0, 256: 8.0}, {128: 90.0, 256: 30.0}),
               _result("B", {128: 3.0, 256: 30.0}, {128: 100.0, 256: 0.0}, window=128)]
    head, rows = _rows(summary_table(results, avg_lengths=[128, 256], reference={"B": {"paper": "1"}}))
    assert head[:5] == ["method", "ppl 128", "ppl 256", "ppl avg 128-256", "rank (ppl)"]
    assert rows["A"]["ppl 128"] == "4.50 ±0.50" and rows["A"]["ppl 256"] == "7.00 ±1.00"
    assert rows["A"]["ppl avg 128-256"] == "5.75 ±0.75" and rows["A"]["rank (ppl)"] == "1"
    assert rows["B"]["ppl 128"] == "3.00" and rows["B"]["rank (ppl)"] == "2"
    assert rows["A"]["passkey 256"] == "40.0 ±10.0" and rows["A"]["rank (passkey)"] == "1"
    assert rows["B"]["paper"] == "1" and rows["A"]["paper"] == "-"


def test_avg_lengths_select_the_columns_averaged():
    results = [_result("A", {128: 4.0, 256: 100.0}, {}), _result("B", {128: 5.0, 256: 6.0}, {})]
    _, rows = _rows(summary_table(results, avg_lengths=[128]))
    assert rows["A"]["ppl avg 128-128"] == "4.00" and rows["A"]["rank (ppl)"] == "1"
    _, rows = _rows(summary_table(results))
    assert rows["B"]["rank (ppl)"] == "1"


def test_report_summary_command_writes_table_and_plot(tmp_path):
    files = []
    for i, r in enumerate([_result("A", {128: 4.0, 256: 6.0}, {128: 100.0}),
                           _result("A", {128: 5.0, 256: 7.0}, {128: 80.0})]):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(r))
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"A": {"paper rank": "1"}}))
    out, png = tmp_path / "s.md", tmp_path / "ppl.png"
    assert eval_main(["report", *map(str, files), "--summary", "--out", str(out), "--ppl-plot", str(png),
                      "--avg-lengths", "128", "--reference", str(ref)]) == 0
    text = out.read_text()
    assert "| A | 4.50 ±0.50 | 6.50 ±0.50 |" in text and "(ppl.png)" in text and "paper rank" in text
    assert png.stat().st_size > 1000


def test_equal_averages_share_a_rank():
    results = [_result(n, {128: 4.0}, {128: 0.0}) for n in ("A", "B")] + [_result("C", {128: 5.0}, {128: 20.0})]
    _, rows = _rows(summary_table(results))
    assert [rows[n]["rank (passkey)"] for n in "ABC"] == ["2", "2", "1"]
    assert [rows[n]["rank (ppl)"] for n in "ABC"] == ["1", "1", "3"]


@pytest.mark.parametrize("count", [3, 10, 11, 20])
def test_plot_lines_are_told_apart(count):
    # the reproduction plots 11 arms: tab10's colours alone would give two of them the same line
    styles = [line_style(i, count) for i in range(count)]
    assert len({color for color, _ in styles}) == count
    assert all(a[1] != b[1] for a, b in zip(styles, styles[1:]))
