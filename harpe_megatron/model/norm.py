"""RMSNorm for the local (non-Transformer-Engine) layer spec.

megatron-core's local spec uses apex's fused norm when apex is present and otherwise a torch norm
that refuses sequence parallelism. This one has no dependency and supports SP: its weight carries
``sequence_parallel = config.sequence_parallel``, which tells megatron's ``finalize_model_grads`` to
all-reduce its gradient over the tensor-parallel group (each TP rank only saw its sequence shard).

Numerics follow HF ``LlamaRMSNorm``: normalise in fp32, cast back to the input dtype, then scale.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """``y = weight * (x / sqrt(mean(x^2) + eps))`` over the last dimension (no bias)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(
                f"RMSNorm module built for normalization={config.normalization!r}; "
                "use the matching norm or set normalization='RMSNorm'"
            )
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
