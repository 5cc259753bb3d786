"""Streaming file I/O for checkpoint conversion: bounded memory, near disk speed.

Three pieces, shared by the torch_dist and safetensors readers and writers (the third in
checkpoint/prefetch.py):

:class:`BufferPool`
    Reusable page-aligned byte buffers under a byte budget. Fresh memory costs a page fault per
    4 KiB page (measured ~1 GB/s on a 2-core VM, slower than the disk); a pool touches each
    buffer once and hands it out again, and its budget is the memory bound of a pipeline.
    :meth:`~BufferPool.acquire` blocks until enough bytes are released (by another thread).

:class:`StreamWriter`
    Writes one file sequentially through a few page-aligned staging blocks that a background
    thread writes with ``O_DIRECT`` where the filesystem allows it (page-cache writes measured
    3x slower than direct ones on that VM) and checksums (CRC-32, the manifest's) as they go; the
    last block is padded to the alignment and the file truncated to its true size. Falls back to
    ordinary writes where ``O_DIRECT`` is refused (tmpfs, some network filesystems).

:class:`Prefetcher`
    Reads byte ranges of files, in a given order, into pool buffers on a background thread
    (``preadv`` releases the GIL; ``O_DIRECT`` where allowed), CRC-32 of each range included, so
    the consumer computes while the disk reads. At most the pool's budget is in flight.

Memory: a pipeline built from these holds its pool's budget plus ``StreamWriter.BLOCKS x
BLOCK_BYTES`` per open writer, whatever the size of the files.
"""

from __future__ import annotations

import errno
import fcntl
import os
import queue
import threading
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch

__all__ = ["ALIGN", "BufferPool", "Buffer", "StreamWriter", "aligned_bytes", "pipeline_memory_bound"]

ALIGN = 4096  # O_DIRECT alignment of addresses, offsets and lengths (the common logical block size)
_MIB = 1 << 20


