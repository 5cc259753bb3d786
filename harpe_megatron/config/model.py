"""Typed config sections for the model: architecture, positional encoding, parallel layout.

Each section validates itself in ``__post_init__`` and names the offending key in its errors;
cross-section checks live in :func:`validate_model_setup`. YAML (``model:``, ``positional:``,
``parallel:``) mirrors these dataclasses field for field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from harpe_megatron.positional.bases import BaseStrategy, PaperBases, base_strategy_from_dict
from harpe_megatron.positional.scaling import ROPE_SCALINGS, NoScaling, RopeScaling

__all__ = ["ModelConfig", "PositionalConfig", "PER_HEAD_ROPE", "ParallelConfig", "validate_model_setup",
           "padded_vocab_size"]

PER_HEAD_ROPE = ("fused", "table")  # values of positional.per_head_rope


@dataclass
class ModelConfig:
    """A Llama-family decoder: RMSNorm, SwiGLU, no biases, rotary positions, untied embeddings."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None: MHA (one KV head per query head)
    ffn_hidden_size: int = 176
    vocab_size: int = 256
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    untie_embeddings_and_output_weights: bool = True
    make_vocab_size_divisible_by: int = 128
    pretrained_context_length: int = 4096
    # layer implementation: "local" (megatron's local spec with our SDPAttention and RMSNorm: the
    # tested path, CPU and GPU) or "te" (Transformer Engine's spec: never run anywhere yet, see
    # docs/design.md; needs transformer_engine installed)
    transformer_impl: str = "local"

    def __post_init__(self) -> None:
        if self.transformer_impl not in ("local", "te"):
            raise ValueError(f"model.transformer_impl: expected 'local' or 'te', got {self.transformer_impl!r}")
        for key in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        for key in ("num_query_groups", "make_vocab_size_divisible_by", "pretrained_context_length"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")
        if not self.norm_epsilon > 0:
            raise ValueError(f"model.norm_epsilon must be positive, got {self.norm_epsilon}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"model.num_query_groups ({self.num_query_groups})"
            )
        if self.head_dim % 2:
            raise ValueError(f"model: head dim hidden_size/num_attention_heads = {self.head_dim} must be even (RoPE)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class PositionalConfig:
    """RoPE: how heads get their bases, how frequencies are scaled, where positions come from.

    ``scaling``: ``{type: none}`` (default), ``linear`` (PI), ``ntk`` or ``yarn``; see
    :mod:`harpe_megatron.positional.scaling`.

    ``position_ids``: ``sequential`` (0..S-1 of the packed sequence, zigzag-sharded under CP) or
    ``from_batch`` (per-sample ids from the data pipeline, e.g. CREAM/PoSE). Unset (``null``):
    ``sequential`` here; a run config with ``data.position_scheme`` makes it ``from_batch``
    (:class:`~harpe_megatron.config.run.RunConfig`), and refuses an explicit ``sequential`` then.

    ``per_head_rope``: how the per-head rotation is applied. ``fused`` (default): inside attention
    from positions and per-head inverse frequencies (our Triton kernel on CUDA, the same
    expression in torch elsewhere; no angle table). ``table``: megatron's unfused path on a
    precomputed per-head angle table (the reference; more memory). Formerly
    ``apply_rope_fusion: true|false`` (still read, with a warning, by the config loader); unrelated
    to megatron-core's ``TransformerConfig.apply_rope_fusion``, which stays off.
    """

    bases: BaseStrategy = field(default_factory=PaperBases)
    scaling: RopeScaling = field(default_factory=NoScaling)
    position_ids: Optional[str] = None  # None: unset, see above
    rotary_interleaved: bool = False
    per_head_rope: str = "fused"
    # whether position_ids was given (False: defaulted; RunConfig may then set from_batch)
    position_ids_explicit: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.position_ids_explicit = self.position_ids is not None
        if self.position_ids is None:
            self.position_ids = "sequential"
        if isinstance(self.bases, dict):
            self.bases = base_strategy_from_dict(self.bases)
        if isinstance(self.scaling, dict):
            spec = dict(self.scaling)
            name = spec.pop("type", None)
            if name not in ROPE_SCALINGS:
                raise ValueError(f"positional.scaling.type: expected one of {sorted(ROPE_SCALINGS)}, got {name!r}")
            self.scaling = ROPE_SCALINGS[name](**spec)
        if self.position_ids not in ("sequential", "from_batch"):
            raise ValueError(
                f"positional.position_ids: expected 'sequential' or 'from_batch', got {self.position_ids!r}"
            )
        if self.per_head_rope not in PER_HEAD_ROPE:
            raise ValueError(f"positional.per_head_rope: expected 'fused' or 'table', got {self.per_head_rope!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"bases": self.bases.to_dict(), "scaling": self.scaling.to_dict(),
                "position_ids": self.position_ids, "rotary_interleaved": self.rotary_interleaved,
                "per_head_rope": self.per_head_rope}


@dataclass
class ParallelConfig:
    """megatron-core parallel layout (world = TP x CP x PP x DP).

    ``cp_comm_type``: how context-parallel attention exchanges K/V (megatron's field): ``null``
    (Transformer Engine's default, the ``p2p`` ring that overlaps each hop with a chunk of
    attention; our SDPAttention without TE: ``all_gather``), ``p2p``, ``all_gather``, ``a2a`` or
    ``a2a+p2p`` (TE only). See docs/performance.md for when which pays off.
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    cp_comm_type: Optional[str] = None

    def __post_init__(self) -> None:
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"parallel.{key} must be >= 1, got {getattr(self, key)}")
        if self.cp_comm_type not in (None, "p2p", "all_gather", "a2a", "a2a+p2p"):
            raise ValueError(
                f"parallel.cp_comm_type: expected null, p2p, all_gather, a2a or a2a+p2p, got {self.cp_comm_type!r}"
            )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("parallel.sequence_parallel needs parallel.tensor_model_parallel_size > 1")


def padded_vocab_size(vocab_size: int, tp_size: int, divisible_by: int = 128) -> int:
    """Megatron's padding: round the vocabulary up to a multiple of ``divisible_by * tp_size``."""
    multiple = divisible_by * tp_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def validate_model_setup(model: ModelConfig, parallel: ParallelConfig, seq_length: Optional[int] = None) -> None:
    """Checks that need more than one section; each error names the keys involved."""
    tp, cp = parallel.tensor_model_parallel_size, parallel.context_parallel_size
    if model.num_attention_heads % tp:
        raise ValueError(
            f"model.num_attention_heads ({model.num_attention_heads}) must be divisible by "
            f"parallel.tensor_model_parallel_size ({tp})"
        )
    if model.num_query_groups % tp:
        raise ValueError(
            f"model.num_query_groups ({model.num_query_groups}) must be divisible by "
            f"parallel.tensor_model_parallel_size ({tp})"
        )
    if model.num_layers % parallel.pipeline_model_parallel_size:
        raise ValueError(
            f"model.num_layers ({model.num_layers}) must be divisible by "
            f"parallel.pipeline_model_parallel_size ({parallel.pipeline_model_parallel_size})"
        )
    if seq_length is not None:
        # CP cuts the sequence into 2*cp zigzag chunks; SP then splits each rank's share over TP.
        factors = {"2 x context_parallel_size": 2 * cp if cp > 1 else 1,
                   "tensor_model_parallel_size (sequence_parallel)": tp if parallel.sequence_parallel else 1}
        multiple = factors["2 x context_parallel_size"] * factors["tensor_model_parallel_size (sequence_parallel)"]
        if seq_length % multiple:
            why = " x ".join(k for k, v in factors.items() if v > 1)
            raise ValueError(f"sequence length {seq_length} must be divisible by {multiple} ({why})")

