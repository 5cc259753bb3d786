"""The training loop on megatron-core: DDP, (distributed) optimizer, schedules, checkpoints.

One step = one global batch: ``num_microbatches`` micro-batches per data-parallel rank through
megatron's forward/backward schedule (1F1B when pipeline parallel), gradients reduced by
megatron's DDP and divided by the global token count (``calculate_per_token_loss``), one
optimizer step (with gradient clipping), one LR-scheduler step. The logged loss is the global
token-weighted mean over DP x CP and all micro-batches.

Reliability (docs/reliability.md):

* preemption: SIGTERM/SIGUSR1 on any rank -> every rank finishes the step, saves, and ``train``
  returns with ``preempted=True`` (the CLI exits with ``PREEMPTED_EXIT_CODE``);
* a step whose global loss or any gradient is non-finite is skipped (no optimizer or LR-schedule
  step; its data is *not* replayed), counted, logged; more than
  ``training.max_consecutive_nonfinite_steps`` in a row raise :class:`NonFiniteAbort`;
* both decisions come from one all-reduce(MAX) per step, so every rank takes the same one;
* a watchdog thread (training/watchdog.py) ends a rank whose peers died or hung;
* one run per run_dir: rank 0 holds its lock for the run's life (training/run_lock.py);
* a failed checkpoint save or load raises ``CheckpointError`` on every rank (one line; a failed
  save removes its partial directory and leaves ``latest`` as it was).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from harpe_megatron.checkpoint.save_load import (
    CheckpointError,
    load_checkpoint,
    load_model_weights,
    resolve_checkpoint,
    save_checkpoint,
)
from harpe_megatron.config.loader import config_to_dict, save_config
from harpe_megatron.config.run import RunConfig
from harpe_megatron.model.builder import build_model, transformer_config
from harpe_megatron.training.data import TrainingData
from harpe_megatron.training.exit_codes import PEER_FAILURE_EXIT_CODE, NonFiniteAbort
from harpe_megatron.training.faults import ENV_VAR as FAULTS_ENV_VAR
from harpe_megatron.training.faults import SaveFaults, fault_at, maybe_die
from harpe_megatron.training.initialize import distributed_run
from harpe_megatron.training.input_checks import validate_run_inputs
from harpe_megatron.training.metrics import (
    MetricSinks,
    format_step_line,
    memory_gib,
    peak_tflops,
    training_flops_per_token,
)
from harpe_megatron.training.plan import Builders, preflight
from harpe_megatron.training.preemption import Preemption
from harpe_megatron.training.run_lock import RunDirInUse, hold_run_dir
from harpe_megatron.training.step import forward_step
from harpe_megatron.training.watchdog import PeerFailure, Watchdog, is_communication_error, watchdog_store

__all__ = ["train", "TrainResult", "build_training_model", "build_optimizer", "run_schedule"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass
class TrainResult:
    """What a run did (identical on every rank)."""

    losses: dict[int, float]  # step -> global training loss
    eval_losses: dict[int, float]
    last_step: int
    checkpoint: Optional[str]
    tokens_per_s: Optional[float]  # mean over the steps after the first (warm-up)
    preempted: bool = False  # stopped by SIGTERM/SIGUSR1 after saving ``checkpoint``
    skipped_steps: list[int] = dataclasses.field(default_factory=list)  # non-finite loss/gradients


def _log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


def build_training_model(cfg: RunConfig):
    """``([DDP-wrapped model chunk], TransformerConfig)`` for ``cfg`` on this rank (bf16/fp16 under
    Float16Module, on CUDA when available); parallel state must be initialised."""
    dtype = _DTYPES[cfg.training.precision]
    on_gpu = torch.cuda.is_available()
    t = cfg.training
    tconfig = transformer_config(
        cfg.model, cfg.parallel, params_dtype=dtype, use_cpu_initialization=not on_gpu, positional=cfg.positional,
        calculate_per_token_loss=True,
        recompute_granularity=t.recompute_granularity, recompute_method=t.recompute_method,
        recompute_num_layers=t.recompute_num_layers,
        deallocate_pipeline_outputs=True,
    )
    model = build_model(
        cfg.model, cfg.positional, tconfig, max_sequence_length=cfg.data.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    if on_gpu:
        model.cuda(torch.cuda.current_device())
    if dtype != torch.float32:
        model = Float16Module(tconfig, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=t.overlap_grad_reduce,
        overlap_param_gather=t.overlap_param_gather,
        use_distributed_optimizer=t.use_distributed_optimizer,
    )
    ddp = DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=model)
    tconfig.finalize_model_grads_func = finalize_model_grads
    if t.overlap_grad_reduce:
        tconfig.no_sync_func = ddp.no_sync
        tconfig.grad_sync_func = ddp.start_grad_sync
    return [ddp], tconfig


def build_optimizer(cfg: RunConfig, model_chunks: list, train_iters: int, use_gloo_process_groups: bool = True):
    """megatron's (distributed) Adam with grad clipping, and its LR/WD scheduler, from ``cfg.training``.

    ``use_gloo_process_groups=False``: without megatron's gloo groups (used only to save/load the
    distributed optimizer's state; the memory planner's fake process groups have none)."""
    t = cfg.training
    opt_config = OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad,
        bf16=t.precision == "bf16", fp16=t.precision == "fp16", params_dtype=_DTYPES[t.precision],
        use_distributed_optimizer=t.use_distributed_optimizer,
        overlap_param_gather=t.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(opt_config, model_chunks, use_gloo_process_groups=use_gloo_process_groups)
    decay_iters = t.lr_decay_iters or train_iters
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if t.lr_warmup_iters else t.lr, max_lr=t.lr, min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters, lr_decay_steps=max(decay_iters, t.lr_warmup_iters + 1),
        lr_decay_style=t.lr_decay_style, start_wd=t.weight_decay, end_wd=t.weight_decay,
        wd_incr_steps=max(train_iters, 1), wd_incr_style="constant",
    )
    return optimizer, scheduler


def _global_loss(reports: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """[loss_sum, tokens] over micro-batches and DP x CP, known on every rank afterwards."""
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    total = torch.zeros(2, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage():
        for r in reports:
            total += r["lm loss"].to(device=device, dtype=torch.float64)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    # The last pipeline stage holds the loss; the last rank of the world is on it.
    dist.broadcast(total, src=dist.get_world_size() - 1)
    return total


def _nan_forward_step(data_iterator, model):
    """``forward_step`` whose loss is NaN (fault injection ``nan_loss``): NaN loss and gradients."""
    output, loss_func = forward_step(data_iterator, model)

    def poisoned(output_tensor):
        loss_sum, num_tokens, report = loss_func(output_tensor)
        nan = torch.tensor(float("nan"), device=loss_sum.device)
        return loss_sum * nan, num_tokens, {"lm loss": report["lm loss"] * torch.stack([nan, nan.new_ones(())])}

    return output, poisoned


def run_schedule(cfg: RunConfig, model_chunks: list, data_iter: Iterator, num_microbatches: int,
                 forward_only: bool, step_func=forward_step) -> torch.Tensor:
    """One pass of megatron's forward(/backward) schedule over ``num_microbatches``; returns the
    global ``[loss_sum, tokens]`` (identical on every rank)."""
    reports = get_forward_backward_func()(
        forward_step_func=step_func, data_iterator=data_iter, model=model_chunks,
        num_microbatches=num_microbatches, seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.training.micro_batch_size, forward_only=forward_only,
    )
    return _global_loss(reports)


def _grads_finite(model_chunks: list) -> bool:
    """Whether this rank's gradient buffers hold only finite values (after the DP reduction).

    A NaN/inf anywhere in a gradient reaches the global norm, so checking every rank's local
    buffers and all-reducing the answer decides the same thing on every rank.
    """
    for chunk in model_chunks:
        for buf in chunk.buffers + chunk.expert_parallel_buffers:
            g = buf.grad_data
            if g.numel() and not (torch.isfinite(g.amax()) and torch.isfinite(g.amin())):
                return False
    return True


def _agree(flags: list[float]) -> list[bool]:
    """Per flag: whether any rank raised it (one all-reduce(MAX) over the world)."""
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    t = torch.tensor(flags, dtype=torch.float32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def _update(precision: str, model_chunks: list, optimizer, scheduler, loss: float,
            preemption: Optional[Preemption], step: int) -> tuple[bool, bool, Optional[float]]:
    """The optimizer and LR-schedule step, unless the step is non-finite on any rank.

    Returns ``(preempt, nonfinite, grad_norm)``, identical on every rank: one all-reduce(MAX)
    carries the preemption flag and the local "gradients not finite" flag. fp16's loss scaler
    checks the gradients itself (and must see the overflow to lower the scale), so there only a
    non-finite loss counts.
    """
    grads_bad = precision != "fp16" and not _grads_finite(model_chunks)
    preempt, grads_bad = _agree([preemption.flag if preemption else 0.0, float(grads_bad)])
    if grads_bad or not math.isfinite(loss):
        return preempt, True, None
    update_ok, grad_norm, _ = optimizer.step()
    if update_ok:
        scheduler.step(increment=1)
    else:
        _log(f"[harpe] step {step}: fp16 loss-scale overflow; step skipped, loss scale lowered")
    return preempt, False, grad_norm


def _evaluate(cfg: RunConfig, model_chunks: list, data: TrainingData, num_microbatches: int,
              watchdog: Optional[Watchdog], step: int) -> float:
    for m in model_chunks:
        m.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        valid_iter = data.valid_iterator()
        for _ in range(cfg.training.eval_iters):
            if watchdog is not None:
                watchdog.progress(step, "eval")
            total += run_schedule(cfg, model_chunks, valid_iter, num_microbatches, forward_only=True).cpu()
    for m in model_chunks:
        m.train()
    return (total[0] / total[1]).item()


def train(cfg: RunConfig) -> TrainResult:
    """Run (or resume) the training described by ``cfg``; returns what happened.

    Raises :class:`NonFiniteAbort` after too many non-finite steps in a row and
    :class:`PeerFailure` (naming the rank) when a collective fails because another rank went away.
    """
    with distributed_run(cfg):
        t = cfg.training
        watchdog = None
        if dist.get_world_size() > 1 and t.hang_timeout_s > 0:
            watchdog = Watchdog(watchdog_store(), dist.get_rank(), dist.get_world_size(), t.hang_timeout_s,
                                t.slow_phase_timeout_s, PEER_FAILURE_EXIT_CODE)
        with watchdog or contextlib.nullcontext(), Preemption() as preemption:
            try:
                return _train(cfg, watchdog, preemption)
            except RuntimeError as exc:
                if watchdog is not None and not isinstance(exc, (NonFiniteAbort, PeerFailure, CheckpointError,
                                                                 RunDirInUse)) \
                        and is_communication_error(exc):
                    watchdog.explain_failure(exc)  # raises PeerFailure if a peer went away
                raise


def _resume_point(load_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from, decided on rank 0 (partial ones reported) and broadcast."""
    decision: list = [None]
    if dist.get_rank() == 0:
        try:
            path, messages = resolve_checkpoint(load_dir)
            for msg in messages:
                print(f"[harpe] {msg}", flush=True)
            decision[0] = ("ok", str(path) if path else None)
        except RuntimeError as exc:
            decision[0] = ("error", str(exc))
    dist.broadcast_object_list(decision, src=0)
    status, value = decision[0]
    if status == "error":
        raise CheckpointError(value)
    return Path(value) if value else None


