"""Reproduce HARPE against its baselines at small scale, in one command (docs/reproduction.md).

    bash scripts/reproduce.sh --tier smoke|cpu|gpu [--arms a,b,...|all] [--seed N]
        [--data-dir DIR] [--runs-dir DIR] [--results-dir DIR] [--dry-run] [--no-check]

Pretrains the tier's base model at L (or finds it), extends it to 8 L once per arm from the same
checkpoint with the same data and token budget, evaluates every arm (perplexity at L..16 L on
held-out text, passkey retrieval by length and depth) and writes results/repro/<tier>/seed<N>/
(a JSON per arm, report.md + heatmaps, table.md + perplexity.png) and results/repro/<tier>/
summary.md over every seed there. Each step is a public command, printed before it runs; a step
whose output exists is skipped, a stopped training resumes, so running the command again
continues where it stopped. timings.json records each step's wall and CPU time and the machine's
load. Arms: base, self_extend (both evaluate the un-extended base), no_rope_change (the
control: the extension's training with the base's RoPE), harpe, abf, abf_multistage, pi, yarn,
ntk, cream, pose. The checks (on by default) test what must hold at any scale: the
base's perplexity at 4 L is above its perplexity at L (by at least 10 %), and HARPE and ABF at
4 L remove at least half of that excess loss (harpe_megatron/repro/checks.py; exit 1 when one
fails).

Exit codes: 0 done, 1 a step or check failed, 2 bad arguments, 75 a training was preempted
(run again to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from harpe_megatron.cli import eval_long_context
from harpe_megatron.repro.checks import run_checks
from harpe_megatron.repro.pipeline import (
    Step,
    environment,
    layout_for,
    plan_steps,
    report_steps,
    shell_line,
    write_paper_reference,
)
from harpe_megatron.repro.protocol import TIERS, plan_tier, resolve_arms

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[2]
# quick steps run here rather than in a new interpreter (the same code as the printed command)
IN_PROCESS = {"tools/eval_long_context.py": eval_long_context.main}


def _say(msg: str) -> None:
    print(f"[reproduce] {msg}", flush=True)


def _cpu() -> float:
    """CPU seconds of this process and its finished children."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_CHILDREN),
                                                  resource.getrusage(resource.RUSAGE_SELF)))


def _record(path: Path, name: str, entry: dict) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[name] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def run_step(step: Step, root: Path, timings: Path) -> int:
    """Run one step (or skip it when done); returns its exit code."""
    if step.done():
        _say(f"{step.name}: done before, skipped")
        return 0
    _say(f"{step.name}: $ {shell_line(step)}")
    load0, cpu0, t0 = os.getloadavg(), _cpu(), time.perf_counter()
    if step.in_process and step.argv[1] in IN_PROCESS:
        rc = IN_PROCESS[step.argv[1]](step.argv[2:])
    else:
        rc = subprocess.run(step.argv, cwd=root, env=environment(step)).returncode
    wall, cpu, load1 = time.perf_counter() - t0, _cpu() - cpu0, os.getloadavg()
    if rc == 0:
        _record(timings, step.name, {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                                     "load_1min_before": round(load0[0], 2), "load_1min_after": round(load1[0], 2),
                                     "load_5min_after": round(load1[1], 2), "cores": os.cpu_count(),
                                     "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        _say(f"{step.name}: {wall:.0f} s wall, {cpu:.0f} s CPU, load {load1[0]:.1f}")
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/reproduce.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tier", required=True, choices=list(TIERS))
    p.add_argument("--arms", default=None, help="comma list or 'all' (default: the tier's arms)")
    p.add_argument("--seed", type=int, default=1, help="training seed of the base and every arm (default 1)")
    p.add_argument("--data-dir", default=None, help="default: data/repro/<tier>")
    p.add_argument("--runs-dir", default=None, help="default: runs/repro/<tier> (seed<N>/<arm> below it)")
    p.add_argument("--results-dir", default=None, help="default: results/repro/<tier> (seed<N>/ below it)")
    p.add_argument("--configs", default=str(ROOT / "configs" / "repro"), help="tier configs (default: configs/repro)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--no-check", action="store_true", help="skip the checks that must hold at any scale")
    args = p.parse_args(argv)
    configs_root = Path(os.path.relpath(Path(args.configs).resolve(), ROOT))
    layout = layout_for(ROOT, args.tier, args.seed, args.data_dir, args.runs_dir, args.results_dir)
    os.chdir(ROOT)  # every path below is relative to the repository, as in the printed commands
    try:
        plan = plan_tier(args.tier, configs_root)
        arms = resolve_arms(args.arms, plan.tier)
    except (ValueError, FileNotFoundError) as exc:
        print(f"reproduce: error: {exc}", file=sys.stderr)
        return 2
    _say(f"tier {args.tier}: L = {plan.length}, target {plan.target}, arms {','.join(arms)}, seed {args.seed}; "
         f"results in {layout.results}")
    steps = plan_steps(plan, arms, layout, configs_root)
    if args.dry_run:
        for step in steps + report_steps(plan, arms, layout):
            print(shell_line(step))
        return 0
    timings, start = layout.results / "timings.json", time.perf_counter()
    for step in steps:
        rc = run_step(step, ROOT, timings)
        if rc:
            _say(f"{step.name} failed with exit code {rc}; run the same command again to continue")
            return 75 if rc == 75 else 1
    write_paper_reference(layout.results.parent / "paper.json")
    for step in report_steps(plan, arms, layout):
        if run_step(step, ROOT, timings):
            return 1
    _say(f"finished in {time.perf_counter() - start:.0f} s: {layout.results}/table.md, report.md, perplexity.png, "
         f"heatmaps; all seeds: {layout.results.parent}/summary.md")
    if args.no_check:
        return 0
    failures = run_checks(layout.results, plan, arms, _say)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
