"""The megatron-core versions harpe-megatron supports, and every megatron internal it relies on.

harpe-megatron subclasses a few megatron-core classes and calls a few of their non-public members.
They are all listed in :data:`INTERNALS` (what, how we use it, where), and :func:`check_megatron`
verifies at import of the modules that use them that the installed megatron-core is inside
:data:`SUPPORTED_MEGATRON` and still has each of them with the arguments we pass. An unsupported
or changed megatron-core fails there, with the installed version, the supported range and the
missing piece named, instead of deep inside a training step.

Supported: 0.16.1 (the newest release for Python 3.11) to 0.19.x (Python 3.12); both ends are
tested in CI (README, "Dependencies and support matrix"). Public API (``GPTModel``'s constructor,
``TransformerConfig``, ``dist_checkpointing.save/load``, the schedules, DDP, the optimizer, the
datasets) is not listed: a break there is megatron's own deprecation cycle, seen by the tests.

One private *torch* helper is wrapped here too, so that it has one caller-facing name:
:func:`is_fake` (``torch._subclasses.fake_tensor.is_fake``), which the memory planner's fake-tensor
paths of the RoPE kernel and the attention ask.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from dataclasses import dataclass

from torch._subclasses.fake_tensor import is_fake as _torch_is_fake

__all__ = ["SUPPORTED_MEGATRON", "INTERNALS", "Internal", "MegatronVersionError", "check_megatron",
           "megatron_version", "is_fake"]

#: Lowest (major, minor, patch) and highest (major, minor) megatron-core release supported.
SUPPORTED_MEGATRON = ((0, 16, 1), (0, 19))


class MegatronVersionError(ImportError):
    """The installed megatron-core is outside the supported range or lacks an internal we use."""


@dataclass(frozen=True)
class Internal:
    """One megatron-core member we rely on: ``module:attr[.attr]``, the arguments we pass, why."""

    target: str
    use: str
    where: str
    params: tuple[str, ...] = ()


INTERNALS: tuple[Internal, ...] = (
    Internal("megatron.core.models.gpt.gpt_model:GPTModel._preprocess",
             "overridden to return our per-head rotary input (positions or tables) instead of "
             "megatron's single-base table; returns (decoder_input, rotary_pos_emb, ...)",
             "model/gpt.py",
             ("input_ids", "position_ids", "decoder_input", "inference_context", "packed_seq_params",
              "padding_mask")),
    Internal("megatron.core.transformer.attention:SelfAttention.forward",
             "replaced by our training forward; TransformerLayer calls it with these arguments",
             "model/self_attention.py",
             ("hidden_states", "attention_mask", "rotary_pos_emb", "packed_seq_params", "inference_context")),
    Internal("megatron.core.transformer.attention:SelfAttention.get_query_key_value_tensors",
             "called by our forward: the QKV projection (and q/k norms) of this TP rank's heads",
             "model/self_attention.py", ("hidden_states", "key_value_states")),
    Internal("megatron.core.transformer.attention:Attention._checkpointed_attention_forward",
             "called by our forward for selective recomputation of the core attention",
             "model/self_attention.py", ("query", "key", "value", "attention_mask", "attn_mask_type")),
    Internal("megatron.core.models.common.embeddings.rope_utils:apply_rotary_pos_emb",
             "applies our per-head angle tables (per_head_rope: table) with megatron's unfused path",
             "model/self_attention.py", ("t", "freqs", "config", "cp_group")),
    Internal("megatron.core.transformer.transformer_block:get_num_layers_to_build",
             "layer count of this pipeline stage when building the layer specs", "model/spec.py",
             ("config", "vp_stage", "pp_rank")),
    Internal("megatron.core.tensor_parallel.random:_CUDA_RNG_STATE_TRACKER",
             "replaced by a CPU tracker on the CPU backend", "distributed/cpu.py"),
    Internal("megatron.core.tensor_parallel.random:_CUDA_RNG_STATE_TRACKER_INITIALIZED",
             "set with the CPU tracker on the CPU backend", "distributed/cpu.py"),
    Internal("megatron.core.optimizer.distrib_optimizer:HAVE_APEX_OR_TE",
             "selects the torch-Adam optimizer-state loading work-around", "checkpoint/save_load.py"),
    Internal("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.load_parameter_state_from_fully_reshardable",
             "second half of that work-around", "checkpoint/save_load.py"),
    Internal("megatron.core.dist_checkpointing.strategies.filesystem_async:_results_queue",
             "seeded with an in-process queue so synchronous saves need no Manager process",
             "checkpoint/save_load.py"),
    Internal("megatron.core.tokenizers:MegatronTokenizerBase",
             "base class of our sentencepiece tokenizer (what GPTDataset reads)", "data/tokenizer.py"),
)


def megatron_version(version: str) -> tuple[int, ...]:
    """``(major, minor, patch)`` of a version string such as ``0.19.2`` or ``0.16.1rc0``."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise MegatronVersionError(f"cannot read the megatron-core version {version!r}")
    return tuple(int(g or 0) for g in match.groups())


def _resolve(target: str):
    module_name, _, path = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _supported_text() -> str:
    (lo, hi) = SUPPORTED_MEGATRON
    return f"{'.'.join(map(str, lo))} to {hi[0]}.{hi[1]}.x"


def check_version(version: str) -> tuple[int, ...]:
    """Raise :class:`MegatronVersionError` when ``version`` is outside :data:`SUPPORTED_MEGATRON`."""
    found = megatron_version(version)
    lo, hi = SUPPORTED_MEGATRON
    if not (found >= lo and found[:2] <= hi):
        raise MegatronVersionError(
            f"megatron-core {version} is installed; harpe-megatron supports megatron-core {_supported_text()} "
            f"(0.16.1 on Python 3.11, 0.19.x on Python 3.12). Install from the lock: "
            f"pip install -c requirements/lock.txt -e . (see README, 'Dependencies and support matrix').")
    return found


def check_internals(internals: tuple[Internal, ...] = INTERNALS, version: str = "?") -> None:
    """Raise :class:`MegatronVersionError` naming every listed internal that is missing or whose
    signature lacks an argument we pass."""
    problems = []
    for item in internals:
        try:
            obj = _resolve(item.target)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{item.target} is missing ({type(exc).__name__}: {exc}); used by {item.where}: {item.use}")
            continue
        if item.params:
            names = set(inspect.signature(obj).parameters)
            missing = [p for p in item.params if p not in names]
            if missing:
                problems.append(f"{item.target} no longer takes {missing}; used by {item.where}: {item.use}")
    if problems:
        raise MegatronVersionError(
            f"megatron-core {version} lacks internals harpe-megatron relies on (supported: {_supported_text()}):\n  "
            + "\n  ".join(problems))


@functools.lru_cache(maxsize=None)
def check_megatron() -> str:
    """Check the installed megatron-core once per process; returns its version string."""
    try:
        from megatron.core.package_info import __version__ as version
    except ImportError as exc:
        raise MegatronVersionError(f"megatron-core is not installed ({exc}); pip install -c requirements/lock.txt -e .") from None
    check_version(version)
    check_internals(version=version)
    return version


def is_fake(t) -> bool:
    """Whether ``t`` is a FakeTensor (the memory planner's tensors: shapes without storage)."""
    return _torch_is_fake(t)
