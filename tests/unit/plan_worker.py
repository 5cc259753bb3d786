"""Subprocess side of test_plan.py: plans need a process without a process group (fake world).

    python -m tests.unit.plan_worker CONFIG OUT_JSON WORLD [--fake-only] [override ...]

Plans the config on fake tensors, then runs exactly the same code on real tensors (same fake
process group: collectives move nothing, which changes no allocation), measured by the same
tracker, then one real optimizer step to measure Adam's state. Writes both plans and the
measured optimizer-state bytes (``--fake-only``: the plan alone, ``"real": null``).
"""

from __future__ import annotations

import json
import sys

import torch

from harpe_megatron.cli.common import quiet_library_warnings
from harpe_megatron.config.loader import load_config
from harpe_megatron.planner.plan import fake_world, megatron_layout, plan_layout
from harpe_megatron.planner.plan_run import _BUILDERS


def main() -> None:
    quiet_library_warnings()
    config, out, world, *overrides = sys.argv[1:]
    world = int(world)
    fake_only = "--fake-only" in overrides
    overrides = [o for o in overrides if o != "--fake-only"]
    cfg = load_config(config, overrides)
    measured = {}

    def inspect(chunks, optimizer):
        for c in chunks:  # the real micro-step left gradients in the buffers; the step needs them finite
            for b in c.buffers:
                b.grad_data.normal_()
        optimizer.step()
        total, steps = 0, 0
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            for state in opt.optimizer.state.values():
                total += sum(state[k].numel() * state[k].element_size() for k in ("exp_avg", "exp_avg_sq"))
        measured["adam_moment_bytes"] = total

    with fake_world(world), megatron_layout(cfg):
        planned = plan_layout(cfg, world, _BUILDERS, fake=True)
        real = None if fake_only else plan_layout(cfg, world, _BUILDERS, fake=False, inspect=inspect)
    with open(out, "w") as f:
        json.dump({"planned": planned.to_json(), "real": real.to_json() if real else None, **measured,
                   "dp_cp": cfg.data_parallel_size(world) * cfg.parallel.context_parallel_size,
                   "precision": cfg.training.precision, "torch": torch.__version__}, f)


if __name__ == "__main__":
    main()
