"""Write a megatron ``torch_dist`` checkpoint tensor by tensor (:func:`write_torch_dist`).

What megatron's ``dist_checkpointing.save`` writes for a one-rank model, produced from tensors
handed over one at a time, so memory holds one tensor (plus the staging blocks of
:class:`~harpe_megatron.checkpoint.stream_io.StreamWriter`) instead of the whole model:

* ``__0_<n>.distcp``: torch.distributed.checkpoint (DCP) data files, each a sequence of
  ``torch.save`` records (one per chunk; byte entries hold ``torch.save([value])``, as megatron
  serialises ``ShardedObject``\\s); a new file starts after ``max_file_bytes`` (several files let
  the ranks of a training run share the checksum work on load);
* ``.metadata``: built and written by torch's own DCP ``save`` (public API: a ``SavePlanner``
  whose local plan lists our write items, a ``FileSystemWriter`` whose ``write_data`` streams
  them): global shapes, chunks, dtypes, where each record sits;
* ``common.pt`` (``torch.save`` of the non-tensor state, like megatron-core 0.16's common
  strategy; 0.19 saves it as a ``common_state`` object inside the ``.distcp`` files instead and
  still reads ``common.pt`` through ``load_common_state_dict``) and
  ``metadata.json`` (megatron's ``save_config`` with its default torch_dist backend/version).

The layout (keys, chunks) comes from the model itself (checkpoint/sharded_layout.py); megatron's
loader reads the result at any TP/PP (tests/distributed/test_convert_tp.py) and it equals
megatron's own save of the same model (tests/unit/test_dist_stream.py).

torch internals used (checked at import): ``torch.distributed.checkpoint.filesystem._StorageInfo``
(where a record sits: what ``FileSystemReader`` reads back; DCP keeps it private).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
import zlib
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.futures import Future
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, StorageMeta, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from harpe_megatron.checkpoint.sharded_layout import ModelLayout, ParamLayout
from harpe_megatron.checkpoint.stream_io import StreamWriter

try:
    from torch.distributed.checkpoint.filesystem import _StorageInfo
except ImportError as exc:  # pragma: no cover - a torch release that moved it
    raise ImportError(f"torch {torch.__version__}: torch.distributed.checkpoint.filesystem._StorageInfo is gone; "
                      "harpe_megatron/checkpoint/dist_stream_write.py needs updating") from exc

__all__ = ["write_torch_dist", "DEFAULT_MAX_FILE_BYTES", "ProducedTensor"]

DEFAULT_MAX_FILE_BYTES = 2 << 30
COMMON_FILE = "common.pt"

ProducedTensor = tuple[str, torch.Tensor, Callable[[], None]]
"""``(parameter name, tensor, release)``: ``release()`` is called once the tensor is written."""


@contextlib.contextmanager
def _no_record_crc() -> Iterator[None]:
    """``torch.save`` without per-record zip CRC-32s (torch's documented option; ``torch.load`` reads
    such files). The manifest checksums every file as a whole; the zip CRCs would cost a second
    pass over the bytes, holding the GIL."""
    from torch.serialization import get_crc32_options, set_crc32_options

    before = get_crc32_options()
    set_crc32_options(False)
    try:
        yield
    finally:
        set_crc32_options(before)


def _exact(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor whose storage is exactly its bytes (``torch.save`` writes whole storages)."""
    if t.numel() == 0:
        return torch.empty(t.shape, dtype=t.dtype)
    if not t.is_contiguous():
        t = t.contiguous()
    if t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    raw = t.reshape(-1).view(torch.uint8).numpy()
    return torch.frombuffer(memoryview(raw), dtype=torch.uint8).view(t.dtype).view(t.shape)


def _write_items(layout: ModelLayout) -> list[WriteItem]:
    items = [WriteItem(index=MetadataIndex(o.key), type=WriteItemType.BYTE_IO) for o in layout.objects]
    for p in layout.params:
        for c in p.chunks:
            items.append(WriteItem(
                index=MetadataIndex(c.key, torch.Size(c.offsets)), type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)),
                                            properties=TensorProperties(dtype=c.dtype), size=torch.Size(c.global_shape))))
    return items


class _ListedItems(DefaultSavePlanner):
    """A save planner whose local plan is a given list of write items (nothing is looked up in a
    state dict; torch still builds and validates the global plan and the metadata)."""

    def __init__(self, items: list[WriteItem]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._items = items

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self._items)
        return self.plan


