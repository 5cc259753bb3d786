"""Training checkpoints on megatron's dist_checkpointing: atomic, resumable, resharding.

Layout of a save directory::

    <save>/latest              text file naming the newest *complete* checkpoint ("iter_0000200")
    <save>/iter_0000200/       a megatron distributed checkpoint:
        model / optimizer      sharded tensors (any TP/PP/CP/DP layout can load them)
        (common state)         iteration, consumed samples, LR scheduler, resolved config
        rng/rank_00000.pt      per-rank RNG states (tensors only; loaded with weights_only=True)
        harpe_manifest.json    every file of the checkpoint with its size, written last
    <save>/iter_0000300.tmp/   a save in progress (or interrupted): never pointed to

A save writes into ``iter_N.tmp``, every rank finishes, rank 0 writes the manifest, renames the
directory to ``iter_N``, replaces ``latest`` atomically (write + fsync + rename) and prunes all
but the newest ``keep_last`` complete checkpoints (and older interrupted ``.tmp`` saves). A crash
or an error (full disk: ``OSError``) at any point leaves ``latest`` naming a complete checkpoint.

Complete = ``metadata.json`` present and, where there is a manifest (every checkpoint this code
saves), every listed file present with its listed size (a truncated or missing file makes the
checkpoint incomplete). :func:`resolve_checkpoint` picks what to resume from: the checkpoint
named by ``latest`` if complete; otherwise, with a warning naming the problem, the newest
complete one; it also names every partial directory (which is ignored). A file that passes the
size check but cannot be read fails the load with an error naming the checkpoint and the cause.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from harpe_megatron.compat import check_megatron
from harpe_megatron.checkpoint.safety import check_megatron_checkpoint
from harpe_megatron.training.faults import fault_at

check_megatron()  # supported megatron-core, internals we subclass present (compat.py)

__all__ = [
    "LATEST_FILE",
    "checkpoint_name",
    "CheckpointScan",
    "find_latest",
    "incomplete_reason",
    "list_checkpoints",
    "resolve_checkpoint",
    "scan_checkpoints",
    "save_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "unwrap_model",
]

LATEST_FILE = "latest"
MANIFEST_FILE = "harpe_manifest.json"
_ITER_DIR = re.compile(r"^iter_(\d{7})$")
_TMP_DIR = re.compile(r"^iter_(\d{7})\.tmp$")
# "fully_reshardable": canonical per-parameter optimizer state, so a checkpoint resumes at another
# TP/PP/DP layout (gathered on DP rank 0 when saving; fine for the sizes we save).
_OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def list_checkpoints(save_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Checkpoint directories (``iter_N``, complete or not) under ``save_dir``, oldest first."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _ITER_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def incomplete_reason(path: Path) -> Optional[str]:
    """Why ``path`` is not a complete checkpoint (None if it is; see the module docstring)."""
    if not path.is_dir():
        return "does not exist"
    if not (path / "metadata.json").is_file():
        return "has no metadata.json (megatron never finished writing it)"
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        return None  # saved without a manifest (converter output, older runs): metadata.json is all we know
    try:
        sizes = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"has an unreadable {MANIFEST_FILE} ({exc})"
    for name, size in sorted(sizes.items()):
        f = path / name
        if not f.is_file():
            return f"is missing {name} (listed in {MANIFEST_FILE})"
        actual = f.stat().st_size
        if actual != size:
            return f"has a truncated or damaged file {name}: {actual} bytes, {MANIFEST_FILE} says {size}"
    return None


@dataclass
class CheckpointScan:
    """What a save directory holds: complete checkpoints (oldest first) and partial directories."""

    complete: list[tuple[int, Path]] = field(default_factory=list)
    partial: list[tuple[Path, str]] = field(default_factory=list)  # (directory, why)


def scan_checkpoints(save_dir: str | os.PathLike) -> CheckpointScan:
    """Sort every ``iter_N`` / ``iter_N.tmp`` directory under ``save_dir`` into complete and partial."""
    scan = CheckpointScan()
    root = Path(save_dir)
    if not root.is_dir():
        return scan
    for child in sorted(root.iterdir()):
        if _TMP_DIR.match(child.name):
            scan.partial.append((child, "is an interrupted save (.tmp)"))
    for step, path in list_checkpoints(root):
        reason = incomplete_reason(path)
        if reason is None:
            scan.complete.append((step, path))
        else:
            scan.partial.append((path, reason))
    return scan


def resolve_checkpoint(load_dir: str | os.PathLike) -> tuple[Optional[Path], list[str]]:
    """``(checkpoint to resume from or None, warnings)`` for ``load_dir`` (no collective).

    Policy: ``latest`` if it names a complete checkpoint; else the newest complete one, with a
    warning; None if the directory has neither ``latest`` nor any complete checkpoint. A
    ``latest`` with no complete checkpoint at all to fall back on raises (starting over from
    scratch would silently throw the run away).
    """
    root = Path(load_dir)
    scan = scan_checkpoints(root)
    warnings_ = [f"ignoring partial checkpoint {p}: it {why}" for p, why in scan.partial]
    marker = root / LATEST_FILE
    if marker.is_file():
        name = marker.read_text().strip()
        named = root / name
        reason = "is not a checkpoint name" if not _ITER_DIR.match(name) else incomplete_reason(named)
        if reason is None:
            return named, warnings_
        if not scan.complete:
            raise RuntimeError(f"{marker} names {name!r}, which {reason}, and {root} holds no other complete "
                               "checkpoint to fall back on")
        fallback = scan.complete[-1][1]
        warnings_.append(f"WARNING: {marker} names {name!r}, which {reason}; resuming from the newest complete "
                         f"checkpoint {fallback.name} instead")
        return fallback, warnings_
    if scan.complete:
        fallback = scan.complete[-1][1]
        warnings_.append(f"WARNING: {root} has no '{LATEST_FILE}' file; resuming from the newest complete "
                         f"checkpoint {fallback.name}")
        return fallback, warnings_
    return None, warnings_


def find_latest(load_dir: str | os.PathLike) -> Optional[Path]:
    """The checkpoint :func:`resolve_checkpoint` picks (its warnings go to ``warnings.warn``)."""
    import warnings

    path, messages = resolve_checkpoint(load_dir)
    for msg in messages:
        if msg.startswith("WARNING"):
            warnings.warn(msg, stacklevel=2)
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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


def _write_manifest(directory: Path) -> None:
    """List every file under ``directory`` with its size (written last, so its presence means done)."""
    files = {}
    for dirpath, _, names in os.walk(directory):
        for n in names:
            f = Path(dirpath) / n
            files[str(f.relative_to(directory))] = f.stat().st_size
    _write_atomic(directory / MANIFEST_FILE, json.dumps({"files": files}, indent=0, sort_keys=True))


def _prune(root: Path, keep_last: int, newest: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; drop partial saves older than ``newest``."""
    if keep_last > 0:
        complete = [p for _, p in list_checkpoints(root) if incomplete_reason(p) is None]
        for old in complete[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    for child in root.iterdir():
        match = _TMP_DIR.match(child.name)
        if match and int(match.group(1)) < newest:
            shutil.rmtree(child, ignore_errors=True)


def save_checkpoint(save_dir: str | os.PathLike, step: int, model_chunks: list, optimizer, scheduler,
                    consumed_samples: int, config_yaml: str, keep_last: int) -> Path:
    """Save a complete checkpoint for ``step`` (collective: every rank calls it).

    Any error (e.g. ``OSError`` of a full disk) is re-raised with the checkpoint's name; ``latest``
    and the checkpoints before are left as they were.
    """
    root = Path(save_dir)
    final = root / checkpoint_name(step)
    tmp = root / (checkpoint_name(step) + ".tmp")
    rank = dist.get_rank()
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left by an interrupted save of the same step
            tmp.mkdir()
        dist.barrier()
        state = _sharded_state(model_chunks, optimizer, is_loading=False)
        state.update(iteration=step, consumed_samples=consumed_samples, config_yaml=config_yaml,
                     scheduler=scheduler.state_dict() if scheduler is not None else None)
        dist_checkpointing.save(state, str(tmp))
        if fault_at("crash_in_save", step, rank):
            print(f"[harpe] fault injection: rank {rank} dies in the middle of saving {tmp}", flush=True)
            os._exit(137)
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
        dist.barrier()
        if rank == 0:
            _write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(root / LATEST_FILE, final.name + "\n")
            _prune(root, keep_last, step)
        dist.barrier()
    except Exception as exc:
        marker = root / LATEST_FILE
        previous = marker.read_text().strip() if marker.is_file() else "nothing"
        raise RuntimeError(f"rank {rank}: saving checkpoint {final.name} into {tmp} failed ({type(exc).__name__}: "
                           f"{exc}); '{LATEST_FILE}' still names {previous}") from exc
    return final


def load_checkpoint(path: str | os.PathLike, model_chunks: list, optimizer, scheduler) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and (same world size) RNG; returns the common state."""
    path = Path(path)
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
    state = _sharded_state(model_chunks, optimizer, is_loading=True)
    try:
        # nothing pickled in it may run code (checkpoint/safety.py); a damaged file fails here too
        check_megatron_checkpoint(path)
        loaded = dist_checkpointing.load(state, str(path))
    except Exception as exc:
        raise RuntimeError(f"loading checkpoint {path} failed ({type(exc).__name__}: {exc}). Its files may be "
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
    """Initial weights only (a converted checkpoint or another run's); optimizer state is fresh."""
    path = Path(path)
    latest = find_latest(path)
    if latest is not None:
        path = latest
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"checkpoint.pretrained: {path} is not a megatron distributed checkpoint "
                                "(no metadata.json)")
    check_megatron_checkpoint(path)  # also when data.validate is off
    model = unwrap_model(model_chunks[0])
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
    model.load_state_dict(loaded["model"])
