"""Reliability pieces in one process: fault specs, signal handlers, checkpoint choice, save errors,
the watchdog's diagnosis and the new config keys (the end-to-end runs: tests/distributed/test_reliability.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from harpe_megatron.checkpoint import save_load as checkpointing
from harpe_megatron.checkpoint.layout import (
    CheckpointDamaged,
    checkpoint_files,
    file_crc32,
    incomplete_reason,
    verify_checksums,
    write_manifest,
)
from harpe_megatron.checkpoint.save_load import MANIFEST_FILE, CheckpointError, resolve_checkpoint, save_checkpoint
from harpe_megatron.distributed.signals import helpers_ignore_preemption
from harpe_megatron.run_dir import LOCK_FILE
from harpe_megatron.step.schedule import forward_step
from harpe_megatron.training.reliability.faults import (
    Faults,
    NoFaults,
    SaveFaults,
    fault_at,
    faults_from_env,
    parse_faults,
)
from harpe_megatron.training.reliability.preemption import NoPreemption, Preemption
from harpe_megatron.training.reliability.run_lock import acquire_run_dir
from harpe_megatron.training.reliability.watchdog import (
    NullWatchdog,
    PeerFailure,
    Watchdog,
    is_communication_error,
    make_watchdog,
)


def test_parse_faults():
    assert parse_faults("nan_loss@3,6;crash_in_save@8:1") == [("nan_loss", {3, 6}, None), ("crash_in_save", {8}, 1)]
    with pytest.raises(ValueError, match="unknown fault kind 'boom'; known: nan_loss"):
        parse_faults("boom@3")
    with pytest.raises(ValueError, match="cannot parse 'nan_loss'; expected kind@step"):
        parse_faults("nan_loss")


def test_fault_at_reads_the_environment(monkeypatch):
    monkeypatch.delenv("HARPE_FAULT_INJECT", raising=False)
    assert not fault_at("exit", 5, 1)
    monkeypatch.setenv("HARPE_FAULT_INJECT", "exit@5:1")
    assert fault_at("exit", 5, 1) and not fault_at("exit", 5, 0) and not fault_at("exit", 4, 1)


def test_fault_injection_is_a_no_op_object_unless_the_variable_is_set(monkeypatch):
    monkeypatch.delenv("HARPE_FAULT_INJECT", raising=False)
    none = faults_from_env()
    assert type(none) is NoFaults and none.save_hooks is None and none.step_func(3, 0) is forward_step
    none.at_step_start(3, 0)  # nothing happens
    monkeypatch.setenv("HARPE_FAULT_INJECT", "nan_loss@3:1")
    faults = faults_from_env()
    assert isinstance(faults, Faults) and isinstance(faults.save_hooks, SaveFaults)
    assert faults.step_func(3, 1) is not forward_step
    assert faults.step_func(3, 0) is forward_step and faults.step_func(4, 1) is forward_step
    monkeypatch.setenv("HARPE_FAULT_INJECT", "boom@3")
    with pytest.raises(ValueError, match="unknown fault kind 'boom'"):  # at start, not at step 3
        faults_from_env()


def test_no_op_watchdog_and_preemption(single_rank):
    watchdog = make_watchdog(60.0, 120.0, 76)  # a world of one rank: nobody to watch
    assert isinstance(watchdog, NullWatchdog)
    with watchdog, NoPreemption() as preemption:
        watchdog.progress(1, "train")
        assert watchdog.explain_failure(RuntimeError("Connection closed by peer")) is None
        assert preemption.flag == 0.0 and preemption.received is None


def test_preemption_handler_sets_flag_and_restores_previous():
    before = signal.getsignal(signal.SIGUSR1)
    with Preemption() as p:
        assert p.flag == 0.0
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while p.received is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert p.received == "SIGUSR1" and p.flag == 1.0
    assert signal.getsignal(signal.SIGUSR1) is before


def test_preemption_outside_main_thread_installs_nothing():
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def body():
        with Preemption():
            seen.append(signal.getsignal(signal.SIGTERM))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [before]


def _fake_checkpoint(root, step, truncate=None, manifest=True):
    d = root / f"iter_{step:07d}"
    (d / "rng").mkdir(parents=True)
    (d / "metadata.json").write_text("{}")
    (d / "__0_0.distcp").write_bytes(b"x" * 100)
    (d / "rng" / "rank_00000.pt").write_bytes(b"y" * 10)
    if manifest:
        files = {"metadata.json": 2, "__0_0.distcp": 100, "rng/rank_00000.pt": 10}
        (d / MANIFEST_FILE).write_text(json.dumps({"files": files}))
    if truncate:
        with open(d / truncate, "r+b") as f:
            f.truncate(5)
    return d


def test_resolve_checkpoint_policy(tmp_path):
    assert resolve_checkpoint(tmp_path / "nothing") == (None, [])
    _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 8, truncate="__0_0.distcp")
    (tmp_path / "iter_0000012.tmp").mkdir()
    (tmp_path / "latest").write_text("iter_0000004\n")
    path, msgs = resolve_checkpoint(tmp_path)
    assert path.name == "iter_0000004"
    assert any("iter_0000012.tmp: it is an interrupted save" in m for m in msgs)
    assert any("iter_0000008: it has a truncated or damaged file __0_0.distcp: 5 bytes" in m for m in msgs)

    (tmp_path / "latest").write_text("iter_0000008\n")
    path, msgs = resolve_checkpoint(tmp_path)
    assert path.name == "iter_0000004"
    assert msgs[-1].startswith("WARNING") and "resuming from the newest complete checkpoint iter_0000004" in msgs[-1]

    (tmp_path / "latest").unlink()
    path, msgs = resolve_checkpoint(tmp_path)
    assert path.name == "iter_0000004" and "has no 'latest' file" in msgs[-1]

    (tmp_path / "latest").write_text("iter_0000016\n")
    assert resolve_checkpoint(tmp_path)[0].name == "iter_0000004"  # latest names a missing directory


def test_resolve_checkpoint_without_anything_complete_raises(tmp_path):
    _fake_checkpoint(tmp_path, 8, truncate="rng/rank_00000.pt")
    (tmp_path / "latest").write_text("iter_0000008\n")
    with pytest.raises(RuntimeError, match="names 'iter_0000008', which has a truncated .* no other complete"):
        resolve_checkpoint(tmp_path)


def test_checkpoint_without_manifest_counts_if_metadata_exists(tmp_path):
    _fake_checkpoint(tmp_path, 4, manifest=False)  # e.g. tools/convert_from_hf.py output
    (tmp_path / "latest").write_text("iter_0000004\n")
    assert resolve_checkpoint(tmp_path) == (tmp_path / "iter_0000004", [])


def _checkpoint_exception(rank, exc):
    """What torch's writer raises when a rank's write fails: a BaseException, the OSError inside."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        raise RuntimeError(f"Worker failure: {exc}") from exc
    except RuntimeError as wrapped:
        return CheckpointException("write", {rank: (wrapped, None)})


