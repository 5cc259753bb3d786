"""Refuse megatron checkpoints whose pickled parts hold anything but plain checkpoint data.

A megatron distributed checkpoint (``torch_dist`` format) has three pickled parts, and loading
it (``dist_checkpointing.load`` / ``load_common_state_dict``) unpickles all of them:

* ``.metadata``: torch.distributed.checkpoint's ``FileSystemReader.read_metadata`` reads it with
  plain ``pickle.load`` (torch 2.13): any global, i.e. arbitrary code;
* byte entries of the ``*.distcp`` files (megatron ``ShardedObject``\\s, e.g. every linear layer's
  ``_extra_state``): ``DefaultLoadPlanner.load_bytes`` uses ``torch.load(weights_only=False)``;
* ``common.pt`` (iteration, scheduler, config): megatron-core 0.16.1 calls
  ``torch.load(path, map_location="cpu")`` without ``weights_only``, i.e. torch's default, which
  is ``weights_only=True`` since torch 2.6 (megatron registers its own safe globals such as
  ``OptimizerConfig``), unless ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` is set.

Tensors themselves are read with ``weights_only=True``. :func:`check_megatron_checkpoint` reads
all three pickled parts *without* running them: ``.metadata`` through an unpickler that accepts
only torch.distributed.checkpoint's dataclasses/enums and a few torch types, every byte entry and
``common.pt`` with ``torch.load(weights_only=True)``. A checkpoint that passes contains nothing
that can run code when megatron loads it; one that fails is refused with the file and the
offending global named. It costs reading the metadata and the byte entries (kilobytes).
"""

from __future__ import annotations

import dataclasses
import enum
import io
import os
import pickle
from pathlib import Path

import torch

from harpe_megatron.checkpoint.layout import read_manifest, verify_checksums

__all__ = ["UnsafeCheckpointError", "check_megatron_checkpoint", "load_dcp_metadata", "read_common_state"]


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that would run code (or cannot be verified) when unpickled."""


_DCP_PREFIX = "torch.distributed.checkpoint."
_TORCH_VALUE_TYPES = (torch.dtype, torch.layout, torch.memory_format)
_EXTRA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                  ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals a torch.distributed.checkpoint ``.metadata`` file needs."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str):
        import importlib

        allowed = False
        obj = None
        if module.startswith(_DCP_PREFIX) or module in ("torch", "torch.serialization", "collections", "builtins"):
            try:
                obj = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                obj = None
            if (module, name) in _EXTRA_GLOBALS:
                allowed = True
            elif module == "torch":
                allowed = isinstance(obj, _TORCH_VALUE_TYPES)
            elif module.startswith(_DCP_PREFIX):
                # plain data classes of the checkpoint format: constructing them runs no code of note
                allowed = isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))
        if not allowed:
            raise UnsafeCheckpointError(
                f"{self._path}: refusing to unpickle: it references {module}.{name}, which is not "
                "torch.distributed.checkpoint metadata (a pickle that could run code); only load checkpoints "
                "you produced (training saves, tools/convert_from_hf.py)"
            )
        return obj


def load_dcp_metadata(ckpt_dir: str | os.PathLike):
    """The ``.metadata`` of a torch_dist checkpoint, unpickled with the restricted unpickler."""
    path = Path(ckpt_dir) / ".metadata"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (not a megatron torch_dist checkpoint)")
    with open(path, "rb") as f:
        try:
            return _MetadataUnpickler(f, path).load()
        except UnsafeCheckpointError:
            raise
        except Exception as exc:
            raise UnsafeCheckpointError(f"{path}: cannot read checkpoint metadata: {type(exc).__name__}: {exc}") from None


def _weights_only(data, where: str) -> None:
    try:
        torch.load(data, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UnsafeCheckpointError(
            f"{where}: refusing to load: not loadable with torch.load(weights_only=True) ({exc}); "
            "megatron would unpickle it; only load checkpoints you produced"
        ) from None


def check_megatron_checkpoint(ckpt_dir: str | os.PathLike) -> None:
    """Raise :class:`UnsafeCheckpointError` unless every pickled part of ``ckpt_dir`` is plain data."""
    import megatron.core  # noqa: F401  (registers megatron's safe globals for weights_only loading)
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    ckpt = Path(ckpt_dir)
    metadata = load_dcp_metadata(ckpt)
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{ckpt / '.metadata'}: holds a {type(metadata).__name__}, not checkpoint Metadata")
    byte_keys = {k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    handles: dict[str, object] = {}
    try:
        for index, info in (metadata.storage_data or {}).items():
            if index.fqn not in byte_keys:
                continue
            file = ckpt / info.relative_path
            where = f"{file} (entry {index.fqn!r})"
            if getattr(info, "transform_descriptors", None):
                raise UnsafeCheckpointError(f"{where}: stored with transforms {list(info.transform_descriptors)}, "
                                            "which this check cannot read; refusing")
            if file.resolve().parent != ckpt.resolve():
                raise UnsafeCheckpointError(f"{where}: points outside the checkpoint directory")
            if not file.is_file():
                raise FileNotFoundError(f"{file}: missing (the checkpoint's .metadata lists entries in it)")
            f = handles.get(info.relative_path) or handles.setdefault(info.relative_path, open(file, "rb"))
            f.seek(info.offset)
            _weights_only(io.BytesIO(f.read(info.length)), where)
    finally:
        for f in handles.values():
            f.close()
    common = ckpt / "common.pt"
    if common.is_file():
        _weights_only(common, str(common))


def read_common_state(ckpt_dir: str | os.PathLike) -> dict:
    """The plain entries of a checkpoint's common state (``iteration``, ``consumed_samples``,
    ``config_yaml``, ...), without its tensors, after :func:`check_megatron_checkpoint` and the
    manifest's CRC-32 of ``common.pt`` (kilobytes read). Raises :class:`UnsafeCheckpointError`,
    ``CheckpointDamaged`` or what the read raises."""
    from megatron.core import dist_checkpointing

    ckpt = Path(ckpt_dir)
    verify_checksums(ckpt, [n for n in (read_manifest(ckpt) or {}).get("crc32", {}) if n == "common.pt"])
    check_megatron_checkpoint(ckpt)
    common = dist_checkpointing.load_common_state_dict(str(ckpt_dir))
    return {k: v for k, v in common.items() if k not in ("model", "optimizer", "scheduler")}
