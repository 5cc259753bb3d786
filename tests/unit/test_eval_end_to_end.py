"""End-to-end eval of a tiny exported model: JSON result and heatmap PNG are written.

The model folder is made by the project's own pipeline (a tiny random HF Llama -> megatron ->
HF export with per-head bases and the demo tokenizer), so the test runs anywhere, CI included.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import tiny_hf_llama, tiny_model_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory, demo_data, single_rank):
    from harpe_megatron.hf.export_hf import convert_megatron_to_hf
    from harpe_megatron.hf.import_hf import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("eval_model")
    m = tiny_model_config(num_query_groups=2, vocab_size=512)
    hf = tiny_hf_llama(m)
    hf.config.max_position_embeddings = 256  # the "trained window" the eval flags lengths against
    hf.save_pretrained(root / "src")
    convert_hf_to_megatron(root / "src", root / "mg", progress=False,
                           overrides=["positional.bases={strategy: uniform, b_min: 500.0, b_max: 20000.0}"])
    convert_megatron_to_hf(root / "mg", root / "hf", tokenizer_model=demo_data["tokenizer"],
                           max_position_embeddings=256, progress=False)
    return root / "hf"


def test_tiny_model_writes_json_and_png(tmp_path, exported_model):
    from harpe_megatron.cli import eval_long_context as cli

    text = tmp_path / "text.txt"
    text.write_text((ROOT / "README.md").read_text()[:3000])
    out = tmp_path / "tiny.json"
    with pytest.warns(UserWarning, match="trained window"):
        rc = cli.main(["run", str(exported_model), "--out", str(out), "--tasks", "passkey", "--lengths", "192,384",
                       "--depths", "0,100", "--heatmap-dir", str(tmp_path), "--name", "tiny",
                       "--ppl-file", str(text), "--ppl-lengths", "192", "--no-progress"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["trained_window"] == 256 and res["beyond_trained_window"] == [384]
    assert not res.get("skipped"), res.get("skipped")
    assert len(res["records"]) == 4
    assert set(res["per_length"]["passkey"]) == {"192", "384"}
    assert all(0 <= r["score"] <= 100 and r["num_tokens"] <= r["length"] for r in res["records"])
    assert res["perplexity"][0]["ppl"] > 1
    png = Path(res["heatmaps"]["passkey"])
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_argument_is_a_folder_or_a_hub_id(tmp_path, monkeypatch):
    """A Hub id stays a Hub id (labelled by its last part, not resolved to a local path); a missing
    path-like argument or a folder without config.json is a one-line error, never sent to the Hub."""
    from harpe_megatron.eval.runner import model_source

    monkeypatch.chdir(tmp_path)
    assert model_source("meta-llama/Llama-2-7b-hf") == ("meta-llama/Llama-2-7b-hf", "Llama-2-7b-hf")
    assert model_source("gpt2") == ("gpt2", "gpt2")
    (tmp_path / "exported").mkdir()
    with pytest.raises(ValueError, match="exported: a directory without config.json"):
        model_source("exported")
    (tmp_path / "exported" / "config.json").write_text("{}")
    assert model_source("exported") == ("exported", "exported")
    for missing in ("./runs/x/hf", "/nonexistent/hf", "runs/x/hf"):
        with pytest.raises(FileNotFoundError, match=f"{missing}: no such model folder"):
            model_source(missing)


def test_self_extend_option(tmp_path, exported_model):
    """--self-extend GROUP,WINDOW: recorded in the result and its name; a window covering every
    length gives the plain model's perplexity; retrieval tasks run with it (generate with cache)."""
    from harpe_megatron.cli import eval_long_context as cli
    from harpe_megatron.eval.runner import evaluate

    text = tmp_path / "text.txt"
    text.write_text((ROOT / "README.md").read_text()[:3000])
    out = tmp_path / "se.json"
    with pytest.warns(UserWarning, match="trained window"):
        rc = cli.main(["run", str(exported_model), "--out", str(out), "--tasks", "passkey", "--lengths", "384",
                       "--depths", "50", "--ppl-file", str(text), "--ppl-lengths", "384",
                       "--self-extend", "4,64", "--no-progress"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["self_extend"] == {"group_size": 4, "window": 64}
    assert res["name"].endswith("+selfextend-g4-w64")
    assert len(res["records"]) == 1 and res["perplexity"][0]["ppl"] > 1
    kwargs = dict(tasks=[], lengths=[192], ppl_file=str(text), progress=False)
    plain = evaluate(str(exported_model), str(tmp_path / "a.json"), **kwargs)
    wide = evaluate(str(exported_model), str(tmp_path / "b.json"), self_extend=(4, 192), **kwargs)
    assert plain["self_extend"] is None
    assert wide["perplexity"][0]["ppl"] == pytest.approx(plain["perplexity"][0]["ppl"], rel=1e-5)
    with pytest.raises(SystemExit):
        cli.parse_args(["run", str(exported_model), "--out", "x.json", "--self-extend", "32"])
    # a folder whose config carries the key runs with it, and the result says so
    import shutil
    keyed = tmp_path / "keyed"
    shutil.copytree(exported_model, keyed)
    config = json.loads((keyed / "config.json").read_text())
    (keyed / "config.json").write_text(json.dumps({**config, "self_extend": {"group_size": 4, "window": 192}}))
    from_key = evaluate(str(keyed), str(tmp_path / "c.json"), **kwargs)
    assert from_key["self_extend"] == {"group_size": 4, "window": 192}
    assert from_key["perplexity"][0]["ppl"] == pytest.approx(wide["perplexity"][0]["ppl"], rel=1e-6)


def test_tokenizer_option(tmp_path, exported_model, demo_data, capsys):
    """--tokenizer PATH_OR_DIR: a folder or the SentencePiece .model the export was made from give the
    same tokens (so the same perplexity) as the folder's own tokenizer; a folder without a tokenizer
    and no --tokenizer is one line naming the folder and the option, exit 2, nothing written."""
    import shutil

    from harpe_megatron.cli import eval_long_context as cli
    from harpe_megatron.eval.runner import TOKENIZER_FILES

    text = tmp_path / "text.txt"
    text.write_text((ROOT / "README.md").read_text()[:2000])
    bare = tmp_path / "bare"
    shutil.copytree(exported_model, bare, ignore=shutil.ignore_patterns(*TOKENIZER_FILES, "special_tokens_map.json"))

    def run(folder, out, *extra):
        return cli.main(["run", str(folder), "--out", str(tmp_path / out), "--tasks", "", "--lengths", "192",
                         "--ppl-file", str(text), "--no-progress", *extra])

    capsys.readouterr()
    assert run(bare, "none.json") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bare) in err[0] and "--tokenizer PATH_OR_DIR" in err[0], err
    assert not (tmp_path / "none.json").exists()
    garbage = tmp_path / "garbage.model"
    garbage.write_text("not a sentencepiece model")
    for bad in (tmp_path / "missing_dir" / "x", text, garbage):
        assert run(bare, "bad.json", "--tokenizer", str(bad)) == 2
        assert f"--tokenizer {bad}" in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()
    assert run(exported_model, "own.json") == 0
    assert run(bare, "dir.json", "--tokenizer", str(exported_model)) == 0
    assert run(bare, "sp.json", "--tokenizer", str(demo_data["tokenizer"])) == 0
    results = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in ("own", "dir", "sp")}
    assert results["dir"]["tokenizer"] == str(exported_model)
    assert results["sp"]["tokenizer"] == str(demo_data["tokenizer"])  # the file named, not the scratch folder
    ppl = {name: r["perplexity"][0]["ppl"] for name, r in results.items()}
    assert ppl["dir"] == ppl["own"] and ppl["sp"] == ppl["own"], ppl


