"""Read a megatron ``torch_dist`` checkpoint parameter by parameter (:class:`TorchDistStream`).

For each parameter of a one-rank layout (checkpoint/sharded_layout.py), in order, the records of
the checkpoint chunks that overlap its chunks are read (a background thread, pooled buffers:
checkpoint/stream_io.py) and assembled; a checkpoint saved at any TP/PP/CP works, since what is
needed is located through the DCP metadata's global offsets (what ``dist_checkpointing.load``
does, without loading a whole model). A record saved by the layout itself (TP=1: one record per
parameter chunk) is used in place, without a copy.

Records are ``torch.save`` files (zip). Each is parsed where it lies in memory: the zip
directory gives the offset of the tensor bytes (``<archive>/data/0``), and ``torch.load`` under
``torch.serialization.skip_data`` with ``weights_only=True`` gives its shape, strides, offset and
dtype without reading them. A record that is not one plain contiguous tensor is loaded fully
(``torch.load(weights_only=True)``, a copy). Nothing is unpickled beyond ``weights_only``.

Every range read is CRC-32'd into a :class:`~harpe_megatron.checkpoint.crc.PieceChecksums`, so
the caller can verify whole files against the manifest afterwards without reading them again.
"""

from __future__ import annotations

import io
import math
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from harpe_megatron.checkpoint.crc import PieceChecksums
from harpe_megatron.checkpoint.safety import load_dcp_metadata
from harpe_megatron.checkpoint.sharded_layout import ParamLayout, StoredChunk
from harpe_megatron.checkpoint.prefetch import Prefetcher, ReadRange
from harpe_megatron.checkpoint.stream_io import Buffer, BufferPool

__all__ = ["TorchDistStream", "decode_record"]


class _MemoryFile(io.RawIOBase):
    """A read-only, seekable file over a memoryview (no copy): what zipfile and torch.load read."""

    def __init__(self, mv: memoryview):
        self._mv = mv
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._mv)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), len(self._mv) - self._pos))
        b[:n] = self._mv[self._pos: self._pos + n]
        self._pos += n
        return n


