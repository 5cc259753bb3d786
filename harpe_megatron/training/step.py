"""The forward step handed to megatron-core's forward/backward schedules, and its loss.

Loss convention (``TransformerConfig.calculate_per_token_loss=True``): each micro-batch returns
the *sum* of its token losses and its token count; megatron sums counts over micro-batches and
the DP x CP group and divides the gradients by the total once (``finalize_model_grads``). So the
loss is averaged over tokens, not over chunks or ranks, whatever the parallel layout.

Batch layout (one micro-batch, already on this rank's CP share in zigzag order):
``tokens``, ``labels``, ``loss_mask``: ``[b, s_local]``; ``position_ids``: ``[b, s_local]``; with
document masking also ``document_ids`` and ``token_index`` (stacked ``[b, 2, s_local]``, handed to
the model as its ``attention_mask``) and ``attention_keys`` (keys each query attends; their sum is reported as ``"attention pairs"`` so
that the trainer counts the attention FLOPs actually done, data/documents.py).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

__all__ = ["token_loss_sum", "forward_step"]


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
