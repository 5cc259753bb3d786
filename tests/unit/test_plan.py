"""The memory/FLOP planner (planner/plan.py) against real runs, arithmetic and the MFU formula.

What is compared: for small configs, the planner's per-rank peak (fake tensors) and the peak of
the *same code on real tensors* (same fake process group, so collectives move nothing but every
allocation happens), both measured by the planner's tracker: live tensor storage bytes, i.e.
what CUDA's caching allocator would have to hold, without fragmentation. On CPU the real run's
CP attention materialises its lower-right mask and runs the math kernel (what CausalBias does
off CUDA), while the plan runs the GPU's flash op, so the real peak also carries the small
score matrices of these tiny shapes. torch's MemTracker was tried as the real run's tracker and
cannot follow megatron's DDP: its module hooks call ``module.buffers()``, which megatron's DDP
shadows with its list of grad buffers. Plans need a process without a process group, so each
runs in a subprocess (tests/unit/plan_worker.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harpe_megatron.config.loader import load_config
from harpe_megatron.config.model import padded_vocab_size

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
FULL_RECOMPUTE = ["training.recompute_granularity=full", "training.recompute_method=uniform",
                  "training.recompute_num_layers=1"]
CASES = {
    "tp2_fp32": ["training.precision=fp32"],
    "tp2_cp2_bf16_full_recompute": ["training.precision=bf16", "parallel.context_parallel_size=2"] + FULL_RECOMPUTE,
    "cp2_gqa_bf16_selective_sp": ["training.precision=bf16", "parallel.context_parallel_size=2",
                                  "parallel.sequence_parallel=true", "training.recompute_granularity=selective",
                                  "training.micro_batch_size=2", "data.seq_length=512"],
}


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module", params=sorted(CASES))
def planned_and_real(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    subprocess.run([sys.executable, "-m", "tests.unit.plan_worker", TINY, str(out), "8", *CASES[request.param]],
                   check=True, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    return request.param, json.loads(out.read_text()), load_config(TINY, CASES[request.param])


def _local_params(cfg) -> int:
    """This rank's parameter count from the config alone (Llama decoder, TP-sharded, untied)."""
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    h, d, f = m.hidden_size, m.head_dim, m.ffn_hidden_size
    vocab = padded_vocab_size(m.vocab_size, tp, m.make_vocab_size_divisible_by)
    per_layer = h * (m.num_attention_heads + 2 * m.num_query_groups) * d // tp  # QKV
    per_layer += m.num_attention_heads * d * h // tp + 3 * h * f // tp + 2 * h  # proj, SwiGLU, 2 norms
    return m.num_layers * per_layer + 2 * vocab * h // tp + h  # embedding, output layer, final norm


def test_planned_peak_within_10_percent_of_the_real_run(planned_and_real):
    name, d, _ = planned_and_real
    planned, real = d["planned"]["peak_bytes"], d["real"]["peak_bytes"]
    print(f"\n[plan-agreement] {name}: planned {planned:,} B, real {real:,} B, ratio {planned / real:.4f}")
    assert abs(planned - real) <= 0.10 * real


def test_params_grads_optimizer_bytes_are_the_arithmetic(planned_and_real):
    """Exact: bf16 (or fp32) params and fp32 main grads = element size x megatron's buffer
    (the parameters plus its alignment padding, here none); the distributed optimizer's fp32
    master shard + Adam's two fp32 moments = 12 (fp32 training: 8) bytes x buffer / (DP x CP).
    The moments are measured after a real optimizer step; the optimizer also holds a few
    bytes of scalars (at most 16 here)."""
    name, d, cfg = planned_and_real
    plan, real = d["planned"], d["real"]
    n = _local_params(cfg)
    assert plan["params_local"] == real["params_local"] == n
    assert plan["buffer_elements"] == real["buffer_elements"] == n  # no padding at these sizes
    param_bytes = 2 if cfg.training.precision == "bf16" else 4
    shard = n // d["dp_cp"]
    for p in (plan, real):
        assert p["breakdown_bytes"]["params_bf16"] == param_bytes * n
        assert p["breakdown_bytes"]["main_grads_fp32"] == 4 * n
    assert d["adam_moment_bytes"] == 8 * shard  # measured after the real step
    master = 4 * shard if cfg.training.precision == "bf16" else 0
    extra = plan["breakdown_bytes"]["optimizer_shard"] - (master + 8 * shard)
    assert 0 <= extra <= 16
    assert plan["static_bytes"] == real["static_bytes"]


