"""What the memory planner counts: every live storage by category, its peak, and FLOPs by phase.

:class:`AllocationTracker` is a ``TorchDispatchMode`` that sees every op of a planned micro-step
(:mod:`harpe_megatron.planner.plan`); on fake tensors it measures what the real run would
allocate, on real tensors the same code measures the real run (the planner's agreement tests).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["AllocationTracker"]


@dataclasses.dataclass
class _Storage:
    nbytes: int
    category: str


def _causal_fraction(func, args, kwargs) -> float:
    """Share of the ``Lq x Lk`` score matrix a causal attention op computes (1.0 if not causal)."""
    names = [a.name for a in func._schema.arguments]
    bound = dict(zip(names, args)) | dict(kwargs)
    causal = bool(bound.get("is_causal", False)) or bound.get("custom_mask_type", 0) in (1, 2)
    q, k = bound.get("query"), bound.get("key")
    if not causal or q is None or k is None:
        return 1.0
    # q/k are [b, h, L, d] for the sdpa ops, [b, L, h, d] for the raw kernels
    lq, lk = (q.shape[-2], k.shape[-2]) if "scaled_dot_product" in func.__name__ else (q.shape[1], k.shape[1])
    pairs = lq * lk - lq * (lq - 1) / 2  # bottom-right aligned (= top-left when lq == lk)
    return pairs / (lq * lk)


class AllocationTracker(TorchDispatchMode):
    """Live storage bytes by category, their peak, and FLOPs by phase, for every op it sees.

    A storage is counted once (views share it) from the op that created it until it is freed
    (a weakref finalizer). ``category`` is what new storages are filed under. FLOPs go to
    ``forward`` outside autograd's backward, ``recompute`` inside megatron's checkpoint functions'
    backward (activation recomputation re-runs the forward there) and for the attention kernels'
    own recomputation of ``Q K^T`` in their backward, ``backward`` otherwise. ``attention_flops``
    holds the attention kernels' share of each (what document masking scales, planner/plan.py).
    """

    def __init__(self, vocab_local: Optional[int] = None):
        super().__init__()
        self.category = "other"
        self.vocab_local = vocab_local
        self.live: dict[str, int] = {}
        self.peak = 0
        self.peak_by_category: dict[str, int] = {}
        self.max_by_category: dict[str, int] = {}  # each category's own high-water mark
        self.flops: dict[str, float] = {"forward": 0.0, "backward": 0.0, "recompute": 0.0}
        self.attention_flops: dict[str, float] = {"forward": 0.0, "backward": 0.0, "recompute": 0.0}  # part of flops
        self._records: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.after_op: Optional[Callable[[], None]] = None

    @property
    def total(self) -> int:
        return sum(self.live.values())

    def reset_peak(self) -> None:
        self.peak = self.total
        self.peak_by_category = dict(self.live)
        self.max_by_category = dict(self.live)

    def _free(self, rec: _Storage) -> None:
        self.live[rec.category] -= rec.nbytes

    def _add(self, storage, category: str) -> None:
        if storage in self._records:
            return
        rec = _Storage(storage.nbytes(), category)
        self._records[storage] = rec
        self.live[category] = self.live.get(category, 0) + rec.nbytes
        self.max_by_category[category] = max(self.max_by_category.get(category, 0), self.live[category])
        weakref.finalize(storage, self._free, rec)
        if self.total > self.peak:
            self.peak = self.total
            self.peak_by_category = dict(self.live)

    def file_under(self, tensors, category: str) -> None:
        """Move the storages of ``tensors`` (already tracked, or adopted now) to ``category``."""
        for t in tensors:
            st = t.untyped_storage()
            rec = self._records.get(st)
            if rec is None:
                self._add(st, category)
            elif rec.category != category:
                self.live[rec.category] -= rec.nbytes
                self.live[category] = self.live.get(category, 0) + rec.nbytes
                rec.category = category
                self.max_by_category[category] = max(self.max_by_category.get(category, 0), self.live[category])

    def category_of(self, t: torch.Tensor) -> Optional[str]:
        rec = self._records.get(t.untyped_storage())
        return rec.category if rec else None

    def _count_flops(self, func, args, kwargs, out) -> None:
        node = torch._C._current_autograd_node()  # the backward node running now; None in forward
        if node is None:
            phase = "forward"
        elif "Checkpoint" in node.name():  # megatron's CheckpointFunction(s): recomputing a forward
            phase = "recompute"
        else:
            phase = "backward"
        fraction = _causal_fraction(func, args, kwargs)
        flops = flop_registry[func.overloadpacket](*args, **kwargs, out_val=out) * fraction
        if phase == "backward" and "attention_backward" in func.__name__:
            # flop_counter's attention backward includes the kernel's recomputation of Q K^T
            names = [a.name for a in func._schema.arguments]
            bound = dict(zip(names, args)) | dict(kwargs)
            q, k = bound.get("query"), bound.get("key")
            if q is not None and k is not None:
                if "scaled_dot_product" in func.__name__:  # [b, h, s, d]
                    (b, h, sq, d), sk = q.shape, k.shape[-2]
                else:  # raw kernels: [b, s, h, d]
                    (b, sq, h, d), sk = q.shape, k.shape[1]
                redo = 2 * b * h * sq * sk * d * fraction
                self.flops["recompute"] += redo
                self.attention_flops["recompute"] += redo
                flops -= redo
        self.flops[phase] += flops
        if "attention" in func.__name__:
            self.attention_flops[phase] += flops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.after_op is not None:
            self.after_op()
        packet = func.overloadpacket
        if packet in flop_registry:
            self._count_flops(func, args, kwargs, out)
        name = func.__name__
        category = self.category
        tensor_args = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if "allgather" in name and tensor_args and tensor_args[0].dim() == 4:
            self.file_under(tensor_args[:1], "cp_kv_gathered")  # [s, b, ng, d]: K or V over the CP group
        elif packet not in flop_registry and tensor_args and self.category_of(tensor_args[0]) == "cp_kv_gathered":
            category = "cp_kv_gathered"  # reorder / slice / copy of the gathered K/V
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                cat = category
                if self.vocab_local and t.dim() >= 2 and t.shape[-1] == self.vocab_local:
                    cat = "logits_and_loss"
                self._add(t.untyped_storage(), cat)
        return out
