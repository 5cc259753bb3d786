"""The reproduction as a list of public commands, each skipped when its output exists.

For one tier and one seed (docs/reproduction.md):

1. ``data``: ``tools/prepare_repro_data.py --tier T`` (keeps a complete build);
2. per training arm, base first: ``CONFIG=configs/repro/T/<arm>.yaml GPUS_PER_NODE=n bash
   scripts/pretrain_harpe.sh <overrides>`` (skipped when its last checkpoint is the final step; a
   stopped run resumes where it stopped), then ``tools/convert_to_hf.py`` (skipped when the export
   is newer than the checkpoint);
3. per arm: ``tools/eval_long_context.py run`` on the export (Self-Extend and the base: on the
   base's export) -> ``<results>/<arm>.json`` (skipped when that file is newer than the export);
4. ``tools/eval_long_context.py report`` of this seed (``report.md`` with heatmaps, ``table.md``
   with the perplexity plot), and ``report --summary`` of every seed found (``../summary.md``).

The overrides every training command gets are the only difference from the YAML file:
``training.seed``, ``run_dir``, ``data.paths`` / ``data.tokenizer_model`` re-rooted under the data
directory and, for the extension arms, ``checkpoint.pretrained`` = the base's checkpoints. They are
the same on every launch, so a resumed run has the config it started with.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from harpe_megatron.checkpoint.layout import checkpoint_step, resolve_checkpoint
from harpe_megatron.config.loader import load_config, stage_config
from harpe_megatron.config.run import RunConfig
from harpe_megatron.repro.protocol import ARMS, TierPlan
from harpe_megatron.run_dir import RunDir

__all__ = ["Layout", "Step", "environment", "layout_for", "plan_steps", "report_steps", "shell_line",
           "write_paper_reference"]


@dataclass(frozen=True)
class Layout:
    """Where one seed's files go; every command runs in ``root`` (the repository)."""

    root: Path
    data: Path  # data/repro/<tier>
    runs: Path  # runs/repro/<tier>/seed<N>
    results: Path  # results/repro/<tier>/seed<N>
    seed: int

    def run_dir(self, arm: str) -> Path:
        return self.runs / arm

    def hf_dir(self, arm: str) -> Path:
        return self.runs / arm / "hf"


@dataclass
class Step:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    done: Callable[[], bool] = lambda: False
    free_port: bool = False  # set MASTER_PORT to a free port when it runs (not part of the command)
    in_process: bool = False  # a quick tools/*.py command the caller may run in its own process


def shell_line(step: Step) -> str:
    """The step as one shell command (what a user types to run it alone)."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in step.env.items())
    return (env + " " if env else "") + shlex.join(step.argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _python(layout: Layout) -> str:
    exe = Path(sys.executable).absolute()
    return str(exe.relative_to(layout.root)) if exe.is_relative_to(layout.root) else str(exe)


def train_overrides(plan: TierPlan, arm: str, layout: Layout) -> list[str]:
    cfg = plan.config(arm)
    paths = ", ".join(str(layout.data / Path(p).name) for p in cfg.data.paths)
    out = [f"training.seed={layout.seed}", f"run_dir={layout.run_dir(arm)}", f"data.paths=[{paths}]",
           f"data.tokenizer_model={layout.data / Path(cfg.data.tokenizer_model or 'tokenizer.model').name}"]
    if arm != "base":
        out.append(f"checkpoint.pretrained={RunDir(layout.run_dir('base')).checkpoints}")
    return out


def final_checkpoints(cfg: RunConfig) -> tuple[Path, int]:
    """(save directory of the last plain run the config launches, its final step)."""
    if cfg.stages:
        last = stage_config(cfg, len(cfg.stages) - 1, cfg.stages[-1], cfg.checkpoint.pretrained)
    else:
        last = cfg
    save = Path(last.checkpoint.save or RunDir(last.run_dir).checkpoints)
    return save, last.training.resolved_train_iters(last.data.seq_length)


def _finished(save: Path, total: int) -> bool:
    if not (save / "latest").is_file():
        return False
    try:
        latest, _ = resolve_checkpoint(save)
    except RuntimeError:  # a broken ``latest``: training itself reports it when it resumes
        return False
    return latest is not None and checkpoint_step(latest) >= total


def _newer(path: Path, than: Path) -> bool:
    return path.exists() and than.exists() and path.stat().st_mtime >= than.stat().st_mtime


def write_paper_reference(path: Path) -> None:
    """The paper's numbers per arm label, as ``report --reference`` reads them (extra columns)."""
    ref = {a.label: {"paper NIAH avg": f"{a.paper.niah_avg:.2f}", "paper ppl avg": f"{a.paper.ppl_avg:.2f}",
                     "paper rank": str(a.paper.rank)} for a in ARMS.values() if a.paper}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ref, indent=1) + "\n")


