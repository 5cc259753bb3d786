"""A resumed run does what its config says, or refuses (docs/reliability.md, "Resume").

At a resume the run config is compared with the config saved in the checkpoint (``config_yaml``
of its common state). The settings whose change alters the meaning of the continued run fall in
three families:

* ``schedule``: ``training.lr``, ``min_lr``, ``lr_warmup_iters``, ``lr_decay_style``, the decay
  length (``training.lr_decay_iters``, by default ``training.train_iters``; with a constant
  schedule neither it nor ``min_lr`` has an effect and they are not compared), ``weight_decay``,
  ``adam_beta1``, ``adam_beta2``, ``adam_eps``. The checkpoint carries all of them (megatron's
  scheduler state, the optimizer's parameter groups), and a plain load would keep the
  checkpoint's values while the config says otherwise.
* ``data``: ``data.seq_length``, ``training.global_batch_size``, ``data.paths``, ``data.weights``,
  ``data.split``, ``data.position_scheme``, ``training.seed``: the saved position (samples
  consumed) would point at other data; ``data.document_masking``, ``data.reset_position_ids``:
  the same samples would be trained otherwise (attention, loss at boundaries, positions;
  docs/document_masking.md). When all of these are equal, the order of the samples
  itself is checked: megatron's dataset builder derives it from the number of samples the run
  needs too (``training.train_iters`` x global batch decides the number of epochs shuffled
  together), so every save records a fingerprint of a few consumed samples
  (:func:`data_fingerprint`) and a resume compares it with the samples the new dataset holds there.
* ``model``: the architecture (``model.num_layers``, ``hidden_size``, ``num_attention_heads``,
  ``num_query_groups``, ``ffn_hidden_size``, ``vocab_size``, ``make_vocab_size_divisible_by``,
  ``norm_epsilon``, ``untie_embeddings_and_output_weights``) and the positions
  (``positional.bases`` as resolved per head, ``scaling``, ``position_ids``,
  ``rotary_interleaved``). A run never continues in place with another model: the way on is a new
  run initialised from the checkpoint (``checkpoint.pretrained``), as a stage does.

Everything else (parallel layout, micro-batch size, precision, recompute, intervals, limits,
``clip_grad``, logging, ...) takes effect from the config at a resume with nothing to check. So
does ``training.train_iters`` itself, unless it changes the decay length or the data order, or
is below the checkpoint's step (refused).

``training.on_resume_change`` (:class:`~harpe_megatron.config.run.ResumePolicy`) chooses per
family: ``refuse`` (default: one line naming the key, both values and the ways on), ``config``
(schedule: the config's schedule from the resumed step on, as if it had been the schedule all
along, through megatron's ``override_opt_param_scheduler``; data: the config's data, entered at
the number of tokens already trained on) or, for the schedule, ``checkpoint`` (the checkpoint's
schedule is kept and written into the run's config). What was applied is logged and recorded in
``metrics.jsonl`` (:meth:`ResumePlan.record`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import yaml

from harpe_megatron.checkpoint.safety import read_common_state
from harpe_megatron.checkpoint.save_load import CheckpointError, describe_checkpoint_error
from harpe_megatron.config.loader import ConfigError, config_from_dict, config_to_dict
from harpe_megatron.config.run import RunConfig
from harpe_megatron.positional.bases import per_query_head_bases

__all__ = ["Change", "ResumePlan", "compare_configs", "config_settings_kept", "data_fingerprint", "plan_resume",
           "read_saved_state"]

_MODEL_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
               "vocab_size", "make_vocab_size_divisible_by", "norm_epsilon", "untie_embeddings_and_output_weights")
_SCHEDULE_KEYS = ("lr", "min_lr", "lr_warmup_iters", "lr_decay_style", "weight_decay", "adam_beta1", "adam_beta2",
                  "adam_eps")
_DECAY = "lr decay length"  # the item whose key depends on the config (lr_decay_iters or train_iters)


@dataclasses.dataclass(frozen=True)
class Change:
    """One setting that differs: its family, the key a user sets, and both values."""

    family: str  # schedule | data | model
    key: str
    checkpoint: Any
    config: Any


def _show(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 16).strip()
    return "null" if value is None else str(value)


def _decay_key(cfg: RunConfig) -> str:
    t = cfg.training
    if t.lr_decay_iters is not None:
        return "training.lr_decay_iters"
    return "training.train_tokens" if t.train_tokens is not None else "training.train_iters"


def _items(cfg: RunConfig) -> dict[tuple[str, str], tuple[Any, Any]]:
    """(family, item) -> (value compared, value shown) of every checked setting of ``cfg``."""
    t, d, m, p = cfg.training, cfg.data, cfg.model, cfg.positional
    items: dict[tuple[str, str], tuple[Any, Any]] = {}
    for key in _SCHEDULE_KEYS:
        items["schedule", f"training.{key}"] = (getattr(t, key),) * 2
    decay = t.lr_decay_steps(t.resolved_train_iters(d.seq_length))
    by_tokens = t.lr_decay_iters is None and t.train_tokens is not None
    items["schedule", _DECAY] = (decay, f"{t.train_tokens:g} ({decay} steps)" if by_tokens else decay)
    data = {"data.seq_length": d.seq_length, "training.global_batch_size": t.global_batch_size,
            "data.paths": list(d.paths), "data.weights": d.weights, "data.split": d.split,
            "data.position_scheme": d.position_scheme.to_dict() if d.position_scheme else None,
            "data.document_masking": d.document_masking, "data.reset_position_ids": d.reset_position_ids,
            "training.seed": t.seed}
    items.update({("data", k): (v, v) for k, v in data.items()})
    items.update({("model", f"model.{k}"): (getattr(m, k),) * 2 for k in _MODEL_KEYS})
    bases = per_query_head_bases(p.bases, m.num_attention_heads, m.num_query_groups, m.head_dim)
    items["model", "positional.bases"] = ([float(b) for b in bases], p.bases.to_dict())
    items["model", "positional.scaling"] = (p.scaling.to_dict(),) * 2
    items["model", "positional.position_ids"] = (p.position_ids,) * 2
    items["model", "positional.rotary_interleaved"] = (p.rotary_interleaved,) * 2
    return items


def compare_configs(saved: RunConfig, cfg: RunConfig) -> list[Change]:
    """The checked settings that differ between the checkpoint's config ``saved`` and ``cfg``."""
    old, new = _items(saved), _items(cfg)
    constant = saved.training.lr_decay_style == cfg.training.lr_decay_style == "constant"
    changes = []
    for (family, item), (value, shown) in new.items():
        if constant and item in (_DECAY, "training.min_lr"):
            continue  # no effect on a constant schedule
        if old[family, item][0] != value:
            key = _decay_key(cfg) if item == _DECAY else item
            changes.append(Change(family, key, old[family, item][1], shown))
    return changes


