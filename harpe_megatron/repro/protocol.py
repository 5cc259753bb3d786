"""The small-scale reproduction's protocol (docs/reproduction.md): arms, tiers, the paper's numbers.

An **arm** is one method of HARPE's comparison (arXiv 2412.07171), or the control that extends
with no RoPE change: a training run extending the base model (its config is ``configs/repro/<tier>/<arm>.yaml``, started from the base checkpoint)
or, for Self-Extend and the base itself, an evaluation of the un-extended base. A **tier** is one
scale of the same protocol: ``smoke`` (CI, minutes), ``cpu`` (the published small-scale result on
2 CPU cores), ``gpu`` (one H100/H200, hours). Everything about the models and their training is in
the tier's YAML files; a tier here adds only what the configs cannot hold: the corpus settings,
the evaluation grid and how to launch.

The short window ``L`` is the base config's ``data.seq_length``, the target the HARPE config's
(8 L in every tier); evaluation lengths are L, 2L, 4L, 8L, 16L: perplexity over windows of
k L tokens, passkey prompts of k L - ``ANSWER_ROOM`` tokens so that prompt and answer (k L in
all) fit in the window (at k = 1 the base answers inside its own window, as its training
documents do; a prompt of L tokens would put the key farther from the question than any
training document). Self-Extend uses the paper's
Llama-2-7B setting carried over by ratio: group = target / L (32 for 4k -> 128k) and window =
L / 4 (1024 of 4096).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from harpe_megatron.config.loader import load_config
from harpe_megatron.config.run import RunConfig
from harpe_megatron.data.repro import ANSWER_ROOM

__all__ = ["ARMS", "TIERS", "Arm", "PaperResult", "Tier", "TierPlan", "plan_tier", "resolve_arms"]


@dataclass(frozen=True)
class PaperResult:
    """Llama-2-7B 4k -> 128k in HARPE's paper (arXiv 2412.07171): needle-in-a-haystack average
    over 4k-128k (RULER's 8 needle tasks) and Proof-pile sliding-window perplexity average
    over 2k-128k; rank among the six methods the paper compares (by both metrics alike)."""

    niah_avg: float
    ppl_avg: float
    rank: int


@dataclass(frozen=True)
class Arm:
    name: str  # command-line and file name
    label: str  # in tables, plots and file names of heatmaps
    trains: bool  # False: evaluation of the un-extended base
    self_extend: bool = False
    paper: Optional[PaperResult] = None


ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("base", "base", trains=False),
    Arm("no_rope_change", "no RoPE change", trains=True),  # a control: the extension with the base's RoPE
    Arm("self_extend", "Self-Extend", trains=False, self_extend=True, paper=PaperResult(42.52, 5.45, 5)),
    Arm("harpe", "HARPE", trains=True, paper=PaperResult(86.82, 3.02, 1)),
    Arm("abf", "ABF-single", trains=True, paper=PaperResult(79.49, 3.06, 3)),
    Arm("abf_multistage", "ABF-multi", trains=True, paper=PaperResult(81.36, 3.03, 2)),
    Arm("pi", "PI", trains=True, paper=PaperResult(20.11, 20.73, 6)),
    Arm("yarn", "YaRN", trains=True, paper=PaperResult(46.93, 4.53, 4)),
    Arm("ntk", "NTK", trains=True),
    Arm("cream", "CREAM", trains=True),
    Arm("pose", "PoSE", trains=True),
)}


@dataclass(frozen=True)
class Tier:
    name: str
    default_arms: tuple[str, ...]
    # corpus (harpe_megatron.data.repro.ReproDataSettings; windows and vocabulary come from the configs)
    text_chars: int
    heldout_chars: int
    heldout_min_chars: int
    retrieval_docs: int
    retrieval_min_length: int
    # evaluation (tools/eval_long_context.py run)
    passkey_depths: tuple[float, ...]
    passkey_samples: int
    ppl_max_tokens: int
    ppl_stride_fraction: float
    # the base's least passkey accuracy (%) inside its window, checked after the run (None: not
    # checked; the smoke tier trains too little to learn retrieval)
    min_in_window_passkey: Optional[float] = None
    # launch
    device: str = "cpu"
    ranks: int = 1  # GPUS_PER_NODE of scripts/pretrain_harpe.sh
    eval_dtype: Optional[str] = None
    notes: tuple[str, ...] = field(default_factory=tuple)


TIERS: dict[str, Tier] = {t.name: t for t in (
    Tier("smoke", default_arms=("base", "harpe", "abf"), text_chars=1_200_000,
         heldout_chars=30_000, heldout_min_chars=3_000, retrieval_docs=600, retrieval_min_length=118,
         passkey_depths=(0.5,), passkey_samples=1, ppl_max_tokens=8192, ppl_stride_fraction=0.5),
    Tier("cpu", default_arms=tuple(ARMS), text_chars=8_000_000, heldout_chars=300_000,
         heldout_min_chars=8_000, retrieval_docs=16000, retrieval_min_length=118,
         passkey_depths=(0.0, 0.25, 0.5, 0.75, 1.0), passkey_samples=8, ppl_max_tokens=65536,
         ppl_stride_fraction=0.5, min_in_window_passkey=90.0),
    Tier("gpu", default_arms=tuple(ARMS), text_chars=6_000_000_000, heldout_chars=3_000_000,
         heldout_min_chars=200_000, retrieval_docs=40_000, retrieval_min_length=2038,
         passkey_depths=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), passkey_samples=4,
         ppl_max_tokens=1_048_576, ppl_stride_fraction=0.5, min_in_window_passkey=90.0, device="cuda", ranks=1, eval_dtype="bf16"),
)}


def resolve_arms(spec: Optional[str], tier: Tier) -> list[str]:
    """``a,b,c`` (or ``all``, or None for the tier's default) -> arm names in protocol order."""
    if spec is None:
        return list(tier.default_arms)
    names = list(ARMS) if spec == "all" else [a.strip() for a in spec.split(",") if a.strip()]
    unknown = [a for a in names if a not in ARMS]
    if unknown or not names:
        raise ValueError(f"--arms: unknown arm(s) {unknown or spec!r}; known: {','.join(ARMS)} or all")
    return [a for a in ARMS if a in names]


@dataclass(frozen=True)
class TierPlan:
    """A tier with its configs read: the windows, the evaluation lengths, Self-Extend's setting."""

    tier: Tier
    config_dir: Path
    length: int  # L
    target: int  # the extension window
    vocab_size: int

    @property
    def eval_lengths(self) -> list[int]:
        """Perplexity windows: L, 2L, 4L, 8L, 16L."""
        return [self.length * k for k in (1, 2, 4, 8, 16)]

    @property
    def passkey_lengths(self) -> list[int]:
        """Passkey prompt lengths: each window less the answer's room (the module docstring)."""
        return [n - ANSWER_ROOM for n in self.eval_lengths]

    @property
    def self_extend(self) -> tuple[int, int]:
        """(group, window)."""
        return self.target // self.length, self.length // 4

    def config_path(self, arm: str) -> Path:
        return self.config_dir / f"{arm}.yaml"

    def config(self, arm: str) -> RunConfig:
        return load_config(str(self.config_path(arm)))


def plan_tier(name: str, configs_root: Path) -> TierPlan:
    """Read ``configs_root/<name>/{base,harpe}.yaml`` for the tier's windows and vocabulary."""
    if name not in TIERS:
        raise ValueError(f"--tier: unknown tier {name!r}; known: {', '.join(TIERS)}")
    config_dir = configs_root / name
    for arm in ("base", "harpe"):
        if not (config_dir / f"{arm}.yaml").is_file():
            raise FileNotFoundError(f"{config_dir / (arm + '.yaml')}: the {name} tier's {arm} config is missing")
    base = load_config(str(config_dir / "base.yaml"))
    target = load_config(str(config_dir / "harpe.yaml")).data.seq_length
    return TierPlan(TIERS[name], config_dir, base.data.seq_length, target, base.model.vocab_size)
