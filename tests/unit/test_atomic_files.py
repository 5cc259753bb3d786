"""Whole-file writes of the data builds (harpe_megatron/data/atomic_files.py) and the build
manifest check (harpe_megatron/data/build_manifest.py)."""

from __future__ import annotations

import json

import pytest

from harpe_megatron.data.atomic_files import write_json_atomic, write_jsonl_atomic, write_text_atomic
from harpe_megatron.data.build_manifest import matches_build


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "m.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})  # not serialisable: fails before anything is written
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_jsonl_and_text(tmp_path):
    write_jsonl_atomic(tmp_path / "d.jsonl", [{"text": "é"}, {"text": "b"}])
    assert (tmp_path / "d.jsonl").read_text(encoding="utf-8") == '{"text": "é"}\n{"text": "b"}\n'
    write_text_atomic(tmp_path / "t.txt", "x\ny")
    assert (tmp_path / "t.txt").read_text() == "x\ny"


def test_matches_build(tmp_path):
    manifest = tmp_path / "manifest.json"
    assert matches_build(manifest, {"seed": 1}, "the data there", "rebuild it") is False  # nothing built
    write_json_atomic(manifest, {"settings": {"seed": 1, "vocab": 512}})
    assert matches_build(manifest, {"seed": 1, "vocab": 512}, "the data there", "rebuild it") is True
    with pytest.raises(FileExistsError, match=r"the data there was built with other settings .*'vocab': \(512, 1024\).*; rebuild it"):
        matches_build(manifest, {"seed": 1, "vocab": 1024}, "the data there", "rebuild it")
