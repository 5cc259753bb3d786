"""The run's record of its configurations: ``<run_dir>/config.yaml`` and ``config.<step>.yaml``.

``config.yaml`` is the resolved config the run trains under now, written by the trainer only
after a launch's resume checks and checkpoint load succeeded (a launch that fails before leaves
the record as it was). Its first line says from which step on it applies. When a launch's config
differs from the one in ``config.yaml``, that one is kept as ``config.<N>.yaml``, N being the
first step it applied to, so the run directory holds every configuration the run trained under,
each named by the step where it took effect (``config.before_<M>.yaml`` for a ``config.yaml``
without that first line, written before it existed; ``config.<N>.<k>.yaml`` if the name is taken).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from harpe_megatron.run_dir import RunDir

__all__ = ["record_config"]

_HEADER = "# harpe: the resolved config of this run from step {step} on (earlier ones: config.<step>.yaml)\n"
_HEADER_RE = re.compile(r"# harpe: the resolved config of this run from step (\d+) on")


def _free_name(run_dir: RunDir, label: str) -> Path:
    path, k = run_dir.earlier_config(label), 1
    while path.exists():
        path, k = run_dir.earlier_config(f"{label}.{k}"), k + 1
    return path


def record_config(run_dir: RunDir, config_yaml: str, first_step: int) -> Optional[Path]:
    """Make ``config_yaml`` the run's config from ``first_step`` on; returns where the previous
    one was kept (None: there was none, or it was the same config)."""
    path = run_dir.config
    kept = None
    if path.is_file():
        old = path.read_text()
        match = _HEADER_RE.match(old)
        body = old.split("\n", 1)[1] if match else old
        if body == config_yaml:
            return None
        kept = _free_name(run_dir, match.group(1) if match else f"before_{first_step}")
    run_dir.root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(_HEADER.format(step=first_step) + config_yaml)
    if kept is not None:  # the old record is in place under its new name before config.yaml is replaced
        kept_tmp = kept.with_name(kept.name + ".tmp")
        kept_tmp.write_text(old)
        os.replace(kept_tmp, kept)
    os.replace(tmp, path)
    return kept
