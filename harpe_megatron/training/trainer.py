"""The training loop on megatron-core: DDP, (distributed) optimizer, schedules, checkpoints.

One step = one global batch: ``num_microbatches`` micro-batches per data-parallel rank through
megatron's forward/backward schedule (1F1B when pipeline parallel), gradients reduced by
megatron's DDP and divided by the global token count (``calculate_per_token_loss``), one
optimizer step (with gradient clipping), one LR-scheduler step. The logged loss is the global
token-weighted mean over DP x CP and all micro-batches.

:func:`run_training` brings up the run (:mod:`~harpe_megatron.training.initialize`), checks its
inputs, holds its run_dir and hands the rest to a :class:`Trainer`, whose construction builds every
component (memory pre-flight, model, optimizer, resume or initial weights, data, metric sinks) and
whose ``run()`` repeats ``train_step()`` and calls ``evaluate()`` and ``save()`` at their intervals.
The pieces of one step (model and optimizer builders, forward step, schedule, FLOPs and sinks) are
:mod:`harpe_megatron.step`'s, shared with the memory planner.

Reliability (docs/reliability.md):

* preemption: SIGTERM/SIGUSR1 on any rank -> every rank finishes the step, saves, and
  :func:`run_training` returns with ``preempted=True`` (the CLI exits with ``PREEMPTED_EXIT_CODE``);
* a step whose global loss or any gradient is non-finite is skipped (no optimizer or LR-schedule
  step; its data is *not* replayed), counted, logged; more than
  ``training.max_consecutive_nonfinite_steps`` in a row raise :class:`NonFiniteAbort`;
* both decisions come from one all-reduce(MAX) per step, so every rank takes the same one;
* a watchdog thread (training/reliability/watchdog.py) ends a rank whose peers died or hung (a
  :class:`~harpe_megatron.training.reliability.watchdog.NullWatchdog` stands in on one rank);
* one run per run_dir: rank 0 holds its lock for the run's life (training/reliability/run_lock.py);
* a failed checkpoint save or load raises ``CheckpointError`` on every rank (one line; a failed
  save removes its partial directory and leaves ``latest`` as it was);
* fault injection (tests only) comes from :func:`~harpe_megatron.training.reliability.faults.faults_from_env`:
  a no-op object unless ``HARPE_FAULT_INJECT`` is set.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import yaml
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig

from harpe_megatron.checkpoint.layout import resolve_checkpoint
from harpe_megatron.checkpoint.save_load import CheckpointError, load_checkpoint, load_model_weights, save_checkpoint
from harpe_megatron.config.loader import config_to_dict
from harpe_megatron.config.run import RunConfig
from harpe_megatron.distributed.bringup import current_device
from harpe_megatron.log import get_logger
from harpe_megatron.planner.plan import Builders, preflight
from harpe_megatron.run_dir import RunDir
from harpe_megatron.step.build import build_optimizer, build_training_model
from harpe_megatron.step.metrics import (MetricSinks, format_step_line, memory_gib, peak_tflops, training_flops,
                                         training_flops_per_token)
from harpe_megatron.step.schedule import run_schedule
from harpe_megatron.training.config_history import record_config
from harpe_megatron.training.data import TrainingData
from harpe_megatron.training.initialize import distributed_run
from harpe_megatron.training.input_checks import validate_run_inputs
from harpe_megatron.training.reliability.exit_codes import PEER_FAILURE_EXIT_CODE, NonFiniteAbort
from harpe_megatron.training.reliability.faults import FaultInjection, faults_from_env
from harpe_megatron.training.reliability.preemption import NoPreemption, Preemption, PreemptionSignal
from harpe_megatron.training.reliability.run_lock import RunDirInUse, hold_run_dir
from harpe_megatron.training.resume_checks import (
    ResumePlan,
    config_settings_kept,
    data_fingerprint,
    plan_resume,
    read_saved_state,
)
from harpe_megatron.training.reliability.watchdog import (
    NullWatchdog,
    PeerFailure,
    StepWatchdog,
    is_communication_error,
    make_watchdog,
)

__all__ = ["run_training", "Trainer", "TrainResult"]

_log = get_logger(__name__)


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
    t = torch.tensor(flags, dtype=torch.float32, device=current_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def _resume_point(load_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from, decided on rank 0 (partial ones reported) and broadcast."""
    decision: list = [None]
    if dist.get_rank() == 0:
        try:
            path, messages = resolve_checkpoint(load_dir)
            for msg in messages:
                (_log.warning if msg.startswith("WARNING") else _log.info)(msg)
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