def _cli(argv: list[str]) -> int:
    from harpe_megatron.cli import eval_long_context as cli

    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code


BAD_RUN = [  # (arguments, the start of the one line printed)
    (["--depths", "150"], "tools/eval_long_context.py run: error: argument --depths: depths are fractions 0-1 or "
                          "percents 0-100, got '150'"),
    (["--depths", "0,-10"], "tools/eval_long_context.py run: error: argument --depths: depths are fractions"),
    (["--lengths", "0,-5"], "tools/eval_long_context.py run: error: argument --lengths: expected integers >= 1, "
                            "got '0,-5'"),
    (["--samples", "0"], "tools/eval_long_context.py run: error: argument --samples: expected an integer >= 1"),
    (["--self-extend", "64,16"], "tools/eval_long_context.py run: error: argument --self-extend: '64,16': "
                                 "self_extend group_size (64) must be smaller than window (16)"),
    (["--self-extend", "16,16"], "tools/eval_long_context.py run: error: argument --self-extend: '16,16'"),
    (["--ppl-lengths", "1"], "tools/eval_long_context.py run: error: argument --ppl-lengths: expected integers >= 2"),
    (["--ppl-stride-fraction", "0"], "tools/eval_long_context.py run: error: argument --ppl-stride-fraction"),
    (["--tasks", ""], "error: --tasks is empty and no --ppl-file is given: nothing to evaluate"),
    (["--ppl-stride", "8"], "error: --ppl-lengths/--ppl-stride/--ppl-stride-fraction/--ppl-max-tokens need --ppl-file"),
    (["--ppl-file", "{empty}"], "error: --ppl-file {empty}: the file is empty; a perplexity needs text"),
    (["--ppl-file", "{binary}"], "error: --ppl-file {binary}: not a text file (it holds NUL bytes)"),
    (["--ppl-file", "{latin1}"],
     "error: --ppl-file {latin1}: not a UTF-8 text file (byte 0: invalid continuation byte)"),
    (["--ppl-file", "{missing}"], "error: --ppl-file {missing}: cannot be read (No such file or directory)"),
    (["--out", "{binary}/x.json"], "error: --out {binary}/x.json: cannot be created: {binary} is not a directory"),
    (["--out", "{dir}"], "error: --out {dir}: is a directory"),
    (["--heatmap-dir", "{binary}"], "error: --heatmap-dir {binary}: is not a directory"),
]


