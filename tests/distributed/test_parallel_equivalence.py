"""TP, CP, SP, DP and TPxCP on gloo give the one-rank loss and gradients (HARPE bases per head).

Each layout runs the real stack: HarpeGPTModel (local spec: our RMSNorm + SDPA/zigzag CP
attention), megatron's DistributedDataParallel, forward/backward schedule and
finalize_model_grads with per-token loss normalisation.

The same holds under document masking (data/documents.py: document ids, per-document positions,
boundary loss mask) with documents that straddle the zigzag chunks, a stretch of one-token
documents, and one CP rank (of CP 2) whose tokens all have loss mask 0, cut for CP in the layout
balanced by attention work (not zigzag); the same bounds apply.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from harpe_megatron.config.model import ParallelConfig, PositionalConfig
from harpe_megatron.data.documents import apply_document_masking, cp_share
from harpe_megatron.distributed.bringup import megatron_parallel
from harpe_megatron.model.builder import build_model, transformer_config
from harpe_megatron.parallel.zigzag import zigzag_positions
from harpe_megatron.positional.bases import UniformBases
from tests.distributed.parallel_workers import layouts_and_cp_attention, loss_and_grads
from tests.helpers import tiny_model_config
from tests.spawn import run_distributed

pytestmark = pytest.mark.distributed

SEQ, BATCH = 32, 2
# Bases spread widely so that a wrong head-to-base assignment changes the loss visibly at SEQ=32.
POSITIONAL = PositionalConfig(bases=UniformBases(b_min=20.0, b_max=2000.0))
LOSS_ATOL = 2e-6   # measured: equal to 7 digits (fp32, gloo, torch 2.13)
GRAD_ATOL = 5e-6   # measured: <= 1.1e-6 (gradients up to ~0.3; fp32 summation order)


@pytest.fixture(scope="module")
def problem(single_rank):
    # init std 0.2 (not 0.02): sharp attention, so positions and bases matter to the loss.
    m = dataclasses.replace(tiny_model_config(num_query_groups=2, vocab_size=256), init_method_std=0.2)
    with megatron_parallel(seed=3):
        cfg = transformer_config(m, ParallelConfig(), use_cpu_initialization=True)
        model = build_model(m, POSITIONAL, cfg, max_sequence_length=SEQ)
        full_state = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, m.vocab_size, (BATCH, SEQ + 1), generator=gen)
    mask = torch.ones(BATCH, SEQ)
    mask[1, -5:] = 0  # uneven token counts across CP/DP shares: the average must count tokens
    batch = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=mask,
                 position_ids=torch.arange(SEQ).expand(BATCH, SEQ).contiguous())
    reference = loss_and_grads(m, POSITIONAL, full_state, batch)
    return m, full_state, batch, reference


EOD = 2
MASKED_POSITIONAL = dataclasses.replace(POSITIONAL, position_ids="from_batch")  # per-document positions


@pytest.fixture(scope="module")
def masked_problem(problem):
    """The problem's weights on a document-masked batch (see the module docstring)."""
    m, full_state, batch, _ = problem
    tokens = batch["tokens"].clamp(min=EOD + 1)
    tokens[0, [4, 13, 22]] = EOD  # documents 0-4, 5-13, 14-22, 23-31: across chunk boundaries
    tokens[1, 8:24] = EOD  # CP 2: every token of rank 1 is a one-token document
    loss_mask = torch.ones(BATCH, SEQ)
    loss_mask[0, 8:24] = 0  # ... and rank 1 (tokens 8-23) has no token with a loss in row 0 either
    masked = apply_document_masking(dict(tokens=tokens, labels=batch["labels"], loss_mask=loss_mask,
                                         position_ids=batch["position_ids"]), EOD, reset_position_ids=True)
    # the CP layouts below are the balanced ones (parallel/cp_layout.py), not zigzag
    assert cp_share(masked, 0, 2)["token_index"][0].tolist() != zigzag_positions(SEQ, 0, 2).tolist()
    reference = loss_and_grads(m, MASKED_POSITIONAL, full_state, masked)
    unmasked = loss_and_grads(m, MASKED_POSITIONAL, full_state, {k: v for k, v in masked.items()
                                                                 if k not in ("document_ids", "attention_keys")})
    assert abs(unmasked["loss"] - reference["loss"]) > 100 * LOSS_ATOL  # the mask matters
    # finite (no NaN from the token-less CP rank or the one-token documents): the layouts must match it
    assert torch.isfinite(torch.tensor(reference["loss"])) and all(torch.isfinite(g).all()
                                                                   for g in reference["grads"].values())
    return masked, reference


