"""Shared helpers of the benchmark scripts: device description, timing, peak figures.

Timing: CUDA events around each call after warm-up (median of ``iters``), or wall clock on CPU.
Peak memory bandwidth is the vendor figure for the device (HBM), by device-name fragment; the
scripts also measure a plain device copy in the same process as a practical ceiling.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Optional

import torch

# Vendor peak DRAM bandwidth in GB/s (1e9 bytes/s), by device-name fragment (first match wins).
_PEAK_GBS = [("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0),
             ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100", 1555.0)]


def device_description(device: torch.device) -> str:
    """One line naming the device and the software versions."""
    import megatron.core

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        extra = f"CUDA {torch.version.cuda}"
        try:
            import triton

            extra += f", Triton {triton.__version__}"
        except ImportError:
            extra += ", no Triton"
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        extra = "CPU"
    return f"{name}; torch {torch.__version__}, megatron-core {megatron.core.__version__}, {extra}"


def peak_bandwidth_gbs(device: torch.device, override: Optional[float] = None) -> Optional[float]:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, gbs in _PEAK_GBS:
        if fragment in name:
            return gbs
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds per call of ``fn`` (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