def _from_rank0(value):
    """``value`` as rank 0 has it, on every rank (one broadcast)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _train(cfg: RunConfig, watchdog: Optional[Watchdog] = None, preemption: Optional[Preemption] = None) -> TrainResult:
    validate_run_inputs(cfg, log=_log)  # data/tokenizer checks, before anything is written
    # one run per run_dir, for the run's life (training/run_lock.py)
    with hold_run_dir(cfg.run_dir, dist.get_rank() == 0, _from_rank0, log=_log):
        return _train_holding_run_dir(cfg, watchdog, preemption)


def _train_holding_run_dir(cfg: RunConfig, watchdog: Optional[Watchdog], preemption: Optional[Preemption]
                           ) -> TrainResult:
    world = dist.get_world_size()
    t = cfg.training
    train_iters = t.resolved_train_iters(cfg.data.seq_length)
    num_microbatches = cfg.num_microbatches(world)
    run_dir = Path(cfg.run_dir)
    save_dir = Path(cfg.checkpoint.save or run_dir / "checkpoints")
    config_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    if dist.get_rank() == 0:
        save_config(cfg, run_dir / "config.yaml")

    preflight(cfg, world, Builders(build_training_model, build_optimizer), log=_log)  # memory plan, nothing allocated
    model_chunks, tconfig = build_training_model(cfg)
    optimizer, scheduler = build_optimizer(cfg, model_chunks, train_iters)

    step, consumed = 0, 0
    resume_from = _resume_point(Path(cfg.checkpoint.load or save_dir))
    if resume_from is not None:
        if watchdog is not None:
            watchdog.progress(step, "load")
        state = load_checkpoint(resume_from, model_chunks, optimizer, scheduler)
        step, consumed = state["iteration"], state["consumed_samples"]
        _log(f"[harpe] resumed from {resume_from} at step {step} ({consumed} samples consumed"
             f"{'' if state['rng_restored'] else '; RNG not restored: different world size'})")
    elif cfg.checkpoint.pretrained:
        load_model_weights(cfg.checkpoint.pretrained, model_chunks)
        if t.precision != "fp32":
            optimizer.reload_model_params()  # refresh the fp32 master copies from the loaded weights
        _log(f"[harpe] initial weights from {cfg.checkpoint.pretrained}")

    data = TrainingData(cfg, world, consumed_train_samples=consumed, total_train_steps=train_iters)
    train_iter = data.train_iterator()
    flops_per_token = training_flops_per_token(cfg.model, cfg.data.seq_length)
    peak = peak_tflops(t.precision, cfg.logging.peak_tflops)
    tokens_per_step = t.global_batch_size * cfg.data.seq_length
    sinks = MetricSinks(enabled=dist.get_rank() == 0, run_dir=str(run_dir), tensorboard=cfg.logging.tensorboard,
                        wandb_project=cfg.logging.wandb_project, wandb_mode=cfg.logging.wandb_mode,
                        wandb_run_name=cfg.logging.wandb_run_name, config=config_to_dict(cfg))
    _log(f"[harpe] world {world} = TP {cfg.parallel.tensor_model_parallel_size} x PP "
         f"{cfg.parallel.pipeline_model_parallel_size} x CP {cfg.parallel.context_parallel_size} x DP "
         f"{cfg.data_parallel_size(world)}; {num_microbatches} micro-batch(es)/step; "
         f"{tokens_per_step:,} tokens/step; steps {step}->{train_iters}; run dir {run_dir}")

    losses: dict[int, float] = {}
    eval_losses: dict[int, float] = {}
    speeds: list[float] = []
    skipped: list[int] = []
    streak = 0  # consecutive non-finite steps
    last_saved: Optional[Path] = None
    preempted = False
    rank = dist.get_rank()
    stop_at = min(train_iters, t.exit_interval) if t.exit_interval else train_iters
    first_step = step + 1
    for m in model_chunks:
        m.train()
    while step < stop_at:
        start = time.perf_counter()
        if watchdog is not None:
            watchdog.progress(step + 1, "first_step" if step + 1 == first_step else "train")
        maybe_die(step + 1, rank)
        for m in model_chunks:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        step_func = _nan_forward_step if fault_at("nan_loss", step + 1, rank) else forward_step
        total = run_schedule(cfg, model_chunks, train_iter, num_microbatches, forward_only=False, step_func=step_func)
        loss = (total[0] / total[1]).item()  # global: identical on every rank
        preempt, nonfinite, grad_norm = _update(t.precision, model_chunks, optimizer, scheduler, loss,
                                                preemption, step + 1)
        step += 1
        consumed += t.global_batch_size  # a skipped step's data is not replayed
        streak = streak + 1 if nonfinite else 0
        if nonfinite:
            skipped.append(step)
            _log(f"[harpe] step {step}: non-finite {'loss' if not math.isfinite(loss) else 'gradients'} "
                 f"(loss {loss}); step skipped (no optimizer update), {streak} in a row, {len(skipped)} in all")
            if streak > t.max_consecutive_nonfinite_steps:
                sinks.log(step, {"loss": loss, "skipped_steps": len(skipped), "nonfinite_streak": streak})
                sinks.close()
                raise NonFiniteAbort(
                    f"steps {step - streak + 1}-{step} all had a non-finite loss or gradients, more than "
                    f"training.max_consecutive_nonfinite_steps={t.max_consecutive_nonfinite_steps}; stopping. "
                    f"The last checkpoint ({last_saved or resume_from or 'none'}) is intact; lower training.lr "
                    f"or inspect the data around sample {consumed - streak * t.global_batch_size}")
        elapsed = time.perf_counter() - start
        losses[step] = loss
        tokens_per_s = tokens_per_step / elapsed
        if step > 1 or resume_from is not None:
            speeds.append(tokens_per_s)
        tflops = flops_per_token * tokens_per_s / world / 1e12
        metrics = {
            "loss": loss, "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": tokens_per_s, "tflops_per_gpu": tflops,
            "mfu": tflops / peak if peak else None, "memory": memory_gib(), "step_time_s": elapsed,
            "skipped": len(skipped), "nonfinite_streak": streak,
        }
        if step % cfg.logging.log_interval == 0 or step == stop_at:
            _log(format_step_line(step, train_iters, metrics))
        sinks.log(step, {k: v for k, v in metrics.items() if k not in ("memory", "skipped")}
                  | {"memory_gib": metrics["memory"][1], "skipped_steps": len(skipped)})
        if t.eval_interval and step % t.eval_interval == 0 and not preempt:
            eval_losses[step] = _evaluate(cfg, model_chunks, data, num_microbatches, watchdog, step)
            _log(f"[harpe] eval at step {step}: loss {eval_losses[step]:.4f}")
            sinks.log(step, {"eval_loss": eval_losses[step]})
        interval = cfg.checkpoint.save_interval
        if (interval and step % interval == 0) or step == stop_at or preempt:
            if watchdog is not None:
                watchdog.progress(step, "save")
            last_saved = save_checkpoint(save_dir, step, model_chunks, optimizer, scheduler, consumed,
                                         config_yaml, cfg.checkpoint.keep_last,
                                         hooks=SaveFaults() if os.environ.get(FAULTS_ENV_VAR) else None)
            _log(f"[harpe] saved checkpoint {last_saved}")
        if preempt and step < stop_at:
            preempted = True
            _log(f"[harpe] preempted: stopping after step {step} with checkpoint {last_saved}; "
                 "start again to resume")
            break
    sinks.close()
    return TrainResult(losses=losses, eval_losses=eval_losses, last_step=step,
                       checkpoint=str(last_saved) if last_saved else None,
                       tokens_per_s=sum(speeds) / len(speeds) if speeds else None,
                       preempted=preempted, skipped_steps=skipped)
