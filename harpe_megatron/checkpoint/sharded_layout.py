"""Where each parameter of a one-rank megatron model lives in a ``torch_dist`` checkpoint.

The layout is read off the model's own ``sharded_state_dict()`` (megatron-core's public
dist-checkpointing mapping: ``ShardedTensor``, ``ShardedObject``, ``ShardedTensorFactory``), so
it is whatever ``dist_checkpointing.save`` would write for that model, e.g. per-layer tensors
stacked along a leading layer axis under one key (``decoder.layers.self_attention.linear_qkv.
weight`` of global shape ``[layers, rows, cols]``), norms renamed to megatron's fused-TE keys,
SwiGLU's ``linear_fc1`` stored as two chunks (gate, up) by its factory, and every linear layer's
``_extra_state`` as a byte object. The model may live on the ``meta`` device: only shapes,
dtypes and view geometry are used.

:class:`ParamLayout` lists, for one parameter (state-dict name), the checkpoint chunks made from
it; :meth:`StoredChunk.of` cuts a chunk out of the real parameter tensor (the same view geometry
megatron's factories use). :func:`model_layout` requires a TP=PP=1 model (every chunk a main
replica): that is the layout both converters read and write; megatron reshards it on load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["StoredChunk", "ParamLayout", "StoredObject", "ModelLayout", "model_layout"]


@dataclass(frozen=True)
class StoredChunk:
    """One chunk of a checkpoint tensor ``key`` and where it sits in its parameter.

    ``offsets``/``sizes``: the chunk inside the global tensor of shape ``global_shape`` (leading
    layer axes included, of size 1 in ``sizes``). ``view``: ``(size, stride, storage_offset)`` of
    the chunk as a view of its (contiguous) parameter."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype
    view: tuple[tuple[int, ...], tuple[int, ...], int]

    @property
    def nbytes(self) -> int:
        return math.prod(self.sizes) * torch.empty((), dtype=self.dtype).element_size()

    def of(self, param: torch.Tensor) -> torch.Tensor:
        """This chunk of ``param``, a view shaped ``sizes`` (writes to it land in ``param``)."""
        size, stride, offset = self.view
        return param.as_strided(size, stride, param.storage_offset() + offset).view(self.sizes)


@dataclass(frozen=True)
class ParamLayout:
    """A parameter (``name`` in ``model.state_dict()``) and its checkpoint chunks."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[StoredChunk, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    def is_whole(self, chunk: StoredChunk) -> bool:
        """Whether ``chunk`` is the entire parameter in its own memory order."""
        size, stride, offset = chunk.view
        contiguous = torch.empty(self.shape, device="meta").stride()
        return len(self.chunks) == 1 and offset == 0 and tuple(size) == self.shape and tuple(stride) == contiguous


@dataclass(frozen=True)
class StoredObject:
    """A byte entry of the checkpoint (megatron ``ShardedObject``): its key and value."""

    key: str
    data: Any


@dataclass(frozen=True)
class ModelLayout:
    params: tuple[ParamLayout, ...]
    objects: tuple[StoredObject, ...]

    @property
    def largest_param_bytes(self) -> int:
        return max((p.nbytes for p in self.params), default=0)

    def in_order(self, names: list[str]) -> "ModelLayout":
        """The same layout with its parameters in the order of ``names`` (exactly its parameters)."""
        by_name = {p.name: p for p in self.params}
        if sorted(names) != sorted(by_name):
            missing, extra = sorted(set(by_name) - set(names)), sorted(set(names) - set(by_name))
            raise ValueError(f"parameter order does not match the model: missing {missing[:4]}, unknown {extra[:4]}")
        return ModelLayout(tuple(by_name[n] for n in names), self.objects)


def _chunk(sh_ten, param: torch.Tensor, where: str) -> StoredChunk:
    if sh_ten.flattened_range is not None:
        raise ValueError(f"{where}: flattened (distributed-optimizer) shards are not a model layout")
    replica = sh_ten.replica_id if isinstance(sh_ten.replica_id, tuple) else (sh_ten.replica_id,)
    if any(r != 0 for r in replica):
        raise ValueError(f"{where}: not a main replica (the layout needs a one-rank model)")
    data = sh_ten.data
    if data.device.type != "meta" and data.untyped_storage().data_ptr() != param.untyped_storage().data_ptr():
        raise ValueError(f"{where}: its data is not a view of the parameter")
    prepend = len(sh_ten.global_shape) - data.dim()
    return StoredChunk(
        key=sh_ten.key, global_shape=tuple(sh_ten.global_shape), offsets=tuple(sh_ten.global_offset),
        sizes=(1,) * prepend + tuple(data.shape), dtype=sh_ten.dtype,
        view=(tuple(data.shape), tuple(data.stride()), data.storage_offset() - param.storage_offset()))


def model_layout(model: torch.nn.Module) -> ModelLayout:
    """The checkpoint layout of a TP=PP=1 megatron model (see module docstring)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    params = dict(model.state_dict(keep_vars=True))
    layouts: list[ParamLayout] = []
    objects: list[StoredObject] = []
    for name, entry in model.sharded_state_dict().items():
        if isinstance(entry, ShardedObject):
            objects.append(StoredObject(entry.unique_key, entry.data))
            continue
        param = params.get(name)
        if param is None:
            raise ValueError(f"sharded state entry {name!r} is not a tensor of model.state_dict()")
        if not param.is_contiguous():
            raise ValueError(f"{name}: parameter is not contiguous")
        if isinstance(entry, ShardedTensorFactory):
            built = entry.build()
            shards = built if isinstance(built, list) else [built]
        elif isinstance(entry, ShardedTensor):
            shards = [entry]
        else:
            raise ValueError(f"{name}: unsupported sharded state entry {type(entry).__name__}")
        chunks = tuple(_chunk(s, param, name) for s in shards)
        covered = sum(math.prod(c.sizes) for c in chunks)
        if covered != param.numel():
            raise ValueError(f"{name}: its checkpoint chunks hold {covered} elements, the parameter {param.numel()}")
        layouts.append(ParamLayout(name, tuple(param.shape), param.dtype, chunks))
    return ModelLayout(tuple(layouts), tuple(objects))
