"""Resume checks (training/resume_checks.py): what a resume compares, refuses and applies; the
config record of a run (training/config_history.py). In-process, no training: the end-to-end
cases (exit code, message, LR of the extended steps) are in tests/distributed/test_reliability.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from harpe_megatron.config import ConfigError, config_to_dict, load_config
from harpe_megatron.data.dataset import build_gpt_datasets
from harpe_megatron.data.tokenizer import train_sentencepiece
from harpe_megatron.positional.bases import per_query_head_bases
from harpe_megatron.run_dir import RunDir
from harpe_megatron.training.config_history import record_config
from harpe_megatron.training.resume_checks import config_settings_kept, data_fingerprint, plan_resume
from tests.helpers import TINY_CPU_CONFIG
from tests.unit.test_data_tokenizer import corpus_texts

CKPT = "/runs/x/checkpoints/iter_0000012"


def _cfg(*overrides: str):
    return load_config(TINY_CPU_CONFIG, list(overrides))


def _saved(cfg, step: int = 12, consumed: int = 96, **extra) -> dict:
    return {"iteration": step, "consumed_samples": consumed,
            "config_yaml": yaml.safe_dump(config_to_dict(cfg), sort_keys=False), **extra}


def _plan(saved_overrides=(), overrides=(), **kw):
    return plan_resume(_cfg(*overrides), Path(CKPT), _saved(_cfg(*saved_overrides), **kw))


# (override, the key named, the checkpoint's value, the config's value, what it would change)
REFUSED = [
    ("training.lr=1.0e-2", "training.lr", "0.003", "0.01", "learning-rate schedule"),
    ("training.min_lr=1.0e-4", "training.min_lr", "0.0003", "0.0001", "learning-rate schedule"),
    ("training.lr_warmup_iters=5", "training.lr_warmup_iters", "10", "5", "learning-rate schedule"),
    ("training.lr_decay_style=linear", "training.lr_decay_style", "cosine", "linear", "learning-rate schedule"),
    ("training.train_iters=200", "training.train_iters", "150", "200", "learning-rate schedule"),
    ("training.lr_decay_iters=100", "training.lr_decay_iters", "150", "100", "learning-rate schedule"),
    ("training.weight_decay=0.0", "training.weight_decay", "0.1", "0.0", "optimizer settings"),
    ("training.adam_beta2=0.99", "training.adam_beta2", "0.95", "0.99", "optimizer settings"),
    ("training.adam_eps=1.0e-6", "training.adam_eps", "1e-08", "1e-06", "optimizer settings"),
    ("data.seq_length=512", "data.seq_length", "256", "512", "data position (96 samples)"),
    ("training.global_batch_size=32", "training.global_batch_size", "16", "32", "data position"),
    ("data.paths=[data/other/text_document]", "data.paths", "[data/demo/demo_text_document]",
     "[data/other/text_document]", "data position"),
    ("data.weights=[2.0]", "data.weights", "null", "[2.0]", "data position"),
    ("data.split=90,10,0", "data.split", "95,5,0", "90,10,0", "data position"),
    ("training.seed=7", "training.seed", "1234", "7", "data position"),
    ("data.document_masking=true", "data.document_masking", "False", "True", "the same samples would be trained"),
    ("model.num_layers=2", "model.num_layers", "4", "2", "another model"),
    ("model.vocab_size=2048", "model.vocab_size", "1024", "2048", "another model"),
    ("model.norm_epsilon=1.0e-6", "model.norm_epsilon", "1e-05", "1e-06", "another model"),
    ("model.make_vocab_size_divisible_by=64", "model.make_vocab_size_divisible_by", "128", "64", "another model"),
    ("positional.bases={strategy: constant, base: 10000.0}", "positional.bases",
     "{strategy: uniform, b_min: 500.0, b_max: 20000.0, order: ascending}", "{strategy: constant, base: 10000.0}",
     "another model"),
    ("positional.scaling={type: linear, factor: 2.0}", "positional.scaling", "{type: none}",
     "{type: linear, factor: 2.0}", "another model"),
    ("positional.rotary_interleaved=true", "positional.rotary_interleaved", "False", "True", "another model"),
]


@pytest.mark.parametrize("override,key,old,new,meaning", REFUSED, ids=[r[0].split("=")[0] for r in REFUSED])
def test_a_change_that_alters_the_continued_run_is_refused_naming_key_and_values(override, key, old, new, meaning):
    with pytest.raises(ConfigError) as err:
        _plan(overrides=[override])
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"resuming {CKPT} (step 12): {key} is {new} in the config but {old} in the checkpoint: ")
    assert meaning in msg
    if meaning == "another model":
        assert f"set {key} back to {old}; or train a new run (another run_dir) from these weights with " \
               "checkpoint.pretrained=/runs/x/checkpoints" in msg and "on_resume_change" not in msg
    elif "data" in meaning or "samples" in meaning:
        assert "set training.on_resume_change.data=config" in msg and f"or set {key} back to {old}" in msg
    else:
        assert "set training.on_resume_change.schedule=config" in msg and "(the LR from step 13 on follows it)" in msg


def test_a_position_scheme_change_is_a_data_change():
    cream = ["positional.position_ids=from_batch", "positional.scaling={type: linear, factor: 2.0}"]
    with pytest.raises(ConfigError, match=r"data.position_scheme is \{type: cream, factor: 4\} in the config but "
                                          r"\{type: cream, factor: 2\} in the checkpoint: the saved data position"):
        _plan(cream + ["data.position_scheme={type: cream, factor: 2}"],
              cream + ["data.position_scheme={type: cream, factor: 4}"])


def test_per_document_positions_changed_at_a_resume_is_named():
    masked = ["data.document_masking=true", "positional.position_ids=from_batch"]
    with pytest.raises(ConfigError, match=r"data.reset_position_ids is True in the config but False in the checkpoint: "
                                          r"the same samples would be trained otherwise"):
        _plan(masked, masked + ["data.reset_position_ids=true"])


def test_several_families_name_every_key_and_every_override():
    with pytest.raises(ConfigError) as err:
        _plan(overrides=["training.train_iters=200", "data.seq_length=512"])
    msg = str(err.value)
    assert ("training.train_iters is 200 in the config but 150 in the checkpoint "
            "(also: data.seq_length 256 -> 512)") in msg
    assert "training.on_resume_change.schedule=config" in msg
    assert "; and set training.on_resume_change.data=config" in msg
    with pytest.raises(ConfigError,
                       match=r"model.num_layers is 2 .* \(also: training.lr 0.003 -> 0.01\): a run cannot"):
        _plan(overrides=["training.lr=1e-2", "model.num_layers=2"])  # a model change first: no override helps


FREE = ["parallel.tensor_model_parallel_size=1", "training.micro_batch_size=2", "training.precision=bf16",
        "training.clip_grad=0.5", "training.exit_interval=160", "training.eval_interval=0", "logging.log_interval=1",
        "checkpoint.save_interval=10", "checkpoint.keep_last=5", "positional.per_head_rope=table",
        "model.init_method_std=0.01", "model.pretrained_context_length=128", "data.validate=quick",
        "training.recompute_granularity=full", "training.hang_timeout_s=60"]


@pytest.mark.parametrize("override", FREE, ids=[o.split("=")[0] for o in FREE])
def test_settings_that_take_effect_as_the_config_says_are_not_checked(override):
    extra = ["training.recompute_method=uniform"] if "recompute" in override else []
    plan = _plan(overrides=[override, *extra])
    assert plan.changes == [] and plan.consumed == 96 and plan.notes == []


def test_the_same_bases_spelled_differently_and_a_constant_schedule_extended_are_no_change():
    explicit = per_query_head_bases(_cfg().positional.bases, 8, 4, 16)
    assert _plan(overrides=[f"positional.bases={{strategy: explicit, values: {explicit[::2]}}}"]).changes == []
    constant = ["training.lr_decay_style=constant"]
    plan = _plan(constant, constant + ["training.train_iters=300", "training.min_lr=0.0"])
    assert plan.changes == []  # neither the decay length nor min_lr has an effect on a constant LR


def test_a_length_in_tokens_is_named_in_tokens():
    tokens = ["training.train_iters=null", "training.train_tokens=6.0e5"]  # 16 x 256 tokens per step: 147 steps
    with pytest.raises(ConfigError, match=r"training.train_tokens is 1.2e\+06 \(293 steps\) in the config but "
                                          r"600000 \(147 steps\) in the checkpoint"):
        _plan(tokens, tokens[:1] + ["training.train_tokens=1.2e6"])


def test_schedule_checkpoint_with_a_length_in_tokens():
    tokens = ["training.train_iters=null", "training.train_tokens=6.0e5"]
    plan = _plan(tokens, tokens[:1] + ["training.train_tokens=1.2e6", "training.on_resume_change.schedule=checkpoint"])
    assert plan.cfg.training.lr_decay_iters == 147 and plan.cfg.training.train_tokens == 1.2e6
    assert "the checkpoint's LR decay length is kept (training.lr_decay_iters=147)" in plan.notes[0]


def test_fewer_steps_than_the_checkpoint_has_is_refused():
    with pytest.raises(ConfigError, match=r"training.train_iters is 10, below the checkpoint's step: nothing would be "
                                          r"trained. Set it to 12 or more, or use another run_dir"):
        _plan(overrides=["training.train_iters=10", "training.on_resume_change=config"])


def test_schedule_config_applies_the_new_schedule_and_says_so():
    plan = _plan(overrides=["training.train_iters=200", "training.lr=1.0e-2",
                            "training.on_resume_change.schedule=config"])
    assert plan.cfg.training.lr == 1.0e-2 and plan.cfg.training.lr_decay_steps(200) == 200
    assert [(c.key, c.checkpoint, c.config) for c in plan.changes] == [
        ("training.lr", 0.003, 0.01), ("training.train_iters", 150, 200)]
    record = plan.record()["resume"]
    assert [c["applied"] for c in record["changes"]] == ["config", "config"]
    assert record["consumed_samples"] == {"checkpoint": 96, "continued": 96} and plan.fingerprint is None
    assert "resume: training.lr is 0.01 in the config, 0.003 in the checkpoint: the config's applies from step 13" \
        in plan.notes


def test_schedule_checkpoint_keeps_the_checkpoints_schedule_in_the_runs_config():
    plan = _plan(overrides=["training.train_iters=200", "training.lr=1.0e-2", "training.adam_beta2=0.99",
                            "training.on_resume_change={schedule: checkpoint}"])
    t = plan.cfg.training
    assert (t.lr, t.adam_beta2, t.train_iters, t.lr_decay_iters) == (0.003, 0.95, 200, 150)
    assert t.lr_decay_steps(200) == 150  # the LR ends its decay where the checkpoint's did
    assert any("the checkpoint's LR decay length is kept (training.lr_decay_iters=150)" in n for n in plan.notes)
    assert {c["applied"] for c in plan.record()["resume"]["changes"]} == {"checkpoint"}


@pytest.mark.parametrize("old,new,consumed,continued", [(256, 512, 96, 48), (256, 384, 100, 67), (256, 128, 96, 192)])
def test_data_config_enters_the_new_data_at_the_tokens_trained_on(old, new, consumed, continued):
    plan = _plan([f"data.seq_length={old}"], [f"data.seq_length={new}", "training.on_resume_change.data=config"],
                 consumed=consumed)
    assert plan.consumed == continued  # ceil(consumed * old / new): no sample of the old tokens is re-read
    assert plan.record()["resume"]["consumed_samples"] == {"checkpoint": consumed, "continued": continued}


def test_checkpoints_without_a_full_run_config():
    """A converted checkpoint (model, positional, parallel only) checks the model; a checkpoint
    whose config cannot be read is resumed with a warning, not refused."""
    cfg = _cfg("training.train_iters=300")
    tree = config_to_dict(_cfg())
    converted = {k: tree[k] for k in ("model", "positional", "parallel")}
    state = {"iteration": 0, "consumed_samples": 0, "config_yaml": yaml.safe_dump(converted)}
    assert plan_resume(cfg, Path(CKPT), state).changes == []
    with pytest.raises(ConfigError, match="model.num_layers is 4 in the config but 2"):
        plan_resume(cfg, Path(CKPT), {**state, "config_yaml": yaml.safe_dump(
            {**converted, "model": {**converted["model"], "num_layers": 2}})})
    plan = plan_resume(cfg, Path(CKPT), {**state, "config_yaml": None})
    assert plan.changes == [] and plan.notes[0].startswith("WARNING: the resume is not checked against the checkpoint")


def test_config_settings_kept_through_a_load():
    """torch's load_state_dict restores the checkpoint's parameter groups (betas, and the
    max_lr/min_lr megatron's scheduler reads before its own); the context puts the config's back
    and sets the loaded step's LR from them."""
    def optimizer(lr, beta2):
        p = torch.nn.Parameter(torch.ones(2))
        opt = torch.optim.Adam([{"params": [p], "max_lr": lr, "min_lr": lr / 10, "wd_mult": 1.0}], betas=(0.9, beta2))
        sched = OptimizerParamScheduler(opt, init_lr=lr, max_lr=lr, min_lr=lr / 10, lr_warmup_steps=0,
                                        lr_decay_steps=20,
                                        lr_decay_style="cosine", start_wd=0.1, end_wd=0.1, wd_incr_steps=20,
                                        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=False,
                                        override_opt_param_scheduler=True)
        return p, opt, sched

    p_old, old, old_sched = optimizer(3e-3, 0.95)
    p_old.grad = torch.ones(2)
    old.step()
    old_sched.step(10)
    _, new, new_sched = optimizer(1e-2, 0.99)
    plain = optimizer(1e-2, 0.99)
    plain[1].load_state_dict(old.state_dict())
    plain[2].load_state_dict(old_sched.state_dict())
    assert plain[1].param_groups[0]["betas"] == (0.9, 0.95) and plain[1].param_groups[0]["max_lr"] == 3e-3
    with config_settings_kept(new, new_sched):
        new.load_state_dict(old.state_dict())
        new_sched.load_state_dict(old_sched.state_dict())
    group = new.param_groups[0]
    assert group["betas"] == (0.9, 0.99) and (group["max_lr"], group["min_lr"]) == (1e-2, 1e-3)
    expected = 1e-3 + (1e-2 - 1e-3) * 0.5 * (1 + np.cos(np.pi * 10 / 20))
    assert new_sched.num_steps == 10 and group["lr"] == pytest.approx(expected, rel=1e-12)
    assert new.state[group["params"][0]]["step"] == 1  # the optimizer state itself is the checkpoint's


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """~40 documents: a few dozen 16-token samples per epoch."""
    root = tmp_path_factory.mktemp("fingerprint")
    tok = train_sentencepiece(corpus_texts(), root / "tok", vocab_size=400)
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(str(root / "d.bin"), dtype=np.uint16)
    for _ in range(40):
        builder.add_item(torch.from_numpy(np.append(rng.integers(3, 400, size=int(rng.integers(2, 60))), 2)))
        builder.end_document()
    builder.finalize(str(root / "d.idx"))
    return root, tok


def test_the_data_order_is_checked_where_the_config_cannot_tell(small_corpus):
    """megatron shuffles as many epochs as the run needs together: the same data settings with a
    longer run can put other samples where the checkpoint's were; the fingerprint of the consumed
    samples tells, and a resume with unchanged data keys is refused then."""
    root, tok = small_corpus

    def train_set(num_samples):
        return build_gpt_datasets([str(root / "d")], None, "100,0,0", 16, 1234, (num_samples, 0, 0), tok,
                                  str(root / "cache"))[0]

    consumed = 24
    saved = data_fingerprint(train_set(30), consumed)
    assert saved["samples"] == [0, 12, 23] and len(saved["crc32"]) == 3
    per_epoch = len(train_set(30))
    assert data_fingerprint(train_set(per_epoch - 5), consumed) == saved  # one epoch either way: same order
    assert data_fingerprint(train_set(3 * per_epoch), consumed) != saved  # three epochs shuffled together
    plan = _plan(data_fingerprint=saved)
    assert plan.fingerprint == saved
    plan.check_data_order(train_set(per_epoch - 5))
    with pytest.raises(ConfigError, match=r"the training data order differs from the checkpoint's \(sample \d+ of the "
                                          r"train split is another one\).*training.on_resume_change.data=config"):
        plan.check_data_order(train_set(3 * per_epoch))
    assert _plan(overrides=["training.on_resume_change.data=config", "data.seq_length=512"],
                 data_fingerprint=saved).fingerprint is None  # a chosen data change is not checked
    accepted = _plan(overrides=["training.on_resume_change.data=config"], data_fingerprint=saved)
    accepted.check_data_order(train_set(3 * per_epoch))  # accepted by choice, and recorded
    assert [(c["key"], c["applied"]) for c in accepted.record()["resume"]["changes"]] == [("data order", "config")]
    assert "continuing with the new order" in accepted.notes[-1]


def test_the_run_keeps_every_config_it_trained_under(tmp_path):
    run = RunDir(tmp_path)
    first = yaml.safe_dump(config_to_dict(_cfg()), sort_keys=False)
    second = yaml.safe_dump(config_to_dict(_cfg("training.train_iters=200")), sort_keys=False)
    third = yaml.safe_dump(config_to_dict(_cfg("training.train_iters=300")), sort_keys=False)
    assert record_config(run, first, 1) is None
    assert record_config(run, first, 13) is None  # the same config: the record says from step 1
    assert (tmp_path / "config.yaml").read_text().startswith("# harpe: the resolved config of this run from step 1 on")
    assert record_config(run, second, 151) == tmp_path / "config.1.yaml"
    assert record_config(run, third, 151) == tmp_path / "config.151.yaml"  # second never trained a step
    assert record_config(run, second, 151) == tmp_path / "config.151.1.yaml"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.1.yaml", "config.151.1.yaml", "config.151.yaml",
                                                          "config.yaml"]
    assert load_config(tmp_path / "config.1.yaml").training.train_iters == 150
    assert load_config(tmp_path / "config.151.1.yaml").training.train_iters == 300
    assert load_config(tmp_path / "config.yaml").training.train_iters == 200
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.yaml").write_text(first)  # written before the first line existed
    assert record_config(RunDir(legacy), second, 40) == legacy / "config.before_40.yaml"