class _StreamingFileWriter(dcp.FileSystemWriter):
    """DCP's file writer with its own ``write_data``: records streamed in plan order (see module docstring)."""

    def __init__(self, path: Path, layout: ModelLayout, produce: Iterator[ProducedTensor], max_file_bytes: int,
                 on_bytes: Callable[[int], None]):
        super().__init__(str(path), single_file_per_rank=True, sync_files=True, thread_count=1, overwrite=False)
        self._dir = Path(path)
        self._layout = layout
        self._produce = produce
        self._max_file_bytes = max_file_bytes
        self._on_bytes = on_bytes
        self.file_crc32: dict[str, str] = {}

    def storage_meta(self) -> StorageMeta:
        # a plain string (torch's writer records a Path, which the restricted .metadata reader of
        # checkpoint/safety.py refuses, as megatron's own saves never contain one)
        return StorageMeta(checkpoint_id=str(self._dir), save_id=self.save_id)

    def write_data(self, plan: SavePlan, planner) -> Future:
        prefix = plan.storage_data.prefix
        objects = {o.key: o.data for o in self._layout.objects}
        chunk_owner = {(c.key, tuple(c.offsets)): p for p in self._layout.params for c in p.chunks}
        results: list[WriteResult] = []
        file_index, writer, name = 0, None, ""
        current: Optional[tuple[ParamLayout, torch.Tensor, Callable[[], None]]] = None
        try:
            with _no_record_crc():
                for item in plan.items:
                    if writer is None:
                        name = f"{prefix}{file_index}.distcp"
                        writer = StreamWriter(self._dir / name)
                    start = writer.position
                    if item.type == WriteItemType.BYTE_IO:
                        blob = io.BytesIO()
                        torch.save([objects[item.index.fqn]], blob)
                        writer.write(blob.getbuffer())
                    else:
                        param = chunk_owner[(item.index.fqn, tuple(item.index.offset))]
                        if current is None or current[0] is not param:
                            if current is not None:
                                current[2]()
                            current = self._next_tensor(param)
                        chunk = next(c for c in param.chunks if tuple(c.offsets) == tuple(item.index.offset))
                        data = chunk.of(current[1])
                        torch.save(_exact(data), writer)
                        self._on_bytes(chunk.nbytes)
                    results.append(WriteResult(index=item.index, size_in_bytes=writer.position - start,
                                               storage_data=_StorageInfo(name, start, writer.position - start)))
                    if writer.position >= self._max_file_bytes:
                        self._close(writer, name)
                        writer, file_index = None, file_index + 1
                if writer is not None:
                    self._close(writer, name)
                    writer = None
                if current is not None:
                    current[2]()
                    current = None
                leftover = next(self._produce, None)
                if leftover is not None:
                    raise ValueError(f"tensor {leftover[0]!r} was produced but the checkpoint layout has no place for it")
        finally:
            if writer is not None:
                writer.abort()
        fut: Future = Future()
        fut.set_result(results)
        return fut

    def _next_tensor(self, param: ParamLayout) -> tuple[ParamLayout, torch.Tensor, Callable[[], None]]:
        produced = next(self._produce, None)
        if produced is None:
            raise ValueError(f"no tensor produced for checkpoint parameter {param.name!r}")
        name, tensor, release = produced
        if name != param.name:
            raise ValueError(f"expected checkpoint parameter {param.name!r} next, got {name!r}")
        if tuple(tensor.shape) != param.shape or tensor.dtype != param.dtype:
            raise ValueError(f"{name}: got {list(tensor.shape)} {tensor.dtype}, the checkpoint stores "
                             f"{list(param.shape)} {param.dtype}")
        return param, tensor.contiguous(), release

    def _close(self, writer: StreamWriter, name: str) -> None:
        _, crc = writer.close()
        self.file_crc32[name] = f"{crc:08x}"


def _file_crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def write_torch_dist(directory: str | os.PathLike, layout: ModelLayout, produce: Iterator[ProducedTensor],
                     common: dict, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                     on_bytes: Callable[[int], None] = lambda n: None) -> dict[str, str]:
    """Write a torch_dist checkpoint of ``layout`` into the empty directory ``directory``.

    ``produce`` yields ``(name, tensor, release)`` for every parameter of ``layout.params``, in
    that order, one at a time; ``common`` is the non-tensor state (``common.pt``); ``on_bytes``
    is told the tensor bytes written (progress). Returns the CRC-32 (8 hex digits) of every file
    written, by name (for the manifest)."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    directory = Path(directory)
    writer = _StreamingFileWriter(directory, layout, produce, max_file_bytes, on_bytes)
    try:
        with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process by design
            warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
            dcp.save({}, storage_writer=writer, planner=_ListedItems(_write_items(layout)), no_dist=True)
    except CheckpointException as exc:  # torch wraps whatever failed (our reads too): raise that
        failure = next(iter(exc.failures.values()), None)
        failure = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(failure, BaseException):
            raise failure from None
        raise
    torch.save(common, directory / COMMON_FILE)
    default = get_default_save_sharded_strategy()
    save_config(CheckpointingConfig(default.backend, default.version), str(directory))
    crcs = dict(writer.file_crc32)
    for small in sorted(set(os.listdir(directory)) - set(crcs)):
        crcs[small] = _file_crc32(directory / small)
    return crcs