@pytest.mark.parametrize("raised", ["oserror", "torch_checkpoint_exception"])
def test_full_disk_during_save_keeps_latest(tmp_path, monkeypatch, single_rank, raised):
    """A full disk mid-save: one line naming the checkpoint, rank and cause; the partial iter_8.tmp
    is removed (it would keep the disk full); 'latest' still names iter_4, which stays loadable.
    torch reports the error as CheckpointException, a BaseException that `except Exception` misses."""
    _fake_checkpoint(tmp_path, 4)
    (tmp_path / "latest").write_text("iter_0000004\n")
    err = OSError(28, "No space left on device")

    def full_disk(state, directory):
        (checkpointing.Path(directory) / "__0_0.distcp").write_bytes(b"partial")
        raise err if raised == "oserror" else _checkpoint_exception(0, err)

    monkeypatch.setattr(checkpointing, "_sharded_state", lambda *a, **k: {})
    monkeypatch.setattr(checkpointing.dist_checkpointing, "save", full_disk)
    expected = (r"^saving checkpoint iter_0000008 into \S+iter_0000008.tmp failed on rank 0: OSError: \[Errno 28\] "
                r"No space left on device; iter_0000008.tmp removed; 'latest' still names iter_0000004$")
    with pytest.raises(CheckpointError, match=expected):
        save_checkpoint(tmp_path, 8, [object()], None, None, 64, "", keep_last=2)
    assert (tmp_path / "latest").read_text() == "iter_0000004\n"
    assert not (tmp_path / "iter_0000008.tmp").exists()
    assert resolve_checkpoint(tmp_path) == (tmp_path / "iter_0000004", [])


