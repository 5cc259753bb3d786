"""Training checkpoints on megatron's dist_checkpointing: atomic, verified, resumable, resharding.

The layout of a save directory, what makes a checkpoint complete, the manifest with its per-file
CRC-32s and the choice of what to resume from are checkpoint/layout.py's (re-exported here).

A save follows checkpoint/directory.py (the one writer of checkpoint directories, which HF import
uses too): rank 0 starts ``iter_N.tmp``; every rank finishes its files, the ranks checksum the
files (each a share) and rank 0 publishes (manifest, rename to ``iter_N``, ``latest`` replaced
atomically, all but the newest ``keep_last`` complete checkpoints and older interrupted ``.tmp``
saves pruned). The ranks agree after every phase,
so an error on any rank (a full disk: ``OSError``, or torch's ``CheckpointException``, which is a
``BaseException``) makes every rank raise :class:`CheckpointError` with one line naming the
checkpoint, the cause and what ``latest`` still names, after rank 0 removed ``iter_N.tmp``. A rank
that dies mid-save leaves ``iter_N.tmp`` behind; ``latest`` still names a complete checkpoint.

Helper processes: megatron-core's torch_dist writer forks writer processes per save (started here
with the preemption signals blocked, see training/reliability/preemption.py) and hands their results back
through a queue; see :func:`_writer_results_in_process` for why that queue is made in-process.

A load verifies the checksums of the checkpoint (each rank a share; resume and initial weights)
and fails with :class:`CheckpointError` naming the damaged file.
"""

from __future__ import annotations

import os
import queue
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies import filesystem_async
from torch.distributed.checkpoint.api import CheckpointException

from harpe_megatron.checkpoint.directory import begin_checkpoint, in_progress_dir, publish_checkpoint
from harpe_megatron.checkpoint.layout import (
    LATEST_FILE,
    MANIFEST_FILE,
    CheckpointDamaged,
    CheckpointScan,
    checkpoint_files,
    checkpoint_name,
    file_crc32,
    incomplete_reason,
    list_checkpoints,
    read_manifest,
    resolve_checkpoint,
    scan_checkpoints,
    verify_checksums,
)
from harpe_megatron.checkpoint.safety import check_megatron_checkpoint
from harpe_megatron.compat import check_megatron
from harpe_megatron.distributed.signals import helpers_ignore_preemption

check_megatron()  # supported megatron-core, internals we subclass present (compat.py)

__all__ = [
    "LATEST_FILE",
    "MANIFEST_FILE",
    "CheckpointError",
    "checkpoint_name",
    "CheckpointScan",
    "find_latest",
    "incomplete_reason",
    "list_checkpoints",
    "resolve_checkpoint",
    "scan_checkpoints",
    "SaveHooks",
    "describe_checkpoint_error",
    "save_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "unwrap_model",
    "verify_checkpoint",
]

# "fully_reshardable": canonical per-parameter optimizer state, so a checkpoint resumes at another
# TP/PP/DP layout (gathered on DP rank 0 when saving; fine for the sizes we save).
_OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class SaveHooks:
    """Called by :func:`save_checkpoint` between its phases; every hook does nothing here."""

    def after_shards_written(self, tmp: Path, step: int, rank: int) -> None:
        """This rank's shards of ``step`` are in ``tmp``; the manifest and the rename are still to come."""


class CheckpointError(RuntimeError):
    """A checkpoint save or load failed; one line naming the checkpoint, the cause and what is kept
    (raised on every rank alike; the CLI prints it without a traceback and exits 1)."""


def find_latest(load_dir: str | os.PathLike) -> Optional[Path]:
    """The checkpoint :func:`resolve_checkpoint` picks (its warnings go to ``warnings.warn``)."""
    path, messages = resolve_checkpoint(load_dir)
    for msg in messages:
        if msg.startswith("WARNING"):
            warnings.warn(msg, stacklevel=2)
    return path


