"""The run config: every shipped YAML loads, round-trips, and bad configs fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from harpe_megatron.config import ConfigError, config_from_dict, config_to_dict, load_config
from harpe_megatron.config.loader import ConfigDeprecationWarning
from harpe_megatron.config.run import RunConfig
from harpe_megatron.positional.bases import PAPER_LLAMA2_7B_BASES

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"llama2_7b_harpe_128k.yaml", "llama2_7b_abf_128k.yaml", "tiny_cpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_round_trips(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg))))
    assert again == cfg


def test_harpe_128k_recipe():
    from harpe_megatron.model.builder import model_head_bases

    cfg = load_config(CONFIGS[0].parent / "llama2_7b_harpe_128k.yaml")
    assert cfg.data.seq_length == 131072 and cfg.model.hidden_size == 4096
    assert model_head_bases(cfg.model, cfg.positional) == list(PAPER_LLAMA2_7B_BASES)
    assert (cfg.training.lr, cfg.training.adam_beta1, cfg.training.adam_beta2) == (2e-5, 0.9, 0.95)
    assert cfg.training.train_tokens == 6e9 and cfg.training.precision == "bf16"
    assert cfg.training.resolved_train_iters(cfg.data.seq_length) == 1431
    cfg.validate_for_world(32)  # 4 nodes x 8 GPUs
    assert cfg.num_microbatches(32) == 8
    abf = load_config(CONFIGS[0].parent / "llama2_7b_abf_128k.yaml")
    assert set(model_head_bases(abf.model, abf.positional)) == {5e6}
    assert config_to_dict(abf) | {"positional": None, "run_dir": None} == \
        config_to_dict(cfg) | {"positional": None, "run_dir": None}


def test_overrides_apply_with_types():
    cfg = load_config(CONFIGS[0].parent / "tiny_cpu.yaml", ["training.lr=3e-4", "logging.tensorboard=false",
                                                            "data.weights=[1.0]"])
    assert cfg.training.lr == 3e-4 and cfg.logging.tensorboard is False and cfg.data.weights == [1.0]


BAD = [
    ("training:\n  lrr: 1\n", r"x\.yaml: training: unknown key\(s\) \['lrr'\]"),
    ("model:\n  hidden_size: big\n", r"model\.hidden_size: expected an integer, got 'big'"),
    ("model:\n  preset: llama3\n", r"model\.preset: unknown preset 'llama3'"),
    ("parallel:\n  tensor_model_parallel_size: 3\n",
     r"model\.num_attention_heads \(32\) must be divisible by parallel\.tensor_model_parallel_size \(3\)"),
    ("parallel:\n  tensor_model_parallel_size: 2\n  context_parallel_size: 2\n  sequence_parallel: true\n"
     "data:\n  seq_length: 4100\n", r"sequence length 4100 must be divisible by 8"),
    ("positional:\n  bases: {strategy: explicit, values: [1.0e6, 2.0e6]}\n",
     r"positional\.bases\.values: expected 32 bases"),
    ("positional:\n  bases: {strategy: uniform, stride: 3}\n", r"positional\.bases: unknown key\(s\) \['stride'\]"),
    ("positional:\n  bases: {strategy: nope}\n", r"positional\.bases\.strategy: unknown strategy 'nope'"),
    ("training:\n  train_iters: 10\n  train_tokens: 1.0e9\n", r"set exactly one of training\.train_iters"),
    ("training:\n  train_iters: 10\n  precision: fp8\n", r"training\.precision: expected bf16, fp16 or fp32"),
    ("training:\n  train_iters: 10\n  recompute_granularity: full\n", r"training\.recompute_method must be"),
    ("logging:\n  wandb_mode: cloud\n", r"logging\.wandb_mode"),
    ("data:\n  paths: [a, b]\n  weights: [1.0]\n", r"data\.weights has 1 entries but data\.paths has 2"),
    ("- just\n- a list\n", r"top level must be a mapping"),
    ("model: [\n", r"invalid YAML"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_yaml_fails_with_key_path(tmp_path, text, message):
    base = "model:\n  preset: llama2-7b\ntraining:\n  train_iters: 10\n"
    path = tmp_path / "x.yaml"
    # Sections given in the bad text replace the base ones.
    tree = yaml.safe_load(base)
    try:
        bad = yaml.safe_load(text)
    except yaml.YAMLError:
        bad = None
    if isinstance(bad, dict):
        tree.update(bad)
        path.write_text(yaml.safe_dump(tree))
    else:
        path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(CONFIGS[0].parent / "tiny_cpu.yaml", ["training.lr"])



def _tiny_tree(**positional) -> dict:
    return {"model": {"preset": "llama2-7b"}, "training": {"train_iters": 1},
            "data": {"seq_length": 4096, "position_scheme": {"type": "cream", "factor": 8}},
            "positional": {"bases": {"strategy": "constant", "base": 1e4}, **positional}}


def test_a_position_scheme_implies_positions_from_the_batch():
    cfg = config_from_dict(_tiny_tree())
    assert cfg.positional.position_ids == "from_batch"
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert config_from_dict(_tiny_tree(position_ids="from_batch")) == cfg
    with pytest.raises(ConfigError, match=r"data\.position_scheme \(cream\) .* positional\.position_ids is "
                                          r"'sequential'; drop positional\.position_ids"):
        config_from_dict(_tiny_tree(position_ids="sequential"))
    tree = _tiny_tree()
    del tree["data"]["position_scheme"]
    assert config_from_dict(tree).positional.position_ids == "sequential"
    for name in ("llama2_7b_cream_32k.yaml", "llama2_7b_pose_32k.yaml"):
        assert load_config(CONFIGS[0].parent / name).positional.position_ids == "from_batch"


def test_apply_rope_fusion_is_read_as_per_head_rope_with_a_warning():
    for old, new in ((True, "fused"), (False, "table")):
        with pytest.warns(ConfigDeprecationWarning, match=r"x\.yaml: positional\.apply_rope_fusion is deprecated .* "
                                                          rf"read as positional\.per_head_rope: {new}"):
            cfg = config_from_dict(_tiny_tree(apply_rope_fusion=old), "x.yaml")
        assert cfg.positional.per_head_rope == new
        assert "apply_rope_fusion" not in config_to_dict(cfg)["positional"]
        assert cfg == config_from_dict(_tiny_tree(per_head_rope=new))
    with pytest.raises(ConfigError, match=r"x\.yaml: positional\.apply_rope_fusion=false contradicts "
                                          r"positional\.per_head_rope=fused"):
        config_from_dict(_tiny_tree(apply_rope_fusion=False, per_head_rope="fused"), "x.yaml")
    with pytest.raises(ConfigError, match=r"positional\.per_head_rope: expected 'fused' or 'table'"):
        config_from_dict(_tiny_tree(per_head_rope="triton"))
