"""The run config tree: one dataclass per YAML section, validated on construction.

```yaml
model: {preset: llama2-7b, ...}   # ModelConfig (a preset plus field overrides)
positional: {bases: {strategy: paper}, position_ids: sequential}
parallel: {tensor_model_parallel_size: 2, context_parallel_size: 4, sequence_parallel: true}
data: {paths: [...], tokenizer_model: ..., seq_length: 131072}
training: {micro_batch_size: 1, global_batch_size: 32, train_tokens: 6e9, lr: 2.0e-5, ...}
checkpoint: {save: ..., save_interval: 200, keep_last: 3, pretrained: ...}
logging: {log_interval: 1, tensorboard: true, wandb_project: null}
run_dir: runs/harpe_128k
```

Cross-section rules live in :meth:`RunConfig.validate`; rules that need the world size (data
parallel size, batch divisibility) in :meth:`RunConfig.validate_for_world`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from harpe_megatron.config.model import ModelConfig, ParallelConfig, PositionalConfig, validate_model_setup
from harpe_megatron.positional.bases import per_query_head_bases
from harpe_megatron.positional.position_ids import PositionScheme

__all__ = ["DataConfig", "ResumePolicy", "TrainingConfig", "CheckpointConfig", "LoggingConfig", "StageConfig",
           "RunConfig"]


@dataclass
class DataConfig:
    """Where tokens come from (megatron indexed datasets) and how they are packed."""

    paths: list[str] = field(default_factory=list)  # indexed-dataset prefixes (no .bin/.idx)
    weights: Optional[list[float]] = None  # blend weights, one per path (None: by size)
    split: str = "98,2,0"  # train/valid/test share of every prefix
    tokenizer_model: Optional[str] = None  # sentencepiece model (Llama-2 tokenizer.model)
    seq_length: int = 4096
    cache_dir: Optional[str] = None  # megatron's index cache (default: next to the data)
    # CREAM / PoSE: samples packed at the scheme's target length, shown through a seq_length
    # window with sampled positions (implies positional.position_ids: from_batch)
    position_scheme: Optional[PositionScheme] = None
    # attention causal within each packed document (EOD-terminated) instead of across the whole
    # row; a document's last token then predicts nothing (docs/document_masking.md)
    document_masking: bool = False
    # positions restart at 0 at every document (Llama 3); needs document_masking, implies
    # positional.position_ids: from_batch
    reset_position_ids: bool = False
    # checks before training (data/validation.py): full = every token id read, quick = headers,
    # index, splits and a sample of token ids, off = none
    validate: str = "full"

    def __post_init__(self) -> None:
        if self.validate not in ("full", "quick", "off"):
            raise ValueError(f"data.validate: expected full, quick or off, got {self.validate!r}")
        if self.seq_length <= 0:
            raise ValueError(f"data.seq_length must be positive, got {self.seq_length}")
        if self.weights is not None and len(self.weights) != len(self.paths):
            raise ValueError(
                f"data.weights has {len(self.weights)} entries but data.paths has {len(self.paths)}"
            )
        parts = self.split.split(",")
        if len(parts) != 3 or not all(p.strip().replace(".", "", 1).isdigit() for p in parts):
            raise ValueError(f"data.split must look like '98,2,0', got {self.split!r}")


# training.on_resume_change: the choices per family of settings (training/resume_checks.py)
_RESUME_CHOICES = {"schedule": ("refuse", "config", "checkpoint"), "data": ("refuse", "config")}


@dataclass(frozen=True)
class ResumePolicy:
    """What a resume does when the run config changes settings the checkpoint's run was made with
    (``training.on_resume_change``; the checks are training/resume_checks.py's, docs/reliability.md).

    ``schedule`` (learning-rate schedule and Adam settings): ``refuse`` (default), ``config`` (the
    config's schedule applies from the resumed step on, as if it had been the schedule all along)
    or ``checkpoint`` (the checkpoint's schedule is kept and recorded as the run's).
    ``data`` (what the saved data position points at): ``refuse`` (default) or ``config`` (the
    config's data from the number of tokens already trained on; training/resume_checks.py).
    YAML: ``on_resume_change: refuse|config`` (both families) or ``{schedule: config, data: refuse}``.
    """

    schedule: str = "refuse"
    data: str = "refuse"

    def __post_init__(self) -> None:
        for family, choices in _RESUME_CHOICES.items():
            if getattr(self, family) not in choices:
                raise ValueError(f"training.on_resume_change.{family}: expected {' or '.join(choices)}, "
                                 f"got {getattr(self, family)!r}")

    @classmethod
    def parse(cls, value: Any) -> "ResumePolicy":
        """A policy from its YAML form: a choice for every family, or a mapping per family."""
        if isinstance(value, ResumePolicy):
            return value
        if isinstance(value, str):
            if value == "checkpoint":
                raise ValueError("training.on_resume_change: 'checkpoint' applies to the schedule only: "
                                 "write {schedule: checkpoint}")
            if value not in ("refuse", "config"):
                raise ValueError(f"training.on_resume_change: expected refuse, config or a mapping "
                                 f"{{schedule: ..., data: ...}}, got {value!r}")
            return cls(schedule=value, data=value)
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(_RESUME_CHOICES))
            if unknown:
                raise ValueError(f"training.on_resume_change: unknown key(s) {unknown}; allowed: "
                                 f"{sorted(_RESUME_CHOICES)}")
            return cls(**value)
        raise ValueError(f"training.on_resume_change: expected refuse, config or a mapping, got {value!r}")


@dataclass
class TrainingConfig:
    """Optimisation, schedule, precision and memory settings."""

    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_iters: Optional[int] = None
    train_tokens: Optional[float] = None  # alternative to train_iters (rounded up to whole steps)
    lr: float = 2e-5
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_style: str = "constant"  # constant | linear | cosine
    lr_decay_iters: Optional[int] = None  # default: train_iters
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    precision: str = "bf16"  # bf16 | fp16 | fp32
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    recompute_granularity: Optional[str] = None  # None | full | selective
    recompute_method: Optional[str] = None  # uniform | block (with full)
    recompute_num_layers: Optional[int] = None
    seed: int = 1234
    # auto: cuda when torch sees a GPU, else cpu (gloo + the CUDA->CPU redirection); cuda or cpu
    # force one (cuda without a GPU is an error). Announced in one log line at start-up.
    device: str = "auto"
    eval_interval: int = 0  # 0: never
    eval_iters: int = 1
    exit_interval: Optional[int] = None  # stop (after saving) at this step; for tests/schedulers
    # reliability (docs/reliability.md)
    max_consecutive_nonfinite_steps: int = 10  # skipped steps in a row tolerated; one more aborts (exit 77)
    hang_timeout_s: float = 900.0  # no progress for this long in a step/eval -> exit 76 naming stale ranks; 0: off
    slow_phase_timeout_s: float = 3600.0  # the same for start-up, checkpoint load/save and the first step
    distributed_timeout_s: float = 1800.0  # init_process_group's timeout for collectives
    # memory plan at start-up, before anything is allocated (planner/plan.py): warn = print the
    # predicted per-rank peak (and, on CUDA, whether it fits), fail = also stop when it does not fit
    preflight: str = "warn"
    preflight_margin_gib: float = 6.0  # kept free beside the plan: CUDA context, NCCL, fragmentation
    # a resume whose config changes the checkpoint's schedule or data: refuse (default) | config,
    # or per family {schedule: refuse|config|checkpoint, data: refuse|config} (ResumePolicy)
    on_resume_change: ResumePolicy | str | dict = "refuse"

    def __post_init__(self) -> None:
        self.on_resume_change = ResumePolicy.parse(self.on_resume_change)
        for key in ("micro_batch_size", "global_batch_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"training.{key} must be positive, got {getattr(self, key)}")
        if self.train_iters is not None and self.train_tokens is not None:
            raise ValueError("set exactly one of training.train_iters and training.train_tokens")
        for key in ("train_iters", "train_tokens", "lr_decay_iters", "exit_interval", "eval_iters"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ValueError(f"training.{key} must be positive, got {getattr(self, key)}")
        for key in ("lr_warmup_iters", "eval_interval"):
            if getattr(self, key) < 0:
                raise ValueError(f"training.{key} must be >= 0, got {getattr(self, key)}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"training.device: expected auto, cuda or cpu, got {self.device!r}")
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"training.precision: expected bf16, fp16 or fp32, got {self.precision!r}")
        if self.lr_decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(
                f"training.lr_decay_style: expected constant, linear or cosine, got {self.lr_decay_style!r}"
            )
        if self.recompute_granularity not in (None, "full", "selective"):
            raise ValueError(
                f"training.recompute_granularity: expected null, full or selective, got {self.recompute_granularity!r}"
            )
        if self.recompute_granularity == "full" and self.recompute_method not in ("uniform", "block"):
            raise ValueError("training.recompute_method must be 'uniform' or 'block' with recompute_granularity=full")
        if self.recompute_granularity != "full" and self.recompute_method is not None:
            raise ValueError("training.recompute_method only applies to recompute_granularity=full")
        if not self.lr >= 0:
            raise ValueError(f"training.lr must be >= 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"training.min_lr must be in [0, training.lr ({self.lr})], got {self.min_lr}")
        for key in ("max_consecutive_nonfinite_steps", "hang_timeout_s", "slow_phase_timeout_s"):
            if getattr(self, key) < 0:
                raise ValueError(f"training.{key} must be >= 0, got {getattr(self, key)}")
        if self.distributed_timeout_s <= 0:
            raise ValueError(f"training.distributed_timeout_s must be positive, got {self.distributed_timeout_s}")
        if self.hang_timeout_s and self.slow_phase_timeout_s < self.hang_timeout_s:
            raise ValueError(
                f"training.slow_phase_timeout_s ({self.slow_phase_timeout_s}) must be >= training.hang_timeout_s "
                f"({self.hang_timeout_s}): checkpoint save/load and the first step take longer than a step"
            )

        if self.preflight not in ("warn", "fail", "off"):
            raise ValueError(f"training.preflight: expected warn, fail or off, got {self.preflight!r}")

    def resolved_train_iters(self, seq_length: int) -> int:
        if self.train_iters is not None:
            return self.train_iters
        if self.train_tokens is None:
            raise ValueError("set exactly one of training.train_iters and training.train_tokens")
        return math.ceil(self.train_tokens / (self.global_batch_size * seq_length))

    def lr_decay_steps(self, train_iters: int) -> int:
        """Steps of the LR decay, warm-up included: ``lr_decay_iters`` (default ``train_iters``),
        at least one past the warm-up (megatron's scheduler needs it longer than the warm-up)."""
        return max(self.lr_decay_iters or train_iters, self.lr_warmup_iters + 1)


@dataclass
class CheckpointConfig:
    """megatron dist-checkpointing: where, how often, how many, and the initial weights."""

    save: Optional[str] = None  # default: <run_dir>/checkpoints
    save_interval: int = 0  # 0: only at the end
    keep_last: int = 3  # 0: keep all
    load: Optional[str] = None  # resume from here (default: save dir, if it has a checkpoint)
    pretrained: Optional[str] = None  # initial weights only (e.g. converted Llama-2-7B)

    def __post_init__(self) -> None:
        if self.save_interval < 0 or self.keep_last < 0:
            raise ValueError("checkpoint.save_interval and checkpoint.keep_last must be >= 0")


@dataclass
class LoggingConfig:
    log_interval: int = 1
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    wandb_mode: str = "offline"  # online | offline (no network needed) | disabled
    wandb_run_name: Optional[str] = None
    peak_tflops: Optional[float] = None  # device peak for MFU (default: built-in table for H100/H200/A100)

    def __post_init__(self) -> None:
        if self.wandb_mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logging.wandb_mode: expected online, offline or disabled, got {self.wandb_mode!r}")
        if self.log_interval <= 0:
            raise ValueError(f"logging.log_interval must be positive, got {self.log_interval}")


# Keys a stage may not set: the schedule sets them per stage (training/stages.py), or (model.preset)
# they would be silently overridden by the run's resolved model fields.
_STAGE_FIXED_KEYS = ("stages", "run_dir", "checkpoint.save", "checkpoint.load", "checkpoint.pretrained",
                     "model.preset")


@dataclass
class StageConfig:
    """One stage of a multi-stage schedule: a name and dotted overrides of the run config.

    ```yaml
    stages:
      - {name: abf_1e6_32k, overrides: {data.seq_length: 32768, positional.bases.base: 1.0e6,
                                        training.train_tokens: 2.0e9}}
      - {name: pi_x4, overrides: {positional.scaling: {type: linear, factor: 4.0}, training.train_iters: 100}}
    ```

    Keys are the command line's ``key.path`` (any key of the run config; a key naming a section
    replaces the whole section, e.g. ``positional.bases: {strategy: paper}``), values are YAML.
    A stage that sets one of ``training.train_iters`` / ``training.train_tokens`` clears the other.
    Every stage's config is built when the config loads (``config/loader.py``,
    :func:`~harpe_megatron.config.loader.stage_run_config`), so unknown keys and bad values fail
    then, naming the stage. ``run_dir`` and ``checkpoint.save/load/pretrained`` are set per stage
    by the schedule (``training/stages.py``) and cannot be staged.
    """

    name: str = "stage"
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(f"stages: stage name {self.name!r} must be non-empty and contain no '/'")
        if not isinstance(self.overrides, dict):
            raise ValueError(f"stage {self.name!r}: overrides must be a mapping of key.path: value, "
                             f"got {type(self.overrides).__name__}")
        for key in self.overrides:
            if not isinstance(key, str) or not all(key.split(".")):
                raise ValueError(f"stage {self.name!r}: override key {key!r} must be a dotted key path")
            fixed = [f for f in _STAGE_FIXED_KEYS if key == f or f.startswith(key + ".") or key.startswith(f + ".")]
            if fixed:
                raise ValueError(
                    f"stage {self.name!r}: {key!r} cannot be staged: run_dir and checkpoint.save/load/pretrained "
                    "are set per stage by the schedule (<run_dir>/<i>_<name>/, initial weights from the previous "
                    "stage) and the model's architecture is the run's (override model.* fields, not model.preset)"
                )


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    positional: PositionalConfig = field(default_factory=PositionalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(train_iters=10))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    stages: Optional[list[StageConfig]] = None  # multi-stage schedule: dotted overrides per stage (training/stages.py)
    run_dir: str = "runs/default"

    def __post_init__(self) -> None:
        # One decision, one key: a position scheme (or per-document positions) means positions come
        # from the batch, unless positional.position_ids was set explicitly (a contradiction is
        # refused in validate).
        batch_positions = self.data.position_scheme is not None or self.data.reset_position_ids
        if batch_positions and not self.positional.position_ids_explicit:
            self.positional = dataclasses.replace(self.positional, position_ids="from_batch")
        self.validate()

    def validate(self) -> None:
        validate_model_setup(self.model, self.parallel, self.data.seq_length)
        # Each stage's own config is built and validated by the loader (config/loader.py).
        if self.data.position_scheme is not None:
            self.data.position_scheme.validate(self.data.seq_length)
            if self.positional.position_ids != "from_batch":
                raise ValueError(
                    f"data.position_scheme ({self.data.position_scheme.name}) gives every sample its own positions, "
                    f"but positional.position_ids is {self.positional.position_ids!r}; drop positional.position_ids "
                    "(a position scheme implies from_batch) or set it to from_batch"
                )
        self._validate_documents()
        if not self.stages and self.training.train_iters is None and self.training.train_tokens is None:
            raise ValueError("set exactly one of training.train_iters and training.train_tokens")
        if self.stages is not None and len({s.name for s in self.stages}) != len(self.stages):
            raise ValueError("stages: stage names must be unique")
        # Resolving the bases checks their count and GQA consistency against the model.
        per_query_head_bases(self.positional.bases, self.model.num_attention_heads,
                             self.model.num_query_groups, self.model.head_dim)
        if self.parallel.pipeline_model_parallel_size > 1 and self.training.global_batch_size < (
            self.training.micro_batch_size * self.parallel.pipeline_model_parallel_size
        ):
            raise ValueError(
                "training.global_batch_size should give at least parallel.pipeline_model_parallel_size "
                "micro-batches per data-parallel rank, or the pipeline idles"
            )

    def _validate_documents(self) -> None:
        """data.document_masking / data.reset_position_ids against the other keys (one line each)."""
        d = self.data
        if d.reset_position_ids and not d.document_masking:
            raise ValueError("data.reset_position_ids needs data.document_masking: true (positions restarting at "
                             "each document while attention still crosses documents give two tokens one position)")
        if d.document_masking and d.position_scheme is not None:
            raise ValueError(f"data.document_masking cannot be combined with data.position_scheme "
                             f"({d.position_scheme.name}): the scheme's window takes its positions across the whole "
                             "packed target-length row, and masking at documents removes the long-distance pairs "
                             "it exists to train; use one of them")
        if d.reset_position_ids and self.positional.position_ids != "from_batch":
            raise ValueError("data.reset_position_ids gives every document its own positions, but "
                             f"positional.position_ids is {self.positional.position_ids!r}; drop positional.position_ids "
                             "(data.reset_position_ids implies from_batch) or set it to from_batch")
        if d.document_masking and self.model.transformer_impl != "local":
            raise ValueError("data.document_masking needs model.transformer_impl: local (our SDPAttention); the "
                             "Transformer Engine spec masks documents only through packed THD sequences")

    @property
    def model_parallel_size(self) -> int:
        p = self.parallel
        return p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by TP x PP x CP = {self.model_parallel_size} "
                "(parallel.*)"
            )
        return world_size // self.model_parallel_size

    def validate_for_world(self, world_size: int) -> None:
        dp = self.data_parallel_size(world_size)
        t = self.training
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ValueError(
                f"training.global_batch_size ({t.global_batch_size}) must be divisible by "
                f"training.micro_batch_size ({t.micro_batch_size}) x data-parallel size ({dp})"
            )

    def num_microbatches(self, world_size: int) -> int:
        return self.training.global_batch_size // (self.training.micro_batch_size * self.data_parallel_size(world_size))
