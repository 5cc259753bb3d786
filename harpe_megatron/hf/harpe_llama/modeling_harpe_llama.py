"""HARPE Llama: Hugging Face Llama with one RoPE base per attention head.

Shipped into exported HF folders and imported by
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``. What that runs: this
file and its siblings ``configuration_harpe_llama.py``, ``compat_harpe_llama.py`` (transformers
version check, KV-cache calling conventions) and ``self_extend_harpe_llama.py`` (Self-Extend),
imported relatively (transformers copies a module's relative imports with it); they import only
``torch`` and ``transformers`` (its Llama classes) and define classes and functions. Nothing is
downloaded, executed at import time or patched globally.

Only the rotary position embedding differs from ``LlamaForCausalLM``; the weights, their names
and everything else are Llama's:

* :class:`HarpeLlamaRotaryEmbedding` returns ``(cos, sin)`` of shape ``[batch, kv_heads, seq,
  head_dim]``: one row per KV group, with the group's base (``config.harpe_rope_bases`` lists one
  base per query head; the heads of a group share it). Frequencies ``base^(-2i/d)`` -- scaled per
  head when ``rope_parameters`` says ``linear`` (position interpolation), ``yarn`` (with YaRN's
  attention factor on cos/sin, as in Llama) or ``llama3`` (Llama 3.1's bands) -- and angles are computed in fp32 and cast to the
  activations' dtype. They are plain tensors, not buffers: casting the model to bf16 or loading
  it on the meta device leaves them alone.
* :class:`HarpeLlamaAttention` applies them rotate-half style: keys ``[b, kv_heads, s, d]``
  directly, queries viewed as ``[b, kv_heads, heads_per_group, s, d]`` so that every query head
  uses its group's table without materialising per-query-head copies. Keys are rotated before
  they enter the KV cache, exactly as in Llama, so ``generate()`` with a cache works.

Self-Extend (``self_extend_harpe_llama.py``): the config key ``self_extend: {"group_size": G,
"window": W}`` makes this model build every layer's attention as ``SelfExtendAttention``.

Transformers versions: the attention forward below restates Llama's; ``compat_harpe_llama.py``
refuses a transformers outside ``TESTED_TRANSFORMERS`` (tested: greedy generation with cache ==
without cache == megatron, equal logits) and calls the KV cache the way the installed one expects.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    eager_attention_forward,
    rotate_half,
)

try:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError:  # pragma: no cover
    ALL_ATTENTION_FUNCTIONS = None

from .compat_harpe_llama import pop_cache, project_qkv, update_cache
from .configuration_harpe_llama import HarpeLlamaConfig
from .self_extend_harpe_llama import SelfExtendAttention, self_extend_settings

__all__ = [
    "HarpeLlamaRotaryEmbedding",
    "HarpeLlamaAttention",
    "HarpeLlamaDecoderLayer",
    "HarpeLlamaModel",
    "HarpeLlamaForCausalLM",
    "harpe_group_bases",
    "harpe_inverse_frequencies",
]


def harpe_group_bases(config) -> list[float]:
    """One base per KV group from ``config.harpe_rope_bases`` (validated)."""
    heads = config.num_attention_heads
    groups = getattr(config, "num_key_value_heads", None) or heads
    bases = getattr(config, "harpe_rope_bases", None)
    if bases is None or len(bases) != heads:
        raise ValueError(f"harpe_rope_bases must list one RoPE base per query head ({heads}), got {bases!r}")
    bases = [float(b) for b in bases]
    if any(not math.isfinite(b) or b <= 1.0 for b in bases):
        raise ValueError(f"every RoPE base must be a finite number > 1, got {bases}")
    per_group = heads // groups
    for g in range(groups):
        group = bases[g * per_group : (g + 1) * per_group]
        if len(set(group)) != 1:
            raise ValueError(f"query heads of KV group {g} must share one RoPE base, got {group}")
    return bases[::per_group]


def _rope_spec(config) -> dict:
    spec = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(spec)


def _yarn_correction_range(base: float, head_dim: int, spec: dict) -> tuple[float, float]:
    original = spec["original_max_position_embeddings"]

    def dim_for(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for(float(spec.get("beta_fast") or 32.0)), dim_for(float(spec.get("beta_slow") or 1.0))
    if spec.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, head_dim - 1)


def _llama3_scaled(inv_freq: torch.Tensor, spec: dict) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling of ``inv_freq`` (rows: bases), transformers' formula
    and operation order: wavelengths below ``original / high_freq_factor`` kept, above
    ``original / low_freq_factor`` divided by ``factor``, a smooth blend in between."""
    factor, low, high = float(spec["factor"]), float(spec["low_freq_factor"]), float(spec["high_freq_factor"])
    old_context_len = spec["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context_len / low, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context_len / high) * ~(wavelen > old_context_len / low)
    return torch.where(medium, smoothed, scaled)


def harpe_inverse_frequencies(bases: list[float], head_dim: int, spec: dict) -> tuple[torch.Tensor, float]:
    """``([len(bases), d/2] fp32 inverse frequencies, attention factor)`` for RoPE type
    ``default``, ``linear`` (position interpolation), ``yarn`` or ``llama3``, each base on its own."""
    cpu = torch.device("cpu")  # explicit: models are often constructed under a meta-device context
    b = torch.tensor(bases, dtype=torch.float32, device=cpu).reshape(-1, 1)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=cpu).to(torch.float32) / head_dim
    plain = 1.0 / (b ** exponents)
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind == "default":
        return plain, 1.0
    factor = float(spec["factor"])
    if kind == "linear":
        return plain / factor, 1.0
    if kind == "llama3":
        return _llama3_scaled(plain, spec), 1.0
    if kind == "yarn":
        rows = []
        for row, base in zip(plain, bases):
            low, high = _yarn_correction_range(float(base), head_dim, spec)
            if low == high:
                high += 0.001
            ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=cpu) - low) / (high - low)).clamp(0, 1)
            keep = 1 - ramp  # 1: keep the frequency (fast dims), 0: interpolate (slow dims)
            rows.append(row / factor * (1 - keep) + row * keep)
        attention = spec.get("attention_factor")
        if attention is None:
            attention = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        return torch.stack(rows), float(attention)
    raise ValueError(f"harpe_llama: RoPE type {kind!r} is not supported (default, linear, yarn, llama3)")


