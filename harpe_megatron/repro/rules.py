"""Every method's RoPE setting at a small scale, carried over from the paper's Llama-2-7B setting.

HARPE's comparison (arXiv 2412.07171) extends Llama-2-7B (one base, 1e4, at 4096 tokens) to
131072 tokens. A reproduction extends a base trained at ``L`` to ``target`` (8 L). Each base (and
YaRN's rotation count) is carried over by :func:`~harpe_megatron.positional.base_transfer.transfer_base`,
which keeps the share of rotary dimensions that complete a period inside the window; lengths of
the paper's intermediate stages keep their fraction of the target. The YAML files in
``configs/repro/<tier>/`` hold the values these functions give (tests/unit/test_repro_configs.py
checks them); docs/reproduction.md tabulates them.

* base model: 1e4 at 4096 -> :func:`base_rope_base` at L;
* HARPE: the paper's Table 2 (32 heads, 1e6 .. 4.54e6 at 131072), head ``h`` of ``H`` taking the
  entry of rank ``round(h * 31 / (H - 1))`` (both ends kept) -> :func:`harpe_bases` at the target;
* ABF single stage: 5e6 at 131072 -> :func:`abf_base`;
* ABF multi-stage: 1e6 at 32k, 2e6 at 64k, 5e6 at 128k -> :func:`abf_stages` (target/4, target/2,
  target), each stage a third of the token budget (the paper gives no split);
* PI, YaRN, NTK, CREAM, PoSE: the base model's base with factor target / L (the paper's x32 for
  4k -> 128k), YaRN's ``beta_fast`` 32 rotations in 4096 tokens -> :func:`yarn_beta_fast` in L
  (``beta_slow`` 1 stays 1);
* Self-Extend: group target / L, window L / 4 (the paper's 32 and 1024 at 4k -> 128k).
"""

from __future__ import annotations

from harpe_megatron.positional.bases import PAPER_LLAMA2_7B_BASES
from harpe_megatron.positional.base_transfer import transfer_base

__all__ = ["PAPER_LENGTH", "PAPER_TARGET", "abf_base", "abf_stages", "base_rope_base", "harpe_bases",
           "yarn_beta_fast"]

PAPER_LENGTH = 4096
PAPER_TARGET = 131072
_LLAMA2_BASE = 1e4
_ABF_BASE = 5e6
_ABF_STAGES = ((1e6, 32768), (2e6, 65536), (5e6, 131072))
_YARN_BETA_FAST = 32.0


def base_rope_base(length: int) -> float:
    """The base model's single base at its window ``length`` (Llama-2's 1e4 at 4096)."""
    return transfer_base(_LLAMA2_BASE, PAPER_LENGTH, length)


def harpe_bases(num_heads: int, target: int) -> list[float]:
    """One base per head at ``target``: Table 2 at evenly spaced ranks, carried over."""
    n = len(PAPER_LLAMA2_7B_BASES)
    ranks = [0] if num_heads == 1 else [round(h * (n - 1) / (num_heads - 1)) for h in range(num_heads)]
    return [transfer_base(PAPER_LLAMA2_7B_BASES[r], PAPER_TARGET, target) for r in ranks]


def abf_base(target: int) -> float:
    """ABF single stage: the paper's 5e6 at 131072, carried over."""
    return transfer_base(_ABF_BASE, PAPER_TARGET, target)


def abf_stages(target: int) -> list[tuple[int, float]]:
    """ABF multi-stage: (length, base) per stage."""
    out = []
    for base, length in _ABF_STAGES:
        ours = target * length // PAPER_TARGET
        out.append((ours, transfer_base(base, length, ours)))
    return out


def yarn_beta_fast(length: int) -> float:
    """YaRN's ``beta_fast`` (rotations inside the original window) at window ``length``."""
    return transfer_base(_YARN_BETA_FAST, PAPER_LENGTH, length)
