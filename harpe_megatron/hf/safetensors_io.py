"""Hugging Face checkpoint folders: lazy, streaming reading (and the safetensors format constants).

Reading (:class:`HFCheckpointReader`)
    A folder holds ``model.safetensors``, ``model.safetensors.index.json`` + shards,
    ``pytorch_model.bin`` or ``pytorch_model.bin.index.json`` + shards (safetensors preferred when
    both exist). Safetensors headers are parsed here (8-byte length, JSON: dtype, shape and byte
    range of every tensor; ranges checked against the file) and tensors are read with plain
    ``pread`` calls, never memory-mapped: :meth:`HFCheckpointReader.stream` reads them in a given
    order on a background thread into pooled buffers (checkpoint/stream_io.py), so memory holds
    the tensors in flight, not a shard (a mapped shard stays resident while it is open). ``.bin``
    files are read with ``torch.load(weights_only=True, mmap=True)`` (zip format; legacy non-zip
    files are loaded whole), one shard at a time: their memory is bounded by the largest shard.
    Any dtype. A shard named by the index that does not exist, or an index entry whose file lacks
    the tensor, is an error naming both.

Writing: :mod:`harpe_megatron.hf.safetensors_write`. The atomic output directory both conversions
write into is ``output_dir.atomic_output_dir``.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from harpe_megatron.checkpoint.prefetch import Prefetcher, ReadRange, read_exactly
from harpe_megatron.checkpoint.stream_io import BufferPool

__all__ = [
    "HFCheckpointError",
    "HFCheckpointReader",
    "TensorInfo",
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
    """Where a tensor is: ``offset`` is the first byte of its data in ``file`` (safetensors; -1 for .bin)."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = -1

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_MAX_HEADER = 100 << 20


def _safetensors_infos(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of a safetensors file from its header (the format: an 8-byte little-endian
    header length, a JSON header ``{name: {dtype, shape, data_offsets: [begin, end]}}``, then the
    data, offsets relative to its start); each entry checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > _MAX_HEADER or 8 + n > size:
            raise HFCheckpointError(f"{path}: not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HFCheckpointError(f"{path}: unreadable safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise HFCheckpointError(f"{path}: safetensors header is not a JSON object")
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES.get(spec["dtype"])
            shape = tuple(int(d) for d in spec["shape"])
            begin, end = (int(o) for o in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise HFCheckpointError(f"{path}: tensor {name!r} has a malformed header entry ({exc})") from None
        if dtype is None:
            raise HFCheckpointError(f"{path}: tensor {name!r} has unsupported dtype {spec['dtype']}")
        info = TensorInfo(name, path, shape, dtype, 8 + n + begin)
        if end - begin != info.nbytes or begin < 0 or 8 + n + end > size:
            raise HFCheckpointError(f"{path}: tensor {name!r}: bytes {begin}..{end} do not hold {list(shape)} "
                                    f"{spec['dtype']} within the file ({size} bytes)")
        out[name] = info
    return out


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
            return _safetensors_infos(path)
        for name, t in self._bin_state(path).items():
            if isinstance(t, torch.Tensor):
                out[name] = TensorInfo(name, path, tuple(t.shape), t.dtype)
        return out

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
            t = torch.empty(info.shape, dtype=info.dtype)
            if t.numel():
                fd = os.open(info.file, os.O_RDONLY)
                try:
                    read_exactly(fd, t.view(-1).view(torch.uint8), info.offset, info.file)
                finally:
                    os.close(fd)
            return t
        t = self._bin_state(info.file)[name]
        if tuple(t.shape) != info.shape or t.dtype != info.dtype:
            raise HFCheckpointError(f"{info.file}: tensor {name!r} changed while reading")
        return t

    def stream(self, names: Sequence[str], pool: BufferPool) -> Iterator[tuple[str, torch.Tensor, Callable[[], None]]]:
        """``(name, tensor, release)`` for ``names`` in order, read ahead on a background thread into
        ``pool`` (safetensors); call ``release()`` when done with a tensor. ``.bin`` tensors are
        mapped views (``release`` does nothing)."""
        if self.format != "safetensors":
            for name in names:
                yield name, self.get(name), lambda: None
            return
        infos = [self.info(n) for n in names]
        prefetch = Prefetcher([ReadRange(i.file, i.offset, i.nbytes, i.name) for i in infos], pool, checksum=False)
        try:
            for info, (_, data, buf, _) in zip(infos, prefetch):
                tensor = data.view(info.dtype).view(info.shape) if info.nbytes else torch.empty(info.shape, dtype=info.dtype)
                yield info.name, tensor, buf.release
        finally:
            prefetch.close()

    def close(self) -> None:
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
