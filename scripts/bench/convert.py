#!/usr/bin/env python
"""Benchmark the checkpoint converters at real size: wall, peak memory, rate against the disk.

    python scripts/bench/convert.py                          # Llama-2-7B shapes, bf16 (13.5 GB)
    python scripts/bench/convert.py --shape llama3-8b        # Llama-3-8B shapes (GQA 8, vocab 128256)
    python scripts/bench/convert.py --layers 4 --json o.json # fewer layers, same widths
    python scripts/bench/convert.py --tiny                   # smoke run (CI): tiny shapes

Steps, in one run:

1. A random HF Llama folder of the chosen shapes (``config.json`` + safetensors shards of at
   most ``--source-shard-size``) is written tensor by tensor (never the whole model in memory).
2. The disk's sequential bandwidth is measured with direct I/O (``dd iflag=direct`` over the
   largest source shard, ``dd oflag=direct`` for writing).
3. Each direction runs as its own process, exactly as a user runs it, with its input evicted from
   the page cache first (``posix_fadvise(DONTNEED)`` on each input file, so the checkpoint is
   read from the disk while the Python libraries stay cached; ``--drop-caches``: drop the whole
   page cache instead, ``sync; echo 3 > /proc/sys/vm/drop_caches``, root, which also times the
   imports from a cold disk): ``tools/convert_from_hf.py SRC MG --tp 2`` then
   ``tools/convert_to_hf.py MG OUT``. Peak RSS is the process's own (``wait4``'s ``ru_maxrss``).
4. The round trip is checked bitwise, tensor by tensor (source == export).

Printed per direction: process wall time (imports included), the converter's own time, peak
RSS, model bytes per second of each, and the ratio to the direct-I/O read bandwidth. Also the
machine's load average and free memory at the start, since other processes share the disk and
the CPUs. ``--keep`` keeps the files (default: deleted); record figures in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SHAPES = {
    # Llama-2-7B (HF meta-llama/Llama-2-7b-hf config.json)
    "llama2-7b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=4096,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    # Llama-3-8B (HF meta-llama/Meta-Llama-3-8B config.json)
    "llama3-8b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                      tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
    "tiny": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=176, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300, rope_theta=10000.0, max_position_embeddings=256,
                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def hf_config(shape: dict, dtype: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
            "initializer_range": 0.02, "attention_bias": False, "mlp_bias": False,
            "torch_dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype], **shape}


def source_tensors(shape: dict, dtype: torch.dtype, seed: int):
    """``(name, tensor)`` of the random source model, in file order, one at a time (deterministic:
    the round-trip check regenerates them instead of keeping the source on disk)."""
    from harpe_megatron.config.model import ModelConfig
    from harpe_megatron.hf.llama_names import expected_hf_shapes

    m = ModelConfig(num_layers=shape["num_hidden_layers"], hidden_size=shape["hidden_size"],
                    num_attention_heads=shape["num_attention_heads"], num_query_groups=shape["num_key_value_heads"],
                    ffn_hidden_size=shape["intermediate_size"], vocab_size=shape["vocab_size"],
                    untie_embeddings_and_output_weights=not shape["tie_word_embeddings"])
    gen = torch.Generator().manual_seed(seed)
    for name, s in expected_hf_shapes(m).items():
        yield name, _randn_rows(s, gen, dtype)


def write_source(folder: Path, shape: dict, dtype: torch.dtype, shard_bytes: int, seed: int) -> int:
    """A random HF Llama folder, tensor by tensor (our streaming safetensors writer); returns bytes."""
    from harpe_megatron.hf.safetensors_write import SafetensorsShardWriter

    shapes = [(n, tuple(t.shape), dtype) for n, t in source_tensors(shape, torch.bool, seed)]
    folder.mkdir(parents=True)
    writer = SafetensorsShardWriter(folder, shapes, max_shard_bytes=shard_bytes)
    for name, t in source_tensors(shape, dtype, seed):
        writer.write(name, t)
    writer.close()
    return writer.total_bytes


def _randn_rows(shape, gen, dtype) -> torch.Tensor:
    """Normal random values (``dtype`` bool: shape only, for planning)."""
    if dtype == torch.bool:
        return torch.empty(shape, dtype=dtype, device="meta")
    out = torch.empty(shape, dtype=dtype)
    rows = max(1, (1 << 22) // max(1, math.prod(shape[1:])))
    for i in range(0, shape[0], rows):
        out[i: i + rows] = torch.randn(out[i: i + rows].shape, generator=gen)
    return out


def evict(folder: Path, drop_all: bool) -> str:
    """Make the next read of ``folder``'s files come from the disk: ``posix_fadvise(DONTNEED)`` on
    each (any user; libraries stay cached, so imports are not timed from a cold disk), or with
    ``drop_all`` the whole page cache (root). Returns what was done."""
    os.sync()
    if drop_all:
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return "page cache dropped"
        except OSError:
            pass
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return "input files evicted from the page cache"


def dd_rate(args: list[str]) -> float:
    """Bytes per second that ``dd`` reports for ``args``."""
    proc = subprocess.run(["dd", *args], capture_output=True, text=True, check=True)
    match = re.search(r"^(\d+) bytes .* copied, ([0-9.]+) s", proc.stderr, flags=re.MULTILINE)
    if not match:
        raise RuntimeError(f"cannot parse dd output: {proc.stderr!r}")
    return int(match.group(1)) / float(match.group(2))


def disk_bandwidth(source: Path, scratch: Path) -> dict:
    biggest = max(source.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    read = dd_rate([f"if={biggest}", "of=/dev/null", "bs=16M", "iflag=direct"])
    count = max(1, min(64, biggest.stat().st_size >> 24))
    write = dd_rate(["if=/dev/zero", f"of={scratch}", "bs=16M", f"count={count}", "oflag=direct"])
    scratch.unlink()
    return {"read_bytes_per_s": read, "write_bytes_per_s": write, "file": str(biggest)}


def run_tool(argv: list[str], cache: str, logs: Path) -> dict:
    """Run a converter as its own process: wall time, its own reported time, its peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out_path, err_path = logs.with_suffix(".out"), logs.with_suffix(".err")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *argv, "--no-progress"], cwd=ROOT, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    stdout = out_path.read_text()
    if code != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({code}):\n{stdout[-2000:]}\n{err_path.read_text()[-4000:]}")
    match = re.search(r"converted .* in ([0-9.]+)s", stdout)
    return {"wall_s": wall, "converter_s": float(match.group(1)) if match else None, "input_cache": cache,
            "peak_rss_bytes": usage.ru_maxrss * 1024}