def data_fingerprint(dataset, consumed: int) -> dict[str, list[int]]:
    """CRC-32s of the tokens of a few of the first ``consumed`` samples of ``dataset`` (the first,
    the middle one, the last): saved with every checkpoint, compared at a resume."""
    samples = sorted({0, consumed // 2, consumed - 1}) if consumed > 0 else []
    samples = [i for i in samples if i < len(dataset)]
    return {"samples": samples, "crc32": [_sample_crc(dataset, i) for i in samples]}


def _sample_crc(dataset, index: int) -> int:
    tokens = torch.as_tensor(dataset[index]["tokens"]).to(torch.int64)
    return zlib.crc32(tokens.numpy().tobytes())


@contextlib.contextmanager
def config_settings_kept(optimizer, scheduler) -> Iterator[None]:
    """Keep the optimizer's parameter-group settings (built from the config) through a checkpoint
    load in the body, then set the LR and weight decay of the loaded step from them.

    A load restores the checkpoint's groups: Adam's betas and eps, and the ``max_lr``/``min_lr``
    that megatron's scheduler reads from each group before its own values, so the checkpoint's
    schedule would win whatever the scheduler was told. The resume checks decided before that the
    config's settings are the ones to use (equal, or chosen by ``training.on_resume_change``).
    """
    kept = [{k: v for k, v in g.items() if k not in ("params", "lr", "weight_decay")} for g in optimizer.param_groups]
    yield
    groups = optimizer.param_groups
    if len(groups) != len(kept):
        raise CheckpointError(f"the checkpoint's optimizer has {len(groups)} parameter groups, this run {len(kept)}")
    for group, settings in zip(groups, kept):
        group.update(settings)
    scheduler.step(increment=0)  # LR and weight decay of the loaded step from these settings


def read_saved_state(path: Path, is_reader: bool, share: Callable[[Any], Any]) -> dict[str, Any]:
    """Checkpoint ``path``'s common state as the reader (rank 0) read it, on every rank
    (``share``: a broadcast from the reader); :class:`CheckpointError` on every rank if it failed."""
    box: Any = None
    if is_reader:
        try:
            box = ("ok", read_common_state(path))
        except Exception as exc:  # noqa: BLE001 - any failure is one line on every rank
            box = ("error", f"reading the saved state of checkpoint {path} failed ({describe_checkpoint_error(exc)})")
    status, value = share(box)
    if status == "error":
        raise CheckpointError(value)
    return value


@dataclasses.dataclass
class ResumePlan:
    """What a resume continues with; identical on every rank."""

    checkpoint: Path
    step: int
    cfg: RunConfig  # the config the run continues under
    changes: list[Change]  # accepted ones
    applied: dict[str, str]  # family -> config | checkpoint, for the families with accepted changes
    saved_consumed: int
    consumed: int  # samples consumed, in samples of ``cfg``
    fingerprint: Optional[dict] = None  # the checkpoint's data fingerprint still to verify
    notes: list[str] = dataclasses.field(default_factory=list)

    def check_data_order(self, dataset) -> None:
        """Whether ``dataset`` holds the checkpoint's fingerprinted samples where they were: if not,
        ConfigError, or (``on_resume_change.data=config``) an accepted, recorded change."""
        if not self.fingerprint:
            return
        for index, crc in zip(self.fingerprint["samples"], self.fingerprint["crc32"]):
            if index < len(dataset) and _sample_crc(dataset, index) == crc:
                continue
            t = self.cfg.training
            why = (f"the training data order differs from the checkpoint's (sample {index} of the train split is "
                   "another one), although data.* and training.global_batch_size/seed are the same: megatron's "
                   "dataset builder shuffles as many epochs as training.train_iters x training.global_batch_size "
                   f"({t.resolved_train_iters(self.cfg.data.seq_length)} x {t.global_batch_size} samples) needs, "
                   "so a new length can reorder the data")
            if t.on_resume_change.data == "config":
                self.changes.append(Change("data", "data order", "the checkpoint's", "another"))
                self.applied["data"] = "config"
                self.notes.append(f"resume: {why}; continuing with the new order (training.on_resume_change.data="
                                  "config: samples already trained on may come again)")
                return
            raise ConfigError(
                f"resuming {self.checkpoint} (step {self.step}): {why}. Set training.on_resume_change.data=config "
                "to continue with the new order (samples already trained on may come again), or set the length back")

    def record(self) -> dict[str, Any]:
        """What this resume applied, for ``metrics.jsonl``."""
        return {"resume": {
            "checkpoint": str(self.checkpoint), "step": self.step,
            "changes": [{"key": c.key, "family": c.family, "checkpoint": c.checkpoint, "config": c.config,
                         "applied": self.applied[c.family]} for c in self.changes],
            "consumed_samples": {"checkpoint": self.saved_consumed, "continued": self.consumed},
        }}


_MEANING = {"model": "a run cannot continue with another model",
            "schedule": "the learning-rate schedule or optimizer settings of the continued run would change",
            "data": "the saved data position ({consumed} samples) would point at other data"}

_KEY_MEANING = {key: "the same samples would be trained otherwise (attention at document boundaries, their loss, "
                     "positions; docs/document_masking.md)"
                for key in ("data.document_masking", "data.reset_position_ids")}


def _refusal(checkpoint: Path, step: int, blocking: list[Change], consumed: int) -> str:
    """One line: the first refused change, the others, and the ways on."""
    first, rest = blocking[0], blocking[1:]
    also = f" (also: {', '.join(f'{c.key} {_show(c.checkpoint)} -> {_show(c.config)}' for c in rest)})" if rest else ""
    families = {c.family for c in blocking}
    back = f"set {first.key} back to {_show(first.checkpoint)}" + (" (and the others)" if rest else "")
    if "model" in families:
        ways = (f"{back}; or train a new run (another run_dir) from these weights with "
                f"checkpoint.pretrained={checkpoint.parent}")
    else:
        policy = []
        if "schedule" in families:
            policy.append(f"set training.on_resume_change.schedule=config to train on with the config's schedule (the "
                          f"LR from step {step + 1} on follows it) or =checkpoint to keep the checkpoint's")
        if "data" in families:
            policy.append("set training.on_resume_change.data=config to continue with the config's data from the "
                          "tokens already trained on")
        ways = f"{'; and '.join(policy)}; or {back}"
    meaning = _KEY_MEANING.get(first.key, _MEANING[first.family]).format(consumed=consumed)
    return (f"resuming {checkpoint} (step {step}): {first.key} is {_show(first.config)} in the config but "
            f"{_show(first.checkpoint)} in the checkpoint{also}: {meaning}. "
            f"To go on, {ways}")


def _with_checkpoint_schedule(cfg: RunConfig, saved: RunConfig) -> RunConfig:
    """``cfg`` with the schedule of ``saved`` (its decay length made explicit)."""
    s = saved.training
    keep = {k: getattr(s, k) for k in _SCHEDULE_KEYS}
    keep["lr_decay_iters"] = s.lr_decay_steps(s.resolved_train_iters(saved.data.seq_length))
    return dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, **keep))