def test_counted_flops_match_the_mfu_formula(planned_and_real):
    name, d, _ = planned_and_real
    plan = d["planned"]
    ratio = plan["flops_per_step"] / plan["analytic_flops_per_step"]
    print(f"\n[plan-flops] {name}: counted / analytic = {ratio:.4f}; recompute adds "
          f"{plan['executed_flops_per_step'] / plan['flops_per_step'] - 1:.1%}")
    assert abs(ratio - 1) <= 0.03
    fl = plan["flops_per_rank_microbatch"]
    assert fl["backward"] == pytest.approx(2 * fl["forward"], rel=1e-9)  # every counted op: dX and dW


def test_full_7b_128k_plan_in_ci(tmp_path):
    """One full-size plan through the CLI: Llama-2-7B at 131072 tokens, TP 2 x CP 4, one node."""
    out = tmp_path / "plan.json"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "tools/plan_run.py", "--config", "configs/llama2_7b_harpe_128k.yaml",
                           "--gpu-memory-gib", "80", "--nodes", "1", "--json", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(out.read_text())
    for key in ("peak_gib", "breakdown_gib", "flops_per_step", "analytic_flops_per_step", "fits", "world_size",
                "layout"):
        assert key in plan
    assert plan["layout"] == {"tp": 2, "cp": 4, "pp": 1, "dp": 1} and plan["world_size"] == 8
    assert plan["fits"] is True and plan["peak_gib"] < 80 - 6
    n = _local_params(load_config("configs/llama2_7b_harpe_128k.yaml"))
    assert plan["params_local"] == n == (6_738_415_616 - 65 * 4096) // 2 + 65 * 4096  # norms are replicated
    b = plan["breakdown_bytes"]
    assert b["params_bf16"] == 2 * plan["buffer_elements"] and b["main_grads_fp32"] == 4 * plan["buffer_elements"]
    # K and V of one layer gathered over CP: 2 x 131072 tokens x 16 heads (TP 2) x 128 x 2 bytes
    assert b["cp_kv_gathered"] == 2 * 131072 * 16 * 128 * 2
    assert abs(plan["flops_per_step"] / plan["analytic_flops_per_step"] - 1) <= 0.03
    print(f"\n[plan-7b] {plan['peak_gib']:.2f} GiB per rank, {elapsed:.1f} s")  # a figure, not a timed assertion


def test_fix_is_searched_and_checked(tmp_path):
    """A layout that cannot fit (7B at 128k with TP 1, CP 1 on 80 GiB): the suggestion is planned."""
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "tools/plan_run.py", "--config", TINY, "--gpu-memory-gib", "0.02",
                           "--margin-gib", "0", "--json", str(out), "training.precision=bf16"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    plan = json.loads(out.read_text())
    assert proc.returncode == (0 if plan["fits"] else 1)
    assert plan["fits"] is False and plan["suggestion"] is not None, proc.stdout
    assert plan["suggestion"]["peak_gib"] <= 0.02
    assert "checked" in proc.stdout or plan["suggestion"]


def test_preflight_prints_one_line_and_fail_stops(single_rank):
    """The trainer's start-up plan on the run's own process group (here one gloo rank)."""
    from harpe_megatron.distributed.bringup import megatron_parallel
    from harpe_megatron.planner.plan import Builders, PreflightError, preflight
    from harpe_megatron.step.build import build_optimizer, build_training_model

    build = Builders(build_training_model, build_optimizer)
    cfg = load_config(TINY, ["parallel.tensor_model_parallel_size=1", "training.preflight=fail"])
    lines = []
    with megatron_parallel():
        plan = preflight(cfg, 1, build, lines.append)
        assert plan.fits is None  # no GPU, no capacity given: a prediction only
        assert len(lines) == 1 and "predicted peak" in lines[0] and "preflight" in lines[0]
        with pytest.raises(PreflightError, match="training.preflight=fail"):
            preflight(cfg, 1, build, lines.append, device_memory_gib=0.001)
        cfg.training.preflight = "warn"
        assert preflight(cfg, 1, build, lines.append, device_memory_gib=0.001).fits is False
        cfg.training.preflight = "off"
        assert preflight(cfg, 1, build, lines.append) is None
    assert len(lines) == 3 and "does NOT fit" in lines[-1]