def compare(tensors, exported: Path) -> int:
    """Every source tensor (``(name, tensor)`` pairs) equals the exported one bit for bit (one
    tensor in memory at a time)."""
    from harpe_megatron.hf.safetensors_io import HFCheckpointReader

    count = 0
    with HFCheckpointReader(exported) as b:
        names = set(b.names())
        for name, x in tensors:
            y = b.get(name)
            if x.dtype != y.dtype or not torch.equal(x.view(torch.int16) if x.itemsize == 2 else x,
                                                    y.view(torch.int16) if y.itemsize == 2 else y):
                raise AssertionError(f"{name}: exported tensor differs from the source")
            names.discard(name)
            count += 1
        if names:
            raise AssertionError(f"exported tensors not in the source: {sorted(names)[:6]}")
    return count


def machine_state() -> dict:
    load = os.getloadavg()
    mem = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    kib = lambda k: int(mem[k].split()[0]) * 1024  # noqa: E731
    return {"load_avg_1_5_15": [round(x, 2) for x in load], "cpus": os.cpu_count(),
            "mem_total_bytes": kib("MemTotal"), "mem_available_bytes": kib("MemAvailable")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--tp", type=int, default=2, help="--tp of convert_from_hf (validation and vocabulary padding)")
    p.add_argument("--source-shard-size", default="5GB", help="largest source safetensors shard")
    p.add_argument("--workdir", default=None, help="where the three checkpoints go (default: a fresh temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--drop-caches", action="store_true",
                   help="drop the whole page cache before each step (root) instead of evicting the input files")
    p.add_argument("--warm", action="store_true", help="leave the inputs in the page cache (warm-cache figures)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (smoke run)")
    p.add_argument("--low-disk", action="store_true",
                   help="delete the source after the import (two checkpoints on disk at a time, not three); "
                        "the round trip is then checked against the regenerated source tensors")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    from harpe_megatron.hf.safetensors_io import parse_size

    shape = dict(SHAPES["tiny" if args.tiny else args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    import tempfile

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="harpe_bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    src, mg, out = work / "hf_source", work / "megatron", work / "hf_export"
    for d in (src, mg, out):
        if d.exists():
            shutil.rmtree(d)
    state = machine_state()
    try:
        t0 = time.perf_counter()
        nbytes = write_source(src, shape, DTYPES[args.dtype], parse_size(args.source_shard_size), seed=0)
        (src / "config.json").write_text(json.dumps(hf_config(shape, args.dtype), indent=2))
        gen_s = time.perf_counter() - t0
        free = shutil.disk_usage(work).free
        need = (1.2 if args.low_disk else 2.2) * nbytes
        if free < need:
            raise SystemExit(f"error: {work} has {free / 1e9:.1f} GB free; the run needs about {need / 1e9:.1f} GB more "
                             "(--low-disk needs less)")
        evict(src, args.drop_caches)
        disk = disk_bandwidth(src, work / "dd_scratch")
        results = {}
        for direction, source, argv in (
                ("hf_to_megatron", src, ["tools/convert_from_hf.py", str(src), str(mg), "--tp", str(args.tp)]),
                ("megatron_to_hf", mg, ["tools/convert_to_hf.py", str(mg), str(out)])):
            cache = "warm (not evicted)" if args.warm else evict(source, args.drop_caches)
            r = run_tool(argv, cache, work / direction)
            if args.low_disk and direction == "hf_to_megatron":
                shutil.rmtree(src)
            r["bytes_per_s_wall"] = nbytes / r["wall_s"]
            r["ratio_to_disk_read_wall"] = r["bytes_per_s_wall"] / disk["read_bytes_per_s"]
            if r["converter_s"]:
                r["bytes_per_s_converter"] = nbytes / r["converter_s"]
                r["ratio_to_disk_read_converter"] = r["bytes_per_s_converter"] / disk["read_bytes_per_s"]
            results[direction] = r
        if src.exists():
            from harpe_megatron.hf.safetensors_io import HFCheckpointReader

            with HFCheckpointReader(src) as reader:
                tensors = compare(((n, reader.get(n)) for n in reader.names()), out)
        else:
            tensors = compare(source_tensors(shape, DTYPES[args.dtype], seed=0), out)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True) if not args.workdir else [shutil.rmtree(d, ignore_errors=True)
                                                                              for d in (src, mg, out)]
    report = {"shape": "tiny" if args.tiny else args.shape, "layers": shape["num_hidden_layers"], "dtype": args.dtype,
              "model_bytes": nbytes, "source_write_s": gen_s, "disk": disk, "machine_at_start": state,
              "roundtrip_bitwise_tensors": tensors, "results": results, "torch": torch.__version__}
    print(f"model {report['shape']} ({shape['num_hidden_layers']} layers, {args.dtype}): {nbytes / 1e9:.2f} GB; "
          f"disk (direct I/O): read {disk['read_bytes_per_s'] / 1e9:.2f} GB/s, write {disk['write_bytes_per_s'] / 1e9:.2f} GB/s")
    print(f"machine at start: load {state['load_avg_1_5_15']} on {state['cpus']} CPUs, "
          f"{state['mem_available_bytes'] / 2**30:.1f} of {state['mem_total_bytes'] / 2**30:.1f} GiB available")
    print("| direction | wall (process) | converter | peak RSS | rate (wall) | / disk read | rate (converter) | / disk read |")
    print("|---|---|---|---|---|---|---|---|")
    for direction, r in results.items():
        conv = r.get("converter_s")
        print(f"| {direction} | {r['wall_s']:.1f} s | {conv:.1f} s | {r['peak_rss_bytes'] / 2**30:.2f} GiB | "
              f"{r['bytes_per_s_wall'] / 1e9:.2f} GB/s | {r['ratio_to_disk_read_wall']:.0%} | "
              f"{r.get('bytes_per_s_converter', 0) / 1e9:.2f} GB/s | {r.get('ratio_to_disk_read_converter', 0):.0%} |")
    print(f"round trip bitwise equal: {tensors} tensors; inputs: {results['hf_to_megatron']['input_cache']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