class HarpeLlamaRotaryEmbedding(nn.Module):
    """Per-KV-group rotary tables: ``forward(x, position_ids) -> (cos, sin)``, ``[b, groups, s, d]``."""

    def __init__(self, config, device=None):
        super().__init__()
        self.group_bases = harpe_group_bases(config)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if self.head_dim % 2:
            raise ValueError(f"rotary head dim must be even, got {self.head_dim}")
        self.rope_spec = _rope_spec(config)
        _, self.attention_scaling = harpe_inverse_frequencies(self.group_bases[:1], self.head_dim, self.rope_spec)
        # Computed on first use, per device, and deliberately not a buffer (see module docstring).
        self._inv_freq: dict[str, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """``[groups, d/2]`` fp32 inverse frequencies on ``device``."""
        key = str(device)
        if key not in self._inv_freq:
            inv_freq, _ = harpe_inverse_frequencies(self.group_bases, self.head_dim, self.rope_spec)
            self._inv_freq[key] = inv_freq.to(device)
        return self._inv_freq[key]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq(x.device)
        angles = position_ids[:, None, :, None].to(torch.float32) * inv_freq[None, :, None, :]
        emb = torch.cat((angles, angles), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def apply_harpe_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate ``q [b, heads, s, d]`` and ``k [b, groups, s, d]`` with group tables ``[b|1, groups, s, d]``."""
    groups = k.shape[1]
    qg = q.unflatten(1, (groups, q.shape[1] // groups))
    cq, sq = cos[:, :, None], sin[:, :, None]
    q_embed = ((qg * cq) + (rotate_half(qg) * sq)).flatten(1, 2)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def _attention_interface(impl: str) -> Callable:
    if ALL_ATTENTION_FUNCTIONS is None:
        return eager_attention_forward
    getter = getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)
    if getter is not None:
        return getter(impl, eager_attention_forward)
    return eager_attention_forward if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]


class HarpeLlamaAttention(LlamaAttention):
    """Llama attention whose rotary tables hold one row per KV group (see module docstring)."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        attention_mask: Optional[torch.Tensor] = None,
        **kwargs,
    ):
        cache = pop_cache(kwargs)  # ``cache=`` (>= 5.24) or ``past_key_values=``
        input_shape = hidden_states.shape[:-1]
        query_states, key_states, value_states = project_qkv(self, hidden_states)

        cos, sin = position_embeddings
        query_states, key_states = apply_harpe_rotary(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = update_cache(cache, key_states, value_states, self.layer_idx, cos, sin, kwargs)

        attention = _attention_interface(self.config._attn_implementation)
        attn_output, attn_weights = attention(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights


class HarpeLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = HarpeLlamaAttention(config=config, layer_idx=layer_idx)
        settings = self_extend_settings(getattr(config, "self_extend", None))
        if settings is not None:  # config key ``self_extend: {group_size, window}``
            head_dim = self.self_attn.head_dim
            inv_freq, scaling = harpe_inverse_frequencies(harpe_group_bases(config), head_dim, _rope_spec(config))
            self.self_attn = SelfExtendAttention(self.self_attn, inv_freq, scaling, *settings)


class HarpeLlamaModel(LlamaModel):
    """``LlamaModel`` with HARPE layers and rotary embedding (``forward`` is Llama's)."""

    config_class = HarpeLlamaConfig
    _no_split_modules = ["HarpeLlamaDecoderLayer"]

    def __init__(self, config):
        LlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [HarpeLlamaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = HarpeLlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class HarpeLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` on :class:`HarpeLlamaModel` (same weight names, same ``forward``)."""

    config_class = HarpeLlamaConfig
    _no_split_modules = ["HarpeLlamaDecoderLayer"]

    def __init__(self, config):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = HarpeLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


try:  # lets save_pretrained() of a loaded model copy this file and write auto_map again
    HarpeLlamaModel.register_for_auto_class("AutoModel")
    HarpeLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
except Exception:  # pragma: no cover
    pass