def _samples_length(cfg: RunConfig) -> int:
    """Tokens per stored sample (the packed length with a position scheme)."""
    d = cfg.data
    return d.position_scheme.target_length(d.seq_length) if d.position_scheme is not None else d.seq_length


def _saved_config(cfg: RunConfig, checkpoint: Path, text: Any) -> RunConfig:
    """The checkpoint's run config; sections it lacks (a converted checkpoint has model, positional
    and parallel only) are taken from ``cfg``."""
    tree = yaml.safe_load(text) if isinstance(text, str) else None
    if not isinstance(tree, dict):
        raise ConfigError(f"{checkpoint}: the checkpoint holds no readable config_yaml")
    merged = config_to_dict(cfg)
    merged.update({k: v for k, v in tree.items() if k in merged})
    return config_from_dict(merged, f"{checkpoint} (config_yaml)")


def plan_resume(cfg: RunConfig, checkpoint: Path, saved_state: dict[str, Any]) -> ResumePlan:
    """Compare ``cfg`` with the checkpoint's config and apply ``training.on_resume_change``.

    Returns the :class:`ResumePlan`; raises :class:`ConfigError` (one line) for a change the
    policy refuses, a model change, or a ``training.train_iters`` below the checkpoint's step.
    """
    step, consumed = int(saved_state["iteration"]), int(saved_state["consumed_samples"])
    plan = ResumePlan(checkpoint, step, cfg, [], {}, consumed, consumed)
    train_iters = cfg.training.resolved_train_iters(cfg.data.seq_length)
    if train_iters < step:
        raise ConfigError(f"resuming {checkpoint} (step {step}): training.train_iters is {train_iters}, below the "
                          f"checkpoint's step: nothing would be trained. Set it to {step} or more, or use another "
                          "run_dir")
    try:
        saved = _saved_config(cfg, checkpoint, saved_state.get("config_yaml"))
    except ConfigError as exc:
        plan.notes.append(f"WARNING: the resume is not checked against the checkpoint's config: {exc}")
        return plan
    policy = cfg.training.on_resume_change
    changes = compare_configs(saved, cfg)
    choice = {"model": "refuse", "schedule": policy.schedule, "data": policy.data}
    blocking = [c for c in changes if choice[c.family] == "refuse"]
    if blocking:
        blocking.sort(key=lambda c: ("model", "schedule", "data").index(c.family))
        raise ConfigError(_refusal(checkpoint, step, blocking, consumed))
    plan.changes = changes
    plan.applied = {c.family: choice[c.family] for c in changes}
    if plan.applied.get("schedule") == "checkpoint":
        plan.cfg = _with_checkpoint_schedule(cfg, saved)
    if "data" in plan.applied:
        old_len, new_len = _samples_length(saved), _samples_length(cfg)
        plan.consumed = math.ceil(consumed * old_len / new_len)
    elif saved_state.get("data_fingerprint"):
        plan.fingerprint = saved_state["data_fingerprint"]
    for c in changes:
        if plan.applied[c.family] == "config":
            how = "the config's applies"
        elif c.key.startswith("training.train_"):  # only the decay length is the checkpoint's
            kept = plan.cfg.training.lr_decay_iters
            how = f"the checkpoint's LR decay length is kept (training.lr_decay_iters={kept})"
        else:
            how = "the checkpoint's is kept (training.on_resume_change.schedule=checkpoint)"
        plan.notes.append(f"resume: {c.key} is {_show(c.config)} in the config, {_show(c.checkpoint)} in the "
                          f"checkpoint: {how} from step {step + 1}")
    if plan.consumed != consumed:
        plan.notes.append(f"resume: data position {consumed} samples of {_samples_length(saved)} tokens -> "
                          f"{plan.consumed} samples of {_samples_length(cfg)} tokens (the tokens already trained on)")
    return plan
