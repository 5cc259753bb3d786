"""The forward step handed to megatron-core's forward/backward schedules, its loss, and one pass of the schedule.

Loss convention (``TransformerConfig.calculate_per_token_loss=True``): each micro-batch returns
the *sum* of its token losses and its token count; megatron sums counts over micro-batches and
the DP x CP group and divides the gradients by the total once (``finalize_model_grads``). So the
loss is averaged over tokens, not over chunks or ranks, whatever the parallel layout.

Batch layout (one micro-batch, already on this rank's CP share in zigzag order):
``tokens``, ``labels``, ``loss_mask``: ``[b, s_local]``; ``position_ids``: ``[b, s_local]``.

:func:`run_schedule` runs megatron's schedule over a step's micro-batches and returns the global
``[loss_sum, tokens]``: summed over micro-batches and DP x CP on the last pipeline stage, then
broadcast from the last rank, so every rank knows the same global token-weighted loss.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from harpe_megatron.config.run import RunConfig
from harpe_megatron.distributed.bringup import current_device

__all__ = ["token_loss_sum", "forward_step", "run_schedule"]


def token_loss_sum(loss_mask: Tensor, output_tensor: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``(sum of masked token losses, token count, {"lm loss": [sum, count]})`` for megatron."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.reshape(-1).to(losses.dtype)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.to(loss_sum.dtype)])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator: Iterator[dict[str, Tensor]], model: Any):
    """megatron ``forward_step_func``: run the model on the next micro-batch."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(token_loss_sum, batch["loss_mask"])


def _global_loss(reports: list[dict[str, Tensor]]) -> Tensor:
    """[loss_sum, tokens] over micro-batches and DP x CP, known on every rank afterwards."""
    device = current_device()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage():
        for r in reports:
            total += r["lm loss"].to(device=device, dtype=torch.float64)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    # The last pipeline stage holds the loss; the last rank of the world is on it.
    dist.broadcast(total, src=dist.get_world_size() - 1)
    return total


def run_schedule(cfg: RunConfig, model_chunks: list, data_iter: Iterator, num_microbatches: int,
                 forward_only: bool, step_func: Callable = forward_step) -> Tensor:
    """One pass of megatron's forward(/backward) schedule over ``num_microbatches``; returns the
    global ``[loss_sum, tokens]`` (identical on every rank)."""
    reports = get_forward_backward_func()(
        forward_step_func=step_func, data_iterator=data_iter, model=model_chunks,
        num_microbatches=num_microbatches, seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.training.micro_batch_size, forward_only=forward_only,
    )
    return _global_loss(reports)