def _rng_state() -> dict[str, Any]:
    """This rank's RNG states as tensors and plain Python values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), int(pos), int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer its state tensors (so a checkpoint can be loaded into them).

    megatron's DistributedOptimizer builds its loading state dict from its current state, which a
    torch Adam (the fallback without apex/TE) only has after a first step. We take one step with
    zero gradients and lr = weight decay = 0, which allocates the state and changes no parameter;
    the loaded checkpoint then overwrites the state, including the step count.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None or len(inner.state) > 0:
            continue
        saved = [(g["lr"], g.get("weight_decay", 0.0)) for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"], g["weight_decay"] = 0.0, 0.0
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        inner.step()
        inner.zero_grad(set_to_none=True)
        for g, (lr, wd) in zip(inner.param_groups, saved):
            g["lr"], g["weight_decay"] = lr, wd


def _load_optimizer_state(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict`` plus a work-around for megatron-core 0.16.1 on its torch-Adam
    fallback (no apex/TE, i.e. CPU): there, ``DistributedOptimizer.load_state_dict`` first puts
    Adam's ``step`` into every parameter's state and then copies the fully-reshardable parameter
    state key by key, failing on ``step`` (which that format does not store per parameter). We do
    the two halves ourselves with ``step`` set aside in between, and un-share the step tensors.
    Other set-ups take the plain call.
    """
    from megatron.core.optimizer import distrib_optimizer

    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    fallback = (
        not distrib_optimizer.HAVE_APEX_OR_TE
        and len(opts) == 1
        and isinstance(opts[0], distrib_optimizer.DistributedOptimizer)
        and state.get("param_state_sharding_type") == "fully_reshardable"
    )
    if not fallback:
        optimizer.load_state_dict(state)
        return
    opt = opts[0]
    state = dict(state)
    param_state = state.pop("param_state")
    opt.load_state_dict(state)
    steps = {p: st.pop("step") for p, st in opt.optimizer.state.items() if "step" in st}
    opt.load_parameter_state_from_fully_reshardable(param_state)
    for p, step in steps.items():
        # megatron hands every parameter the *same* step tensor, which torch's foreach Adam would
        # then increment once per parameter per step: give each its own.
        opt.optimizer.state[p]["step"] = step.detach().clone()


def unwrap_model(module):
    """The bare model under megatron's DDP / Float16Module wrappers (their ``.module``)."""
    while hasattr(module, "module"):
        module = module.module
    return module


def _sharded_state(model_chunks: list, optimizer, is_loading: bool) -> dict[str, Any]:
    if len(model_chunks) != 1:
        raise NotImplementedError("virtual pipeline stages (several model chunks) are not supported")
    model_sd = unwrap_model(model_chunks[0]).sharded_state_dict()
    state: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=_OPT_METADATA)
    return state


def _writer_results_in_process() -> None:
    """Give megatron's checkpoint writer an in-process results queue instead of a Manager process.

    megatron-core (0.16.1) hands the write results of its torch_dist writer back through
    ``filesystem_async._results_queue``, created on first use as
    ``multiprocessing.get_context("spawn").Manager().Queue()``: a server process per rank
    (~270 MB) that lives until the rank exits, dies of the SIGTERM/SIGUSR1 that torchrun and
    scancel send to the rank's process group (every later save then fails with
    BrokenPipeError/EOFError: the preemption save is lost) and outlives a killed rank (orphan).
    That queue crosses processes only for asynchronous saves (the write in a background
    process); our saves are synchronous: the results are put and taken in this process, so a
    ``queue.Queue`` does the job with no process at all. Seeding the module's cache is the only
    hook megatron offers (its writer class is hard-wired in the strategy); nothing else is changed.
    """
    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost cause of ``exc``; for torch's CheckpointException, that of its first failure."""
    if isinstance(exc, CheckpointException) and exc.failures:
        _, failure = sorted(exc.failures.items())[0]
        exc = failure[0] if isinstance(failure, tuple) else failure
    seen = set()
    while exc.__cause__ is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__
    return exc


