"""The streaming torch_dist writer/reader against megatron's own save and load, and their I/O parts.

Oracles: megatron-core's ``dist_checkpointing.save`` of the same model (the DCP metadata must
match: keys, global shapes, dtypes, chunks) and ``dist_checkpointing.load`` (reads the streamed
checkpoint back exactly); zlib for the combined CRC-32s.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
import zlib

import pytest
import torch
from megatron.core import dist_checkpointing

from harpe_megatron.checkpoint.crc import PieceChecksums, crc32_combine
from harpe_megatron.checkpoint.dist_stream_read import TorchDistStream
from harpe_megatron.checkpoint.dist_stream_write import write_torch_dist
from harpe_megatron.checkpoint.stream_io import BufferPool, StreamWriter
from harpe_megatron.config.model import PositionalConfig
from harpe_megatron.hf.session import build_full_model, checkpoint_layout, megatron_cpu_session
from harpe_megatron.positional.bases import ConstantBase
from tests.helpers import tiny_model_config

POSITIONAL = PositionalConfig(bases=ConstantBase(base=1e4))


def _chunks(md):
    out = {}
    for key, entry in md.state_dict_metadata.items():
        if hasattr(entry, "chunks"):
            out[key] = (tuple(entry.size), entry.properties.dtype,
                        sorted((tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks))
        else:
            out[key] = type(entry).__name__
    return out


def test_streamed_checkpoint_is_megatrons_own(single_rank, tmp_path):
    from harpe_megatron.checkpoint.save_load import _writer_results_in_process

    m = tiny_model_config(num_query_groups=2)
    with megatron_cpu_session():
        layout = checkpoint_layout(m, POSITIONAL, torch.bfloat16, 256)
        model = build_full_model(m, POSITIONAL, torch.bfloat16, 256)
        torch.manual_seed(0)
        state = model.state_dict()
        for t in state.values():
            if torch.is_tensor(t):
                t.normal_()
        released = []
        produced = ((p.name, state[p.name], lambda n=p.name: released.append(n)) for p in layout.params)
        (tmp_path / "ours").mkdir()
        crcs = write_torch_dist(tmp_path / "ours", layout, produced, {"iteration": 0}, max_file_bytes=40_000)
        assert released == [p.name for p in layout.params]  # each tensor handed back once written
        (tmp_path / "megatron").mkdir()
        _writer_results_in_process()
        dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": 0}, str(tmp_path / "megatron"))

        ours = pickle.loads((tmp_path / "ours" / ".metadata").read_bytes())
        theirs = pickle.loads((tmp_path / "megatron" / ".metadata").read_bytes())
        # megatron-core 0.19 keeps the common state as a "common_state" object inside the .distcp
        # files, 0.16 as common.pt; we write common.pt, which both read (load_common_state_dict)
        in_distcp = {k for k in _chunks(theirs) if k.startswith("common_state/")}
        assert _chunks(ours) == {k: v for k, v in _chunks(theirs).items() if k not in in_distcp}
        assert dist_checkpointing.load_common_state_dict(str(tmp_path / "ours")) == {"iteration": 0}
        assert len([f for f in os.listdir(tmp_path / "ours") if f.endswith(".distcp")]) > 1  # max_file_bytes
        for name, crc in crcs.items():
            assert crc == f"{zlib.crc32((tmp_path / 'ours' / name).read_bytes()):08x}", name

        for src in ("ours", "megatron"):  # megatron's loader reads ours; our reader reads both
            fresh = build_full_model(m, POSITIONAL, torch.float32, 256)
            loaded = dist_checkpointing.load({"model": fresh.sharded_state_dict()}, str(tmp_path / src))["model"]
            sums = PieceChecksums()
            stream = TorchDistStream(tmp_path / src).read(list(layout.params), BufferPool(1 << 22), BufferPool(1 << 22),
                                                          sums)
            for p, t, release in stream:
                assert torch.equal(t, state[p.name]) and torch.equal(loaded[p.name], state[p.name].float()), (src, p.name)
                release()
            for f in os.listdir(tmp_path / src):  # pieces + the gaps = the whole file, read once
                path = tmp_path / src / f
                assert sums.file_crc32(path, path.stat().st_size) == zlib.crc32(path.read_bytes()), (src, f)


def test_crc32_combine():
    a, b = os.urandom(1000), os.urandom(70_001)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    assert crc32_combine(zlib.crc32(a), 0, 0) == zlib.crc32(a)


def test_stream_writer_strided_cast_and_large(tmp_path, monkeypatch):
    monkeypatch.setattr(StreamWriter, "BLOCK_BYTES", 1 << 16)  # many blocks, rows straddling them
    monkeypatch.setattr(StreamWriter, "SLAB_BYTES", 1 << 12)
    a = torch.randn(300, 97)
    b = torch.randn(64, 50, 3).transpose(0, 1)  # strided
    w = StreamWriter(tmp_path / "f.bin")
    w.write(b"head")
    w.write_tensor(a, torch.bfloat16)
    w.write_tensor(b)
    w.write(a)
    size, crc = w.close()
    data = (tmp_path / "f.bin").read_bytes()
    expected = b"head" + a.to(torch.bfloat16).view(torch.int16).numpy().tobytes() + b.contiguous().numpy().tobytes() \
        + a.numpy().tobytes()
    assert size == len(data) == len(expected) and data == expected and crc == zlib.crc32(expected)


def test_buffer_pool_bounds_and_blocks():
    pool = BufferPool(3 << 20)
    a, b = pool.acquire(1 << 20), pool.acquire(2 << 20)
    got = []
    t = threading.Thread(target=lambda: got.append(pool.acquire(1 << 20)))
    t.start()
    time.sleep(0.2)
    assert not got  # over budget: waits
    a.release()
    t.join(5)
    assert got and got[0] is a  # the freed buffer is reused
    assert pool.peak_bytes == 3 << 20
    got[0].release()
    b.release()
    big = pool.acquire(8 << 20)  # alone bigger than the budget: served as nothing else is held
    assert big.capacity >= 8 << 20
