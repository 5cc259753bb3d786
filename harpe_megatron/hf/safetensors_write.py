"""Streaming sharded safetensors writing (:class:`SafetensorsShardWriter`).

The caller declares every tensor (name, shape, dtype) up front; the writer assigns them to shards
of at most ``max_shard_bytes`` in that order (``model-00001-of-0000N.safetensors``) and then
streams each tensor into its shard file as it is handed over (header first, then the raw
little-endian bytes: the safetensors layout) through a
:class:`~harpe_megatron.checkpoint.stream_io.StreamWriter` (direct I/O, a background thread),
casting to the planned dtype on the way: no more than one tensor is held beyond what the caller
already has. ``close()`` writes ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from harpe_megatron.checkpoint.stream_io import StreamWriter
from harpe_megatron.hf.safetensors_io import _ST_NAMES, SAFETENSORS_INDEX, _itemsize

__all__ = ["SafetensorsShardWriter"]


@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    shard: int
    begin: int
    end: int


class SafetensorsShardWriter:
    """Stream tensors into sharded safetensors files in a declared order (see module docstring).

    Args:
        folder: output directory (exists).
        plan: ``(name, shape, dtype)`` for every tensor, in the order they will be written.
        max_shard_bytes: a shard is closed before it would exceed this (a single larger tensor
            gets a shard of its own).
        prefix: file name prefix (``model`` -> ``model-00001-of-00002.safetensors``).
    """

    def __init__(self, folder: str | os.PathLike, plan: Sequence[tuple[str, Sequence[int], torch.dtype]],
                 max_shard_bytes: int = 5 * 10**9, prefix: str = "model"):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors are little-endian; writing them on a big-endian host is not supported")
        self.folder = Path(folder)
        self.prefix = prefix
        self._planned: list[_Planned] = []
        shard, used = 0, 0
        seen = set()
        for name, shape, dtype in plan:
            if name in seen:
                raise ValueError(f"tensor {name!r} planned twice")
            seen.add(name)
            if dtype not in _ST_NAMES:
                raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
            size = math.prod(shape) * _itemsize(dtype)
            if used > 0 and used + size > max_shard_bytes:
                shard, used = shard + 1, 0
            self._planned.append(_Planned(name, tuple(int(s) for s in shape), dtype, shard, used, used + size))
            used += size
        if not self._planned:
            raise ValueError("nothing to write")
        self.num_shards = shard + 1
        self._next = 0
        self._file: Optional[StreamWriter] = None
        self._open_shard = -1
        self.bytes_written = 0

    def shard_name(self, shard: int) -> str:
        return f"{self.prefix}-{shard + 1:05d}-of-{self.num_shards:05d}.safetensors"

    @property
    def total_bytes(self) -> int:
        return sum(p.end - p.begin for p in self._planned)

    def _start_shard(self, shard: int) -> None:
        header: dict = {"__metadata__": {"format": "pt"}}
        for p in self._planned:
            if p.shard == shard:
                header[p.name] = {"dtype": _ST_NAMES[p.dtype], "shape": list(p.shape), "data_offsets": [p.begin, p.end]}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._file = StreamWriter(self.folder / self.shard_name(shard), checksum=False)  # no manifest here
        self._file.write(len(raw).to_bytes(8, "little"))
        self._file.write(raw)
        self._open_shard = shard

    def _finish_shard(self) -> None:
        if self._file is not None:
            self._file.close()  # fsync'ed
            self._file = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor (names must follow the plan). ``tensor`` may have any
        strides, any shape with the planned row-major element order (e.g. ``[groups, rows, cols]``
        for ``[groups * rows, cols]``) and any floating dtype (cast to the planned one)."""
        if self._next >= len(self._planned):
            raise ValueError(f"tensor {name!r} was not planned (all planned tensors are written)")
        p = self._planned[self._next]
        if name != p.name:
            raise ValueError(f"expected tensor {p.name!r} next, got {name!r}")
        same_order = tuple(tensor.shape) == p.shape or (
            tensor.numel() == math.prod(p.shape) and tensor.dim() > 0 and len(p.shape) > 0
            and tensor.shape[-1] == p.shape[-1])
        castable = tensor.dtype == p.dtype or (tensor.is_floating_point() and p.dtype.is_floating_point)
        if not same_order or not castable:
            raise ValueError(
                f"tensor {name!r}: got {list(tensor.shape)} {tensor.dtype}, planned {list(p.shape)} {p.dtype}"
            )
        if p.shard != self._open_shard:
            self._finish_shard()
            self._start_shard(p.shard)
        if tensor.numel():
            self._file.write_tensor(tensor.detach().to("cpu"), p.dtype)
        self.bytes_written += p.end - p.begin
        self._next += 1

    def close(self) -> dict:
        """Finish the last shard and write the index; returns the index dict."""
        if self._next != len(self._planned):
            missing = [p.name for p in self._planned[self._next:]]
            raise ValueError(f"{len(missing)} planned tensor(s) were never written: {missing[:4]}")
        self._finish_shard()
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": {p.name: self.shard_name(p.shard) for p in self._planned},
        }
        _write_text(self.folder / SAFETENSORS_INDEX, json.dumps(index, indent=2, sort_keys=False) + "\n")
        return index

    def abort(self) -> None:
        if self._file is not None:
            self._file.abort()
            self._file = None


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
