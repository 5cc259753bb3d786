"""Preprocessing JSONL into megatron indexed datasets: round trip, upsampling, atomicity, errors, CLI."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from harpe_megatron.data.dataset import check_indexed_dataset
from harpe_megatron.data.indexed import output_paths, write_indexed_dataset
from harpe_megatron.data.jsonl import Document, read_documents
from harpe_megatron.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from harpe_megatron.data.upsample import LengthUpsampler
from tests.unit.test_data_tokenizer import corpus_texts

ROOT = Path(__file__).resolve().parents[2]


def load_tool(name: str):
    return importlib.import_module(f"harpe_megatron.cli.{name}")


def sample_texts(n: int = 60) -> list[str]:
    """Documents of varied lengths cut from real text (some a few tokens, some hundreds)."""
    text = "\n".join(corpus_texts())
    out, pos = [], 0
    for i in range(n):
        size = [30, 200, 1500, 80, 4000][i % 5]
        out.append(text[pos:pos + size])
        pos += size
    return out


def write_jsonl(path: Path, texts: list[str], sources: list[str] | None = None) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            rec = {"text": t}
            if sources:
                rec["source"] = sources[i % len(sources)]
            f.write(json.dumps(rec) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> SentencePieceTokenizer:
    return train_sentencepiece(corpus_texts(), tmp_path_factory.mktemp("tok") / "tok", vocab_size=400)


def test_round_trip_through_megatron_indexed_dataset(tmp_path, tokenizer):
    texts = sample_texts()
    src = write_jsonl(tmp_path / "in.jsonl", texts, sources=["a", "b"])
    prefix = str(tmp_path / "out" / "data")
    result = write_indexed_dataset(read_documents([src]), tokenizer, prefix, progress=False)
    ds = IndexedDataset(prefix)
    assert len(ds) == len(texts) == result.documents
    assert ds.index.dtype == np.uint16
    np.testing.assert_array_equal(ds.document_indices, np.arange(len(texts) + 1))
    for i, t in enumerate(texts):
        assert ds[i].tolist() == tokenizer.tokenize(t) + [tokenizer.eos]
    assert result.tokens == int(ds.sequence_lengths.sum())
    info = check_indexed_dataset(prefix)
    assert (info.sequences, info.documents, info.tokens, info.dtype) == (len(texts), len(texts), result.tokens, "uint16")
    report = json.loads(Path(result.report_path).read_text())
    assert report["total"]["after"]["tokens"] == result.tokens
    assert set(report["sources"]) == {"a", "b"}
    assert sorted(os.listdir(tmp_path / "out")) == ["data.bin", "data.idx", "data.report.json"]


def test_add_bos_and_empty_documents(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "in.jsonl", ["hello world", "", "second document"])
    prefix = str(tmp_path / "bos")
    result = write_indexed_dataset(read_documents([src]), tokenizer, prefix, add_bos=True, progress=False)
    ds = IndexedDataset(prefix)
    assert len(ds) == 2 and result.report["empty_documents_skipped"] == 1
    assert ds[0].tolist() == [tokenizer.bos] + tokenizer.tokenize("hello world") + [tokenizer.eos]


def test_upsampling_drops_exactly_the_rule_decisions(tmp_path, tokenizer):
    texts = sample_texts(100)
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    u = LengthUpsampler(short_threshold=100, short_keep_prob=0.3, seed=5)
    prefix = str(tmp_path / "up")
    result = write_indexed_dataset(read_documents([src]), tokenizer, prefix, upsampler=u, progress=False)
    expected = []
    for i, t in enumerate(texts):
        ids = tokenizer.tokenize(t) + [tokenizer.eos]
        if u.keep(i, len(ids)):
            expected.append(ids)
    ds = IndexedDataset(prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    assert 0 < len(expected) < len(texts)
    assert any(len(ids) < 100 for ids in expected)  # some short documents survive (p = 0.3)
    before, after = result.report["total"]["before"], result.report["total"]["after"]
    assert (before["documents"], after["documents"]) == (len(texts), len(expected))
    assert after["long_token_share"] > before["long_token_share"]


def test_workers_give_identical_output(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "in.jsonl", sample_texts(80))
    u = LengthUpsampler(short_threshold=100, short_keep_prob=0.5, seed=1)
    for w in (1, 2):
        write_indexed_dataset(read_documents([src]), tokenizer, str(tmp_path / f"w{w}"), upsampler=u,
                              workers=w, batch_size=8, progress=False)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()


def test_failure_midway_leaves_no_output(tmp_path, tokenizer):
    texts = sample_texts(20)
    docs = [Document(index=i, text=t, source="s", path="mem", line=i + 1) for i, t in enumerate(texts)]

    def exploding():
        yield from docs[:10]
        raise RuntimeError("reader died")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="reader died"):
        write_indexed_dataset(exploding(), tokenizer, str(out / "data"), progress=False)
    assert not out.exists()  # not even the directory it created
    # a bad line in the middle of a JSONL file: same, and the error names file:line
    src = tmp_path / "in.jsonl"
    write_jsonl(src, texts)
    with open(src, "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"in\.jsonl:21: invalid JSON"):
        write_indexed_dataset(read_documents([str(src)]), tokenizer, str(out / "data"), workers=2, progress=False)
    assert not out.exists()
    out.mkdir()  # an existing directory stays, without any file
    with pytest.raises(RuntimeError, match="reader died"):
        write_indexed_dataset(exploding(), tokenizer, str(out / "data"), progress=False)
    assert os.listdir(out) == []


def test_existing_output_refused_unless_overwrite(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "in.jsonl", sample_texts(5))
    prefix = str(tmp_path / "data")
    Path(prefix + ".idx").write_text("old")
    with pytest.raises(FileExistsError, match=r"data\.idx"):
        write_indexed_dataset(read_documents([src]), tokenizer, prefix, progress=False)
    assert Path(prefix + ".idx").read_text() == "old" and not os.path.exists(prefix + ".bin")
    write_indexed_dataset(read_documents([src]), tokenizer, prefix, overwrite=True, progress=False)
    assert len(IndexedDataset(prefix)) == 5


class _BadTokenizer(SentencePieceTokenizer):
    def tokenize(self, text):
        return [self.vocab_size + 3] if "BAD" in text else super().tokenize(text)


def test_token_id_outside_vocabulary(tmp_path, tokenizer):
    bad = _BadTokenizer(tokenizer.model_path)
    src = write_jsonl(tmp_path / "in.jsonl", ["fine", "fine too", "BAD one"])
    with pytest.raises(ValueError, match=r"in\.jsonl:3: token id 403 outside the vocabulary \[0, 400\)"):
        write_indexed_dataset(read_documents([src]), bad, str(tmp_path / "d"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_nothing_left_is_an_error(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "in.jsonl", ["tiny", "small"])
    with pytest.raises(ValueError, match="no document left"):
        write_indexed_dataset(read_documents([src]), tokenizer, str(tmp_path / "d"),
                              upsampler=LengthUpsampler(1000, 0.0), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_check_indexed_dataset_errors(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "in.jsonl", sample_texts(10))
    prefix = str(tmp_path / "d")
    write_indexed_dataset(read_documents([src]), tokenizer, prefix, progress=False)
    paths = output_paths(prefix)
    data = Path(paths["bin"]).read_bytes()
    Path(paths["bin"]).write_bytes(data[:-10])
    with pytest.raises(ValueError, match=rf"{paths['bin']}: truncated"):
        check_indexed_dataset(prefix)
    Path(paths["bin"]).write_bytes(data)
    index = Path(paths["idx"]).read_bytes()
    Path(paths["idx"]).write_bytes(index[:-8])
    with pytest.raises(ValueError, match=rf"{paths['idx']}: truncated"):
        check_indexed_dataset(prefix)
    os.remove(paths["idx"])
    with pytest.raises(FileNotFoundError, match=rf"{paths['idx']}"):
        check_indexed_dataset(prefix)


def test_preprocess_cli(tmp_path, tokenizer, capsys):
    tool = load_tool("preprocess_data")
    src = write_jsonl(tmp_path / "in.jsonl", sample_texts(30), sources=["x", "y"])
    prefix = str(tmp_path / "cli" / "data")
    args = ["--input", src, "--tokenizer-model", tokenizer.model_path, "--output-prefix", prefix,
            "--short-threshold", "100", "--short-keep-prob", "0.2", "--no-progress"]
    assert tool.main(args) == 0
    out = capsys.readouterr().out
    assert "TOTAL" in out and prefix + ".bin" in out and prefix + ".report.json" in out
    report = json.loads(Path(prefix + ".report.json").read_text())
    assert report["rule"]["short_threshold"] == 100 and set(report["sources"]) == {"x", "y"}
    assert tool.main(args) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert tool.main(args + ["--overwrite", "--no-upsample"]) == 0
    assert json.loads(Path(prefix + ".report.json").read_text())["total"]["after"]["documents"] == 30


def test_bad_input_is_one_line_exit_2_and_leaves_no_folders(tmp_path, tokenizer, capsys):
    """Input that is missing, not text or lacks the text field: one line, exit 2, and none of the
    folders the output prefix needed is left behind (before, the outer ones stayed)."""
    tool = load_tool("preprocess_data")
    good = write_jsonl(tmp_path / "in.jsonl", sample_texts(3))
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\x00\xff\xfe binary")
    prefix = tmp_path / "new" / "a" / "b" / "data"
    for inputs, message in [([str(tmp_path / "missing.jsonl")], "input file not found"),
                            ([str(binary)], f"{binary}: not valid UTF-8"),
                            ([good, "--text-key", "nokey"], f"{good}:1: no text field 'nokey'")]:
        code = tool.main(["--input", *inputs, "--tokenizer-model", tokenizer.model_path, "--output-prefix", str(prefix),
                          "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"preprocess_data: error: ") and message in err and err.count("\n") == 1
        assert not (tmp_path / "new").exists()


def test_stale_temporary_files_of_a_killed_writer_are_removed(tmp_path, tokenizer, capsys):
    """A writer killed with -9 leaves <prefix>.tmp-<host>-<pid>.*; the next write of that prefix
    removes them once the pid is gone, and leaves a live writer's and another host's alone."""
    import socket
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    prefix = tmp_path / "data"
    dead = [tmp_path / f"data.tmp-{host}-{gone.pid}.bin", tmp_path / f"data.tmp-{host}-{gone.pid}.idx"]
    kept = [tmp_path / f"data.tmp-{host}-{os.getppid()}.bin", tmp_path / f"data.tmp-otherhost-{gone.pid}.bin"]
    for f in dead + kept:
        f.write_bytes(b"partial")
    src = write_jsonl(tmp_path / "in.jsonl", sample_texts(10))
    write_indexed_dataset(read_documents([src]), tokenizer, str(prefix), progress=False)
    assert not any(f.exists() for f in dead) and all(f.exists() for f in kept)
    assert f"removed temporary files of an interrupted earlier write: {dead[0]}, {dead[1]}" in capsys.readouterr().err


def test_ctrl_c_with_workers_stops_promptly_and_leaves_nothing(tmp_path, tokenizer):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while 2 workers tokenize:
    the tool exits 130 within seconds with one line, no temporary file and no worker left."""
    import signal
    import subprocess
    import sys
    import time

    src = write_jsonl(tmp_path / "in.jsonl", sample_texts(60) * 400)
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        marker = f"HARPE_TEST_LAUNCH={out}"
        env = dict(os.environ, HARPE_TEST_LAUNCH=str(out), OMP_NUM_THREADS="1")
        proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", src,
                                 "--tokenizer-model", tokenizer.model_path, "--output-prefix", str(out / "data"),
                                 "--workers", "2", "--no-upsample", "--no-progress"],
                                env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 60
        while not list(out.glob("data.tmp-*.bin")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.02)
        time.sleep(0.2 * attempt)  # at different points of the work
        os.killpg(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"attempt {attempt}: preprocess_data hung after Ctrl-C") from None
        err = proc.stderr.read()
        assert code == 130, err
        assert "preprocess_data: interrupted; no output written" in err and "Traceback" not in err
        assert list(out.iterdir()) == [] if out.exists() else True
        left = []
        for p in Path("/proc").iterdir():
            try:
                if p.name.isdigit() and marker.encode() in (p / "environ").read_bytes().split(b"\0"):
                    left.append(p.name)
            except OSError:
                continue
        assert left == [], f"attempt {attempt}: processes left: {left}"


class _ExplodingTokenizer:
    """Tokenizes by characters; a text "die" ends its worker process, "bad" raises."""

    def tokenize(self, text: str) -> list[int]:
        if text == "die":
            os._exit(3)
        if text == "bad":
            raise ValueError("cannot tokenize 'bad'")
        return [ord(c) for c in text]


@pytest.mark.parametrize("poison, error", [("die", "died with exit code 3"), ("bad", "cannot tokenize 'bad'")])
def test_a_failing_worker_is_an_error_not_a_hang(poison, error):
    """A worker that dies (killed, out of memory) or raises ends the iteration with an error naming it;
    documents before it come out in order, and no worker is left behind."""
    import multiprocessing

    from harpe_megatron.data.tokenize_workers import tokenized_documents

    docs = [Document(index=i, text=t, source="s", path="in", line=i + 1) for i, t in enumerate(["ab", "c", poison, "d"])]
    got = []
    with pytest.raises((RuntimeError, ValueError), match=error):
        for doc, ids in tokenized_documents(docs, _ExplodingTokenizer(), workers=2, batch_size=1):
            got.append((doc.text, ids.tolist()))
    assert got == [("ab", [97, 98]), ("c", [99])]
    assert multiprocessing.active_children() == []