def test_plan_table_script_runs(tmp_path):
    """scripts/bench/plan_table.py (the docs table) on the tiny config: one markdown row per node count."""
    out = tmp_path / "table.json"
    proc = subprocess.run([sys.executable, "scripts/bench/plan_table.py", "--configs", "configs/tiny_cpu.yaml",
                           "--nodes", "1", "--json", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| tiny_cpu")]
    assert len(rows) == 2 and "| yes | yes |" in rows[0]  # printed as it goes, then in the table
    assert json.loads(out.read_text())[0]["world_size"] == 8


def test_document_masking_counts_the_attention_it_leaves(demo_data, tmp_path):
    """With data.document_masking the plan's attention FLOPs shrink by the data's own fraction
    (its documents packed into rows of data.seq_length); counted and analytic still agree."""
    from harpe_megatron.data.documents import data_attention_fraction
    from harpe_megatron.step.metrics import training_flops

    out = tmp_path / "plan.json"
    overrides = [f"data.paths=[{demo_data['prefix']}]", f"data.tokenizer_model={demo_data['tokenizer']}",
                 "model.vocab_size=512", "data.seq_length=2048", "data.document_masking=true",
                 "training.precision=bf16", "parallel.context_parallel_size=2"]
    subprocess.run([sys.executable, "-m", "tests.unit.plan_worker", TINY, str(out), "4", "--fake-only", *overrides],
                   check=True, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    plan = json.loads(out.read_text())["planned"]
    cfg = load_config(TINY, overrides)
    fraction = data_attention_fraction([demo_data["prefix"]], None, 2048, cfg.training.seed)
    assert plan["document_masking"] and plan["masked_attention_fraction"] == fraction and 0 < fraction < 0.95
    tokens = cfg.training.global_batch_size * 2048
    assert plan["analytic_flops_per_step"] == training_flops(cfg.model, tokens, fraction * tokens * 2048 / 2)
    assert abs(plan["flops_per_step"] / plan["analytic_flops_per_step"] - 1) <= 0.03
    assert 0 < plan["attention_flops_per_step"] < plan["flops_per_step"]


@pytest.mark.parametrize("args,message", [
    (["--nodes", "0"], "tools/plan_run.py: error: argument --nodes: expected an integer >= 1, got '0'"),
    (["--gpus-per-node", "0"], "tools/plan_run.py: error: argument --gpus-per-node: expected an integer >= 1"),
    (["--gpu-memory-gib", "0"], "tools/plan_run.py: error: argument --gpu-memory-gib: expected a number > 0, got '0'"),
    (["--gpu-memory-gib", "-1"], "tools/plan_run.py: error: argument --gpu-memory-gib: expected a number > 0"),
    (["--margin-gib", "-100"], "tools/plan_run.py: error: argument --margin-gib: expected a number >= 0, got '-100'"),
    (["--margin-gib", "90"], "tools/plan_run.py: error: --margin-gib 90 leaves nothing of --gpu-memory-gib 80"),
    (["--json", "{file}/plan.json"], "error: --json {file}/plan.json: cannot be created: {file} is not a directory"),
    (["--json", "{dir}"], "error: --json {dir}: is a directory"),
], ids=["nodes", "gpus", "memory0", "memory-1", "margin-100", "margin90", "json_under_file", "json_dir"])
def test_meaningless_plan_arguments_are_one_line_exit_2_before_planning(tmp_path, capsys, args, message):
    from harpe_megatron.cli.plan_run import main

    (tmp_path / "file").write_text("x")
    args = [a.format(file=tmp_path / "file", dir=tmp_path) for a in args]
    try:
        code = main(["--config", TINY, *args])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""  # nothing planned
    assert captured.err.startswith(message.format(file=tmp_path / "file", dir=tmp_path))
    assert captured.err.count("\n") == 1
