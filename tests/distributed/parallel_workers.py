"""Worker functions for the gloo parallel-equivalence tests (imported by spawned ranks).

One worker runs one training micro-step of the real stack -- HarpeGPTModel, megatron's
DistributedDataParallel, its forward/backward schedule and finalize_model_grads -- for a given
(TP, CP, SP) layout on the current process group, and returns the global loss and the full
(TP-gathered, DP/CP-reduced) gradients so that the test can compare them with one rank.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from harpe_megatron.config.model import ModelConfig, ParallelConfig, PositionalConfig
from harpe_megatron.data.documents import cp_share
from harpe_megatron.distributed.bringup import megatron_parallel
from harpe_megatron.hf.llama_names import tp_gather, tp_shard
from harpe_megatron.model.builder import build_model, transformer_config
from harpe_megatron.parallel.zigzag import slice_for_cp_rank
from harpe_megatron.step.schedule import forward_step


def shard_batch(batch: dict, dp_rank: int, dp_size: int, cp_rank: int, cp_size: int) -> dict:
    """This rank's micro-batch: rows split over DP, sequence split over CP as the data pipeline
    does (zigzag, or the balanced layout of a document-masked batch)."""
    rows = batch["tokens"].size(0) // dp_size
    out = {key: t[dp_rank * rows : (dp_rank + 1) * rows] for key, t in batch.items()}
    if "document_ids" in out:
        return cp_share(out, cp_rank, cp_size)
    return {key: slice_for_cp_rank(t, 1, cp_rank, cp_size).contiguous() for key, t in out.items()}


def loss_and_grads(model_cfg: ModelConfig, positional: PositionalConfig, full_state: dict, batch: dict,
                   tp: int = 1, cp: int = 1, sp: bool = False, per_head_rope: str | None = None) -> dict:
    """One forward/backward at layout (tp, cp, sp); DP fills the rest of the world. A batch with
    ``document_ids`` runs the model with document masking; ``per_head_rope`` overrides the RoPE path."""
    if per_head_rope is not None:
        positional = dataclasses.replace(positional, per_head_rope=per_head_rope)
    with megatron_parallel(tp=tp, cp=cp):
        par = ParallelConfig(tensor_model_parallel_size=tp, context_parallel_size=cp, sequence_parallel=sp)
        cfg = transformer_config(model_cfg, par, use_cpu_initialization=True, calculate_per_token_loss=True)
        seq_len = batch["tokens"].size(1)
        model = build_model(model_cfg, positional, cfg, max_sequence_length=seq_len,
                            document_masking="document_ids" in batch)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(tp_shard(name, full_state[name], tp_rank, tp))
        ddp = DistributedDataParallel(config=cfg, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                      module=model)
        cfg.finalize_model_grads_func = finalize_model_grads
        local = shard_batch(batch, parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
                            parallel_state.get_context_parallel_rank(), cp)
        ddp.zero_grad_buffer()
        reports = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([local]), model=[ddp], num_microbatches=1,
            seq_length=local["tokens"].size(1), micro_batch_size=local["tokens"].size(0), forward_only=False,
        )
        report = reports[0]["lm loss"].clone()
        dist.all_reduce(report, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        tp_group = parallel_state.get_tensor_model_parallel_group()
        grads = {}
        for name, p in model.named_parameters():
            g = p.main_grad.detach().clone()
            shards = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(shards, g, group=tp_group)
            grads[name] = tp_gather(name, shards)
        return {"loss": (report[0] / report[1]).item(), "tokens": int(report[1].item()), "grads": grads}


def all_layouts(model_cfg, positional, full_state, batch, layouts: list[dict]) -> list[dict]:
    """Run several layouts one after another in the same process group."""
    return [loss_and_grads(model_cfg, positional, full_state, batch, **layout) for layout in layouts]


def cp_attention_vs_one_rank(seq: int, heads: int, groups: int, head_dim: int, seed: int = 0,
                             documents: list[int] | None = None) -> float:
    """Max |diff| of CP attention (output and q/k/v grads) against one-rank attention.

    Runs on a process group whose CP size is the world size; every rank builds the same global
    tensors from ``seed`` and checks its own share. ``documents``: document lengths (summing to
    ``seq``) for attention causal within documents on both sides, the CP side in the balanced
    layout (parallel/cp_layout.py) as the model runs it; else zigzag and causal.
    """
    from harpe_megatron.model.attention import causal_attention, context_parallel_causal_attention
    from harpe_megatron.model.document_attention import masked_document_attention
    from harpe_megatron.parallel.cp_layout import balanced_layout

    cp_group = parallel_state.get_context_parallel_group()
    cp_rank, cp = cp_group.rank(), cp_group.size()
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(seq, 2, heads, head_dim, generator=gen)
    k = torch.randn(seq, 2, groups, head_dim, generator=gen)
    v = torch.randn(seq, 2, groups, head_dim, generator=gen)
    upstream = torch.randn(2, heads, seq, head_dim, generator=gen)
    scale = head_dim ** -0.5

    full = [t.clone().requires_grad_() for t in (q, k, v)]
    if documents is None:
        ref = causal_attention(*(t.permute(1, 2, 0, 3) for t in full), scale)
        mine = lambda t, dim: slice_for_cp_rank(t, dim, cp_rank, cp)  # noqa: E731
        layout = None
    else:
        ids = torch.repeat_interleave(torch.arange(len(documents)), torch.tensor(documents)).expand(2, seq)
        ref = masked_document_attention(*(t.permute(1, 2, 0, 3) for t in full), ids, scale)
        work = torch.cat([torch.arange(1, n + 1) for n in documents]).double().numpy()
        index = torch.from_numpy(balanced_layout(work, cp))
        mine = lambda t, dim: t.index_select(dim, index[cp_rank])  # noqa: E731
        layout = torch.stack((ids, index.flatten().expand(2, seq)), dim=1)
    ref.backward(upstream)

    local = [mine(t, 0).clone().requires_grad_() for t in (q, k, v)]
    out = context_parallel_causal_attention(*local, scale, cp_group, layout=layout)
    out.backward(mine(upstream, 2))

    diffs = [(out - mine(ref.detach(), 2)).abs().max()]
    for own, theirs in zip(local, full):
        diffs.append((own.grad - mine(theirs.grad, 0)).abs().max())
    return max(d.item() for d in diffs)


def layouts_and_cp_attention(model_cfg, positional, full_state, batch, layouts, attention_case: dict,
                             masked: tuple | None = None) -> dict:
    """Several model layouts, then CP attention alone with CP = world size (one spawn for all).

    ``masked``: ``(positional, batch, layouts)`` of a document-masked problem, run in the same
    spawn; the CP attention check then also runs with ``attention_case["documents"]``.
    """
    results = all_layouts(model_cfg, positional, full_state, batch, layouts)
    masked_results = all_layouts(model_cfg, masked[0], full_state, masked[1], masked[2]) if masked else []
    with megatron_parallel(cp=dist.get_world_size()):
        documents = attention_case.pop("documents", None)
        attention_diff = cp_attention_vs_one_rank(**attention_case)
        if documents is not None:
            attention_diff = max(attention_diff, cp_attention_vs_one_rank(**attention_case, documents=documents))
    return {"layouts": results, "masked_layouts": masked_results, "cp_attention_max_diff": attention_diff}