def test_checksums_name_a_damaged_file_of_the_same_size(tmp_path):
    d = tmp_path / "iter_0000004"
    (d / "rng").mkdir(parents=True)
    (d / "metadata.json").write_text("{}")
    (d / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    (d / "rng" / "rank_00000.pt").write_bytes(b"y" * 10)
    write_manifest(d, {n: file_crc32(d / n) for n in checkpoint_files(d)})
    manifest = json.loads((d / MANIFEST_FILE).read_text())
    assert set(manifest["crc32"]) == set(manifest["files"]) == {"metadata.json", "__0_0.distcp", "rng/rank_00000.pt"}
    assert verify_checksums(d) == 3
    with open(d / "__0_0.distcp", "r+b") as f:  # flip one bit, same size
        f.seek(1000)
        byte = f.read(1)[0]
        f.seek(1000)
        f.write(bytes([byte ^ 0x40]))
    assert incomplete_reason(d) is None  # sizes cannot tell
    with pytest.raises(CheckpointDamaged, match=r"__0_0.distcp: damaged: its CRC-32 is [0-9a-f]{8}, "
                                                r"harpe_manifest.json recorded [0-9a-f]{8}"):
        verify_checksums(d)
    assert verify_checksums(d, ["metadata.json"]) == 1
    with pytest.raises(ValueError, match="no checksum for rng/rank_00000.pt"):
        write_manifest(d, {"metadata.json": "0", "__0_0.distcp": "0"})


def test_helpers_started_while_saving_survive_the_launchers_signals():
    """torchrun/scancel signal the rank's whole process group: a helper started inside
    helpers_ignore_preemption (as megatron's writer forks are) survives SIGTERM/SIGUSR1/SIGINT,
    and this process still handles the signal."""
    code = "import sys, time; sys.stdout.write('up\\n'); sys.stdout.flush(); time.sleep(3)"
    with Preemption() as p:
        with helpers_ignore_preemption():
            helper = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
            assert helper.stdout.readline() == b"up\n"
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                helper.send_signal(sig)
            os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while p.received is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert p.received == "SIGUSR1"
    assert helper.wait(timeout=10) == 0
    plain = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert plain.stdout.readline() == b"up\n"
    plain.send_signal(signal.SIGUSR1)
    assert plain.wait(timeout=10) == -signal.SIGUSR1


def test_run_dir_lock_refuses_a_second_holder_and_takes_over_a_stale_one(tmp_path):
    logged = []
    fd = acquire_run_dir(tmp_path / "run", logged.append)
    record = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and logged == []
    # another process (flock locks belong to the open file: a child process stands in for a second run)
    probe = ("import sys; from harpe_megatron.training.reliability.run_lock import acquire_run_dir, RunDirInUse\n"
             "try:\n    acquire_run_dir(sys.argv[1])\nexcept RunDirInUse as e:\n    print(e); sys.exit(3)")
    second = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "run")], capture_output=True, text=True)
    assert second.returncode == 3, second.stderr
    assert f"run_dir {tmp_path / 'run'} is in use by another run (host " in second.stdout
    assert f"pid {os.getpid()}" in second.stdout and "set another run_dir" in second.stdout
    os.close(fd)  # as if the holder died (kill -9): the kernel drops the lock, the record stays
    fd = acquire_run_dir(tmp_path / "run", logged.append)
    assert len(logged) == 1 and "taking over the lock left by a run that did not end cleanly" in logged[0]
    assert f"pid {os.getpid()}" in logged[0]
    os.close(fd)


def test_run_dir_that_is_a_file_and_a_failed_start_leave_nothing(tmp_path):
    """run_dir naming a regular file is a config error naming run_dir (it was a lock-file error);
    a start that fails in a run_dir it created removes it again; run dirs that existed, or that
    got more than the lock file, stay."""
    from harpe_megatron.config import ConfigError
    from harpe_megatron.training.reliability.run_lock import hold_run_dir

    def share(error):
        return error

    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=f"^run_dir: {afile} exists and is not a directory"):
        with hold_run_dir(afile, True, share):
            pass
    new = tmp_path / "new"
    with pytest.raises(RuntimeError, match="setup failed"):
        with hold_run_dir(new, True, share):
            assert (new / LOCK_FILE).is_file()
            raise RuntimeError("setup failed")
    assert not new.exists()
    with pytest.raises(RuntimeError):
        with hold_run_dir(new, True, share):
            (new / "metrics.jsonl").write_text("{}")
            raise RuntimeError("failed after it trained")
    assert (new / "metrics.jsonl").is_file()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(RuntimeError):
        with hold_run_dir(existing, True, share):
            raise RuntimeError("setup failed")
    assert [p.name for p in existing.iterdir()] == [LOCK_FILE]


