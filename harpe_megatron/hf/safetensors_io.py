"""Hugging Face checkpoint folders: lazy reading and streaming sharded safetensors writing.

Reading (:class:`HFCheckpointReader`)
    A folder holds ``model.safetensors``, ``model.safetensors.index.json`` + shards,
    ``pytorch_model.bin`` or ``pytorch_model.bin.index.json`` + shards (safetensors preferred when
    both exist). Tensors are read one at a time: safetensors through ``safe_open`` (memory-mapped),
    ``.bin`` files with ``torch.load(weights_only=True, mmap=True)`` (zip format; legacy non-zip
    files are loaded whole, one shard at a time). Any dtype. A shard named by the index that does
    not exist, or an index entry whose file lacks the tensor, is an error naming both.

Writing (:class:`SafetensorsShardWriter`)
    The caller declares every tensor (name, shape, dtype) up front; the writer assigns them to
    shards of at most ``max_shard_bytes`` in that order (``model-00001-of-0000N.safetensors``) and
    then streams each tensor straight into its shard file as it is handed over (header first, then
    the raw little-endian bytes: the safetensors layout), so no more than one tensor is held
    beyond what the caller already has. ``close()`` writes ``model.safetensors.index.json``.

The atomic output directory both conversions write into is ``output_dir.atomic_output_dir``.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

__all__ = [
    "HFCheckpointError",
    "HFCheckpointReader",
    "SafetensorsShardWriter",
    "parse_size",
    "SAFETENSORS_INDEX",
    "BIN_INDEX",
]

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES: dict[torch.dtype, str] = {v: k for k, v in _ST_DTYPES.items()}


class HFCheckpointError(ValueError):
    """A problem with an HF checkpoint folder (missing files/tensors, wrong shapes...)."""


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5e9 bytes, ``"500MiB"`` -> 500 * 2**20, ``1024`` -> 1024."""
    if isinstance(text, int):
        if text < 1:
            raise ValueError(f"a size must be at least 1 byte, got {text!r}")
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot parse a size from {text!r} (examples: 5GB, 500MiB, 1048576)")
    value, unit, binary = match.groups()
    power = " KMGT".index(unit.upper() or " ")
    size = int(float(value) * (1024 if binary else 1000) ** power)
    if size < 1:
        raise ValueError(f"a size must be at least 1 byte, got {text!r}")
    return size


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class HFCheckpointReader:
    """Lazy access to the tensors of an HF model folder (see module docstring).

    ``infos`` maps each tensor name to its file, shape and dtype (read from file headers, no
    tensor data). ``get(name)`` loads one tensor. Use as a context manager or call ``close()``.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise HFCheckpointError(f"HF checkpoint folder {self.folder} does not exist")
        self.format, index_file, weight_map = self._discover()
        self.index_file = index_file
        self._st_handles: dict[Path, object] = {}
        self._bin_cache: tuple[Optional[Path], Optional[dict]] = (None, None)
        self.infos: dict[str, TensorInfo] = {}
        self._scan(weight_map)

    # -- discovery -----------------------------------------------------------------------------
    def _discover(self) -> tuple[str, Optional[Path], Optional[dict[str, str]]]:
        f = self.folder
        for fmt, index_name, single_name in (("safetensors", SAFETENSORS_INDEX, SAFETENSORS_SINGLE),
                                             ("bin", BIN_INDEX, BIN_SINGLE)):
            index = f / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise HFCheckpointError(f"{index}: not a valid index file (need a 'weight_map'): {exc}") from None
                if not isinstance(weight_map, dict) or not weight_map:
                    raise HFCheckpointError(f"{index}: 'weight_map' is empty or not a mapping")
                return fmt, index, weight_map
            if (f / single_name).is_file():
                return fmt, None, None
        raise HFCheckpointError(
            f"{f}: no HF weights found (looked for {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, "
            f"{BIN_INDEX}, {BIN_SINGLE})"
        )

    def _scan(self, weight_map: Optional[dict[str, str]]) -> None:
        if weight_map is None:
            files = {self.folder / (SAFETENSORS_SINGLE if self.format == "safetensors" else BIN_SINGLE): None}
        else:
            files = {}
            for name, file_name in weight_map.items():
                files.setdefault(self.folder / file_name, []).append(name)
            missing = [p for p in files if not p.is_file()]
            if missing:
                p = missing[0]
                names = files[p]
                raise HFCheckpointError(
                    f"{self.index_file}: shard file {p.name!r} does not exist in {self.folder} "
                    f"(it should hold {len(names)} tensor(s), e.g. {names[:3]})"
                    + (f"; {len(missing) - 1} more shard(s) missing" if len(missing) > 1 else "")
                )
        for path, expected_names in files.items():
            present = self._file_infos(path)
            if expected_names is None:
                self.infos.update(present)
                continue
            for name in expected_names:
                if name not in present:
                    raise HFCheckpointError(
                        f"{self.index_file}: tensor {name!r} is listed in shard {path.name!r}, "
                        f"but that file does not contain it"
                    )
                self.infos[name] = present[name]

    def _file_infos(self, path: Path) -> dict[str, TensorInfo]:
        out = {}
        if self.format == "safetensors":
            handle = self._safetensors(path)
            for name in handle.keys():
                sl = handle.get_slice(name)
                dtype = _ST_DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise HFCheckpointError(f"{path}: tensor {name!r} has unsupported dtype {sl.get_dtype()}")
                out[name] = TensorInfo(name, path, tuple(sl.get_shape()), dtype)
        else:
            for name, t in self._bin_state(path).items():
                if isinstance(t, torch.Tensor):
                    out[name] = TensorInfo(name, path, tuple(t.shape), t.dtype)
        return out

    def _safetensors(self, path: Path):
        # One file open at a time: a handle maps its file, and pages read through it stay in this
        # process's resident set until it is closed (tensors are read in file order anyway).
        handle = self._st_handles.get(path)
        if handle is None:
            from safetensors import safe_open

            self._st_handles.clear()
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types
                raise HFCheckpointError(f"{path}: cannot read safetensors file: {exc}") from None
            self._st_handles[path] = handle
        return handle

    def _bin_state(self, path: Path) -> dict:
        cached_path, cached = self._bin_cache
        if cached_path == path:
            return cached
        self._bin_cache = (None, None)  # drop the previous shard before loading the next
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as exc:
            raise HFCheckpointError(f"{path}: cannot load with torch.load(weights_only=True): {exc}") from None
        if not isinstance(state, dict):
            raise HFCheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
        self._bin_cache = (path, state)
        return state

    # -- access --------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def info(self, name: str) -> TensorInfo:
        if name not in self.infos:
            raise HFCheckpointError(f"{self.folder}: the checkpoint has no tensor {name!r}")
        return self.infos[name]

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (its own memory for safetensors; a mapped view for zip ``.bin``)."""
        info = self.info(name)
        if self.format == "safetensors":
            t = self._safetensors(info.file).get_tensor(name)
        else:
            t = self._bin_state(info.file)[name]
        if tuple(t.shape) != info.shape or t.dtype != info.dtype:
            raise HFCheckpointError(f"{info.file}: tensor {name!r} changed while reading")
        return t

    def close(self) -> None:
        self._st_handles.clear()
        self._bin_cache = (None, None)

    def __enter__(self) -> "HFCheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check(self, expected: dict[str, tuple[int, ...]], ignore: Iterable[str] = ()) -> None:
        """Every expected tensor is present with its shape; nothing else is (bar ``ignore`` regexes)."""
        missing = [n for n in expected if n not in self.infos]
        if missing:
            raise HFCheckpointError(
                f"HF checkpoint {self.folder} is missing {len(missing)} tensor(s): {missing[:6]}"
                + (" ..." if len(missing) > 6 else "")
            )
        for name, shape in expected.items():
            info = self.infos[name]
            if info.shape != tuple(shape):
                raise HFCheckpointError(
                    f"tensor {name!r} in {info.file} has shape {list(info.shape)}, expected {list(shape)} "
                    "from config.json"
                )
        patterns = [re.compile(p) for p in ignore]
        unexpected = [n for n in self.infos if n not in expected and not any(p.search(n) for p in patterns)]
        if unexpected:
            where = sorted({self.infos[n].file.name for n in unexpected})
            raise HFCheckpointError(
                f"HF checkpoint {self.folder} has {len(unexpected)} tensor(s) that a Llama model of this "
                f"config does not have: {unexpected[:6]} (in {where[:3]})"
            )


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


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
        self._file = None
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
        self._file = open(self.folder / self.shard_name(shard), "wb")
        self._file.write(len(raw).to_bytes(8, "little"))
        self._file.write(raw)
        self._open_shard = shard

    def _finish_shard(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor (names, shapes and dtypes must follow the plan)."""
        if self._next >= len(self._planned):
            raise ValueError(f"tensor {name!r} was not planned (all planned tensors are written)")
        p = self._planned[self._next]
        if name != p.name:
            raise ValueError(f"expected tensor {p.name!r} next, got {name!r}")
        if tuple(tensor.shape) != p.shape or tensor.dtype != p.dtype:
            raise ValueError(
                f"tensor {name!r}: got {list(tensor.shape)} {tensor.dtype}, planned {list(p.shape)} {p.dtype}"
            )
        if p.shard != self._open_shard:
            self._finish_shard()
            self._start_shard(p.shard)
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._file.write(memoryview(data.view(torch.uint8).numpy()))
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
            self._file.close()
            self._file = None


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
