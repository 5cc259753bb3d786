"""The forward step handed to megatron-core's forward/backward schedules, and its loss.

Loss convention (``TransformerConfig.calculate_per_token_loss=True``): each micro-batch returns
the *sum* of its token losses and its token count; megatron sums counts over micro-batches and
the DP x CP group and divides the gradients by the total once (``finalize_model_grads``). So the
loss is averaged over tokens, not over chunks or ranks, whatever the parallel layout.

Batch layout (one micro-batch, already on this rank's CP share in zigzag order):
``tokens``, ``labels``, ``loss_mask``: ``[b, s_local]``; ``position_ids``: ``[b, s_local]``.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterator

import torch
from torch import Tensor

__all__ = ["token_loss_sum", "forward_step"]


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
