"""Worker functions for the gloo parallel-equivalence tests (imported by spawned ranks).

One worker runs one training micro-step of the real stack -- HarpeGPTModel, megatron's
DistributedDataParallel, its forward/backward schedule and finalize_model_grads -- for a given
(TP, CP, SP) layout on the current process group, and returns the global loss and the full
(TP-gathered, DP/CP-reduced) gradients so that the test can compare them with one rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from harpe_megatron.config.model import ModelConfig, ParallelConfig, PositionalConfig
from harpe_megatron.distributed.bringup import megatron_parallel
from harpe_megatron.hf.llama_names import tp_gather, tp_shard
from harpe_megatron.model.builder import build_model, transformer_config
from harpe_megatron.parallel.zigzag import slice_for_cp_rank
from harpe_megatron.step.schedule import forward_step


def shard_batch(batch: dict, dp_rank: int, dp_size: int, cp_rank: int, cp_size: int) -> dict:
    """This rank's micro-batch: rows split over DP, sequence zigzag-split over CP."""
    out = {}
    for key, t in batch.items():
        rows = t.size(0) // dp_size
        t = t[dp_rank * rows : (dp_rank + 1) * rows]
        out[key] = slice_for_cp_rank(t, 1, cp_rank, cp_size).contiguous()
    return out


def loss_and_grads(model_cfg: ModelConfig, positional: PositionalConfig, full_state: dict, batch: dict,
                   tp: int = 1, cp: int = 1, sp: bool = False) -> dict:
    """One forward/backward at layout (tp, cp, sp); DP fills the rest of the world."""
    with megatron_parallel(tp=tp, cp=cp):
        par = ParallelConfig(tensor_model_parallel_size=tp, context_parallel_size=cp, sequence_parallel=sp)
        cfg = transformer_config(model_cfg, par, use_cpu_initialization=True, calculate_per_token_loss=True)
        seq_len = batch["tokens"].size(1)
        model = build_model(model_cfg, positional, cfg, max_sequence_length=seq_len)
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


def cp_attention_vs_one_rank(seq: int, heads: int, groups: int, head_dim: int, seed: int = 0) -> float:
    """Max |diff| of zigzag-CP attention (output and q/k/v grads) against one-rank attention.

    Runs on a process group whose CP size is the world size; every rank builds the same global
    tensors from ``seed`` and checks its own share.
    """
    from harpe_megatron.model.attention import causal_attention, context_parallel_causal_attention

    cp_group = parallel_state.get_context_parallel_group()
    cp_rank, cp = cp_group.rank(), cp_group.size()
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(seq, 2, heads, head_dim, generator=gen)
    k = torch.randn(seq, 2, groups, head_dim, generator=gen)
    v = torch.randn(seq, 2, groups, head_dim, generator=gen)
    upstream = torch.randn(2, heads, seq, head_dim, generator=gen)
    scale = head_dim ** -0.5

    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = causal_attention(*(t.permute(1, 2, 0, 3) for t in full), scale)
    ref.backward(upstream)

    local = [slice_for_cp_rank(t, 0, cp_rank, cp).clone().requires_grad_() for t in (q, k, v)]
    out = context_parallel_causal_attention(*local, scale, cp_group)
    out.backward(slice_for_cp_rank(upstream, 2, cp_rank, cp))

    diffs = [(out - slice_for_cp_rank(ref.detach(), 2, cp_rank, cp)).abs().max()]
    for mine, theirs in zip(local, full):
        diffs.append((mine.grad - slice_for_cp_rank(theirs.grad, 0, cp_rank, cp)).abs().max())
    return max(d.item() for d in diffs)


def layouts_and_cp_attention(model_cfg, positional, full_state, batch, layouts, attention_case: dict) -> dict:
    """Several model layouts, then CP attention alone with CP = world size (one spawn for all)."""
    results = all_layouts(model_cfg, positional, full_state, batch, layouts)
    with megatron_parallel(cp=dist.get_world_size()):
        attention_diff = cp_attention_vs_one_rank(**attention_case)
    return {"layouts": results, "cp_attention_max_diff": attention_diff}