def _data_record(mv: memoryview) -> Optional[tuple[int, int]]:
    """``(offset, length)`` of the only storage record of a torch.save zip, or None."""
    with zipfile.ZipFile(_MemoryFile(mv)) as zf:
        records = [i for i in zf.infolist() if "/data/" in i.filename and not i.filename.split("/")[-1].startswith(".")]
    if len(records) != 1 or records[0].compress_type != zipfile.ZIP_STORED:
        return None
    info = records[0]
    head = bytes(mv[info.header_offset: info.header_offset + 30])
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        return None
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def decode_record(buf: torch.Tensor, sizes: tuple[int, ...], dtype: torch.dtype, where: str) -> torch.Tensor:
    """The tensor of a ``torch.save`` record held in the uint8 tensor ``buf``: a view of ``buf``
    when it is one contiguous tensor of ``sizes``/``dtype`` (the usual case), else a loaded copy."""
    mv = memoryview(buf.numpy())
    try:
        with torch.serialization.skip_data():
            meta = torch.load(_MemoryFile(mv), map_location="cpu", weights_only=True)
        located = _data_record(mv)
    except Exception:  # noqa: BLE001 - no fast path for this record; the full load below names problems
        meta, located = None, None
    numel = math.prod(sizes)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    fast = (isinstance(meta, torch.Tensor) and located is not None and meta.dtype == dtype
            and tuple(meta.shape) == tuple(sizes) and meta.is_contiguous() and meta.storage_offset() == 0
            and meta.untyped_storage().nbytes() == nbytes == located[1])
    if fast:
        offset, _ = located
        if not nbytes:
            return torch.empty(sizes, dtype=dtype)
        raw = buf[offset: offset + nbytes]
        if raw.data_ptr() % raw.new_empty((), dtype=dtype).element_size() == 0:
            return raw.view(dtype).view(sizes)
        # a record at an odd place in its file (direct reads keep file offsets modulo 4096): a view
        # at an unaligned address, which torch's CPU kernels read with unaligned loads
        return torch.frombuffer(memoryview(raw.numpy()), dtype=dtype).view(sizes)
    try:
        t = torch.load(_MemoryFile(mv), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{where}: cannot read the record ({type(exc).__name__}: {exc})") from None
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(sizes):
        raise ValueError(f"{where}: holds {type(t).__name__} {list(getattr(t, 'shape', []))}, the metadata says "
                         f"a tensor of {list(sizes)}")
    return t.to(dtype)


@dataclass(frozen=True)
class _Piece:
    """A stored record overlapping a wanted chunk: ``(param index, wanted chunk, stored offsets/sizes)``."""

    param: int
    chunk: StoredChunk
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


def _overlap(a_off, a_size, b_off, b_size) -> Optional[tuple[tuple[int, ...], tuple[int, ...]]]:
    lo = tuple(max(x, y) for x, y in zip(a_off, b_off))
    hi = tuple(min(x + s, y + t) for x, s, y, t in zip(a_off, a_size, b_off, b_size))
    if any(h <= low for low, h in zip(lo, hi)):
        return None
    return lo, tuple(h - low for low, h in zip(lo, hi))


def _narrow(t: torch.Tensor, origin: tuple[int, ...], lo: tuple[int, ...], size: tuple[int, ...]) -> torch.Tensor:
    for dim, (o, start, n) in enumerate(zip(origin, lo, size)):
        t = t.narrow(dim, start - o, n)
    return t


class TorchDistStream:
    """The stored chunks of checkpoint ``ckpt`` (its ``.metadata``, read with the restricted
    unpickler of checkpoint/safety.py) and the reading of parameters from them."""

    def __init__(self, ckpt: str | Path):
        self.ckpt = Path(ckpt)
        md = load_dcp_metadata(self.ckpt)
        self.tensors = {k: v for k, v in md.state_dict_metadata.items() if hasattr(v, "chunks")}
        self._where = {}
        for index, info in (md.storage_data or {}).items():
            if getattr(info, "transform_descriptors", None):
                raise ValueError(f"{self.ckpt}: entry {index.fqn!r} is stored with transforms "
                                 f"{list(info.transform_descriptors)}; not supported")
            if index.offset is not None:
                self._where[(index.fqn, tuple(index.offset))] = info

    def dtype_of(self, key: str) -> Optional[torch.dtype]:
        entry = self.tensors.get(key)
        return None if entry is None else entry.properties.dtype

    def shape_of(self, key: str) -> Optional[tuple[int, ...]]:
        entry = self.tensors.get(key)
        return None if entry is None else tuple(entry.size)

    def _pieces(self, params: list[ParamLayout]) -> list[tuple[ReadRange, _Piece]]:
        out = []
        for i, p in enumerate(params):
            for c in p.chunks:
                stored = self.tensors.get(c.key)
                if stored is None:
                    raise ValueError(f"{self.ckpt}: the checkpoint has no tensor {c.key!r} (is it a model checkpoint of "
                                     "this architecture?)")
                if tuple(stored.size) != tuple(c.global_shape):
                    raise ValueError(f"{self.ckpt}: tensor {c.key!r} has shape {list(stored.size)}, the model needs "
                                     f"{list(c.global_shape)}")
                covered = 0
                for sc in stored.chunks:
                    ov = _overlap(c.offsets, c.sizes, tuple(sc.offsets), tuple(sc.sizes))
                    if ov is None:
                        continue
                    covered += math.prod(ov[1])
                    info = self._where.get((c.key, tuple(sc.offsets)))
                    if info is None:
                        raise ValueError(f"{self.ckpt}: .metadata lists a chunk of {c.key!r} at {list(sc.offsets)} "
                                         "but not where it is stored")
                    path = self.ckpt / info.relative_path
                    if path.resolve().parent != self.ckpt.resolve():
                        raise ValueError(f"{self.ckpt}: entry {c.key!r} points outside the checkpoint directory")
                    if not path.is_file():
                        raise FileNotFoundError(f"{path}: missing (the checkpoint's .metadata lists entries in it)")
                    out.append((ReadRange(path, info.offset, info.length),
                                _Piece(i, c, tuple(sc.offsets), tuple(sc.sizes))))
                if covered != math.prod(c.sizes):
                    raise ValueError(f"{self.ckpt}: tensor {c.key!r} is not fully stored around {list(c.offsets)} "
                                     f"(chunks cover {covered} of {math.prod(c.sizes)} elements)")
        return out

    def read(self, params: list[ParamLayout], in_pool: BufferPool, work_pool: BufferPool,
             sums: PieceChecksums, on_bytes: Callable[[int], None] = lambda n: None
             ) -> Iterator[tuple[ParamLayout, torch.Tensor, Callable[[], None]]]:
        """``(param, tensor, release)`` for every parameter of ``params``, in order: ``tensor`` has the
        parameter's shape and the checkpoint's dtype; call ``release()`` when done with it."""
        pieces = self._pieces(params)
        prefetch = Prefetcher([r for r, _ in pieces], in_pool, checksum=True)
        stream = iter(prefetch)
        try:
            k = 0
            for i, p in enumerate(params):
                mine = []
                while k < len(pieces) and pieces[k][1].param == i:
                    r, data, buf, crc = next(stream)
                    sums.add(r.path, r.offset, r.length, crc)
                    on_bytes(r.length)
                    mine.append((pieces[k][1], data, buf, r))
                    k += 1
                yield self._assemble(p, mine, work_pool)
        finally:
            prefetch.close()

    def _assemble(self, p: ParamLayout, mine: list[tuple[_Piece, torch.Tensor, Buffer, ReadRange]],
                  work_pool: BufferPool):
        held: list[Buffer] = [buf for _, _, buf, _ in mine]
        decoded = []
        for piece, data, _, r in mine:
            where = f"{r.path} (entry {piece.chunk.key!r} at {list(piece.offsets)})"
            decoded.append((piece, decode_record(data, piece.sizes, p.dtype, where)))
        if len(decoded) == 1:
            piece, t = decoded[0]
            if piece.offsets == piece.chunk.offsets and piece.sizes == piece.chunk.sizes and p.is_whole(piece.chunk):
                return p, t.view(p.shape), lambda: [b.release() for b in held]
        out_buf = work_pool.acquire(p.nbytes)
        held.append(out_buf)
        out = out_buf.view(p.nbytes, p.dtype).view(p.shape)
        for piece, t in decoded:
            dest = piece.chunk.of(out)
            lo, size = _overlap(piece.chunk.offsets, piece.chunk.sizes, piece.offsets, piece.sizes)
            target = _narrow(dest, piece.chunk.offsets, lo, size)
            target.copy_(_narrow(t, piece.offsets, lo, size))
        for _, _, buf, _ in mine:
            buf.release()
        held = [out_buf]
        return p, out, lambda: [b.release() for b in held]
