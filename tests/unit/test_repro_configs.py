"""The reproduction's configs (configs/repro/<tier>/) follow its protocol (docs/reproduction.md):
the bases of every arm are the transfer rule's, and the arms of a tier differ only where their
method does: same model, same data, same tokens per step and in all."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from harpe_megatron.config.loader import config_from_dict, config_to_dict, load_config
from harpe_megatron.model.builder import model_head_bases
from harpe_megatron.positional.base_transfer import base_exponent, transfer_base
from harpe_megatron.positional.bases import PAPER_LLAMA2_7B_BASES
from harpe_megatron.repro.protocol import ARMS, TIERS, plan_tier
from harpe_megatron.repro.rules import abf_base, abf_stages, base_rope_base, harpe_bases, yarn_beta_fast
from harpe_megatron.training.stages import stage_config

ROOT = Path(__file__).resolve().parents[2] / "configs" / "repro"
TRAINED = [a for a, arm in ARMS.items() if arm.trains]
CASES = [(t, a) for t in TIERS for a in ["base", *TRAINED]]


def _config(tier, arm):
    return load_config(str(ROOT / tier / f"{arm}.yaml"))


def _runs(cfg):
    """The plain run configs the file launches (one, or one per stage)."""
    if not cfg.stages:
        return [cfg]
    return [stage_config(cfg, i, s, cfg.checkpoint.pretrained) for i, s in enumerate(cfg.stages)]


@pytest.mark.parametrize("tier,arm", CASES, ids=lambda x: x)
def test_config_loads_and_round_trips(tier, arm):
    cfg = _config(tier, arm)
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))) == cfg


def test_every_arm_has_a_config_and_nothing_else_is_shipped():
    for tier in TIERS:
        assert {p.stem for p in (ROOT / tier).glob("*.yaml")} == {"base", *TRAINED}


def test_transfer_rule_keeps_the_share_of_slow_dimensions():
    # 1e4 at 4096 (Llama-2) and its image at 128 leave the same share of rotary pairs whose
    # wavelength 2 pi b^(2i/d) exceeds the window
    for base, length, new in ((1e4, 4096, 128), (5e6, 131072, 1024), (1e6, 32768, 2048)):
        new_base = transfer_base(base, length, new)
        share = lambda b, L: math.log(L / (2 * math.pi)) / math.log(b)  # noqa: E731  2 i_c / d
        assert share(new_base, new) == pytest.approx(share(base, length), rel=1e-12)
    assert transfer_base(1e4, 4096, 4096) == pytest.approx(1e4)
    assert base_exponent(1e4, 4096) == pytest.approx(1.42137, abs=1e-5)
    assert base_rope_base(128) == pytest.approx(72.547, abs=1e-3)
    assert abf_base(1024) == pytest.approx(2696.74, abs=1e-2)
    assert harpe_bases(2, 131072) == pytest.approx([PAPER_LLAMA2_7B_BASES[0], PAPER_LLAMA2_7B_BASES[-1]])
    assert [n for n, _ in abf_stages(1024)] == [256, 512, 1024] and yarn_beta_fast(4096) == pytest.approx(32)
    with pytest.raises(ValueError, match="must be > 1"):
        base_exponent(1.0, 4096)


@pytest.mark.parametrize("tier", TIERS)
def test_bases_follow_the_rule(tier):
    plan = plan_tier(tier, ROOT)
    L, T = plan.length, plan.target
    assert T == 8 * L and plan.self_extend == (8, L // 4)

    def bases(arm):
        cfg = _config(tier, arm)
        return model_head_bases(cfg.model, cfg.positional)

    b0 = base_rope_base(L)
    assert bases("base") == pytest.approx([b0] * len(bases("base")), abs=0.006)
    control = _config(tier, "no_rope_change")
    assert bases("no_rope_change") == bases("base") and control.positional == _config(tier, "base").positional
    heads = _config(tier, "harpe").model.num_attention_heads
    assert bases("harpe") == pytest.approx(harpe_bases(heads, T), abs=0.051)  # YAML keeps one decimal
    assert len(set(bases("harpe"))) == heads
    assert bases("abf") == pytest.approx([abf_base(T)] * heads, abs=0.051)
    stages = _runs(_config(tier, "abf_multistage"))
    assert [(s.data.seq_length, model_head_bases(s.model, s.positional)[0]) for s in stages] == \
        [(n, pytest.approx(b, abs=0.051)) for n, b in abf_stages(T)]
    for arm in ("pi", "yarn", "ntk", "cream", "pose"):
        cfg = _config(tier, arm)
        assert bases(arm) == pytest.approx([b0] * heads, abs=0.006)
        assert cfg.positional.scaling.factor == T // L
    yarn = _config(tier, "yarn").positional.scaling
    assert (yarn.original_max_position_embeddings, yarn.beta_slow) == (L, 1.0)
    assert yarn.beta_fast == pytest.approx(yarn_beta_fast(L), abs=0.006)
    assert _config(tier, "cream").data.position_scheme.target_length(L) == T
    assert _config(tier, "pose").data.position_scheme.target_length(L) == T


@pytest.mark.parametrize("tier", TIERS)
def test_arms_share_model_data_and_token_budget(tier):
    base = _config(tier, "base")
    assert base.positional.scaling.name == "none" and not base.stages
    budget = None
    for arm in TRAINED:
        cfg = _config(tier, arm)
        assert cfg.model == base.model, arm
        assert cfg.checkpoint.pretrained == f"runs/repro/{tier}/seed1/base/checkpoints", arm
        assert [Path(p).name for p in cfg.data.paths] == ["text_long_document", "retrieval_extend_document"], arm
        assert cfg.data.weights == [0.8, 0.2] and cfg.data.tokenizer_model == base.data.tokenizer_model
        runs = _runs(cfg)
        per_step = {r.training.global_batch_size * r.data.seq_length for r in runs}
        total = sum(r.training.resolved_train_iters(r.data.seq_length) * r.training.global_batch_size
                    * r.data.seq_length for r in runs)
        assert len(per_step) == 1, arm
        budget = budget or (per_step, total)
        assert (per_step, total) == budget, arm
        for r in runs:
            t = r.training
            assert (t.lr, t.min_lr, t.lr_decay_style) == (base.training.min_lr, base.training.min_lr, "constant"), arm
            assert r.training.seed == base.training.seed and r.training.precision == base.training.precision
            r.validate_for_world(1)
