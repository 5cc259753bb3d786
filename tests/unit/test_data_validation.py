"""Data and tokenizer checks before training: every bad input is named, and nothing is written.

One table of faults (each a small damage done to a good dataset or config) is checked against
``validate_training_inputs``; a subset goes through the real entry points (``train`` on one gloo
rank in process, ``python -m harpe_megatron.train`` and ``tools/check_data.py`` as processes) to
show that the checks run before the run directory, ``config.yaml`` or megatron's index cache
exist. Two gloo ranks show that a problem seen by one rank stops both, and that the full scan is
shared between ranks.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from harpe_megatron.config.loader import config_from_dict
from harpe_megatron.data import validation
from harpe_megatron.data.tokenizer import train_sentencepiece
from harpe_megatron.data.validation import DataValidationError, validate_training_inputs
from tests.spawn import run_distributed
from tests.unit.test_data_tokenizer import corpus_texts

REPO = Path(__file__).resolve().parents[2]
VOCAB = 400
SEQ = 16


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    return train_sentencepiece(corpus_texts(), tmp_path_factory.mktemp("tok") / "tok", vocab_size=VOCAB).model_path


def write_prefix(prefix: str, docs: list[np.ndarray], dtype=np.uint16) -> str:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in docs:
        builder.add_item(torch.from_numpy(np.asarray(d, dtype=np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def documents(n: int = 40, seed: int = 0, length: int = 30) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(3, VOCAB, size=length), 2) for _ in range(n)]


def tree(tmp_path: Path, tokenizer: str, prefix: str, **data) -> dict:
    """A tiny one-rank run config (as YAML would give it)."""
    return {
        "model": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "num_query_groups": 2,
                  "ffn_hidden_size": 64, "vocab_size": VOCAB},
        "positional": {"bases": {"strategy": "uniform", "b_min": 500.0, "b_max": 20000.0}},
        "data": {"paths": [prefix], "tokenizer_model": tokenizer, "seq_length": SEQ, "split": "90,10,0", **data},
        "training": {"micro_batch_size": 1, "global_batch_size": 1, "train_iters": 1, "precision": "fp32",
                     "use_distributed_optimizer": False},
        "logging": {"tensorboard": False},
        "run_dir": str(tmp_path / "run"),
    }


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


# --- the fault table -------------------------------------------------------------------------------
def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _truncate(path: str, drop: int) -> None:
    os.truncate(path, os.path.getsize(path) - drop)


def fault_id_ge_vocab(d, t):
    docs = documents()
    docs[25][7] = VOCAB + 50  # 450: outside the 400-piece vocabulary, still fits uint16
    write_prefix(d["prefix"], docs)


def fault_negative_id(d, t):
    docs = documents()
    docs[3][1] = -5
    write_prefix(d["prefix"], docs, dtype=np.int32)


def fault_truncated_bin(d, t):
    _truncate(d["prefix"] + ".bin", 10)


def fault_truncated_idx(d, t):
    _truncate(d["prefix"] + ".idx", 16)


def fault_mismatched_pair(d, t):
    other = write_prefix(str(Path(d["prefix"]).parent / "other"), documents(n=41, seed=9))
    shutil.copyfile(other + ".bin", d["prefix"] + ".bin")


def fault_wrong_dtype_code(d, t):
    _patch(d["prefix"] + ".idx", 17, bytes([4]))  # int32 instead of uint16: pointers say 2 bytes per token


def fault_float_dtype_code(d, t):
    _patch(d["prefix"] + ".idx", 17, bytes([7]))  # float32


def fault_unknown_dtype_code(d, t):
    _patch(d["prefix"] + ".idx", 17, bytes([99]))


def fault_wrong_version(d, t):
    _patch(d["prefix"] + ".idx", 9, struct.pack("<Q", 2))


def fault_bad_magic(d, t):
    _patch(d["prefix"] + ".idx", 0, b"NOTANIDX\x00")


def fault_damaged_pointer(d, t):
    _patch(d["prefix"] + ".idx", 34 + 40 * 4 + 5 * 8, struct.pack("<q", 12345))  # sequence 5's pointer


def fault_missing_bin(d, t):
    os.remove(d["prefix"] + ".bin")


def fault_missing_idx(d, t):
    os.remove(d["prefix"] + ".idx")


def fault_missing_prefix(d, t):
    t["data"]["paths"] = [str(Path(d["prefix"]).parent / "nowhere" / "corpus_text_document")]


def fault_tokenizer_vocab_differs(d, t):
    t["model"]["vocab_size"] = 512


def fault_tokenizer_missing(d, t):
    t["data"]["tokenizer_model"] = str(Path(d["prefix"]).parent / "missing.model")


def fault_tokenizer_not_a_model(d, t):
    bogus = Path(d["prefix"]).parent / "bogus.model"
    bogus.write_bytes(b"not a sentencepiece model")
    t["data"]["tokenizer_model"] = str(bogus)


def fault_corpus_shorter_than_sample(d, t):
    t["data"]["seq_length"] = 2048  # the train split holds 36 x 31 = 1116 tokens


def fault_position_scheme_too_long(d, t):
    # PoSE packs samples at its target length: 16-token windows over 1024-token samples
    t["data"]["position_scheme"] = {"type": "pose", "target": 2048, "chunks": 2}
    t["positional"]["position_ids"] = "from_batch"


def fault_empty_valid_split(d, t):
    t["data"]["split"] = "99,1,0"  # round(0.99 * 40) = 40: the valid range is empty


def fault_eval_without_valid_share(d, t):
    t["data"]["split"] = "100,0,0"
    t["training"]["eval_interval"] = 5


def fault_no_train_share(d, t):
    t["data"]["split"] = "0,100,0"


def fault_empty_paths(d, t):
    t["data"]["paths"] = []


def fault_document_without_eod(d, t):
    _patch(d["prefix"] + ".bin", (7 * 31 + 30) * 2, np.uint16(5).tobytes())  # document 7's last token
    t["data"]["document_masking"] = True


def fault_pickled_cache_file(d, t):
    cache = Path(d["prefix"]) / "cache" / "GPTDataset_indices"
    cache.mkdir(parents=True)
    np.save(cache / "0123-GPTDataset-train-document_index.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)


FAULTS = [  # (damage, expected message (regex))
    (fault_id_ge_vocab, r"data\.paths\[0\]: .*d\.bin: token id 450 at token 782 \(document 25\) is outside the "
                        r"vocabulary \[0, 400\) of data\.tokenizer_model .*tok\.model \(= model\.vocab_size\)"),
    (fault_negative_id, r"d\.bin: token id -5 at token 94 \(document 3\) is outside the vocabulary \[0, 400\)"),
    (fault_truncated_bin, r"data\.paths\[0\]: .*d\.bin: truncated \(2470 bytes, .*d\.idx indexes 2480\)"),
    (fault_truncated_idx, r"data\.paths\[0\]: .*d\.idx: truncated \(\d+ bytes, its header announces \d+\)"),
    (fault_mismatched_pair, r"d\.bin: 2542 bytes but .*d\.idx indexes 2480 \(files from different runs\?\)"),
    (fault_wrong_dtype_code, r"d\.idx: sequence 1 starts at byte 62, expected 124 \(previous start \+ length x 4 "
                             r"bytes of int32, the dtype in its header\): pointers and lengths disagree"),
    (fault_float_dtype_code, r"d\.idx: token dtype float32 \(code 7\) in its header, expected an integer type"),
    (fault_unknown_dtype_code, r"d\.idx: unknown token dtype code 99"),
    (fault_wrong_version, r"d\.idx: unsupported index version 2"),
    (fault_bad_magic, r"d\.idx: not a megatron indexed-dataset index \(bad magic bytes\)"),
    (fault_damaged_pointer, r"d\.idx: sequence 5 starts at byte 12345, expected 310 .*pointers and lengths disagree"),
    (fault_missing_bin, r"data\.paths\[0\]: indexed dataset file missing: .*d\.bin"),
    (fault_missing_idx, r"data\.paths\[0\]: indexed dataset file missing: .*d\.idx"),
    (fault_missing_prefix, r"data\.paths\[0\]: no indexed dataset at '.*nowhere/corpus_text_document' \(neither "
                           r".*\.bin nor .*\.idx exists; directory .*nowhere does not exist\)"),
    (fault_tokenizer_vocab_differs, r"data\.tokenizer_model: .*tok\.model has 400 pieces but model\.vocab_size is "
                                    r"512; they must be equal"),
    (fault_tokenizer_missing, r"data\.tokenizer_model: .*missing\.model does not exist \(expected a sentencepiece"),
    (fault_tokenizer_not_a_model, r"data\.tokenizer_model: .*bogus\.model is not a valid sentencepiece model"),
    (fault_corpus_shorter_than_sample, r"data\.paths\[0\]: the train split of .*d holds 1116 tokens \(36 documents\), "
                                       r"fewer than one sample of 2049 tokens \(data\.seq_length 2048 \+ 1\)"),
    (fault_position_scheme_too_long, r"the train split of .*d holds 1116 tokens \(36 documents\), fewer than one "
                                     r"sample of 2049 tokens \(data\.seq_length 16 packed by data\.position_scheme "
                                     r"to 2048 \+ 1\)"),
    (fault_empty_valid_split, r"data\.paths\[0\]: data\.split '99,1,0' gives the valid split of .*d no document "
                              r"\(40 documents in all"),
    (fault_eval_without_valid_share, r"training\.eval_interval is 5 but data\.split '100,0,0' leaves no validation share"),
    (fault_no_train_share, r"data\.split: '0,100,0' gives the train split no share"),
    (fault_empty_paths, r"data\.paths is empty: expected at least one indexed-dataset prefix"),
    (fault_document_without_eod, r"data\.paths\[0\]: .*d\.bin: document 7 does not end with the tokenizer's EOD "
                                 r"\(id 2\); data\.document_masking finds document boundaries by EOD tokens"),
    (fault_pickled_cache_file, r"data\.cache_dir: .*0123-GPTDataset-train-document_index\.npy holds Python objects "
                               r"\(dtype object\), not an index; .*refused"),
]


def _make(tmp_path: Path, tokenizer: str, fault) -> tuple[dict, dict]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    d = {"prefix": str(data_dir / "d")}
    write_prefix(d["prefix"], documents())
    t = tree(tmp_path, tokenizer, d["prefix"])
    fault(d, t)
    return d, t


def test_good_inputs_pass_with_a_summary(tmp_path, tokenizer_path, caplog):
    d, t = _make(tmp_path, tokenizer_path, lambda d, t: None)
    before = snapshot(tmp_path)
    with caplog.at_level(logging.INFO, logger="harpe"):
        report = validate_training_inputs(config_from_dict(t), announce=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "harpe.data.validation"]
    assert snapshot(tmp_path) == before
    (p,) = report.prefixes
    assert (p.documents, p.tokens, p.scanned_tokens, p.dtype) == (40, 40 * 31, 40 * 31, "uint16")
    assert p.split_documents == {"train": 36, "valid": 4} and p.max_id < VOCAB
    assert lines and lines[0].startswith("data checks (full) passed: 1 prefix(es), 1,240 tokens")
    t["data"]["document_masking"] = True  # every document ends with EOD: passes
    validate_training_inputs(config_from_dict(t))


@pytest.mark.parametrize("fault,message", FAULTS, ids=[f.__name__[len("fault_"):] for f, _ in FAULTS])
def test_bad_input_is_named_and_nothing_is_written(tmp_path, tokenizer_path, fault, message):
    d, t = _make(tmp_path, tokenizer_path, fault)
    cfg = config_from_dict(t)
    before = snapshot(tmp_path)
    with pytest.raises(DataValidationError, match=message):
        validate_training_inputs(cfg)
    assert snapshot(tmp_path) == before  # no run dir, no config.yaml, no index cache
    assert not (tmp_path / "run").exists()


def test_quick_mode_reads_a_bounded_sample(tmp_path, tokenizer_path, monkeypatch):
    """quick reads QUICK_WINDOWS windows only: a bad id between them passes quick, fails full."""
    monkeypatch.setattr(validation, "QUICK_WINDOWS", 2)
    monkeypatch.setattr(validation, "QUICK_WINDOW_TOKENS", 100)
    monkeypatch.setattr(validation, "SCAN_CHUNK_TOKENS", 64)  # several chunks per window
    docs = documents()
    docs[20][0] = VOCAB  # token 620, between the windows [0, 100) and [1140, 1240)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    prefix = write_prefix(str(data_dir / "d"), docs)
    cfg = config_from_dict(tree(tmp_path, tokenizer_path, prefix, validate="quick"))
    (p,) = validate_training_inputs(cfg).prefixes
    assert p.scanned_tokens == 200
    with pytest.raises(DataValidationError, match=r"token id 400 at token 620 \(document 20\)"):
        validate_training_inputs(cfg, mode="full")
    assert validate_training_inputs(cfg, mode="off").prefixes == []
    with pytest.raises(ValueError, match="data.validate: expected full, quick or off, got 'some'"):
        config_from_dict(tree(tmp_path, tokenizer_path, prefix, validate="some"))


@pytest.mark.parametrize("sequence", [1, 7, 8, 9, 39])
def test_index_is_checked_in_chunks_across_boundaries(tmp_path, tokenizer_path, monkeypatch, sequence):
    """A damaged pointer is found wherever it lies relative to the chunks (8 entries here)."""
    monkeypatch.setattr(validation, "SCAN_CHUNK_TOKENS", 8)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    prefix = write_prefix(str(data_dir / "d"), documents())
    cfg = config_from_dict(tree(tmp_path, tokenizer_path, prefix))
    validate_training_inputs(cfg)
    if sequence != 39:  # the last pointer is checked against the .bin size already
        _patch(prefix + ".idx", 34 + 40 * 4 + sequence * 8, struct.pack("<q", 7))
    else:
        _patch(prefix + ".idx", 34 + 38 * 4, struct.pack("<i", 30))  # sequence 38's length: pointer 39 disagrees
    expected = 62 * sequence
    with pytest.raises(DataValidationError, match=rf"sequence {sequence} starts at byte {7 if sequence != 39 else 62 * 39}, "
                                                  rf"expected {expected if sequence != 39 else 62 * 38 + 60}"):
        validate_training_inputs(cfg)


@pytest.mark.slow
def test_megatron_would_hang_on_the_empty_split_we_refuse(tmp_path, tokenizer_path):
    """Why the empty-split check exists: megatron's GPTDataset writes the train split's index cache,
    then loops forever counting epochs of the valid split's 0 tokens."""
    d, t = _make(tmp_path, tokenizer_path, fault_empty_valid_split)
    cache = tmp_path / "c"
    code = (
        "from harpe_megatron.data.dataset import build_gpt_datasets\n"
        "from harpe_megatron.data.tokenizer import SentencePieceTokenizer as T\n"
        "print('building', flush=True)\n"
        f"build_gpt_datasets([{d['prefix']!r}], None, '99,1,0', {SEQ}, 1, (4, 4, 0), T({tokenizer_path!r}), {str(cache)!r})\n"
        "print('built', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-W", "ignore", "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline() == "building\n"
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=8)  # building 8 index entries takes milliseconds; it never returns
        assert any(p.name.endswith("GPTDataset-train-document_index.npy") for p in cache.iterdir())
    finally:
        proc.kill()
        proc.wait()


