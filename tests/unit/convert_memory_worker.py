"""Worker of tests/unit/test_convert_memory.py: the peak resident memory of one conversion.

    python -m tests.unit.convert_memory_worker OUT.json import|export SRC DST WARM_SRC SCRATCH

One measurement per process, so no earlier conversion's freed-but-retained heap hides this one's
growth. The process first converts WARM_SRC (a small model) both ways so every module and code
path is loaded, frees it and returns freed heap to the system (``malloc_trim``); then it resets the
peak (``/proc/self/clear_refs`` = 5, Linux >= 4.0) to the resident set just before (``VmRSS``),
runs the conversion, reads the peak after (``VmHWM``) and the bound the converter states
(``summary.memory_bound_bytes``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
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


def _release_freed_heap() -> None:
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc:
        trim = getattr(ctypes.CDLL(libc), "malloc_trim", None)
        if trim is not None:
            trim(0)


def main(out: str, direction: str, src: str, dst: str, warm_src: str, scratch: str) -> None:
    root = Path(scratch)
    convert_hf_to_megatron(warm_src, root / "warm_mg", tp=2, progress=False)
    convert_megatron_to_hf(root / "warm_mg", root / "warm_hf", progress=False)
    shutil.rmtree(root)
    _release_freed_heap()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    if direction == "import":
        summary = convert_hf_to_megatron(src, dst, tp=2, progress=False)
    else:
        summary = convert_megatron_to_hf(src, dst, progress=False)
    peak = _status("VmHWM")
    Path(out).write_text(json.dumps({"before": before, "peak": peak, "growth": peak - before,
                                     "bound": summary.memory_bound_bytes}))


if __name__ == "__main__":
    main(*sys.argv[1:])
