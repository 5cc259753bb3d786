"""A packed row of k documents under document masking trains exactly the k documents run alone.

The whole model (HarpeGPTModel: per-head RoPE bases, GQA, fused and table RoPE paths, YaRN's
attention temperature) on one rank: per-token losses and every parameter's gradient of a row of
documents with ``data.document_masking`` + ``data.reset_position_ids`` equal those of the same
documents run one by one through the plain causal model (positions 0..n-1 each). The data side
(data/documents.py) makes the row's document ids, positions and boundary loss mask.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from harpe_megatron.config.model import ParallelConfig, PositionalConfig
from harpe_megatron.data.documents import (
    apply_document_masking,
    cp_rank_pairs,
    document_ids,
    document_positions,
    packed_attention_fraction,
    packed_rows,
)
from harpe_megatron.distributed.bringup import megatron_parallel
from harpe_megatron.model.builder import build_model, transformer_config
from harpe_megatron.positional.bases import UniformBases
from harpe_megatron.positional.scaling import YarnScaling
from tests.helpers import tiny_model_config

EOD = 2
LENGTHS = [7, 12, 5, 8]  # one row of 32 tokens, each document ending in EOD
BASES = UniformBases(b_min=20.0, b_max=2000.0)


def _documents(seed=0, vocab=256):
    gen = torch.Generator().manual_seed(seed)
    docs = [torch.cat([torch.randint(3, vocab, (n - 1,), generator=gen), torch.tensor([EOD])]) for n in LENGTHS]
    return docs, torch.randint(3, vocab, (1,), generator=gen)  # and the next row's first token


def _models(positional, masked_too=True):
    m = dataclasses.replace(tiny_model_config(num_query_groups=2, vocab_size=256), init_method_std=0.2)
    cfg = transformer_config(m, ParallelConfig(), use_cpu_initialization=True, positional=positional)
    plain = build_model(m, positional, cfg, max_sequence_length=64)
    masked = build_model(m, dataclasses.replace(positional, position_ids="from_batch"), cfg, max_sequence_length=64,
                         document_masking=True)
    masked.load_state_dict(plain.state_dict())
    return plain, masked


def _loss_and_grads(model, tokens, labels, mask, positions, batch=None):
    """Per-token losses and gradients; ``batch``: the document-masked batch whose layout to pass."""
    model.zero_grad()
    layout = torch.stack((batch["document_ids"], batch["token_index"]), dim=1) if batch is not None else None
    losses = model(tokens, positions, layout, labels=labels)
    (losses * mask).sum().backward()
    return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("per_head_rope", ["fused", "table"])
@pytest.mark.parametrize("scaling", [None, YarnScaling(factor=4.0, original_max_position_embeddings=8)])
def test_row_of_documents_equals_documents_run_separately(single_rank, per_head_rope, scaling):
    kwargs = dict(bases=BASES, per_head_rope=per_head_rope)
    if scaling is not None:
        kwargs["scaling"] = scaling
    with megatron_parallel(seed=3):
        plain, masked = _models(PositionalConfig(**kwargs))
        docs, next_first = _documents()
        row = torch.cat(docs)[None]
        batch = apply_document_masking(
            {"tokens": row, "labels": torch.cat([row[0, 1:], next_first])[None], "loss_mask": torch.ones(1, 32),
             "position_ids": torch.arange(32)[None]}, EOD, reset_position_ids=True)
        packed_losses, packed_grads = _loss_and_grads(masked, batch["tokens"], batch["labels"], batch["loss_mask"],
                                                      batch["position_ids"], batch)
        alone_grads, start = None, 0
        for doc in docs:
            n = doc.numel()
            mask = torch.ones(1, n)
            mask[0, -1] = 0  # the EOD predicts nothing inside its own document
            labels = torch.cat([doc[1:], doc[:1]])[None]
            losses, grads = _loss_and_grads(plain, doc[None], labels, mask, None)
            span = batch["loss_mask"][0, start:start + n].bool()
            assert span.tolist() == mask[0].bool().tolist()
            torch.testing.assert_close(packed_losses[0, start:start + n][span], losses[0][span], rtol=1e-6, atol=1e-6)
            alone_grads = grads if alone_grads is None else {k: alone_grads[k] + g for k, g in grads.items()}
            start += n
        for name, g in alone_grads.items():
            # fp32, other summation order (one backward vs four): measured <= 1.5e-6 of the largest entry
            assert (packed_grads[name] - g).abs().max() <= 4e-6 * g.abs().max(), name
        # not vacuous: the same row without document masking gives other losses
        unmasked, _ = _loss_and_grads(plain, batch["tokens"], batch["labels"], batch["loss_mask"], None)
        assert (unmasked - packed_losses)[batch["loss_mask"].bool()].abs().max() > 1e-2


def test_without_reset_positions_only_rope_rounding_differs(single_rank):
    """Positions running on across documents: RoPE is relative, so the row equals the documents
    alone up to the rounding of larger angles."""
    with megatron_parallel(seed=3):
        plain, masked = _models(PositionalConfig(bases=BASES))
        docs, next_first = _documents()
        row = torch.cat(docs)[None]
        batch = apply_document_masking(
            {"tokens": row, "labels": torch.cat([row[0, 1:], next_first])[None], "loss_mask": torch.ones(1, 32),
             "position_ids": torch.arange(32)[None]}, EOD, reset_position_ids=False)
        assert batch["position_ids"].tolist() == [list(range(32))]
        packed, _ = _loss_and_grads(masked, batch["tokens"], batch["labels"], batch["loss_mask"],
                                    batch["position_ids"], batch)
        start = 0
        for doc in docs:
            n = doc.numel()
            losses, _ = _loss_and_grads(plain, doc[None], torch.cat([doc[1:], doc[:1]])[None], torch.ones(1, n), None)
            torch.testing.assert_close(packed[0, start:start + n - 1], losses[0, :-1], rtol=0, atol=1e-4)
            start += n


def test_model_refuses_a_missing_or_unexpected_mask(single_rank):
    with megatron_parallel():
        plain, masked = _models(PositionalConfig(bases=BASES))
        tokens = torch.randint(3, 256, (1, 8))
        with pytest.raises(ValueError, match="built without document masking"):
            plain(tokens, None, torch.zeros(1, 2, 8, dtype=torch.long))
        for bad in (None, torch.zeros(1, 8, dtype=torch.long)):
            with pytest.raises(ValueError, match="needs this rank's document ids and token positions"):
                masked(tokens, torch.arange(8)[None], bad)


# data side ------------------------------------------------------------------------------------

def test_ids_positions_and_boundary_loss():
    tokens = torch.tensor([[5, EOD, 7, 8, EOD, EOD, 9, 1]])
    ids = document_ids(tokens, EOD)
    assert ids.tolist() == [[0, 0, 1, 1, 1, 2, 3, 3]]  # an EOD ends (belongs to) its document
    assert document_positions(ids).tolist() == [[0, 1, 0, 1, 2, 0, 0, 1]]
    batch = apply_document_masking({"tokens": tokens, "loss_mask": torch.ones(1, 8),
                                    "position_ids": torch.arange(8)[None]}, EOD, reset_position_ids=False)
    assert batch["loss_mask"].tolist() == [[1, 0, 1, 1, 0, 0, 1, 1]]  # an EOD does not predict the next document
    assert batch["position_ids"].tolist() == [list(range(8))]
    assert batch["attention_keys"].tolist() == [[1, 2, 1, 2, 3, 1, 1, 2]]


def test_packed_rows_and_fraction_against_brute_force():
    lengths = np.random.default_rng(0).integers(1, 40, size=200)
    rows = packed_rows(lengths, 64, seed=5)
    order = np.random.default_rng(5).permutation(lengths.size)
    stream = np.repeat(np.arange(lengths.size), lengths[order])  # document of every token, shuffled order
    assert len(rows) == stream.size // 64
    pairs = 0.0
    for r, pieces in enumerate(rows):
        ids = torch.from_numpy(stream[r * 64:(r + 1) * 64])
        keys = document_positions(ids[None] - ids[0]) + 1
        assert pieces.sum() == 64 and keys.sum().item() == sum(p * (p + 1) / 2 for p in pieces)
        pairs += keys.sum().item()
    fraction, n = packed_attention_fraction(lengths, 64, seed=5)
    assert n == len(rows) and fraction == pytest.approx(pairs / (n * 64 * 65 / 2), rel=1e-12)
    assert packed_attention_fraction([1000], 64)[0] == 1.0  # one document longer than every row: no saving


def test_cp_rank_pairs_sum_to_the_row_and_balance_a_single_document():
    pieces = np.array([5, 20, 3, 36])
    per_rank = cp_rank_pairs(pieces, 4)
    assert per_rank.sum() == sum(p * (p + 1) / 2 for p in pieces)
    single = cp_rank_pairs(np.array([64]), 4)
    assert np.ptp(single) == 0  # the zigzag layout balances plain causal attention exactly


# config ---------------------------------------------------------------------------------------

def _tree(data, **positional):
    from harpe_megatron.config import config_from_dict

    return config_from_dict({"model": {"preset": "llama2-7b"}, "training": {"train_iters": 1},
                             "data": {"seq_length": 4096, **data},
                             "positional": {"bases": {"strategy": "constant", "base": 1e4}, **positional}})


def test_reset_positions_imply_positions_from_the_batch_and_round_trip():
    from harpe_megatron.config import config_from_dict, config_to_dict

    cfg = _tree({"document_masking": True, "reset_position_ids": True})
    assert cfg.positional.position_ids == "from_batch"
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert _tree({"document_masking": True}).positional.position_ids == "sequential"


@pytest.mark.parametrize("data,positional,message", [
    ({"reset_position_ids": True}, {}, r"data\.reset_position_ids needs data\.document_masking: true"),
    ({"document_masking": True, "position_scheme": {"type": "pose", "target": 8192}}, {},
     r"data\.document_masking cannot be combined with data\.position_scheme \(pose\)"),
    ({"document_masking": True, "position_scheme": {"type": "cream", "factor": 8}}, {},
     r"data\.document_masking cannot be combined with data\.position_scheme \(cream\)"),
    ({"document_masking": True, "reset_position_ids": True}, {"position_ids": "sequential"},
     r"data\.reset_position_ids .* positional\.position_ids is 'sequential'"),
])
def test_combinations_that_make_no_sense_are_refused_in_one_line(data, positional, message):
    from harpe_megatron.config import ConfigError

    with pytest.raises(ConfigError, match=message) as err:
        _tree(data, **positional)
    assert "\n" not in str(err.value)


def test_te_spec_refuses_document_masking():
    from harpe_megatron.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=r"data\.document_masking needs model\.transformer_impl: local"):
        config_from_dict({"model": {"preset": "llama2-7b", "transformer_impl": "te"}, "training": {"train_iters": 1},
                          "data": {"document_masking": True}})


def test_document_lengths_of_an_indexed_dataset(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from harpe_megatron.data.documents import dataset_document_lengths, first_document_without_eod

    prefix = str(tmp_path / "d")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    docs = [[[5, 6, EOD]], [[7, 8], [9, EOD]], [[EOD]], [[3] * 10 + [EOD]]]  # document 1: two sequences
    for doc in docs:
        for seq in doc:
            builder.add_item(torch.tensor(seq))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    assert dataset_document_lengths(prefix).tolist() == [3, 4, 1, 11]
    sampled = dataset_document_lengths(prefix, max_documents=2, seed=0)
    assert sampled.size == 2 and set(sampled.tolist()) <= {3, 4, 1, 11}
    lengths = np.array([3, 2, 2, 1, 11], dtype=np.int32)  # the sequences' lengths, as the .idx holds them
    pointers = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64) * 2
    args = (prefix + ".bin", np.dtype(np.uint16), lengths, pointers, np.array([0, 1, 3, 4, 5]))
    assert first_document_without_eod(*args, EOD, [(0, 4)]) is None
    assert first_document_without_eod(*args, 9, [(0, 4)]) == 0
