"""Multi-stage schedules: each stage is dotted overrides of the run config, built when the config loads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from harpe_megatron.config import ConfigError, config_from_dict, config_to_dict, load_config
from harpe_megatron.config.loader import stage_config
from harpe_megatron.positional.bases import ConstantBase, UniformBases
from harpe_megatron.positional.position_ids import CreamPositions
from harpe_megatron.positional.scaling import LinearScaling, NoScaling
from harpe_megatron.training.resume_checks import plan_resume
from tests.helpers import TINY_CPU_CONFIG

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _stages(*stages: str) -> str:
    return "stages=[" + ", ".join(stages) + "]"


def test_shipped_multistage_abf():
    cfg = load_config(CONFIGS / "llama2_7b_abf_multistage.yaml")
    plain = [stage_config(cfg, i, s, f"prev{i}") for i, s in enumerate(cfg.stages)]
    assert [s.name for s in cfg.stages] == ["abf_1e6_32k", "abf_2e6_64k", "abf_5e6_128k"]
    assert [p.data.seq_length for p in plain] == [32768, 65536, 131072]
    assert [p.positional.bases for p in plain] == [ConstantBase(1e6), ConstantBase(2e6), ConstantBase(5e6)]
    assert [p.training.resolved_train_iters(p.data.seq_length) for p in plain] == [1908, 954, 477]
    assert [p.run_dir for p in plain] == [f"runs/llama2_7b_abf_multistage/{i}_{s.name}" for i, s in enumerate(cfg.stages)]
    assert [p.checkpoint.save for p in plain] == [f"{p.run_dir}/checkpoints" for p in plain]
    assert [(p.checkpoint.pretrained, p.checkpoint.load, p.stages) for p in plain] == \
        [("prev0", None, None), ("prev1", None, None), ("prev2", None, None)]
    # everything not staged is the run's
    assert all(p.training.lr == cfg.training.lr and p.parallel == cfg.parallel and p.model == cfg.model for p in plain)


def test_any_setting_can_be_staged():
    """Non-ABF stages: a PI scaling factor, then CREAM positions; each stage overrides the run
    config (not the previous stage), and a stage's train_iters replaces the run's length."""
    cfg = load_config(TINY_CPU_CONFIG, [
        "training.train_iters=null", "training.train_tokens=1.0e6",
        _stages("{name: pi, overrides: {positional.scaling: {type: linear, factor: 4.0}, training.train_iters: 5}}",
                "{name: cream, overrides: {positional.scaling.type: linear, positional.scaling.factor: 2.0, "
                "positional.position_ids: from_batch, data.position_scheme: {type: cream, factor: 2}, "
                "training.lr: 1.0e-3}}"),
    ])
    pi, cream = (stage_config(cfg, i, s, None) for i, s in enumerate(cfg.stages))
    assert pi.positional.scaling == LinearScaling(factor=4.0) and pi.data.position_scheme is None
    assert (pi.training.train_iters, pi.training.train_tokens) == (5, None)
    assert cream.positional.scaling == LinearScaling(factor=2.0)
    assert cream.positional.position_ids == "from_batch" and cream.data.position_scheme == CreamPositions(factor=2)
    assert (cream.training.train_iters, cream.training.train_tokens, cream.training.lr) == (None, 1.0e6, 1.0e-3)
    # the run itself and the stage list are unchanged
    assert cfg.positional.scaling == NoScaling() and cfg.positional.bases == UniformBases(b_min=500.0, b_max=20000.0)
    assert cfg.stages[0].overrides == {"positional.scaling": {"type": "linear", "factor": 4.0}, "training.train_iters": 5}
    # the stages round-trip through the saved config
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))) == cfg


@pytest.mark.parametrize("stage, message", [
    ("{name: s2, overrides: {training.lrr: 1.0}}", r"stages\[1\] \(s2\): training: unknown key\(s\) \['lrr'\]"),
    ("{name: s2, overrides: {trainingg.lr: 1.0}}", r"stages\[1\] \(s2\): unknown key\(s\) \['trainingg'\]"),
    ("{name: s2, overrides: {positional.bases.b_minn: 1.0}}", r"stages\[1\] \(s2\): positional\.bases: unknown key"),
    ("{name: s2, overrides: {data.seq_length: 0}}", r"stages\[1\] \(s2\): data\.seq_length must be positive"),
    ("{name: s2, overrides: {training.lr: 1.0e-5}}", r"stages\[1\] \(s2\): training\.min_lr must be in"),
    ("{name: s2, overrides: {training.lr.x: 1}}", r"stages\[1\] \(s2\): override 'training\.lr\.x': training\.lr is not a section"),
    ("{name: s2, overrides: {checkpoint.save: /x}}", r"stages\[1\]: stage 's2': 'checkpoint\.save' cannot be staged"),
    ("{name: s2, overrides: {run_dir: /x}}", r"stages\[1\]: stage 's2': 'run_dir' cannot be staged"),
    ("{name: s2, overrides: {model.preset: llama2-7b}}", r"stage 's2': 'model\.preset' cannot be staged"),
    ("{name: s2, overrides: [training.lr=1.0]}", r"stage 's2': overrides must be a mapping"),
    ("{name: s2, overrides: {training.lr: 1.0}, seq_len: 4}", r"stages\[1\]: unknown key\(s\) \['seq_len'\]"),
    ("{name: s1, overrides: {}}", r"stage names must be unique"),
])
def test_bad_stage_fails_at_load_naming_the_stage(stage, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY_CPU_CONFIG, [_stages("{name: s1, overrides: {training.train_iters: 2}}", stage)])


def test_old_stage_form_fails_with_the_new_form():
    with pytest.raises(ConfigError) as exc:
        load_config(TINY_CPU_CONFIG, [_stages("{name: a, overrides: {training.train_iters: 2}}",
                                              "{name: b, seq_length: 128, rope_base: 1.0e6, train_iters: 3}")])
    msg = str(exc.value)
    assert "stages[1]: ['rope_base', 'seq_length', 'train_iters'] are the old stage keys" in msg
    new = yaml.safe_load(msg.split("write: ")[1])
    assert float(new["overrides"]["positional.bases"].pop("base")) == 1.0e6  # YAML reads 1.0e6 as a string
    assert new == {"name": "b", "overrides": {"data.seq_length": 128, "training.train_iters": 3,
                                              "positional.bases": {"strategy": "constant"}}}
    new["overrides"]["positional.bases"]["base"] = 1.0e6
    # ... and that form loads
    cfg = load_config(TINY_CPU_CONFIG, [_stages(yaml.safe_dump(new, default_flow_style=True).strip())])
    assert stage_config(cfg, 0, cfg.stages[0], None).positional.bases == ConstantBase(1.0e6)


def test_stage_transitions_are_not_resumes_and_a_stage_resumes_its_own_checkpoint():
    """Stages change lengths, bases and schedules between them legitimately: each has its own
    run_dir and checkpoint dir and takes the previous stage's weights as checkpoint.pretrained,
    so no resume check sees a transition. A stage resuming its own checkpoint (preempted mid-stage)
    compares with that stage's saved config: nothing differs; a stage edited between launches is
    checked like any run (training/resume_checks.py)."""
    cfg = load_config(CONFIGS / "llama2_7b_abf_multistage.yaml")
    plain = [stage_config(cfg, i, s, f"prev{i}") for i, s in enumerate(cfg.stages)]
    assert len({p.checkpoint.save for p in plain}) == len(plain)
    assert all(p.checkpoint.load is None and p.checkpoint.pretrained == f"prev{i}" for i, p in enumerate(plain))
    for p in plain:
        saved = {"iteration": 5, "consumed_samples": 160, "config_yaml": yaml.safe_dump(config_to_dict(p))}
        assert plan_resume(p, Path(p.checkpoint.save) / "iter_0000005", saved).changes == []
    raised = dataclasses.replace(cfg.stages[1], overrides={**cfg.stages[1].overrides, "positional.bases.base": 3.0e6})
    stage1 = stage_config(cfg, 1, raised, "prev1")  # stage 1's base raised after it started
    saved = {"iteration": 5, "consumed_samples": 160, "config_yaml": yaml.safe_dump(config_to_dict(plain[1]))}
    with pytest.raises(ConfigError, match=r"positional.bases is \{strategy: constant, base: 3000000.0\} in the config "
                                          r"but \{strategy: constant, base: 2000000.0\} in the checkpoint"):
        plan_resume(stage1, Path(stage1.checkpoint.save) / "iter_0000005", saved)
