"""The forward step handed to megatron-core's forward/backward schedules, its loss, and one pass of the schedule.

Loss convention (``TransformerConfig.calculate_per_token_loss=True``): each micro-batch returns
the *sum* of its token losses and its token count; megatron sums counts over micro-batches and
the DP x CP group and divides the gradients by the total once (``finalize_model_grads``). So the
loss is averaged over tokens, not over chunks or ranks, whatever the parallel layout.

Batch layout (one micro-batch, already on this rank's CP share: zigzag, or the balanced layout
under document masking): ``tokens``, ``labels``, ``loss_mask``: ``[b, s_local]``;
``position_ids``: ``[b, s_local]``; with document masking also ``document_ids`` and
``token_index`` (stacked ``[b, 2, s_local]``, handed to the model as its ``attention_mask``) and
``attention_keys`` (keys each query attends; their sum is reported as ``"attention pairs"`` so
that the trainer counts the attention FLOPs actually done, data/documents.py).

:func:`run_schedule` runs megatron's schedule over a step's micro-batches and returns the global
``[loss_sum, tokens, attention_pairs]``: summed over micro-batches and DP x CP on the last
pipeline stage, then broadcast from the last rank, so every rank knows the same global
token-weighted loss (``attention_pairs``: 0 unless the batches count them).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from harpe_megatron.config.run import RunConfig
from harpe_megatron.distributed.bringup import current_device

__all__ = ["token_loss_sum", "forward_step", "run_schedule"]


def token_loss_sum(loss_mask: Tensor, output_tensor: Tensor,
                   attention_keys: Optional[Tensor] = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``(sum of masked token losses, token count, {"lm loss": [sum, count]})`` for megatron, plus
    ``"attention pairs"`` (the sum of ``attention_keys``, float64) when given."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.reshape(-1).to(losses.dtype)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = {"lm loss": torch.stack([loss_sum.detach(), num_tokens.to(loss_sum.dtype)])}
    if attention_keys is not None:
        report["attention pairs"] = attention_keys.detach().to(torch.float64).sum().reshape(1)
    return loss_sum, num_tokens, report


def forward_step(data_iterator: Iterator[dict[str, Tensor]], model: Any):
    """megatron ``forward_step_func``: run the model on the next micro-batch."""
    batch = next(data_iterator)
    layout = None
    if "document_ids" in batch:  # document masking: ids and row positions of this rank's tokens (model/gpt.py)
        layout = torch.stack((batch["document_ids"], batch["token_index"]), dim=1)
    output = model(batch["tokens"], batch["position_ids"], layout, labels=batch["labels"])
    return output, partial(token_loss_sum, batch["loss_mask"], attention_keys=batch.get("attention_keys"))


def _global_loss(reports: list[dict[str, Tensor]]) -> Tensor:
    """[loss_sum, tokens, attention_pairs] over micro-batches and DP x CP, known on every rank
    afterwards (attention_pairs: 0 unless the batches count them, i.e. with document masking)."""
    device = current_device()
    total = torch.zeros(3, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage():
        for r in reports:
            total[:2] += r["lm loss"].to(device=device, dtype=torch.float64)
            if "attention pairs" in r:
                total[2:] += r["attention pairs"].to(device=device, dtype=torch.float64)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    # The last pipeline stage holds the loss; the last rank of the world is on it.
    dist.broadcast(total, src=dist.get_world_size() - 1)
    return total


def run_schedule(cfg: RunConfig, model_chunks: list, data_iter: Iterator, num_microbatches: int,
                 forward_only: bool, step_func: Callable = forward_step) -> Tensor:
    """One pass of megatron's forward(/backward) schedule over ``num_microbatches``; returns the
    global ``[loss_sum, tokens, attention_pairs]`` (identical on every rank)."""
    reports = get_forward_backward_func()(
        forward_step_func=step_func, data_iterator=data_iter, model=model_chunks,
        num_microbatches=num_microbatches, seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.training.micro_batch_size, forward_only=forward_only,
    )
    return _global_loss(reports)
