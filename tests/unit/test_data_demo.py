"""The demo corpus: built from text on this machine, loadable, deterministic, idempotent; CLI help."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harpe_megatron.cli.prepare_run import main as prepare_run
from harpe_megatron.config.loader import ConfigError, config_from_dict, config_to_dict, load_config
from harpe_megatron.data.dataset import MicroBatchSampler, build_gpt_datasets, check_indexed_dataset, to_batch
from harpe_megatron.data.demo import prepare_demo_data
from harpe_megatron.data.tokenizer import SentencePieceTokenizer
from tests.helpers import TINY_CPU_CONFIG
from tests.unit.test_data_indexed import load_tool

MAX_DOCS = 30


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    logs: list[str] = []
    out = prepare_demo_data(tmp_path_factory.mktemp("demo"), max_docs=MAX_DOCS, progress=False, log=logs.append)
    return out, logs


def test_demo_outputs_are_loadable(single_rank, demo, tmp_path):
    out, logs = demo
    records = [json.loads(line) for line in Path(out.corpus).read_text(encoding="utf-8").splitlines()]
    assert 3 <= len(records) <= MAX_DOCS
    assert len({r["source"] for r in records}) >= 2
    assert all(r["text"].strip() for r in records)
    tok = SentencePieceTokenizer(out.tokenizer)
    assert (tok.vocab_size, tok.bos, tok.eos) == (512, 1, 2)
    info = check_indexed_dataset(out.prefix)
    report = json.loads(Path(out.report).read_text())
    assert report["rule"]["short_threshold"] == 512 and report["rule"]["short_keep_prob"] == 0.1
    assert report["total"]["before"]["documents"] == len(records)
    assert info.documents == report["total"]["after"]["documents"] and info.tokens == report["total"]["after"]["tokens"]
    assert any("TOTAL" in line for line in logs)
    train, valid, _ = build_gpt_datasets([out.prefix], None, "95,5,0", 32, 1234, (16, 4, 0), tok, str(tmp_path / "cache"))
    batch = to_batch(next(MicroBatchSampler(train, 4)))
    assert batch["tokens"].shape == (4, 32) and int(batch["tokens"].max()) < 512
    assert valid is not None and len(valid) >= 4


def test_demo_is_idempotent_and_deterministic(demo, tmp_path):
    out, _ = demo
    files = [out.corpus, out.tokenizer, out.prefix + ".bin", out.prefix + ".idx", out.report]
    before = {f: (Path(f).stat().st_mtime_ns, Path(f).read_bytes()) for f in files}
    logs: list[str] = []
    prepare_demo_data(out.out_dir, max_docs=MAX_DOCS, progress=False, log=logs.append)
    assert any("already prepared" in line for line in logs)
    assert {f: (Path(f).stat().st_mtime_ns, Path(f).read_bytes()) for f in files} == before
    with pytest.raises(FileExistsError, match="other settings"):
        prepare_demo_data(out.out_dir, max_docs=MAX_DOCS, vocab_size=600, progress=False, log=lambda s: None)
    again = prepare_demo_data(tmp_path / "again", max_docs=MAX_DOCS, progress=False, log=lambda s: None)
    for f, g in zip(files, [again.corpus, again.tokenizer, again.prefix + ".bin", again.prefix + ".idx"]):
        assert Path(f).read_bytes() == Path(g).read_bytes(), f


@pytest.mark.parametrize("tool, needles", [
    ("preprocess_data", ["--input", "--tokenizer-model", "--output-prefix", "--short-threshold", "--workers", "--overwrite"]),
    ("train_tokenizer", ["--input", "--output-prefix", "--vocab-size"]),
    ("prepare_demo_data", ["--out", "--vocab-size", "--max-docs"]),
])
def test_cli_help(tool, needles, capsys):
    with pytest.raises(SystemExit) as exc:
        load_tool(tool).main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for n in needles:
        assert n in text


def test_train_tokenizer_cli(demo, tmp_path, capsys):
    out, _ = demo
    tool = load_tool("train_tokenizer")
    prefix = str(tmp_path / "tok")
    assert tool.main(["--input", out.corpus, "--output-prefix", prefix, "--vocab-size", "400"]) == 0
    assert "400 pieces" in capsys.readouterr().out
    assert SentencePieceTokenizer(prefix + ".model").vocab_size == 400
    assert tool.main(["--input", out.corpus, "--output-prefix", prefix]) == 1  # exists


def test_demo_data_step_says_what_to_do_when_the_demo_data_differs(demo, capsys):
    """prepare_run (scripts/demo.sh's data step, which has no --overwrite) names the differing
    setting and says to delete the directory, with exit 2."""
    out, _ = demo
    code = prepare_run(["--config", TINY_CPU_CONFIG, f"data.paths=[{out.prefix}]", f"data.tokenizer_model={out.tokenizer}",
                        "model.vocab_size=600"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "built with other settings" in err and f"delete {out.out_dir} to have the demo data step rebuild it" in err
    assert "--overwrite" not in err and "overwrite=True" not in err


def test_demo_data_step_needs_the_demo_layout(demo, tmp_path, capsys):
    """The step writes <dir>/demo_text_document and <dir>/tokenizer.model: other paths fail before
    anything is written."""
    out, _ = demo
    fresh = tmp_path / "fresh"
    bad = prepare_run(["--config", TINY_CPU_CONFIG, f"data.paths=[{fresh / 'x'}]",
                       f"data.tokenizer_model={fresh / 'tokenizer.model'}"])
    assert bad == 2 and "the demo data step writes" in capsys.readouterr().err
    assert not fresh.exists()
    two = prepare_run(["--config", TINY_CPU_CONFIG, f"data.paths=[{out.prefix}, {out.prefix}]"])
    assert two == 2 and "data.paths has 2 entries" in capsys.readouterr().err


def test_launcher_builds_no_data():
    """scripts/pretrain_harpe.sh (production) has no data step; scripts/demo.sh builds the demo data."""
    scripts = Path(__file__).resolve().parents[2] / "scripts"
    assert "prepare_run" not in "".join(
        line for line in (scripts / "pretrain_harpe.sh").read_text().splitlines(keepends=True)
        if not line.startswith("#"))
    assert "harpe_megatron.cli.prepare_run --config" in (scripts / "demo.sh").read_text()


def test_build_demo_corpus_key_is_rejected_with_what_to_do():
    with pytest.raises(ConfigError, match=r"data\.build_demo_corpus was removed.*scripts/demo\.sh"):
        load_config(TINY_CPU_CONFIG, ["data.build_demo_corpus=true"])
    # saved configs of earlier runs (run dirs, checkpoints) carry it: they still load
    tree = config_to_dict(load_config(TINY_CPU_CONFIG))
    tree["data"]["build_demo_corpus"] = True
    assert config_from_dict(tree) == load_config(TINY_CPU_CONFIG)