def plan_steps(plan: TierPlan, arms: list[str], layout: Layout, configs_root: Path) -> list[Step]:
    """Every step for ``arms`` (see the module docstring), in order."""
    tier, py = plan.tier, _python(layout)
    steps = [Step("data", [py, "tools/prepare_repro_data.py", "--tier", tier.name, "--out", str(layout.data),
                           "--configs", str(configs_root)])]
    trained = ["base"] + [a for a in arms if ARMS[a].trains]
    for arm in trained:
        overrides = train_overrides(plan, arm, layout)
        cfg = load_config(str(plan.config_path(arm)), overrides)
        save, total = final_checkpoints(cfg)
        steps.append(Step(f"train {arm}", ["bash", "scripts/pretrain_harpe.sh", *overrides],
                          {"CONFIG": str(plan.config_path(arm)), "GPUS_PER_NODE": str(tier.ranks)},
                          done=lambda save=save, total=total: _finished(save, total), free_port=True))
        hf = layout.hf_dir(arm)
        window = plan.length if arm == "base" else plan.target
        steps.append(Step(f"export {arm}", [py, "tools/convert_to_hf.py", str(save), str(hf),
                                            "--max-position-embeddings", str(window), "--overwrite", "--no-progress"],
                          done=lambda hf=hf, save=save: _newer(hf / "config.json", save / "latest")))
    lengths = ",".join(str(L) for L in plan.eval_lengths)
    passkey_lengths = ",".join(str(L) for L in plan.passkey_lengths)
    for arm in arms:
        a = ARMS[arm]
        hf = layout.hf_dir(arm if a.trains else "base")
        out = layout.results / f"{arm}.json"
        argv = [py, "tools/eval_long_context.py", "run", str(hf), "--out", str(out), "--name", a.label,
                "--tasks", "passkey", "--lengths", passkey_lengths,
                "--depths", ",".join(f"{d:g}" for d in tier.passkey_depths), "--samples", str(tier.passkey_samples),
                "--seed", "0", "--heatmap-dir", str(layout.results / "heatmaps"),
                "--ppl-file", str(layout.data / "heldout.txt"), "--ppl-lengths", lengths,
                "--ppl-stride-fraction", f"{tier.ppl_stride_fraction:g}", "--ppl-max-tokens", str(tier.ppl_max_tokens),
                "--device", tier.device, "--no-progress"]
        if tier.eval_dtype:
            argv += ["--dtype", tier.eval_dtype]
        if a.self_extend:
            argv += ["--self-extend", "{},{}".format(*plan.self_extend)]
        steps.append(Step(f"eval {arm}", argv, done=lambda out=out, hf=hf: _newer(out, hf / "config.json")))
    return steps


def report_steps(plan: TierPlan, arms: list[str], layout: Layout) -> list[Step]:
    """The seed's report and the summary over every seed's results (always run: they are quick)."""
    py, res = _python(layout), layout.results
    files = [str(res / f"{arm}.json") for arm in arms]
    avg = ",".join(str(L) for L in plan.eval_lengths + plan.passkey_lengths if L <= plan.target)
    ref = str(res.parent / "paper.json")  # write_paper_reference
    every = sorted(str(p) for p in res.parent.glob("seed*/*.json") if p.stem in ARMS)  # not timings.json
    order = {ARMS[a].label: i for i, a in enumerate(ARMS)}
    every.sort(key=lambda p: (order.get(json.loads(Path(p).read_text()).get("name"), 99), p))
    return [
        Step("report", [py, "tools/eval_long_context.py", "report", *files, "--out", str(res / "report.md"),
                        "--heatmap", str(res / "heatmaps.png")], in_process=True),
        Step("table", [py, "tools/eval_long_context.py", "report", *files, "--summary", "--out",
                       str(res / "table.md"), "--ppl-plot", str(res / "perplexity.png"), "--avg-lengths", avg,
                       "--reference", ref], in_process=True),
        Step("summary", [py, "tools/eval_long_context.py", "report", *every, "--summary", "--out",
                         str(res.parent / "summary.md"), "--ppl-plot", str(res.parent / "perplexity.png"),
                         "--avg-lengths", avg, "--reference", ref], in_process=True),
    ]


def environment(step: Step) -> dict[str, str]:
    env = dict(os.environ, **step.env, PYTHONUNBUFFERED="1")
    if step.free_port:
        env["MASTER_PORT"] = str(free_port())
    if "PYTHON" not in env:
        env["PYTHON"] = sys.executable
    return env


def layout_for(root: Path, tier: str, seed: int, data: Optional[str] = None, runs: Optional[str] = None,
               results: Optional[str] = None) -> Layout:
    """The default folders (data/repro/<tier>, runs/repro/<tier>/seed<N>, results/repro/<tier>/seed<N>)
    or the given ones; paths inside ``root`` are kept relative to it (the commands run there)."""
    root = root.resolve()

    def place(given: Optional[str], default: str) -> Path:
        path = (Path(given) if given else root / default).resolve()
        return path.relative_to(root) if path.is_relative_to(root) else path

    return Layout(root=root, data=place(data, f"data/repro/{tier}"),
                  runs=place(runs, f"runs/repro/{tier}") / f"seed{seed}",
                  results=place(results, f"results/repro/{tier}") / f"seed{seed}", seed=seed)
