"""CRC-32 of a file from pieces read in any order: verification without a second read.

A reader that needs a file's byte ranges in some other order than the file's (a converter
reading a checkpoint tensor by tensor) records the CRC-32 of every range it reads
(:meth:`PieceChecksums.add`); :meth:`PieceChecksums.file_crc32` then reads only the bytes no
range covered (headers between tensors, entries nobody needed) and combines everything, in file
order, into the CRC-32 of the whole file, which :func:`verify_pieces` compares with the manifest
(checkpoint/layout.py). Every byte is read once.

Combining uses the GF(2) linear map "append n zero bytes" (zlib's ``crc32_combine``, which
Python's ``zlib`` does not expose): its matrices for n = 2^k are computed once, so a combination
costs at most 64 matrix-vector products of 32 bits.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from harpe_megatron.checkpoint.layout import CheckpointDamaged, verify_checksums

__all__ = ["crc32_combine", "PieceChecksums", "verify_pieces"]

_POLY = 0xEDB88320
_GAP_CHUNK = 16 << 20


def _times(mat: list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _square(mat: list[int]) -> list[int]:
    return [_times(mat, mat[n]) for n in range(32)]


def _zero_byte_operators() -> list[list[int]]:
    """``ops[k]``: the operator that appends 2^k zero bytes to a CRC register."""
    one_bit = [_POLY] + [1 << n for n in range(31)]  # one zero bit
    op = one_bit
    for _ in range(3):  # 8 bits = one byte
        op = _square(op)
    ops = []
    for _ in range(64):
        ops.append(op)
        op = _square(op)
    return ops


_OPS: Optional[list[list[int]]] = None


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)``."""
    global _OPS
    if len2 <= 0:
        return crc1
    if _OPS is None:
        _OPS = _zero_byte_operators()
    k = 0
    while len2:
        if len2 & 1:
            crc1 = _times(_OPS[k], crc1)
        len2 >>= 1
        k += 1
    return crc1 ^ crc2


@dataclass
class PieceChecksums:
    """CRC-32s of byte ranges read from files, to be completed into whole-file CRC-32s."""

    pieces: dict[Path, list[tuple[int, int, int]]] = field(default_factory=dict)

    def add(self, path: Path, offset: int, length: int, crc: int) -> None:
        self.pieces.setdefault(Path(path), []).append((offset, length, crc))

    def file_crc32(self, path: Path, size: int) -> int:
        """The CRC-32 of the first ``size`` bytes of ``path``: recorded pieces plus the gaps, read now
        (overlapping pieces are an error: every byte is counted once)."""
        path = Path(path)
        ranges = sorted(self.pieces.get(path, []))
        crc, pos = 0, 0
        fd = None
        try:
            for offset, length, piece_crc in ranges + [(size, 0, 0)]:
                if offset < pos:
                    raise ValueError(f"{path}: overlapping checksum pieces at byte {offset}")
                while pos < offset:  # a gap nobody read: read it now
                    if fd is None:
                        fd = os.open(path, os.O_RDONLY)
                    chunk = os.pread(fd, min(_GAP_CHUNK, offset - pos), pos)
                    if not chunk:
                        raise CheckpointDamaged(f"{path}: ends at byte {pos}, expected {size} bytes (truncated)")
                    crc = zlib.crc32(chunk, crc)
                    pos += len(chunk)
                if length:
                    crc = crc32_combine(crc, piece_crc, length)
                    pos = offset + length
        finally:
            if fd is not None:
                os.close(fd)
        return crc


def verify_pieces(ckpt: Path, sums: PieceChecksums) -> int:
    """Check every file the manifest of ``ckpt`` checksums against its CRC-32, combining the pieces
    in ``sums`` and reading the rest (checkpoint/layout.py's ``verify_checksums``: same messages,
    :class:`CheckpointDamaged` naming the first mismatch). Returns the number of files checked."""
    return verify_checksums(ckpt, crc_of=lambda f, size: f"{sums.file_crc32(f, size):08x}")
