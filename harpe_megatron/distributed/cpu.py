"""CUDA -> CPU redirection so that the real megatron-core stack runs on a machine without a GPU.

megatron-core allocates with ``device=torch.cuda.current_device()``, calls ``Tensor.cuda()``,
asks ``Tensor.type()`` for a ``torch.cuda.*`` name and forks a CUDA RNG tracker around
tensor-parallel initialisation and dropout. None of that is needed for correctness, so on CPU we:

* run everything under a :class:`~torch.overrides.TorchFunctionMode` that rewrites CUDA devices
  (``"cuda"``, ``"cuda:N"``, ``torch.device("cuda")`` and bare integers) to ``"cpu"``, drops
  ``pin_memory``, makes ``Tensor.cuda()`` / ``Tensor.pin_memory()`` no-ops and
  reports ``Tensor.type()`` with the ``torch.cuda.`` prefix;
* replace a handful of ``torch.cuda`` functions (``current_device``, ``synchronize``,
  ``manual_seed`` ...) by CPU stand-ins while the harness is active, restoring them afterwards;
* install an RNG tracker whose ``fork()`` is a no-op (CPU runs use one global generator).

This module is used only by the CPU path (tests, the CPU demo). Nothing in the model or training
code knows about it; on a GPU it is never entered. See docs/cpu_harness.md.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["cpu_megatron", "CpuRNGStatesTracker"]

_STATE = threading.local()


def _cpu_device(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _run_backward_redirected(mode: TorchFunctionMode, tensors, grad_tensors, retain_graph, create_graph) -> None:
    """Backward with the redirection active inside autograd Functions' ``backward``.

    A TorchFunctionMode is switched off while its own handler runs, and ``torch.autograd.backward``
    dispatches to the handler, so the backward passes of megatron's collectives (which allocate
    on ``torch.cuda.current_device()``) would run unredirected. We therefore call the autograd
    engine directly with the mode pushed again -- the same engine call megatron's own
    ``custom_backward`` makes.
    """
    from torch.autograd import Variable

    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    if grad_tensors is None:
        grad_tensors = (None,) * len(tensors)
    elif isinstance(grad_tensors, torch.Tensor):
        grad_tensors = (grad_tensors,)
    grads = []
    for t, g in zip(tensors, grad_tensors):
        if g is None:
            if t.numel() != 1:
                raise RuntimeError("grad can be implicitly created only for scalar outputs")
            g = torch.ones_like(t)
        grads.append(g)
    keep = create_graph if retain_graph is None else retain_graph
    with mode:
        Variable._execution_engine.run_backward(
            tensors, tuple(grads), keep, create_graph, tuple(), allow_unreachable=True, accumulate_grad=True
        )


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement requests to CPU (see module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            names = ("tensors", "grad_tensors", "retain_graph", "create_graph")
            if func is torch.Tensor.backward:
                names = ("tensors", "gradient", "retain_graph", "create_graph")
            bound = dict(zip(names, args))
            bound.update(kwargs)
            if bound.get("inputs") is not None or bound.get("grad_variables") is not None:
                return func(*args, **kwargs)
            _run_backward_redirected(
                self, bound[names[0]], bound.get(names[1]), bound.get("retain_graph"),
                bool(bound.get("create_graph", False)),
            )
            return None
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.is_pinned:
            return False
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to:
            args = tuple(_cpu_device(a) if isinstance(a, (str, torch.device)) else a for a in args)
            if len(args) > 1 and isinstance(args[1], int) and not isinstance(args[1], bool):
                args = (args[0], torch.device("cpu")) + args[2:]
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """Stand-in for megatron's CudaRNGStatesTracker: named states are accepted, fork is a no-op.

    On CPU all ranks draw from the global torch generator, which the callers seed explicitly.
    Dropout is off in every shipped Llama config, so this changes no result of ours.
    """

    def __init__(self, *args, **kwargs):
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self) -> bool:
        return True

    def reset(self) -> None:
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self.seeds_.add(seed)
        self.states_[name] = torch.tensor([seed])

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        yield


class _Event:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


class _Stream(_Event):
    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass


_CUDA_REPLACEMENTS: dict[str, Any] = {
    "current_device": lambda: 0,
    "device_count": lambda: 1,
    "set_device": lambda *a, **k: None,
    "synchronize": lambda *a, **k: None,
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: the CPU generator is already seeded.
    "manual_seed": lambda seed: None,
    "manual_seed_all": lambda seed: None,
    "get_rng_state": lambda *a, **k: torch.get_rng_state(),
    "set_rng_state": lambda state, *a, **k: torch.set_rng_state(state),
    "memory_allocated": lambda *a, **k: 0,
    "max_memory_allocated": lambda *a, **k: 0,
    "memory_reserved": lambda *a, **k: 0,
    "max_memory_reserved": lambda *a, **k: 0,
    "reset_peak_memory_stats": lambda *a, **k: None,
    "empty_cache": lambda *a, **k: None,
    "Event": _Event,
    "Stream": _Stream,
    "current_stream": lambda *a, **k: _Stream(),
    "default_stream": lambda *a, **k: _Stream(),
    "stream": lambda *a, **k: contextlib.nullcontext(),
}


# megatron's activation checkpointing reads torch.cuda.random.get_rng_state directly.
_CUDA_RANDOM_REPLACEMENTS = ("get_rng_state", "set_rng_state")


@contextlib.contextmanager
def cpu_megatron(seed: int | None = None) -> Iterator[None]:
    """Run megatron-core on CPU inside this context (re-entrant).

    Args:
        seed: when given, seeds torch's global generator (every CPU "device" RNG).
    """
    from megatron.core.tensor_parallel import random as mcore_random

    depth = getattr(_STATE, "depth", 0)
    if depth > 0:
        _STATE.depth = depth + 1
        try:
            yield
        finally:
            _STATE.depth -= 1
        return

    import torch.cuda.random as cuda_random

    saved_cuda = {name: getattr(torch.cuda, name) for name in _CUDA_REPLACEMENTS}
    saved_random = {name: getattr(cuda_random, name) for name in _CUDA_RANDOM_REPLACEMENTS}
    for name in _CUDA_RANDOM_REPLACEMENTS:
        setattr(cuda_random, name, _CUDA_REPLACEMENTS[name])
    saved_tracker = (mcore_random._CUDA_RNG_STATE_TRACKER, mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED)
    for name, fn in _CUDA_REPLACEMENTS.items():
        setattr(torch.cuda, name, fn)
    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    if seed is not None:
        torch.manual_seed(seed)
    _STATE.depth = 1
    try:
        with _CudaToCpuMode():
            yield
    finally:
        _STATE.depth = 0
        for name, fn in saved_cuda.items():
            setattr(torch.cuda, name, fn)
        for name, fn in saved_random.items():
            setattr(cuda_random, name, fn)
        mcore_random._CUDA_RNG_STATE_TRACKER, mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = saved_tracker
