"""The training loop end to end on CPU/gloo: parallel layouts, resume, resharding, data position.

All runs start from the same initial checkpoint (``checkpoint.pretrained``) and train 20 steps of
a tiny HARPE model (per-head bases, GQA) on a real indexed dataset built from text on the machine.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.training_workers import stages_by_hand, stages_with, train_methods, train_with
from tests.helpers import TINY_CPU_CONFIG, checkpoint_tensors, tiny_run_overrides
from tests.spawn import run_distributed

pytestmark = pytest.mark.distributed

STEPS = 20
# Measured over 20 steps (fp32, lr 3e-3): TP 2 2.2e-6, CP 2 1.1e-5, PP 2 1.0e-5, saved at TP 2 and
# resumed at TP 1 2.2e-6 (summation-order differences that Adam amplifies as training goes on);
# resume at the same layout is bitwise.
LOSS_ATOL = 5e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_data):
    root = tmp_path_factory.mktemp("train")
    base = tiny_run_overrides(demo_data, STEPS) + ["logging.log_interval=5", "checkpoint.save_interval=0"]
    config = TINY_CPU_CONFIG
    init = root / "init"
    run_distributed(train_with, 1, config, base + ["parallel.tensor_model_parallel_size=1",
                                                   "training.train_iters=1", f"run_dir={init}"])
    base.append(f"checkpoint.pretrained={init / 'checkpoints'}")
    reference = run_distributed(train_with, 1, config, base + ["parallel.tensor_model_parallel_size=1",
                                                               f"run_dir={root / 'ref'}"])[0]
    assert len(reference.losses) == STEPS
    return config, base, root, reference


def _close(losses, reference, steps, label=""):
    for s in steps:
        assert losses[s] == pytest.approx(reference.losses[s], abs=LOSS_ATOL), f"step {s}"
    worst = max(abs(losses[s] - reference.losses[s]) for s in steps)
    print(f"\n[train-equivalence] {label}: max |loss - one rank| over steps {min(steps)}-{max(steps)} = {worst:.2e}")


def test_loss_falls(setup):
    _, _, _, reference = setup
    assert reference.losses[STEPS] < reference.losses[1] - 0.3


@pytest.mark.parametrize("layout", [["parallel.tensor_model_parallel_size=2"],
                                    ["parallel.tensor_model_parallel_size=1", "parallel.context_parallel_size=2"],
                                    ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=2"]],
                         ids=["tp2", "cp2", "pp2"])
def test_parallel_layout_matches_one_rank(setup, layout):
    config, base, root, reference = setup
    name = "_".join(x.split("=")[0].split(".")[-1] + x.split("=")[1] for x in layout)
    result = run_distributed(train_with, 2, config, base + layout + [f"run_dir={root / name}"])
    for r in result:  # every rank reports the same global loss
        _close(r.losses, reference, range(1, STEPS + 1), name)


def test_document_masked_training_matches_one_rank_under_cp_and_pp(setup):
    """data.document_masking + reset_position_ids end to end: the trainer's data pipeline (EOD
    boundaries, balanced CP layout), the model, the loss report; CP 2 and PP 2 equal one rank."""
    config, base, root, _ = setup
    masked = base + ["data.document_masking=true", "data.reset_position_ids=true", "positional.position_ids=from_batch",
                     "training.train_iters=6"]
    one = run_distributed(train_with, 1, config, masked + ["parallel.tensor_model_parallel_size=1",
                                                           f"run_dir={root / 'docs_ref'}"])[0]
    for name, layout in (("cp2", ["parallel.context_parallel_size=2"]), ("pp2", ["parallel.pipeline_model_parallel_size=2"])):
        result = run_distributed(train_with, 2, config, masked + layout + ["parallel.tensor_model_parallel_size=1",
                                                                           f"run_dir={root / ('docs_' + name)}"])
        for r in result:
            _close(r.losses, one, range(1, 7), f"document-masked {name}")


def test_stop_and_resume_equals_uninterrupted(setup):
    config, base, root, reference = setup
    run = [f"run_dir={root / 'resume'}", "parallel.tensor_model_parallel_size=1"]
    first = run_distributed(train_with, 1, config, base + run + ["training.exit_interval=10"])[0]
    assert sorted(first.losses) == list(range(1, 11))
    second = run_distributed(train_with, 1, config, base + run)[0]
    assert sorted(second.losses) == list(range(11, STEPS + 1))
    for s in range(11, STEPS + 1):
        assert second.losses[s] == reference.losses[s], f"step {s}"  # bitwise


def test_save_at_tp2_resume_at_tp1(setup):
    config, base, root, reference = setup
    run = [f"run_dir={root / 'reshard'}"]
    run_distributed(train_with, 2, config, base + run + ["parallel.tensor_model_parallel_size=2",
                                                         "training.exit_interval=10"])
    resumed = run_distributed(train_with, 1, config, base + run + ["parallel.tensor_model_parallel_size=1"])[0]
    assert sorted(resumed.losses) == list(range(11, STEPS + 1))
    _close(resumed.losses, reference, range(11, STEPS + 1), "saved at TP 2, resumed at TP 1")


def test_bf16_run_keeps_pretrained_weights(setup):
    """bf16: the optimizer's fp32 master copies must start from checkpoint.pretrained, not init."""
    config, base, root, reference = setup
    trained = str(root / "ref" / "checkpoints")  # the reference run's final weights (step 20)
    overrides = [o for o in base if not o.startswith("checkpoint.pretrained=")] + [
        f"checkpoint.pretrained={trained}", "training.precision=bf16", "training.lr=1e-9",
        "training.min_lr=0", "training.train_iters=3", "parallel.tensor_model_parallel_size=1",
        f"run_dir={root / 'bf16'}",
    ]
    result = run_distributed(train_with, 1, config, overrides)[0]
    # Every step stays at the trained level (the untrained level is reference.losses[1]); with the
    # master copies left at random init, the weights fell back after the first update.
    assert max(result.losses.values()) < reference.losses[1] - 0.3