def aligned_bytes(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of ``nbytes`` whose first byte is ``ALIGN``-aligned (its storage is a bit larger)."""
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % ALIGN
    return raw[skip: skip + nbytes]


class Buffer:
    """A pooled byte buffer: ``data`` (uint8 tensor of ``capacity`` bytes); give it back with
    :meth:`BufferPool.release` (or ``release()``)."""

    def __init__(self, pool: Optional["BufferPool"], capacity: int):
        self.pool = pool
        self.capacity = capacity
        self.data = aligned_bytes(capacity)

    def view(self, nbytes: int, dtype: torch.dtype = torch.uint8, offset: int = 0) -> torch.Tensor:
        """``nbytes`` from ``offset`` as a 1-D tensor of ``dtype`` whose storage is exactly these bytes
        (so ``torch.save`` writes them and nothing else)."""
        if offset + nbytes > self.capacity:
            raise ValueError(f"{offset} + {nbytes} bytes exceed a buffer of {self.capacity}")
        mv = memoryview(self.data.numpy())[offset: offset + nbytes]
        return torch.frombuffer(mv, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)

    def release(self) -> None:
        if self.pool is not None:
            self.pool.release(self)


class BufferPool:
    """Page-aligned buffers reused under a budget of ``budget`` bytes (see module docstring).

    ``acquire(n)`` returns the smallest free buffer of at least ``n`` bytes, else allocates one
    (rounded up to 1 MiB) if the budget allows, dropping free buffers that are too small to make
    room; otherwise it waits until another thread releases one. A request larger than the budget
    on its own is served once nothing else is held (the budget is then exceeded by that request).
    ``peak_bytes`` is the most ever allocated at once.
    """

    def __init__(self, budget: int):
        self.budget = int(budget)
        self._free: list[Buffer] = []
        self._allocated = 0
        self._held = 0
        self.peak_bytes = 0
        self._cond = threading.Condition()
        self._closed = False

    def acquire(self, nbytes: int, stop: Optional[threading.Event] = None) -> Buffer:
        """A buffer of at least ``nbytes`` (see class docstring); waiting ends with RuntimeError
        when the pool is closed or ``stop`` is set."""
        want = max(_MIB, -(-int(nbytes) // _MIB) * _MIB)
        with self._cond:
            while True:
                if self._closed or (stop is not None and stop.is_set()):
                    raise RuntimeError("buffer pool closed" if self._closed else "stopped")
                fits = [b for b in self._free if b.capacity >= nbytes]
                if fits:
                    buf = min(fits, key=lambda b: b.capacity)
                    self._free.remove(buf)
                    self._held += buf.capacity
                    return buf
                while self._free and self._allocated + want > self.budget:
                    self._drop(max(self._free, key=lambda b: b.capacity))
                if self._allocated + want <= self.budget or self._held == 0:
                    buf = Buffer(self, want)
                    self._allocated += want
                    self._held += want
                    self.peak_bytes = max(self.peak_bytes, self._allocated)
                    return buf
                self._cond.wait(timeout=0.1 if stop is not None else None)

    def _drop(self, buf: Buffer) -> None:
        self._free.remove(buf)
        self._allocated -= buf.capacity

    def release(self, buf: Buffer) -> None:
        with self._cond:
            self._held -= buf.capacity
            self._free.append(buf)
            self._cond.notify_all()

    def close(self) -> None:
        """Free every buffer and wake waiters (they raise)."""
        with self._cond:
            self._closed = True
            self._free.clear()
            self._allocated = self._held
            self._cond.notify_all()


def _open_direct(path: Path) -> tuple[int, bool]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, flags | direct, 0o644), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o644), False


class StreamWriter:
    """Sequential writer of one file through staging blocks and a background thread (see module
    docstring). ``write`` copies bytes in (any bytes-like object or contiguous tensor);
    ``write_tensor`` also takes strided tensors and casts to ``dtype``; ``close()`` returns
    ``(size, crc32)`` after the data is on disk (fsync; crc32 is 0 with ``checksum=False``). Errors of the background thread are
    raised by the next call. ``abort()`` stops without finishing (the caller removes the file)."""

    BLOCK_BYTES = 8 * _MIB
    BLOCKS = 4
    SLAB_BYTES = 4 * _MIB  # strided/cast copies: rows per step

    def __init__(self, path: str | os.PathLike, direct: bool = True, checksum: bool = True):
        self.path = Path(path)
        self._checksum = checksum
        if direct:
            self._fd, self.direct = _open_direct(self.path)
        else:
            self._fd, self.direct = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), False
        self._free: queue.Queue = queue.Queue()
        for _ in range(self.BLOCKS):
            self._free.put(aligned_bytes(self.BLOCK_BYTES))
        self._todo: queue.Queue = queue.Queue()
        self._error: Optional[BaseException] = None
        self._set_block(self._free.get())
        self.position = 0  # bytes handed over so far (the offset of the next write)
        self.crc = 0
        self._thread = threading.Thread(target=self._drain, name=f"write {self.path.name}", daemon=True)
        self._thread.start()
        self._closed = False
        self._scratch: Optional[torch.Tensor] = None

    # -- background thread ------------------------------------------------------------------------
    def _drain(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            block, nbytes = item
            try:
                if self._error is None:
                    self._write_block(block, nbytes)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                self._error = exc
            self._free.put(block)

    def _write_block(self, block: torch.Tensor, nbytes: int) -> None:
        mv = memoryview(block.numpy())
        if self._checksum:
            self.crc = zlib.crc32(mv[:nbytes], self.crc)
        length = -(-nbytes // ALIGN) * ALIGN if self.direct else nbytes
        done = 0
        while done < length:
            try:
                done += os.write(self._fd, mv[done:length])
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                # O_DIRECT accepted at open, refused at write (some filesystems): write plainly.
                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False
                length = nbytes

    # -- caller side ----------------------------------------------------------------------------
    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise ValueError(f"{self.path}: writer is closed")

    def _flush_block(self) -> None:
        if self._fill:
            self._todo.put((self._block, self._fill))
            self._set_block(self._free.get())
            self._check()

    def _set_block(self, block: torch.Tensor) -> None:
        self._block, self._block_np, self._fill = block, block.numpy(), 0

    def write(self, data) -> int:
        """Append the bytes of ``data`` (bytes-like, or a contiguous tensor of any dtype)."""
        self._check()
        src = _as_bytes(data)
        n = src.size
        done = 0
        while done < n:
            take = min(n - done, self.BLOCK_BYTES - self._fill)
            self._block_np[self._fill: self._fill + take] = src[done: done + take]
            self._fill += take
            done += take
            if self._fill == self.BLOCK_BYTES:
                self._flush_block()
        self.position += n
        return n

    def write_tensor(self, t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> int:
        """Append ``t`` in row-major order as ``dtype`` (default its own). Strided or cast tensors
        are copied a slab of leading rows at a time, straight into the staging block when the slab
        fits its free space, else through a small scratch buffer."""
        dtype = dtype or t.dtype
        if t.is_contiguous() and t.dtype == dtype:
            return self.write(t)
        if t.dim() == 0:
            return self.write(t.to(dtype).reshape(1))
        itemsize = torch.empty((), dtype=dtype).element_size()
        row = t[0].numel() * itemsize
        if row > self.SLAB_BYTES:  # one leading row is bigger than a slab: go one dimension down
            return sum(self.write_tensor(t[i], dtype) for i in range(t.size(0)))
        written, i = 0, 0
        per_slab = max(1, self.SLAB_BYTES // max(row, 1))
        while i < t.size(0):
            rows = min(t.size(0) - i, per_slab)
            nbytes = rows * row
            if self.BLOCK_BYTES - self._fill >= nbytes:
                self._check()
                dst = self._block[self._fill: self._fill + nbytes].view(dtype).view(rows, *t.shape[1:])
                dst.copy_(t[i: i + rows])
                self._fill += nbytes
                self.position += nbytes
                if self._fill == self.BLOCK_BYTES:
                    self._flush_block()
            else:
                if self._scratch is None:
                    self._scratch = aligned_bytes(self.SLAB_BYTES)
                self._scratch[:nbytes].view(dtype).view(rows, *t.shape[1:]).copy_(t[i: i + rows])
                self.write(self._scratch[:nbytes])
            written += nbytes
            i += rows
        return written

    def flush(self) -> None:
        """Nothing to do (``torch.save`` calls it): ``close()`` makes the file durable."""

    def close(self) -> tuple[int, int]:
        """Write what is staged, wait for the thread, fix the size, fsync; ``(size, crc32)``."""
        self._check()
        self._flush_block()
        self._todo.put(None)
        self._thread.join()
        self._closed = True
        try:
            if self._error is not None:
                raise self._error
            if self.direct:
                os.ftruncate(self._fd, self.position)
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
        return self.position, self.crc

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._error = self._error or RuntimeError("aborted")
        self._todo.put(None)
        self._thread.join()
        os.close(self._fd)


def _as_bytes(data) -> np.ndarray:
    """A flat uint8 array over the bytes of ``data`` (no copy; read-only sources are fine)."""
    if isinstance(data, torch.Tensor):
        if not data.is_contiguous():
            raise ValueError("write() needs a contiguous tensor; use write_tensor()")
        if data.numel() == 0:
            return np.empty(0, dtype=np.uint8)
        return data.reshape(-1).view(torch.uint8).numpy()
    return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)


BOOKKEEPING_BYTES = 32 * _MIB
"""Allowance for everything of a conversion that is not a pooled buffer or a staging block
(metadata, the meta-device model, Python objects, torch.save headers): independent of model size."""


def pipeline_memory_bound(*pools: BufferPool) -> int:
    """The stated peak memory (bytes above the process's baseline) of a pipeline of ``pools`` and
    one open :class:`StreamWriter` (staging blocks + scratch slab) plus :data:`BOOKKEEPING_BYTES`."""
    staging = StreamWriter.BLOCKS * (StreamWriter.BLOCK_BYTES + ALIGN) + StreamWriter.SLAB_BYTES
    return sum(p.budget for p in pools) + staging + BOOKKEEPING_BYTES