def _assert_matches(result, reference, layout):
    assert result["tokens"] == reference["tokens"]
    assert result["loss"] == pytest.approx(reference["loss"], abs=LOSS_ATOL), layout
    assert result["grads"].keys() == reference["grads"].keys()
    for name, g in reference["grads"].items():
        torch.testing.assert_close(result["grads"][name], g, rtol=0, atol=GRAD_ATOL,
                                   msg=lambda msg: f"{layout} {name}: {msg}")


def test_two_ranks_dp_tp_cp_sp(problem, masked_problem):
    m, full_state, batch, reference = problem
    masked_batch, masked_reference = masked_problem
    layouts = [dict(), dict(tp=2), dict(cp=2), dict(tp=2, sp=True)]  # dict() = DP=2
    masked_layouts = [dict(), dict(cp=2), dict(tp=2, sp=True, per_head_rope="table")]
    attention = dict(seq=32, heads=4, groups=2, head_dim=8, documents=[3, 10, 1, 1, 9, 8])
    out = run_distributed(layouts_and_cp_attention, 2, m, POSITIONAL, full_state, batch, layouts, attention,
                          (MASKED_POSITIONAL, masked_batch, masked_layouts))
    for rank_result in out:
        for layout, result in zip(layouts, rank_result["layouts"]):
            _assert_matches(result, reference, layout or "dp=2")
        assert len(rank_result["masked_layouts"]) == len(masked_layouts)
        for layout, result in zip(masked_layouts, rank_result["masked_layouts"]):
            _assert_matches(result, masked_reference, f"document-masked {layout or 'dp=2'}")
        assert rank_result["cp_attention_max_diff"] < 1e-5


def test_four_ranks_tp2_cp2(problem, masked_problem):
    m, full_state, batch, reference = problem
    masked_batch, masked_reference = masked_problem
    layouts = [dict(tp=2, cp=2), dict(tp=2, cp=2, sp=True)]
    masked_layouts = [dict(tp=2, cp=2, sp=True)]
    attention = dict(seq=64, heads=4, groups=1, head_dim=8, documents=[20, 1, 30, 13])  # CP=4, MQA
    out = run_distributed(layouts_and_cp_attention, 4, m, POSITIONAL, full_state, batch, layouts, attention,
                          (MASKED_POSITIONAL, masked_batch, masked_layouts))
    for rank_result in out:
        for layout, result in zip(layouts, rank_result["layouts"]):
            _assert_matches(result, reference, layout)
        assert len(rank_result["masked_layouts"]) == len(masked_layouts)
        for layout, result in zip(masked_layouts, rank_result["masked_layouts"]):
            _assert_matches(result, masked_reference, f"document-masked {layout}")
        assert rank_result["cp_attention_max_diff"] < 1e-5


def test_reference_depends_on_the_bases(problem):
    """Guard against a vacuous comparison: other bases give another loss."""
    m, full_state, batch, reference = problem
    other = loss_and_grads(m, PositionalConfig(bases=UniformBases(b_min=20.0, b_max=2000.0, order="descending")),
                           full_state, batch)
    assert abs(other["loss"] - reference["loss"]) > 100 * LOSS_ATOL
    grad_change = max((other["grads"][n] - g).abs().max().item() for n, g in reference["grads"].items())
    assert grad_change > 100 * GRAD_ATOL