def describe_checkpoint_error(exc: BaseException) -> str:
    """One line for a save or load error (the first line of the innermost cause)."""
    cause = _root_cause(exc)
    if isinstance(cause, CheckpointException):  # a non-coordinator rank: torch names no cause there
        return "CheckpointException: the write failed on another rank"
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def _attempt(action: Callable[[], Any]) -> Optional[str]:
    """Run ``action``; its error as one line (None if it succeeded). KeyboardInterrupt propagates."""
    try:
        action()
    except (Exception, CheckpointException) as exc:
        return describe_checkpoint_error(exc)
    return None


def _first_failure(failure: Optional[str]) -> Optional[str]:
    """Every rank's ``failure`` (collective); the most informative one, prefixed with its rank."""
    failures: list = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    named = [(r, f) for r, f in enumerate(failures) if f is not None]
    if not named:
        return None
    specific = [(r, f) for r, f in named if "failed on another rank" not in f]
    r, f = (specific or named)[0]
    return f"rank {r}: {f}"


def _write_shards(tmp: Path, step: int, model_chunks: list, optimizer, scheduler, consumed_samples: int,
                  config_yaml: str, hooks: "SaveHooks", common: Optional[dict]) -> None:
    rank = dist.get_rank()
    state = _sharded_state(model_chunks, optimizer, is_loading=False)
    state.update(common or {})
    state.update(iteration=step, consumed_samples=consumed_samples, config_yaml=config_yaml,
                 scheduler=scheduler.state_dict() if scheduler is not None else None)
    dist_checkpointing.save(state, str(tmp))
    hooks.after_shards_written(tmp, step, rank)
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")


def _checksum_share(directory: Path) -> dict[str, str]:
    """CRC-32 of this rank's share of the files under ``directory`` (every world-th, sorted)."""
    names = checkpoint_files(directory)
    return {n: file_crc32(directory / n) for n in names[dist.get_rank()::dist.get_world_size()]}


def save_checkpoint(save_dir: str | os.PathLike, step: int, model_chunks: list, optimizer, scheduler,
                    consumed_samples: int, config_yaml: str, keep_last: int, hooks: Optional["SaveHooks"] = None,
                    common: Optional[dict] = None) -> Path:
    """Save a complete checkpoint for ``step`` (collective: every rank calls it).

    ``hooks`` (default: none) is called between phases; the reliability tests' fault injection
    (training/reliability/faults.py) is the one user. ``common``: further plain entries (numbers,
    strings, lists, dicts) of the checkpoint's common state, e.g. the trainer's data fingerprint.

    Any error on any rank raises :class:`CheckpointError` on every rank (one line: checkpoint,
    failing rank and cause, what ``latest`` still names); ``iter_N.tmp`` is removed, ``latest``
    and the checkpoints before are left as they were.
    """
    root = Path(save_dir)
    final = root / checkpoint_name(step)
    tmp = in_progress_dir(root, step)
    rank = dist.get_rank()
    hooks = hooks if hooks is not None else SaveHooks()
    _writer_results_in_process()

    def prepare() -> None:
        if rank == 0:
            begin_checkpoint(root, step)  # this run holds the lock: a leftover iter_N.tmp is its own

    checksums: dict[str, str] = {}

    def checksum() -> Optional[str]:
        """Every rank checksums its share; one gather of the shares or of a rank's error."""
        try:
            share: Any = _checksum_share(tmp)
        except OSError as exc:
            share = describe_checkpoint_error(exc)
        shares: list = [None] * dist.get_world_size()
        dist.all_gather_object(shares, share)
        failed = [(r, f) for r, f in enumerate(shares) if isinstance(f, str)]
        if failed:
            return f"rank {failed[0][0]}: {failed[0][1]}"
        for part in shares:
            checksums.update(part)
        return None

    def publish() -> None:
        if rank == 0:
            publish_checkpoint(root, step, checksums, keep_last)

    with helpers_ignore_preemption():
        failure = _first_failure(_attempt(prepare))
        if failure is None:
            failure = _first_failure(_attempt(
                lambda: _write_shards(tmp, step, model_chunks, optimizer, scheduler, consumed_samples, config_yaml,
                                      hooks, common)))
        if failure is None:
            failure = checksum()  # all ranks' files are written: agreed just above
        if failure is None:
            failure = _first_failure(_attempt(publish))
    if failure is None:
        return final
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    removed = f"; {tmp.name} removed" if not tmp.exists() else f"; {tmp.name} could not be removed"
    marker = root / LATEST_FILE
    previous = marker.read_text().strip() if marker.is_file() else "nothing"
    raise CheckpointError(f"saving checkpoint {final.name} into {tmp} failed on {failure}{removed}; "
                          f"'{LATEST_FILE}' still names {previous}")


