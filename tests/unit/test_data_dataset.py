"""Packed GPT datasets (megatron's builder), the resumable DP sampler, batches and the CP split."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from harpe_megatron.data.dataset import (
    MicroBatchSampler,
    build_gpt_datasets,
    slice_batch_for_cp,
    to_batch,
)
from harpe_megatron.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from harpe_megatron.parallel.cp_layout import zigzag_layout
from harpe_megatron.parallel.zigzag import zigzag_positions
from tests.spawn import run_distributed
from tests.unit.test_data_tokenizer import corpus_texts

SEQ = 16


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> SentencePieceTokenizer:
    return train_sentencepiece(corpus_texts(), tmp_path_factory.mktemp("tok") / "tok", vocab_size=400)


def make_documents(n: int, seed: int, eod: int = 2, vocab: int = 400) -> list[np.ndarray]:
    """Documents of varied lengths (3..60 tokens, EOS-terminated) with random ids > 2."""
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(3, vocab, size=int(rng.integers(2, 60))), eod) for _ in range(n)]


def write_prefix(prefix: str, docs: list[np.ndarray]) -> str:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d in docs:
        builder.add_item(torch.from_numpy(d))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def raw(sample: dict) -> list[int]:
    """The seq_length + 1 tokens a GPTDataset sample was cut from."""
    return sample["tokens"].tolist() + sample["labels"][-1:].tolist()


@pytest.mark.parametrize("num_samples", [20, 90], ids=["one_epoch", "several_epochs"])
def test_packing_follows_the_documents_in_order(single_rank, tmp_path, tokenizer, num_samples):
    docs = make_documents(30, seed=0)
    prefix = write_prefix(str(tmp_path / "d"), docs)
    train, valid, test = build_gpt_datasets([prefix], None, "100,0,0", SEQ, 1234, (num_samples, 0, 0),
                                            tokenizer, str(tmp_path / "cache"))
    assert valid is None and test is None and len(train) >= num_samples
    # the packed stream: the (shuffled, per epoch) documents, concatenated
    stream = np.concatenate([docs[d] for d in train.document_index]).tolist()
    assert sorted(train.document_index[:30].tolist()) == list(range(30))
    crossing = 0
    for idx in range(len(train)):
        s = train[idx]
        j = int(train.shuffle_index[idx])  # position of this sample in the packed stream
        assert raw(s) == stream[j * SEQ: j * SEQ + SEQ + 1]
        assert s["tokens"].shape == (SEQ,) and s["labels"].tolist() == raw(s)[1:]
        assert s["loss_mask"].tolist() == [1.0] * SEQ
        assert s["position_ids"].tolist() == list(range(SEQ))
        crossing += int(tokenizer.eod in s["tokens"].tolist()[:-1])
    assert crossing > 0  # samples run across document boundaries


def test_split_uses_document_ranges(single_rank, tmp_path, tokenizer):
    prefix = write_prefix(str(tmp_path / "d"), make_documents(40, seed=1))
    train, valid, _ = build_gpt_datasets([prefix], None, "90,10,0", SEQ, 7, (10, 4, 0), tokenizer, str(tmp_path / "c"))
    assert set(train.document_index.tolist()) == set(range(36))
    assert set(valid.document_index.tolist()) == set(range(36, 40))


def test_blend_of_two_prefixes(single_rank, tmp_path, tokenizer):
    a = write_prefix(str(tmp_path / "a"), make_documents(30, seed=2))
    b = write_prefix(str(tmp_path / "b"), make_documents(30, seed=3))
    for weights in (None, [1.0, 3.0]):
        train, _, _ = build_gpt_datasets([a, b], weights, "100,0,0", SEQ, 1, (200, 0, 0), tokenizer, str(tmp_path / "c"))
        assert len(train) >= 200  # megatron rounds each share up
        ids = [int(train[i]["dataset_id"]) for i in range(len(train))]
        assert set(ids) == {0, 1}
        if weights:
            assert ids.count(1) == pytest.approx(150, abs=3)
        assert to_batch([train[0], train[1]])["tokens"].shape == (2, SEQ)
    with pytest.raises(ValueError, match="1 blend weights for 2 data prefixes"):
        build_gpt_datasets([a, b], [1.0], "100,0,0", SEQ, 1, (10, 0, 0), tokenizer, None)


def test_missing_or_truncated_data_named(single_rank, tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match=r"nope\.idx"):
        build_gpt_datasets([str(tmp_path / "nope")], None, "100,0,0", SEQ, 1, (1, 0, 0), tokenizer, None)
    prefix = write_prefix(str(tmp_path / "d"), make_documents(5, seed=4))
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(prefix + ".bin") - 4)
    with pytest.raises(ValueError, match=rf"{prefix}\.bin: truncated"):
        build_gpt_datasets([prefix], None, "100,0,0", SEQ, 1, (1, 0, 0), tokenizer, None)
    os.remove(prefix + ".bin")
    with pytest.raises(FileNotFoundError, match=rf"{prefix}\.bin"):
        build_gpt_datasets([prefix], None, "100,0,0", SEQ, 1, (1, 0, 0), tokenizer, None)


@pytest.mark.parametrize("dp_size", [1, 2])
def test_sampler_resume_continues_the_uninterrupted_sequence(dp_size):
    data = list(range(100))
    mbs = 3
    full = {r: list(MicroBatchSampler(data, mbs, r, dp_size)) for r in range(dp_size)}
    steps = len(full[0])
    assert steps == 100 // (mbs * dp_size)
    for t in range(steps):  # megatron's order: consecutive samples per micro-step, rank r takes slice r
        assert sum((full[r][t] for r in range(dp_size)), []) == list(range(t * mbs * dp_size, (t + 1) * mbs * dp_size))
    for r in range(dp_size):
        for k in (0, 1, 4, steps):
            s = MicroBatchSampler(data, mbs, r, dp_size)
            first = [next(s) for _ in range(k)]
            assert s.consumed_samples == k * mbs * dp_size == s.state_dict()["consumed_samples"]
            resumed = MicroBatchSampler(data, mbs, r, dp_size, consumed_samples=s.consumed_samples)
            assert len(resumed) == steps - k
            assert first + list(resumed) == full[r]
    with pytest.raises(ValueError, match="consumed_samples"):
        MicroBatchSampler(data, mbs, 0, dp_size, consumed_samples=101)


def test_sampler_over_gpt_dataset_and_to_batch(single_rank, tmp_path, tokenizer):
    prefix = write_prefix(str(tmp_path / "d"), make_documents(30, seed=5))
    train, _, _ = build_gpt_datasets([prefix], None, "100,0,0", SEQ, 3, (24, 0, 0), tokenizer, str(tmp_path / "c"))
    sampler = MicroBatchSampler(train, micro_batch_size=2, data_parallel_rank=1, data_parallel_size=2, consumed_samples=8)
    batch = to_batch(next(sampler))
    assert sampler.consumed_samples == 12
    expected = [train[10], train[11]]
    assert batch["tokens"].tolist() == [e["tokens"].tolist() for e in expected]
    assert batch["labels"].tolist() == [e["labels"].tolist() for e in expected]
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "tokens": ((2, SEQ), torch.int64), "labels": ((2, SEQ), torch.int64),
        "loss_mask": ((2, SEQ), torch.float32), "position_ids": ((2, SEQ), torch.int64)}
    assert batch["position_ids"].tolist() == [list(range(SEQ))] * 2


def test_to_batch_from_raw_samples():
    samples = [np.arange(10, 27), torch.arange(20, 37)]
    b = to_batch(samples)
    assert b["tokens"][0].tolist() == list(range(10, 26)) and b["labels"][1].tolist() == list(range(21, 37))
    assert b["loss_mask"].dtype == torch.float32 and b["loss_mask"].sum() == 32
    with pytest.raises(ValueError, match="different lengths"):
        to_batch([np.arange(5), np.arange(6)])


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_cp_slicing_keeps_tokens_and_positions_aligned(cp_size):
    seq = 32
    offset = 1000  # token value = offset + global position, so alignment is visible
    batch = to_batch([np.arange(offset, offset + seq + 1), np.arange(offset, offset + seq + 1)])
    batch["loss_mask"] = (batch["position_ids"] % 3 == 0).float()
    shares = []
    for r in range(cp_size):
        part = slice_batch_for_cp(batch, r, cp_size)
        assert part["tokens"].shape == (2, seq // cp_size)
        assert torch.equal(part["position_ids"], part["tokens"] - offset)  # position_ids[i] = global index of tokens[i]
        assert torch.equal(part["labels"], part["tokens"] + 1)
        assert torch.equal(part["loss_mask"], (part["position_ids"] % 3 == 0).float())
        assert part["position_ids"][0].tolist() == zigzag_positions(seq, r, cp_size).tolist()
        shares.append(part["tokens"])
    assert torch.equal(torch.cat(shares, dim=1)[:, np.argsort(zigzag_layout(seq, cp_size).reshape(-1))], batch["tokens"])
    if cp_size > 1:
        with pytest.raises(ValueError, match="divisible"):
            slice_batch_for_cp(to_batch([np.arange(31)]), 0, cp_size * 4)


def _build_on_rank(prefix: str, tokenizer_path: str, cache: str) -> list[list[int]]:
    """Worker for the 2-rank test: every rank builds the datasets and reads a few samples."""
    tok = SentencePieceTokenizer(tokenizer_path)
    train, valid, _ = build_gpt_datasets([prefix], None, "80,20,0", SEQ, 11, (30, 5, 0), tok, cache)
    return [raw(train[i]) for i in range(5)] + [raw(valid[0]), [len(train), len(valid)]]


@pytest.mark.distributed
def test_two_gloo_ranks_build_the_same_datasets(single_rank, tmp_path, tokenizer):
    prefix = write_prefix(str(tmp_path / "d"), make_documents(40, seed=6))
    cache = str(tmp_path / "cache")
    results = run_distributed(_build_on_rank, 2, prefix, tokenizer.model_path, cache, timeout=120)
    assert results[0] == results[1]
    built = sorted(os.listdir(cache))
    assert len([f for f in built if f.endswith(".npy")]) == 6  # train + valid: document/sample/shuffle indices
    assert _build_on_rank(prefix, tokenizer.model_path, cache) == results[0]  # this process: a cache hit
    assert sorted(os.listdir(cache)) == built
    assert Path(tokenizer.model_path).is_file()
