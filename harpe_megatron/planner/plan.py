"""Memory and FLOP plan of a run for one rank of its layout, without a GPU and without memory.

``plan_layout(cfg, world_size, builders)`` builds the real model, DDP and optimizer with the
trainer's ``build_training_model`` / ``build_optimizer`` and runs one training micro-step through
megatron's forward/backward schedule (the configured recomputation, CP attention, loss) under
``FakeTensorMode``: every tensor has its real shape, dtype and lifetime but no storage. A
``TorchDispatchMode`` (:class:`~harpe_megatron.planner.tracker.AllocationTracker`) sees every op,
keeps the bytes of every live storage (freed when the storage dies) by category, the peak and what
was live at the peak, and
counts FLOPs with torch's ``flop_counter`` formulas (causal attention counted as computed).
Process groups: a fake backend of the full world size (:mod:`planner.plan_run`,
``tools/plan_run.py``), or the run's own groups (the training pre-flight, :func:`preflight`:
collectives on fake tensors move nothing).

What is **modelled** vs **measured**:

* measured (from the tensors the real code creates): bf16 params (DDP's param buffer), fp32 main
  grads (DDP's grad buffer), the distributed optimizer's fp32 master shard, and the live bytes
  during forward + backward of one micro-batch: activations kept for backward, the recompute
  working set, CP-gathered K/V, logits and loss temporaries, collective buffers;
* modelled: Adam's two fp32 moments (``2 x`` the master shard; torch creates them at the first
  optimizer step, the plan adds them as if present); CP attention's lower-right chunks run the
  flash op that ``causal_lower_right`` dispatches to on GPU (attention.py; ``CausalBias`` cannot
  be wrapped by fake tensors); non-CP attention runs the same flash op;
* not included: the CUDA context and NCCL buffers (~1-3 GiB), allocator fragmentation, the
  optimizer step's own temporaries (at most about one fp32 shard, far below the activation peak
  at long context), the DP gradient reduce-scatter and the distributed optimizer's parameter
  all-gather (both in place in DDP's buffers; not run), pipeline parallelism (only PP 1 is
  planned). The margin (``margin_gib``) stands for these.

One micro-batch is planned: with PP 1 megatron runs micro-batches one after the other, so the
peak does not grow with their number (FLOPs are multiplied by it).

Document masking (``data.document_masking``): fake tensors hold no document ids, so the planned
attention is the causal flash op of each chunk, i.e. one document per row. That is the memory of
the real run (the varlen kernel keeps the same output and log-sum-exp) but not its FLOPs: the
attention kernels' FLOPs (counted apart by the tracker) are scaled by the fraction of attended
pairs that document masking leaves for the data's document lengths
(:func:`~harpe_megatron.data.documents.data_attention_fraction`: the ``data.paths`` documents
packed into rows of ``data.seq_length``). ``flops_per_step`` and ``analytic_flops_per_step`` are
then the masked figures, ``masked_attention_fraction`` says by how much; when the data cannot be
read the fraction is ``None`` and the FLOPs stay at the one-document-per-row bound (the summary
says so).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from harpe_megatron.config.model import padded_vocab_size
from harpe_megatron.config.run import RunConfig
from harpe_megatron.data.documents import data_attention_fraction
from harpe_megatron.distributed.bringup import current_device, megatron_parallel
from harpe_megatron.planner.tracker import AllocationTracker
from harpe_megatron.step.metrics import training_flops, training_flops_per_token
from harpe_megatron.step.schedule import forward_step

__all__ = ["RunPlan", "Builders", "plan_layout", "fake_world", "megatron_layout", "preflight",
           "PreflightError"]


@dataclasses.dataclass(frozen=True)
class Builders:
    """The trainer's ``build_training_model`` and ``build_optimizer`` (step/build.py), passed in: the
    trainer's pre-flight builds the optimizer with megatron's gloo groups, the fake-world planner
    (plan_run.py) without them."""

    model: Callable[[RunConfig], tuple[list, Any]]  # cfg -> ([DDP chunk], TransformerConfig)
    optimizer: Callable[[RunConfig, list, int], tuple[Any, Any]]  # (cfg, chunks, iters) -> (optimizer, scheduler)


GIB = 2**30
BREAKDOWN = ("params_bf16", "main_grads_fp32", "optimizer_shard", "activations", "cp_kv_gathered",
             "logits_and_loss", "other")


class PreflightError(RuntimeError):
    """``training.preflight: fail`` and the plan does not fit the device."""


# --------------------------------------------------------------------------------------------
# the plan


@dataclasses.dataclass
class RunPlan:
    """The plan of one layout for one rank (rank 0; with PP 1 every rank holds the same)."""

    config_name: str
    world_size: int
    layout: dict[str, int]  # tp, cp, pp, dp
    seq_length: int
    micro_batch_size: int
    num_microbatches: int
    recompute: str
    peak_bytes: int
    breakdown_bytes: dict[str, int]  # what was live at the peak, by category
    category_max_bytes: dict[str, int]  # each category's own maximum during the step (e.g. logits at the loss)
    static_bytes: int
    params_local: int  # parameters of this rank (sum of numel)
    buffer_elements: int  # elements of DDP's param/grad buffers (params + megatron's alignment padding)
    flops_per_rank_microbatch: dict[str, float]  # forward / backward / recompute, counted
    flops_per_step: float  # counted model FLOPs of the whole step, all ranks, recompute excluded
    executed_flops_per_step: float  # the same with recomputation (what the GPUs execute)
    analytic_flops_per_step: float  # training_flops_per_token x tokens per step (the MFU formula)
    planning_s: float = 0.0
    gpu_memory_gib: Optional[float] = None
    margin_gib: float = 0.0
    suggestion: Optional[dict[str, Any]] = None  # the smallest checked change that fits
    document_masking: bool = False
    attention_flops_per_step: float = 0.0  # the attention kernels' part of flops_per_step
    masked_attention_fraction: Optional[float] = None  # attended pairs masked / causal, from the data

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    @property
    def fits(self) -> Optional[bool]:
        if self.gpu_memory_gib is None:
            return None
        return self.peak_gib + self.margin_gib <= self.gpu_memory_gib

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(peak_gib=round(self.peak_gib, 3), fits=self.fits,
                   breakdown_gib={k: round(v / GIB, 3) for k, v in self.breakdown_bytes.items()},
                   flops_vs_analytic=self.flops_per_step / self.analytic_flops_per_step)
        return out

    def summary(self) -> str:
        lay = self.layout
        parts = [f"{self.config_name}: TP {lay['tp']} x CP {lay['cp']} x PP {lay['pp']} x DP {lay['dp']} "
                 f"(world {self.world_size}), seq {self.seq_length:,}, micro-batch {self.micro_batch_size}, "
                 f"recompute {self.recompute}: predicted peak {self.peak_gib:.2f} GiB per rank"]
        if self.gpu_memory_gib is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            parts.append(f"{verdict} {self.gpu_memory_gib:g} GiB with a {self.margin_gib:g} GiB margin")
        if self.document_masking:
            f = self.masked_attention_fraction
            parts.append("document masking: attention FLOPs at the one-document-per-row bound (data.paths "
                         "unreadable, document lengths unknown)" if f is None else
                         f"document masking: attention FLOPs x {f:.3f} (the data's document lengths)")
        return "; ".join(parts)


@contextlib.contextmanager
def fake_world(world_size: int) -> Iterator[None]:
    """A default process group of ``world_size`` ranks on torch's fake backend, as rank 0.

    Nothing communicates: collectives return at once. Needs a process without a process group.
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore  # torch's fake backend

    if dist.is_initialized():
        raise RuntimeError("fake_world: this process already has a process group; plan in a fresh process "
                           "(tools/plan_run.py) or use plan_layout with the existing parallel state")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def megatron_layout(cfg: RunConfig) -> Iterator[None]:
    """megatron's parallel state for ``cfg``'s layout on the current (fake or real) process group,
    through the one bring-up: no seeding (planning leaves the generators alone) and no gloo twins
    of the groups (torch's fake backend cannot host them)."""
    p = cfg.parallel
    with megatron_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size,
                           seed=None, gloo_groups=False):
        yield


