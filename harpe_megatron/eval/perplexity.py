"""Sliding-window perplexity by context length (HF-style strided evaluation).

For a context length L and stride S the token stream is read in windows [b, b+L) with b
advancing by S; each window scores only the tokens no earlier window scored (the last
``end - prev_end`` tokens), conditioned on up to L-1 preceding tokens. S == L gives
non-overlapping chunks (each chunk's first token is then not scored: it has no context); smaller S gives every scored token more context (slower).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


@torch.no_grad()
def sliding_window_nll(model, input_ids: torch.Tensor, context_length: int, stride: Optional[int] = None,
                       device: str | torch.device = "cpu", progress=None) -> tuple[float, int]:
    """(sum of NLL in nats, number of scored tokens) for a 1-D ``input_ids``."""
    stride = stride or context_length
    if not 0 < stride <= context_length:
        raise ValueError(f"stride must be in (0, context_length], got {stride} for {context_length}")
    ids = input_ids.view(-1)
    n = ids.numel()
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, max(1, n - 1), stride):
        end = min(begin + context_length, n)
        chunk = ids[begin:end].unsqueeze(0).to(device)
        new = end - prev_end                 # tokens not scored before (targets)
        logits = model(chunk).logits[0, :-1].float()
        targets = chunk[0, 1:]
        keep = min(new, targets.numel())     # the first token of the stream has no context
        if keep > 0:
            nll += F.cross_entropy(logits[-keep:], targets[-keep:], reduction="sum").item()
            count += keep
        prev_end = end
        if progress is not None:
            progress.update(1)
        if end == n:
            break
    return nll, count


def perplexity_by_length(model, input_ids: torch.Tensor, lengths: list[int], stride: Optional[int] = None,
                         stride_fraction: Optional[float] = None, max_tokens: Optional[int] = None,
                         trained_window: Optional[int] = None, device="cpu", progress: bool = False) -> list[dict]:
    """One row per context length: {length, stride, tokens, nll, ppl, beyond_trained_window}.
    ``stride`` is absolute; ``stride_fraction`` (e.g. 0.5) is relative to each length."""
    ids = input_ids.view(-1)
    if max_tokens:
        ids = ids[:max_tokens]
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(desc="perplexity", unit="window")
    for L in lengths:
        s = stride or (max(1, int(L * stride_fraction)) if stride_fraction else L)
        s = min(s, L)
        nll, count = sliding_window_nll(model, ids, L, s, device=device, progress=bar)
        rows.append({"length": L, "stride": s, "tokens": count, "nll": nll / max(1, count),
                     "ppl": math.exp(nll / count) if count else float("nan"),
                     "beyond_trained_window": bool(trained_window and L > trained_window)})
    if bar is not None:
        bar.close()
    return rows


def perplexity_table(rows: list[dict]) -> str:
    """Markdown table of perplexity rows."""
    out = ["| length | stride | tokens | ppl |", "|---:|---:|---:|---:|"]
    for r in rows:
        flag = " *" if r.get("beyond_trained_window") else ""
        out.append(f"| {r['length']}{flag} | {r['stride']} | {r['tokens']} | {r['ppl']:.3f} |")
    return "\n".join(out)
