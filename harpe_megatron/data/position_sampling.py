"""Apply a position scheme (CREAM, PoSE) to packed batches: the data side of those methods.

Samples are packed at the scheme's *target* length ``L`` (``L + 1`` tokens); each row is cut
down to the training window ``n`` by the scheme's ``(token_index, position_ids)``:
``tokens = row_tokens[token_index]``, ``labels = row_labels[token_index]`` (each kept token's
true successor in the document), ``position_ids = position_ids``. The draw for a sample is
seeded by ``(seed, global sample index)``, so it is the same whatever the DP/CP layout and after
a resume.

Difference to CREAM's reference code, which trains on the concatenated selection with
``labels = tokens`` (the model shifts): there the last head token predicts the first middle
token; here every kept token predicts its real next token. The two agree except at the two
segment joins of a sample.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from harpe_megatron.positional.position_ids import PositionScheme

__all__ = ["apply_position_scheme"]


def apply_position_scheme(batch: dict[str, torch.Tensor], scheme: PositionScheme, window: int,
                          sample_indices: Sequence[int], seed: int) -> dict[str, torch.Tensor]:
    """``batch`` (rows of the target length) cut to ``window`` tokens with the scheme's positions."""
    rows = batch["tokens"].size(0)
    if len(sample_indices) != rows:
        raise ValueError(f"{len(sample_indices)} sample indices for a batch of {rows} rows")
    target = scheme.target_length(window)
    if batch["tokens"].size(1) != target:
        raise ValueError(f"batch rows have {batch['tokens'].size(1)} tokens, the scheme needs {target}")
    out = {k: [] for k in ("tokens", "labels", "loss_mask", "position_ids")}
    for row, index in enumerate(sample_indices):
        token_index, positions = scheme.sample(np.random.default_rng([seed, int(index)]), window)
        idx = torch.from_numpy(token_index)
        out["tokens"].append(batch["tokens"][row, idx])
        out["labels"].append(batch["labels"][row, idx])
        out["loss_mask"].append(batch["loss_mask"][row, idx])
        out["position_ids"].append(torch.from_numpy(positions))
    return {k: torch.stack(v) for k, v in out.items()}