@contextlib.contextmanager
def _isolated() -> Iterator[None]:
    """Leave no trace of planning in the process: RNG states and megatron's cached buffers."""
    buffer = parallel_state._GLOBAL_MEMORY_BUFFER  # megatron caches SP all-gather buffers here
    saved = dict(buffer.buffer) if buffer is not None else None
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            if buffer is not None:
                buffer.buffer.clear()
                buffer.buffer.update(saved)


@contextlib.contextmanager
def _object_collectives_outside_fake_mode() -> Iterator[None]:
    """``all_gather_object`` pickles into tensors and reads their sizes, which fake tensors cannot
    give. While planning: on the fake backend every rank holds the same objects (each rank of a
    PP-1 layout builds the same param groups), so the gather is answered locally; on real process
    groups (the pre-flight) it runs for real, outside fake mode."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    original = dist.all_gather_object

    def all_gather_object(object_list, obj, group=None):
        if dist.get_backend(group) == "fake":
            object_list[:] = [obj] * len(object_list)
            return None
        with unset_fake_temporarily():
            return original(object_list, obj, group=group)

    dist.all_gather_object = all_gather_object
    try:
        yield
    finally:
        dist.all_gather_object = original


def _fake_mode():
    """``FakeTensorMode`` for planning, and a function to call after every op (see below).

    Real tensors reaching an op (megatron's CPU initialisation) are converted to fake ones, and
    the converter's memo keeps a weakref to each result. A parameter with a weakref cannot be
    swapped, and ``Module._apply`` always swaps fake parameters, so ``Float16Module``'s cast
    would fail. The memo is only needed within one conversion, so it is emptied after every op.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    return mode, mode.fake_tensor_converter.meta_converter.tensor_memo.clear


def _batch(cfg: RunConfig, vocab: int) -> dict[str, torch.Tensor]:
    """One micro-batch of this rank's CP share, as the data pipeline hands it to ``forward_step``."""
    device = current_device()
    shape = (cfg.training.micro_batch_size, cfg.data.seq_length // cfg.parallel.context_parallel_size)
    tokens = torch.randint(0, vocab, shape, device=device)
    batch = {"tokens": tokens, "labels": tokens.clone(),
             "loss_mask": torch.ones(shape, dtype=torch.float32, device=device),
             "position_ids": torch.arange(shape[1], device=device).expand(shape).contiguous()}
    if cfg.data.document_masking:  # one document per row (module docstring)
        batch["document_ids"] = torch.zeros(shape, dtype=torch.int64, device=device)
        batch["token_index"] = batch["position_ids"].clone()
        batch["attention_keys"] = (batch["position_ids"] + 1).to(torch.float32)
    return batch


def _unique_storages(tensors) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        key = id(t.untyped_storage())
        if t is not None and key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _adam_moment_bytes(optimizer) -> int:
    """Bytes of Adam's exp_avg + exp_avg_sq for the parameters the torch optimizer updates (the
    fp32 master shard with the distributed optimizer): two tensors of each parameter's size and dtype."""
    total = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in opt.optimizer.param_groups:
            total += sum(2 * p.numel() * p.element_size() for p in group["params"])
    return total


def plan_layout(cfg: RunConfig, world_size: int, build: Builders, fake: bool = True, name: str = "run",
                tracker: Optional[AllocationTracker] = None,
                inspect: Optional[Callable[[list, Any], None]] = None) -> RunPlan:
    """Plan ``cfg`` for rank 0 with megatron's parallel state already initialised for it.

    ``fake=False`` runs the same code on real tensors (small configs; what the agreement tests
    compare against); ``inspect(chunks, optimizer)`` is then called after the micro-step. Nothing
    of the planning survives: RNG states and megatron's buffer cache are restored.
    """
    if cfg.parallel.pipeline_model_parallel_size != 1:
        raise NotImplementedError("the planner covers pipeline_model_parallel_size 1 only")
    start = time.perf_counter()
    tp, cp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.context_parallel_size
    dp = cfg.data_parallel_size(world_size)
    vocab = padded_vocab_size(cfg.model.vocab_size, tp, cfg.model.make_vocab_size_divisible_by)
    tracker = tracker or AllocationTracker(vocab_local=vocab // tp)
    modes, tracker.after_op = _fake_mode() if fake else (contextlib.nullcontext(), None)
    with _isolated(), _object_collectives_outside_fake_mode(), modes, tracker:
        tracker.category = "model"
        chunks, tconfig = build.model(cfg)
        # The DP gradient reduction is left out: a reduce-scatter/all-reduce in place inside the
        # grad buffer (no memory), and the fake backend has no coalesced collectives.
        tconfig.finalize_model_grads_func = None
        tconfig.grad_sync_func = None
        for c in chunks:  # likewise the distributed optimizer's param all-gather (in place in the param buffer)
            if getattr(c, "use_forward_hook", False):
                c.disable_forward_pre_hook(param_sync=False)
        tracker.category = "optimizer"
        optimizer, _ = build.optimizer(cfg, chunks, max(cfg.training.train_iters or 1, 1))
        params = _unique_storages(p for c in chunks for p in c.parameters())
        grads = _unique_storages(p.main_grad for c in chunks for p in c.parameters()
                                 if getattr(p, "main_grad", None) is not None)
        tracker.file_under(params, "params_bf16")
        tracker.file_under(grads, "main_grads_fp32")
        for cat in ("model", "optimizer"):  # what else the build left alive
            target = "optimizer_shard" if cat == "optimizer" else "other"
            tracker.live[target] = tracker.live.get(target, 0) + tracker.live.pop(cat, 0)
            for rec in tracker._records.values():
                if rec.category == cat:
                    rec.category = target
        moments = _adam_moment_bytes(optimizer)
        tracker.live["optimizer_shard"] += moments  # created by the first optimizer step
        static = tracker.total
        tracker.reset_peak()
        tracker.category = "activations"
        batch = _batch(cfg, cfg.model.vocab_size)
        for c in chunks:
            c.train()
        with contextlib.ExitStack() as no_sync:
            for c in chunks:
                no_sync.enter_context(c.no_sync())
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([batch]), model=chunks, num_microbatches=1,
                seq_length=cfg.data.seq_length, micro_batch_size=cfg.training.micro_batch_size, forward_only=False,
            )
        del batch
        peak, by_cat, cat_max = tracker.peak, dict(tracker.peak_by_category), dict(tracker.max_by_category)
        params_local = sum(p.numel() for c in chunks for p in c.parameters())
        buffer_elements = sum(b.grad_data.numel() for c in chunks for b in c.buffers)
        if inspect is not None:
            inspect(chunks, optimizer)
    nmb = cfg.num_microbatches(world_size)
    flops, attn = dict(tracker.flops), dict(tracker.attention_flops)
    model_flops = (flops["forward"] + flops["backward"]) * nmb * world_size
    executed_flops = model_flops + flops["recompute"] * nmb * world_size
    attention_flops = (attn["forward"] + attn["backward"]) * nmb * world_size
    t = cfg.training
    tokens_per_step = t.global_batch_size * cfg.data.seq_length
    analytic = training_flops_per_token(cfg.model, cfg.data.seq_length) * tokens_per_step
    fraction = None
    if cfg.data.document_masking:
        fraction = data_attention_fraction(cfg.data.paths, cfg.data.weights, cfg.data.seq_length, t.seed)
    if fraction is not None:  # module docstring: only the attention kernels' FLOPs shrink
        model_flops -= attention_flops * (1 - fraction)
        executed_flops -= (attention_flops + attn["recompute"] * nmb * world_size) * (1 - fraction)
        attention_flops *= fraction
        analytic = training_flops(cfg.model, tokens_per_step, fraction * tokens_per_step * cfg.data.seq_length / 2)
    recompute = t.recompute_granularity or "none"
    if t.recompute_granularity == "full":
        recompute = f"full/{t.recompute_method}/{t.recompute_num_layers}"
    return RunPlan(
        config_name=name, world_size=world_size, layout=dict(tp=tp, cp=cp, pp=1, dp=dp),
        seq_length=cfg.data.seq_length, micro_batch_size=t.micro_batch_size, num_microbatches=nmb,
        recompute=recompute, peak_bytes=peak,
        breakdown_bytes={k: by_cat.get(k, 0) for k in BREAKDOWN},
        category_max_bytes={k: cat_max.get(k, 0) for k in BREAKDOWN}, static_bytes=static,
        params_local=params_local, buffer_elements=buffer_elements,
        flops_per_rank_microbatch=flops, flops_per_step=model_flops, executed_flops_per_step=executed_flops,
        analytic_flops_per_step=analytic, planning_s=time.perf_counter() - start,
        document_masking=cfg.data.document_masking, attention_flops_per_step=attention_flops,
        masked_attention_fraction=fraction,
    )


def preflight(cfg: RunConfig, world_size: int, build: Builders, log: Callable[[str], None],
              device_memory_gib: Optional[float] = None) -> Optional[RunPlan]:
    """``training.preflight``: plan this run on its own process groups before anything is allocated.

    Prints one line with the predicted per-rank peak (and, on CUDA or with ``device_memory_gib``,
    whether it fits that memory); ``fail`` raises :class:`PreflightError` when it does not. Every
    rank plans (collectives on fake tensors communicate nothing).
    """
    mode = cfg.training.preflight
    if mode == "off":
        return None
    if cfg.parallel.pipeline_model_parallel_size != 1:
        log("preflight: skipped (the memory planner covers pipeline_model_parallel_size 1 only)")
        return None
    plan = plan_layout(cfg, world_size, build)
    if device_memory_gib is None and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(current_device())
        device_memory_gib = props.total_memory / GIB
    if device_memory_gib is not None:
        plan.gpu_memory_gib = device_memory_gib
        plan.margin_gib = cfg.training.preflight_margin_gib
    top = sorted(plan.breakdown_bytes.items(), key=lambda kv: -kv[1])[:3]
    log(f"preflight: {plan.summary()} ({', '.join(f'{k} {v / GIB:.2f}' for k, v in top)} GiB; "
        f"planned in {plan.planning_s:.1f} s)")
    if plan.fits is False and mode == "fail":
        raise PreflightError(
            f"training.preflight=fail: predicted peak {plan.peak_gib:.2f} GiB + margin {plan.margin_gib:g} GiB "
            f"exceeds the device's {plan.gpu_memory_gib:.1f} GiB; run tools/plan_run.py with this config for a "
            "change that fits, or set training.preflight: warn")
    return plan


