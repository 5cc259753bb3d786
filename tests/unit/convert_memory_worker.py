"""Worker of tests/unit/test_convert_memory.py: peak resident memory of conversions, one process.

    python -m tests.unit.convert_memory_worker OUT.json SRC_SMALL SRC_LARGE SCRATCH

Warms up (a first conversion of SRC_SMALL each way, so every module and code path is loaded),
then for SRC_SMALL and SRC_LARGE, each direction: the resident set just before (``VmRSS``),
the peak reset to it (``/proc/self/clear_refs`` = 5, Linux >= 4.0), the conversion, the peak
after (``VmHWM``), and the bound the converter states (``summary.memory_bound_bytes``).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from harpe_megatron.hf.export_hf import convert_megatron_to_hf
from harpe_megatron.hf.import_hf import convert_hf_to_megatron


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _measure(run) -> dict:
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    summary = run()
    peak = _status("VmHWM")
    return {"before": before, "peak": peak, "growth": peak - before, "bound": summary.memory_bound_bytes}


def main(out: str, small: str, large: str, scratch: str) -> None:
    root = Path(scratch)
    convert_hf_to_megatron(small, root / "warm_mg", progress=False)
    convert_megatron_to_hf(root / "warm_mg", root / "warm_hf", progress=False)
    results = {}
    for name, src in (("small", small), ("large", large)):
        mg, hf = root / f"{name}_mg", root / f"{name}_hf"
        results[f"import_{name}"] = _measure(lambda: convert_hf_to_megatron(src, mg, tp=2, progress=False))
        results[f"export_{name}"] = _measure(lambda: convert_megatron_to_hf(mg, hf, progress=False))
        shutil.rmtree(mg)
        shutil.rmtree(hf)
    Path(out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