def verify_checkpoint(path: Path) -> None:
    """Check checkpoint ``path``'s files against its manifest's checksums, each rank a share
    (collective); :class:`CheckpointError` naming the damaged file on every rank."""
    error = None
    try:
        names = sorted((read_manifest(path) or {}).get("crc32", {}))
        verify_checksums(path, names[dist.get_rank()::dist.get_world_size()])
    except (CheckpointDamaged, OSError, ValueError) as exc:
        error = str(exc)
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    found = [e for e in errors if e]
    if found:
        raise CheckpointError(f"checkpoint {path} is damaged: {found[0]}. Move {path.name} out of {path.parent} "
                              "to resume from the newest complete checkpoint before it")


def load_checkpoint(path: str | os.PathLike, model_chunks: list, optimizer, scheduler) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and (same world size) RNG; returns the common state.

    The files are verified against the manifest's checksums first; any failure raises
    :class:`CheckpointError` naming the checkpoint (and the file where known)."""
    path = Path(path)
    verify_checkpoint(path)
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
    state = _sharded_state(model_chunks, optimizer, is_loading=True)
    try:
        # nothing pickled in it may run code (checkpoint/safety.py); a damaged file fails here too
        check_megatron_checkpoint(path)
        loaded = dist_checkpointing.load(state, str(path))
    except (Exception, CheckpointException) as exc:
        raise CheckpointError(f"loading checkpoint {path} failed ({describe_checkpoint_error(exc)}). Its files may be "
                              f"damaged: move {path.name} out of {path.parent} to resume from the newest complete "
                              "checkpoint before it") from exc
    unwrap_model(model_chunks[0]).load_state_dict(loaded["model"])
    if optimizer is not None:
        _load_optimizer_state(optimizer, loaded["optimizer"])
    if scheduler is not None and loaded.get("scheduler") is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    num_rng = len(list((path / "rng").glob("rank_*.pt"))) if (path / "rng").is_dir() else 0
    if rng_file.is_file() and num_rng == dist.get_world_size():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return {"iteration": int(loaded["iteration"]), "consumed_samples": int(loaded["consumed_samples"]),
            "config_yaml": loaded.get("config_yaml"), "rng_restored": rng_file.is_file() and num_rng == dist.get_world_size()}


def load_model_weights(path: str | os.PathLike, model_chunks: list) -> None:
    """Initial weights only (a converted checkpoint or another run's); optimizer state is fresh.
    The files are verified against the manifest's checksums first (where it has them)."""
    path = Path(path)
    latest = find_latest(path)
    if latest is not None:
        path = latest
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"checkpoint.pretrained: {path} is not a megatron distributed checkpoint "
                                "(no metadata.json)")
    verify_checkpoint(path)
    check_megatron_checkpoint(path)  # also when data.validate is off
    model = unwrap_model(model_chunks[0])
    try:
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
    except (Exception, CheckpointException) as exc:
        raise CheckpointError(f"checkpoint.pretrained: loading {path} failed ({describe_checkpoint_error(exc)}); its "
                              "model must be the one model.* of this config describes") from exc
    model.load_state_dict(loaded["model"])