@pytest.mark.parametrize("args,message", BAD_RUN, ids=[" ".join(a) for a, _ in BAD_RUN])
def test_meaningless_run_input_is_one_line_exit_2_before_any_work(tmp_path, capsys, args, message):
    """Checked before the model is loaded (the model argument here does not even exist)."""
    files = {"empty": tmp_path / "empty.txt", "binary": tmp_path / "bin.dat", "latin1": tmp_path / "latin1.txt",
             "missing": tmp_path / "missing.txt", "dir": tmp_path}
    files["empty"].write_text("  \n")
    files["binary"].write_bytes(b"\x00\x01\x02 binary")
    files["latin1"].write_bytes("\xe9t\xe9".encode("latin-1"))
    args = [a.format(**files) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "r.json")]
    assert _cli(["run", str(tmp_path / "no_model"), *out, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.format(**files)) and err.count("\n") == 1, err
    assert not (tmp_path / "r.json").exists()


def test_a_perplexity_text_without_two_tokens_and_a_bad_report(tmp_path, capsys, exported_model):
    """Found once the tokenizer is loaded, before any task runs (the CLI's --ppl-max-tokens is
    at least 2 and this tokenizer adds BOS, so only the library call can get there); report
    inputs are one line too."""
    from harpe_megatron.eval.runner import EvalInputError, evaluate

    text = tmp_path / "short.txt"
    text.write_text("a")
    with pytest.raises(EvalInputError, match=f"--ppl-file {text}: 1 token\\(s\\) after tokenization and "
                                             "--ppl-max-tokens; a perplexity needs at least 2"):
        evaluate(str(exported_model), str(tmp_path / "r.json"), tasks=["passkey"], lengths=[64], ppl_file=str(text),
                 ppl_max_tokens=1, progress=False)
    assert not (tmp_path / "r.json").exists()
    capsys.readouterr()
    (tmp_path / "bad.json").write_text("{not json")
    for name, message in [("missing.json", "cannot be read (No such file or directory)"),
                          ("bad.json", "not a result file of 'run' (invalid JSON: ")]:
        assert _cli(["report", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / name}: {message}") and err.count("\n") == 1, err
