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