# --- through the real entry points -----------------------------------------------------------------
@pytest.mark.parametrize("fault,message", [(f, m) for f, m in FAULTS if f in (
    fault_id_ge_vocab, fault_truncated_bin, fault_corpus_shorter_than_sample, fault_empty_valid_split)],
    ids=["id_ge_vocab", "truncated_bin", "corpus_shorter_than_sample", "empty_valid_split"])
def test_train_fails_before_writing_anything(single_rank, tmp_path, tokenizer_path, fault, message):
    from harpe_megatron.training.trainer import run_training

    d, t = _make(tmp_path, tokenizer_path, fault)
    before = snapshot(tmp_path)
    with pytest.raises(DataValidationError, match=message):
        run_training(config_from_dict(t))
    assert not (tmp_path / "run").exists()
    assert not (Path(d["prefix"]) / "cache").exists()
    assert snapshot(tmp_path) == before


def _write_yaml(path: Path, t: dict) -> str:
    import yaml

    path.write_text(yaml.safe_dump(t))
    return str(path)


def test_train_cli_exits_with_the_message_and_writes_nothing(tmp_path, tokenizer_path):
    d, t = _make(tmp_path, tokenizer_path, fault_id_ge_vocab)
    config = _write_yaml(tmp_path / "bad.yaml", t)
    before = snapshot(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-m", "harpe_megatron.train", "--config", config],
                          cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 2, proc.stderr
    # one line, no traceback (and no library notices before it)
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("[harpe] error: ")
    assert "token id 450 at token 782 (document 25)" in proc.stderr
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def _check_data_main():
    from harpe_megatron.cli.check_data import main

    return main


def test_check_data_tool(tmp_path, tokenizer_path, capsys):
    d, t = _make(tmp_path, tokenizer_path, lambda d, t: None)
    config = _write_yaml(tmp_path / "run.yaml", t)
    main = _check_data_main()
    before = snapshot(tmp_path)
    assert main(["--config", config]) == 0
    out = capsys.readouterr().out
    assert "data checks (full) passed" in out and "train 36 docs / 1,116 tokens" in out
    assert main(["--config", config, "--mode", "quick", "data.seq_length=4096"]) == 1
    err = capsys.readouterr().err
    assert "data check failed (run, data.seq_length 4096): data.paths[0]: the train split" in err
    # a multi-stage config is checked at every stage's length
    stages = ["stages=[{name: a, overrides: {data.seq_length: 16, training.train_iters: 1}},"
              " {name: b, overrides: {data.seq_length: 1024, training.train_iters: 1}}]"]
    assert main(["--config", config] + stages) == 1
    assert "data check failed (stage 1 (b), data.seq_length 1024): data.paths[0]: the valid split" in capsys.readouterr().err
    assert main(["--config", config, "data.validate=sometimes"]) == 2
    assert "data.validate: expected full, quick or off, got 'sometimes'" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


# --- several ranks ---------------------------------------------------------------------------------
def validate_on_rank(cases: list[list[dict]]) -> list[tuple[str, int]]:
    """Worker: for each case (one config per rank), (error message or '', token ids read here)."""
    import torch.distributed as dist

    out = []
    for trees in cases:
        try:
            report = validate_training_inputs(config_from_dict(trees[dist.get_rank()]))
            out.append(("", report.prefixes[0].scanned_tokens))
        except DataValidationError as exc:
            out.append((str(exc), -1))
    return out


def test_two_ranks_share_the_scan_and_fail_together(tmp_path, tokenizer_path):
    d, good = _make(tmp_path, tokenizer_path, lambda d, t: None)
    bad = tmp_path / "bad"
    bad.mkdir()
    docs = documents()
    docs[30][0] = VOCAB + 1  # in the second half of the tokens: only rank 1 reads it
    bad_id = tree(tmp_path, tokenizer_path, write_prefix(str(bad / "d"), docs))
    missing = tree(tmp_path, tokenizer_path, str(tmp_path / "absent" / "d"))  # as if rank 1 cannot see the data
    rank0, rank1 = run_distributed(validate_on_rank, 2, [[good, good], [bad_id, bad_id], [good, missing]])
    # good data: each rank reads half of the token ids
    assert rank0[0] == rank1[0] == ("", 620)
    # the bad id: found by rank 1, raised on both
    assert rank1[1][0].startswith("data.paths[0]: ") and "token id 401 at token 930 (document 30)" in rank1[1][0]
    assert rank0[1][0] == f"(found by rank 1) {rank1[1][0]}"
    # the missing file on one rank only: both raise
    assert "no indexed dataset at" in rank1[2][0] and rank0[2][0] == f"(found by rank 1) {rank1[2][0]}"