class Trainer:
    """One plain run on the current process group and parallel state, its run_dir held.

    Constructing it builds every component, in this order: the resume checks against the
    checkpoint to resume from (training/resume_checks.py), the memory pre-flight (nothing allocated
    before it), model and optimizer, the state to resume from or the initial weights, data, the
    resolved config recorded in the run dir (config_history.py), metric sinks. ``run()`` then trains from where
    the run stands to ``training.train_iters`` (or ``exit_interval``). The optional parts
    (``watchdog``, ``preemption``, ``faults``) are typed by what the trainer asks of them and
    default to their no-op stand-ins.
    """

    def __init__(self, cfg: RunConfig, watchdog: Optional[StepWatchdog] = None,
                 preemption: Optional[PreemptionSignal] = None, faults: Optional[FaultInjection] = None):
        t = cfg.training
        # settings
        self.cfg = cfg
        self.world: int = dist.get_world_size()
        self.rank: int = dist.get_rank()
        self.train_iters: int = t.resolved_train_iters(cfg.data.seq_length)
        self.stop_at: int = min(self.train_iters, t.exit_interval) if t.exit_interval else self.train_iters
        self.num_microbatches: int = cfg.num_microbatches(self.world)
        self.run_dir = RunDir(cfg.run_dir)
        self.save_dir = Path(cfg.checkpoint.save) if cfg.checkpoint.save else self.run_dir.checkpoints
        self.tokens_per_step: int = t.global_batch_size * cfg.data.seq_length
        self.config_yaml: str = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
        # optional parts
        self.watchdog: StepWatchdog = NullWatchdog() if watchdog is None else watchdog
        self.preemption: PreemptionSignal = NoPreemption() if preemption is None else preemption
        self.faults: FaultInjection = faults_from_env() if faults is None else faults
        # progress of the run
        self.step, self.consumed = 0, 0
        self.first_step = 1
        self.resume_from: Optional[Path] = None  # set with the resume checks below
        self.last_saved: Optional[Path] = None
        self.losses: dict[int, float] = {}
        self.eval_losses: dict[int, float] = {}
        self.speeds: list[float] = []
        self.skipped: list[int] = []
        self.streak = 0  # consecutive non-finite steps
        self.preempt = False  # all ranks agreed to stop after this step
        # components. The resume checks first (training/resume_checks.py): a refused change writes
        # nothing and builds nothing; schedule=checkpoint puts the checkpoint's schedule into cfg.
        self.resume: Optional[ResumePlan] = None
        self.resume_from = _resume_point(Path(cfg.checkpoint.load or self.save_dir))
        if self.resume_from is not None:
            saved = read_saved_state(self.resume_from, self.rank == 0, _from_rank0)
            self.resume = plan_resume(cfg, self.resume_from, saved)
            self.cfg = cfg = self.resume.cfg
            self.config_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
        # memory plan, nothing allocated
        preflight(cfg, self.world, Builders(build_training_model, build_optimizer), log=_log.info)
        self.model_chunks: list[DistributedDataParallel]
        self.tconfig: TransformerConfig
        self.model_chunks, self.tconfig = build_training_model(cfg)
        self.optimizer: MegatronOptimizer
        self.scheduler: OptimizerParamScheduler
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model_chunks, self.train_iters)
        self._load_state()
        self.first_step = self.step + 1
        self.data = TrainingData(cfg, self.world, consumed_train_samples=self.consumed,
                                 total_train_steps=self.train_iters)
        if self.resume is not None:
            self.resume.check_data_order(self.data.train)
        self.train_iter: Iterator[dict[str, torch.Tensor]] = self.data.train_iterator()
        if self.rank == 0:  # the run's record, only now: a start that failed before leaves it as it was
            record_config(self.run_dir, self.config_yaml, self.first_step)
        self.flops_per_token: float = training_flops_per_token(cfg.model, cfg.data.seq_length)
        self.peak: Optional[float] = peak_tflops(t.precision, cfg.logging.peak_tflops)
        self.sinks = MetricSinks(enabled=self.rank == 0, run_dir=self.run_dir,
                                 tensorboard=cfg.logging.tensorboard, wandb_project=cfg.logging.wandb_project,
                                 wandb_mode=cfg.logging.wandb_mode, wandb_run_name=cfg.logging.wandb_run_name,
                                 config=config_to_dict(cfg))
        for note in self.resume.notes if self.resume is not None else []:
            (_log.warning if note.startswith("WARNING") else _log.info)(note)
        if self.resume is not None and self.resume.changes:
            self.sinks.record(self.step, self.resume.record())
        p = cfg.parallel
        _log.info(f"world {self.world} = TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size} "
                  f"x CP {p.context_parallel_size} x DP {cfg.data_parallel_size(self.world)}; "
                  f"{self.num_microbatches} micro-batch(es)/step; {self.tokens_per_step:,} tokens/step; "
                  f"steps {self.step}->{self.train_iters}; run dir {self.run_dir.root}")

    def _load_state(self) -> None:
        """Resume from the newest complete checkpoint, or load ``checkpoint.pretrained``, or neither."""
        cfg = self.cfg
        if self.resume is not None:
            self.watchdog.progress(self.step, "load")
            with config_settings_kept(self.optimizer, self.scheduler):  # the config's LR, betas, ... win
                state = load_checkpoint(self.resume_from, self.model_chunks, self.optimizer, self.scheduler)
            self.step, self.consumed = state["iteration"], self.resume.consumed
            _log.info(f"resumed from {self.resume_from} at step {self.step} ({self.consumed} samples consumed"
                      f"{'' if state['rng_restored'] else '; RNG not restored: different world size'})")
        elif cfg.checkpoint.pretrained:
            load_model_weights(cfg.checkpoint.pretrained, self.model_chunks)
            if cfg.training.precision != "fp32":
                self.optimizer.reload_model_params()  # refresh the fp32 master copies from the loaded weights
            _log.info(f"initial weights from {cfg.checkpoint.pretrained}")

    # one step ----------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """One step (one global batch): forward/backward, the agreed update; returns its metrics.

        Sets :attr:`preempt` when any rank was signalled (one all-reduce with the non-finite check).
        Raises :class:`NonFiniteAbort` after too many non-finite steps in a row.
        """
        t = self.cfg.training
        start = time.perf_counter()
        step = self.step + 1
        self.watchdog.progress(step, "first_step" if step == self.first_step else "train")
        self.faults.at_step_start(step, self.rank)
        for m in self.model_chunks:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        total = run_schedule(self.cfg, self.model_chunks, self.train_iter, self.num_microbatches,
                             forward_only=False, step_func=self.faults.step_func(step, self.rank))
        loss = (total[0] / total[1]).item()  # global: identical on every rank
        nonfinite, grad_norm = self._update(loss, step)
        self.step = step
        self.consumed += t.global_batch_size  # a skipped step's data is not replayed
        self.streak = self.streak + 1 if nonfinite else 0
        if nonfinite:
            self._skip(loss)
        elapsed = time.perf_counter() - start
        self.losses[step] = loss
        tokens_per_s = self.tokens_per_step / elapsed
        if step > 1 or self.resume_from is not None:
            self.speeds.append(tokens_per_s)
        pairs = total[2].item()  # attended pairs, counted from the batches under document masking
        step_flops = (training_flops(self.cfg.model, self.tokens_per_step, pairs) if pairs
                      else self.flops_per_token * self.tokens_per_step)
        tflops = step_flops / elapsed / self.world / 1e12
        return {
            "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": tokens_per_s, "tflops_per_gpu": tflops,
            "mfu": tflops / self.peak if self.peak else None, "memory": memory_gib(), "step_time_s": elapsed,
            "skipped": len(self.skipped), "nonfinite_streak": self.streak,
        }

    def _update(self, loss: float, step: int) -> tuple[bool, Optional[float]]:
        """The optimizer and LR-schedule step, unless the step is non-finite on any rank.

        Returns ``(nonfinite, grad_norm)`` and sets :attr:`preempt`, identical on every rank: one
        all-reduce(MAX) carries the preemption flag and the local "gradients not finite" flag.
        fp16's loss scaler checks the gradients itself (and must see the overflow to lower the
        scale), so there only a non-finite loss counts.
        """
        grads_bad = self.cfg.training.precision != "fp16" and not _grads_finite(self.model_chunks)
        self.preempt, grads_bad = _agree([self.preemption.flag, float(grads_bad)])
        if grads_bad or not math.isfinite(loss):
            return True, None
        update_ok, grad_norm, _ = self.optimizer.step()
        if update_ok:
            self.scheduler.step(increment=1)
        else:
            _log.info(f"step {step}: fp16 loss-scale overflow; step skipped, loss scale lowered")
        return False, grad_norm

    def _skip(self, loss: float) -> None:
        """Count and log a non-finite step; too many in a row end the run."""
        t, step, streak = self.cfg.training, self.step, self.streak
        self.skipped.append(step)
        _log.info(f"step {step}: non-finite {'loss' if not math.isfinite(loss) else 'gradients'} "
                  f"(loss {loss}); step skipped (no optimizer update), {streak} in a row, {len(self.skipped)} in all")
        if streak > t.max_consecutive_nonfinite_steps:
            self.sinks.log(step, {"loss": loss, "skipped_steps": len(self.skipped), "nonfinite_streak": streak})
            self.sinks.close()
            raise NonFiniteAbort(
                f"steps {step - streak + 1}-{step} all had a non-finite loss or gradients, more than "
                f"training.max_consecutive_nonfinite_steps={t.max_consecutive_nonfinite_steps}; stopping. "
                f"The last checkpoint ({self.last_saved or self.resume_from or 'none'}) is intact; lower "
                f"training.lr or inspect the data around sample {self.consumed - streak * t.global_batch_size}")

    def _report(self, metrics: dict[str, Any]) -> None:
        """The console line (every ``logging.log_interval`` steps and the last) and the sinks."""
        step = self.step
        if step % self.cfg.logging.log_interval == 0 or step == self.stop_at:
            _log.info(format_step_line(step, self.train_iters, metrics))
        self.sinks.log(step, {k: v for k, v in metrics.items() if k not in ("memory", "skipped")}
                       | {"memory_gib": metrics["memory"].gib, "skipped_steps": len(self.skipped)})

    # evaluation and checkpoints ----------------------------------------------------------------
    def evaluate(self) -> float:
        """The global loss over ``training.eval_iters`` validation batches (the same ones every time)."""
        for m in self.model_chunks:
            m.eval()
        total = torch.zeros(3, dtype=torch.float64)
        with torch.no_grad():
            valid_iter = self.data.valid_iterator()
            for _ in range(self.cfg.training.eval_iters):
                self.watchdog.progress(self.step, "eval")
                total += run_schedule(self.cfg, self.model_chunks, valid_iter, self.num_microbatches,
                                      forward_only=True).cpu()
        for m in self.model_chunks:
            m.train()
        return (total[0] / total[1]).item()

    def save(self) -> Path:
        """A checkpoint of the current step (every rank; ``latest`` moves when all have written)."""
        self.watchdog.progress(self.step, "save")
        c = self.cfg.checkpoint
        self.last_saved = save_checkpoint(self.save_dir, self.step, self.model_chunks, self.optimizer, self.scheduler,
                                          self.consumed, self.config_yaml, c.keep_last, hooks=self.faults.save_hooks,
                                          common={"data_fingerprint": data_fingerprint(self.data.train, self.consumed)})
        _log.info(f"saved checkpoint {self.last_saved}")
        return self.last_saved

    # the loop ----------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Steps until ``stop_at`` or an agreed preemption; evaluations and saves at their intervals."""
        t, interval = self.cfg.training, self.cfg.checkpoint.save_interval
        preempted = False
        for m in self.model_chunks:
            m.train()
        while self.step < self.stop_at:
            self._report(self.train_step())
            step = self.step
            if t.eval_interval and step % t.eval_interval == 0 and not self.preempt:
                self.eval_losses[step] = self.evaluate()
                _log.info(f"eval at step {step}: loss {self.eval_losses[step]:.4f}")
                self.sinks.log(step, {"eval_loss": self.eval_losses[step]})
            if (interval and step % interval == 0) or step == self.stop_at or self.preempt:
                self.save()
            if self.preempt and step < self.stop_at:
                preempted = True
                _log.info(f"preempted: stopping after step {step} with checkpoint {self.last_saved}; "
                          "start again to resume")
                break
        self.sinks.close()
        return TrainResult(losses=self.losses, eval_losses=self.eval_losses, last_step=self.step,
                           checkpoint=str(self.last_saved) if self.last_saved else None,
                           tokens_per_s=sum(self.speeds) / len(self.speeds) if self.speeds else None,
                           preempted=preempted, skipped_steps=self.skipped)


def run_training(cfg: RunConfig) -> TrainResult:
    """Run (or resume) the training described by ``cfg``; returns what happened.

    Raises :class:`NonFiniteAbort` after too many non-finite steps in a row and
    :class:`PeerFailure` (naming the rank) when a collective fails because another rank went away.
    """
    with distributed_run(cfg):
        t = cfg.training
        watchdog = make_watchdog(t.hang_timeout_s, t.slow_phase_timeout_s, PEER_FAILURE_EXIT_CODE)
        with watchdog, Preemption() as preemption:
            try:
                validate_run_inputs(cfg, announce=True)  # data/tokenizer checks, before anything is written
                # one run per run_dir, for the run's life (training/reliability/run_lock.py)
                with hold_run_dir(cfg.run_dir, dist.get_rank() == 0, _from_rank0):
                    return Trainer(cfg, watchdog, preemption).run()
            except RuntimeError as exc:
                if not isinstance(exc, (NonFiniteAbort, PeerFailure, CheckpointError, RunDirInUse)) \
                        and is_communication_error(exc):
                    watchdog.explain_failure(exc)  # raises PeerFailure if a peer went away
                raise