STAGES = [  # (name, overrides): two ABF stages (growing length and base), then a non-ABF change (PI x2)
    ("s1", {"data.seq_length": 32, "positional.bases": "{strategy: constant, base: 1000.0}",
            "training.train_iters": 3, "training.lr": "1.0e-3"}),
    ("s2", {"data.seq_length": 64, "positional.bases": "{strategy: constant, base: 5000.0}",
            "training.train_iters": 3, "training.lr": "5.0e-4"}),
    ("s3", {"data.seq_length": 128, "positional.bases": "{strategy: constant, base: 5000.0}",
            "positional.scaling": "{type: linear, factor: 2.0}", "training.train_iters": 2, "training.lr": "2.0e-4"}),
]


def test_multistage_schedule_equals_stages_by_hand(setup, tmp_path, single_rank):
    """Three tiny stages (ABF-style, then PI) in one launch == the same overrides run one by one."""
    config, base, root, _ = setup
    stages = "stages=[" + ", ".join(
        f"{{name: {name}, overrides: {{{', '.join(f'{k}: {v}' for k, v in o.items())}}}}}" for name, o in STAGES) + "]"
    common = [o for o in base if not o.startswith("training.train_iters")] + [
        "parallel.tensor_model_parallel_size=1", "training.lr_decay_style=constant",
        "training.lr_warmup_iters=0", "training.min_lr=0"]
    scheduled = run_distributed(stages_with, 1, config,
                                common + [stages, f"run_dir={tmp_path / 'schedule'}"])[0]
    by_hand = run_distributed(stages_by_hand, 1, config, common,
                              [[f"{k}={v}" for k, v in o.items()] for _, o in STAGES], str(tmp_path / "hand"))[0]
    assert [sorted(r.losses) for r in scheduled] == [[1, 2, 3], [1, 2, 3], [1, 2]]
    for a, b in zip(scheduled, by_hand):
        assert a.losses == b.losses
    final_a = checkpoint_tensors(scheduled[-1].checkpoint, tmp_path / "a")
    final_b = checkpoint_tensors(by_hand[-1].checkpoint, tmp_path / "b")
    weights = [k for k in final_a if not k.startswith("optimizer")]
    assert weights and all(torch.equal(final_a[k], final_b[k]) for k in weights)
    # A second launch finds every stage finished and trains nothing.
    again = run_distributed(stages_with, 1, config, common + [stages, f"run_dir={tmp_path / 'schedule'}"])[0]
    assert again == [None, None, None]


METHODS = {  # the paper's comparison on the tiny model: positional overrides only
    "harpe": [],
    "abf": ["positional.bases={strategy: constant, base: 20000.0}"],
    "pi": ["positional.bases={strategy: constant, base: 10000.0}", "positional.scaling={type: linear, factor: 4.0}"],
    "yarn": ["positional.bases={strategy: constant, base: 10000.0}",
             "positional.scaling={type: yarn, factor: 4.0, original_max_position_embeddings: 16}"],
    "cream": ["positional.bases={strategy: constant, base: 10000.0}", "positional.scaling={type: linear, factor: 4.0}",
              "positional.position_ids=from_batch", "data.position_scheme={type: cream, factor: 4}"],
    "pose": ["positional.bases={strategy: constant, base: 10000.0}", "positional.scaling={type: linear, factor: 4.0}",
             "positional.position_ids=from_batch", "data.position_scheme={type: pose, target: 256, chunks: 2}"],
    # HARPE on a Llama-3-style model: the keys of configs/llama3_8b_harpe_128k.yaml at tiny width
    "llama3": ["positional.bases={strategy: uniform, b_min: 5.0e+5, b_max: 2.5e+6}",
               "positional.scaling={type: llama3, factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, "
               "original_max_position_embeddings: 16}"],
}


def test_every_method_trains_and_exports_to_hf(setup, tmp_path, single_rank):
    """Each baseline trains the tiny model from its config and exports a loadable HF folder."""
    from transformers import AutoModelForCausalLM

    from harpe_megatron.hf.export_hf import convert_megatron_to_hf

    config, base, _, _ = setup
    common = [o for o in base if not o.startswith("training.train_iters")] + [
        "training.train_iters=3", "parallel.tensor_model_parallel_size=2"]
    results = run_distributed(train_methods, 2, config, common, METHODS, str(tmp_path))[0]
    expected_type = {"harpe": "harpe_llama", "abf": "llama", "pi": "llama", "yarn": "llama",
                     "cream": "llama", "pose": "llama", "llama3": "harpe_llama"}
    for name, result in results.items():
        assert len(result.losses) == 3 and all(v == v for v in result.losses.values()), name  # finite
        out = tmp_path / f"{name}_hf"
        convert_megatron_to_hf(result.checkpoint, out, progress=False)
        model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        assert model.config.model_type == expected_type[name], name
        with torch.no_grad():
            logits = model(torch.arange(1, 33)[None]).logits
        assert torch.isfinite(logits).all(), name
        if name in ("pi", "cream", "pose"):
            assert model.config.rope_parameters["rope_type"] == "linear"
        if name == "yarn":
            assert model.config.rope_parameters["rope_type"] == "yarn"
        if name == "llama3":
            assert model.config.rope_parameters["rope_type"] == "llama3"
