"""The reproduction corpus: held-out text never trained on, retrieval documents that fit the window
and answer their question, upsampling of the extension text, idempotent builds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harpe_megatron.cli.prepare_repro_data import main as prepare_main
from harpe_megatron.cli.prepare_repro_data import passkey_document
from harpe_megatron.data.dataset import build_gpt_datasets, check_indexed_dataset
from harpe_megatron.data.repro import ReproDataSettings, prepare_repro_data
from harpe_megatron.data.tokenizer import SentencePieceTokenizer
from harpe_megatron.eval.scoring import exact_match

SETTINGS = ReproDataSettings(length=128, target=1024, vocab_size=1024, text_chars=400_000, heldout_chars=20_000,
                             heldout_min_chars=4_000, retrieval_docs=40, retrieval_min_length=80)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    logs: list[str] = []
    out = prepare_repro_data(tmp_path_factory.mktemp("repro"), SETTINGS, passkey_document, log=logs.append)
    return out, logs


def test_heldout_text_is_long_and_never_trained_on(built):
    out, _ = built
    train = [json.loads(line) for line in Path(out.out_dir, "text_train.jsonl").read_text().splitlines()]
    manifest = json.loads(Path(out.manifest).read_text())
    heldout = manifest["heldout_documents"]
    assert heldout and not set(heldout) & {d["origin"] for d in train}
    text = Path(out.heldout).read_text()
    assert len(text) >= SETTINGS.heldout_chars
    assert sum(len(d["text"]) for d in train) >= SETTINGS.text_chars
    assert manifest["settings"]["length"] == 128


def test_retrieval_documents_fit_the_window_and_hold_their_answer(built):
    out, _ = built
    tok = SentencePieceTokenizer(out.tokenizer)
    for which in ("pretrain", "extend"):
        lines = Path(out.out_dir, f"retrieval_{which}.jsonl").read_text().splitlines()
        docs = [json.loads(line)["text"] for line in lines]
        assert len(docs) == SETTINGS.retrieval_docs
        for doc in docs:
            # BOS + text + EOS is exactly L; the answer after the question is the pass key of the needle
            assert len(tok.tokenize(doc)) + 2 == SETTINGS.length
            prompt, answer = doc.rstrip("\n").rsplit(" ", 1)
            key = prompt.split("The pass key is ")[1].split(".")[0]
            assert exact_match(answer, key) == 1.0 and prompt.endswith("The pass key is")
    pre = Path(out.out_dir, "retrieval_pretrain.jsonl").read_text()
    ext = Path(out.out_dir, "retrieval_extend.jsonl").read_text()
    assert not set(pre.splitlines()) & set(ext.splitlines())


def test_indexed_datasets_and_upsampling(built):
    out, _ = built
    text, long_ = check_indexed_dataset(out.text), check_indexed_dataset(out.text_long)
    assert long_.documents < text.documents and long_.tokens < text.tokens
    report = json.loads(Path(out.text_long + ".report.json").read_text())
    assert report["rule"]["short_threshold"] == SETTINGS.target
    assert report["output"]["add_bos"] is True
    assert check_indexed_dataset(out.retrieval_pretrain).documents == SETTINGS.retrieval_docs


def test_same_settings_do_nothing_other_settings_refused(built):
    out, _ = built
    logs: list[str] = []
    prepare_repro_data(out.out_dir, SETTINGS, passkey_document, log=logs.append)
    assert logs == [f"[repro data] already prepared in {out.out_dir}; nothing to do"]
    other = ReproDataSettings(**{**SETTINGS.__dict__, "retrieval_docs": 41})
    with pytest.raises(FileExistsError, match="retrieval_docs"):
        prepare_repro_data(out.out_dir, other, passkey_document, log=logs.append)


def test_settings_and_cli_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="retrieval_min_length"):
        ReproDataSettings(**{**SETTINGS.__dict__, "retrieval_min_length": 119})
    with pytest.raises(ValueError, match="held-out"):
        prepare_repro_data(tmp_path / "x", ReproDataSettings(**{**SETTINGS.__dict__, "heldout_min_chars": 10**9}),
                           passkey_document, log=lambda _: None)
    assert prepare_main(["--tier", "cpu", "--configs", str(tmp_path), "--out", str(tmp_path / "d")]) == 2
    assert "cpu tier's base config is missing" in capsys.readouterr().err


def test_megatron_samples_of_the_window_are_whole_retrieval_documents(single_rank, built, tmp_path):
    """Packed at L (pretraining) or 8 L (extension), a sample never cuts a question from its needle."""
    out, _ = built
    tok = SentencePieceTokenizer(out.tokenizer)
    for seq in (SETTINGS.length, SETTINGS.target):
        train, _, _ = build_gpt_datasets([out.retrieval_pretrain], None, "100,0,0", seq, 1234, (8, 0, 0), tok,
                                         str(tmp_path / f"cache{seq}"))
        for i in range(4):
            tokens = train[i]["tokens"].tolist()
            for start in range(0, seq, SETTINGS.length):
                doc = tokens[start:start + SETTINGS.length]
                assert doc[0] == tok.bos and doc[-1] == tok.eod and doc.count(tok.bos) == 1
