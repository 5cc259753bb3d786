"""JSONL reading: sources, keys, gzip, and errors that name file:line."""

from __future__ import annotations

import gzip
import json

import pytest

from harpe_megatron.data.jsonl import read_documents, source_name_of_file


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_documents_sources_and_indices(tmp_path):
    a = _write(tmp_path / "books.jsonl", [
        json.dumps({"text": "one", "source": "wiki"}),
        "",  # blank lines are skipped
        json.dumps({"text": "two", "meta": {"redpajama_set_name": "RedPajamaBook"}}),
        json.dumps({"text": "three"}),
    ])
    b = tmp_path / "more.jsonl.gz"
    with gzip.open(b, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "four", "source": None}) + "\n")
    docs = list(read_documents([a, str(b)]))
    assert [d.text for d in docs] == ["one", "two", "three", "four"]
    assert [d.source for d in docs] == ["wiki", "RedPajamaBook", "books", "more"]
    assert [d.index for d in docs] == [0, 1, 2, 3]
    assert [d.line for d in docs] == [1, 3, 4, 1]
    assert docs[1].where == f"{a}:3"


def test_custom_and_nested_keys(tmp_path):
    a = _write(tmp_path / "x.jsonl", [json.dumps({"body": {"content": "hi"}, "lang": "en"})])
    (doc,) = read_documents([a], text_key="body.content", source_key="lang")
    assert (doc.text, doc.source) == ("hi", "en")


def test_glob_patterns_expand_sorted(tmp_path):
    for name in ("b.jsonl", "a.jsonl"):
        _write(tmp_path / name, [json.dumps({"text": name})])
    docs = list(read_documents([str(tmp_path / "*.jsonl")]))
    assert [d.text for d in docs] == ["a.jsonl", "b.jsonl"]


def test_source_name_of_file():
    assert source_name_of_file("/d/arxiv.jsonl.gz") == "arxiv"
    assert source_name_of_file("c4.json") == "c4"


def test_bad_json_names_file_and_line(tmp_path):
    a = _write(tmp_path / "bad.jsonl", [json.dumps({"text": "ok"}), '{"text": "unterminated'])
    with pytest.raises(ValueError, match=rf"{tmp_path / 'bad.jsonl'}:2: invalid JSON"):
        list(read_documents([a]))


def test_missing_text_field_names_file_line_and_key(tmp_path):
    a = _write(tmp_path / "m.jsonl", [json.dumps({"text": "ok"}), json.dumps({"content": "no text"})])
    with pytest.raises(ValueError, match=r"m\.jsonl:2: no text field 'text'"):
        list(read_documents([a]))
    with pytest.raises(ValueError, match=r"m\.jsonl:1: no text field 'content'"):
        list(read_documents([a], text_key="content"))


@pytest.mark.parametrize("value", [123, None, ["a"]])
def test_non_string_text(tmp_path, value):
    a = _write(tmp_path / "n.jsonl", [json.dumps({"text": value})])
    with pytest.raises(ValueError, match=r"n\.jsonl:1: field 'text' must be a string"):
        list(read_documents([a]))


def test_non_object_line(tmp_path):
    a = _write(tmp_path / "l.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match=r"l\.jsonl:1: expected a JSON object"):
        list(read_documents([a]))


def test_empty_input(tmp_path):
    a = _write(tmp_path / "empty.jsonl", ["", "   "])
    (tmp_path / "zero.jsonl").write_text("")
    with pytest.raises(ValueError, match="no documents"):
        list(read_documents([a, str(tmp_path / "zero.jsonl")]))


def test_missing_file_and_unmatched_glob(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(read_documents([str(tmp_path / "nope.jsonl")]))
    with pytest.raises(FileNotFoundError, match=r"no input file matches"):
        list(read_documents([str(tmp_path / "*.jsonl")]))