class DictStore:
    """The three store calls the watchdog makes."""

    def __init__(self):
        self.data = {}

    def set(self, key, value):
        self.data[key] = value.encode() if isinstance(value, str) else value

    def get(self, key):
        return self.data[key]

    def check(self, keys):
        return all(k in self.data for k in keys)


def _record(store, rank, **kw):
    rec = {"rank": rank, "host": "other-host", "pid": 1, "step": 5, "phase": "train", "beat": time.time(),
           "progress": time.time()} | kw
    store.set(str(rank), json.dumps(rec))


def test_watchdog_names_dead_stale_behind_and_missing_ranks():
    import socket

    store = DictStore()
    dog = Watchdog(store, rank=0, world_size=5, hang_timeout_s=10, slow_phase_timeout_s=10, exit_code=76)
    dog.progress(5, "train")
    dog._beat()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: no such process any more
    _record(store, 1, host=socket.gethostname(), pid=gone.pid)
    _record(store, 2, beat=time.time() - 60)
    _record(store, 3, step=4)
    lines = dog._suspects(dog._read_records())
    host = socket.gethostname()
    assert lines[0].startswith(f"rank 1 (host {host}, pid {gone.pid}, last at step 5 in train) has exited")
    assert lines[1].startswith("rank 2 (host other-host") and "sent no heartbeat for 60 s" in lines[1]
    assert lines[2].startswith("rank 3") and "is behind" in lines[2]
    assert lines[3] == "rank 4 never reported a heartbeat"
    with pytest.raises(PeerFailure, match=r"rank 0 at step 5 \(train\): a collective failed \(boom\) because rank 1"):
        dog.explain_failure(RuntimeError("boom"))


def test_watchdog_explain_failure_returns_when_every_peer_is_alive():
    store = DictStore()
    dog = Watchdog(store, rank=0, world_size=2, hang_timeout_s=5, slow_phase_timeout_s=5, exit_code=76)
    dog.progress(3, "train")
    dog.stale_after, dog.interval = 0.5, 0.1  # keep the wait short
    stop = threading.Event()

    def peer_alive():  # rank 1 keeps beating, as a live peer's thread does
        while not stop.is_set():
            _record(store, 1, step=3)
            time.sleep(0.05)

    beating = threading.Thread(target=peer_alive)
    beating.start()
    try:
        start = time.monotonic()
        dog.explain_failure(RuntimeError("a bug, not a lost peer"))  # returns: the caller re-raises
        assert time.monotonic() - start >= 0.5
    finally:
        stop.set()
        beating.join()


@pytest.mark.parametrize("override, message", [
    ("training.hang_timeout_s=-1", "training.hang_timeout_s must be >= 0"),
    ("training.max_consecutive_nonfinite_steps=-1", "training.max_consecutive_nonfinite_steps must be >= 0"),
    ("training.slow_phase_timeout_s=10", r"training.slow_phase_timeout_s \(10.0\) must be >= training.hang_timeout_s"),
    ("training.distributed_timeout_s=0", "training.distributed_timeout_s must be positive"),
    # issue 13: these used to crash later with a traceback
    ("model.num_query_groups=0", "model.num_query_groups must be positive, got 0"),
    ("model.num_query_groups=-4", "model.num_query_groups must be positive, got -4"),
    ("model.make_vocab_size_divisible_by=0", "model.make_vocab_size_divisible_by must be positive, got 0"),
    ("training.train_iters=-5", "training.train_iters must be positive, got -5"),
    ("training.eval_iters=0", "training.eval_iters must be positive, got 0"),
    # issue 28: a negative lr blamed training.min_lr
    ("training.lr=-1e-3", r"tiny_cpu.yaml \(with overrides .*\): training.lr must be >= 0, got -0.001$"),
    ("training.min_lr=1.0", r"training.min_lr must be in \[0, training.lr \(0.003\)\], got 1.0"),
])
def test_reliability_config_errors(override, message):
    from pathlib import Path

    from harpe_megatron.config import load_config

    config = str(Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml")
    with pytest.raises(Exception, match=message):
        load_config(config, [override])


def test_is_communication_error():
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:27018")
    assert is_communication_error(gloo)
    try:
        try:
            raise gloo
        except RuntimeError as inner:
            raise RuntimeError("rank 0: saving checkpoint iter_0000008 failed") from inner
    except RuntimeError as wrapped:
        assert is_communication_error(wrapped)
    assert not is_communication_error(RuntimeError("loading checkpoint x failed (UnpicklingError: bad data)"))
    assert not is_communication_error(ValueError("shape mismatch"))
