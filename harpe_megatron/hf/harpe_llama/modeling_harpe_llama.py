"""HARPE Llama: Hugging Face Llama with one RoPE base per attention head.

Shipped into exported HF folders and imported by
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``. What that runs: this
file and ``configuration_harpe_llama.py``; both import only ``torch`` and ``transformers`` (its
Llama classes) and define the classes below. Nothing is downloaded, executed at import time or
patched globally.

Only the rotary position embedding differs from ``LlamaForCausalLM``; the weights, their names
and everything else are Llama's:

* :class:`HarpeLlamaRotaryEmbedding` returns ``(cos, sin)`` of shape ``[batch, kv_heads, seq,
  head_dim]``: one row per KV group, with the group's base (``config.harpe_rope_bases`` lists one
  base per query head; the heads of a group share it). Frequencies ``base^(-2i/d)`` -- scaled per
  head when ``rope_parameters`` says ``linear`` (position interpolation) or ``yarn`` (with YaRN's
  attention factor on cos/sin, as in Llama) -- and angles are computed in fp32 and cast to the
  activations' dtype. They are plain tensors, not buffers: casting the model to bf16 or loading
  it on the meta device leaves them alone.
* :class:`HarpeLlamaAttention` applies them rotate-half style: keys ``[b, kv_heads, s, d]``
  directly, queries viewed as ``[b, kv_heads, heads_per_group, s, d]`` so that every query head
  uses its group's table without materialising per-query-head copies. Keys are rotated before
  they enter the KV cache, exactly as in Llama, so ``generate()`` with a cache works.

Self-Extend (Jin et al. 2024, "LLM Maybe LongLM"; reference implementation datamllab/LongLM), an
inference-time option for this model and for stock Llama models alike: :func:`apply_self_extend`
swaps every layer's attention for :class:`SelfExtendAttention`, or the config key
``self_extend: {"group_size": G, "window": W}`` makes this model build it. Within the neighbour
window (``q - k < W``) scores use the normal positions; beyond it both positions are floor-divided
by ``G`` and the query's shifted by ``W - W / G`` (:func:`self_extend_positions`); the two score
maps are merged per query in one softmax. Per-group bases and YaRN/PI scalings are kept. Keys are
cached unrotated (each key is rotated at two positions), so cached and uncached generation agree.

Transformers versions: the attention forward below restates Llama's, so it depends on how the
installed transformers hands the KV cache to the layer (``past_key_values=`` before 5.24,
``cache=`` from 5.24) and to ``Cache.update`` (a ``cache_kwargs`` dict before 5.4, nothing from
5.4, ``kwargs=`` from 5.24). Each spelling is accepted; the versions in ``TESTED_TRANSFORMERS``
were tested (greedy generation with cache == without cache == megatron, equal logits) and any
other version is refused at import with a message naming both, unless
``HARPE_LLAMA_ALLOW_UNTESTED_TRANSFORMERS=1`` is set (then the newest convention is used, with a
warning).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from typing import Callable, Optional

import torch
import transformers
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

from .configuration_harpe_llama import HarpeLlamaConfig

#: Lowest and highest (major, minor) of transformers this file was tested with, both included.
TESTED_TRANSFORMERS = ((5, 0), (5, 24))
ALLOW_UNTESTED_ENV = "HARPE_LLAMA_ALLOW_UNTESTED_TRANSFORMERS"


def transformers_version(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a transformers version string such as ``5.24.0`` or ``5.25.0.dev0``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise RuntimeError(f"harpe_llama: cannot read the transformers version {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_transformers_version(version: str) -> tuple[int, int]:
    """Refuse (RuntimeError) a transformers version outside ``TESTED_TRANSFORMERS``, unless
    ``HARPE_LLAMA_ALLOW_UNTESTED_TRANSFORMERS=1`` (then warn). Returns the (major, minor) used."""
    (lo, hi), found = TESTED_TRANSFORMERS, transformers_version(version)
    if lo <= found <= hi:
        return found
    supported = f"{lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}.x"
    message = (f"harpe_llama: transformers {version} is installed, but this model's code was tested with "
               f"transformers {supported}; its attention restates Llama's and depends on transformers "
               f"internals (how the KV cache is passed), so an untested version could compute wrong "
               f"generations silently.")
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        warnings.warn(message + f" Continuing because {ALLOW_UNTESTED_ENV}=1.", stacklevel=2)
        return min(max(found, lo), hi)
    raise RuntimeError(message + f" Install a tested version (pip install 'transformers>={lo[0]}.{lo[1]},"
                       f"<{hi[0]}.{hi[1] + 1}') or set {ALLOW_UNTESTED_ENV}=1 to try it anyway.")


_TRANSFORMERS = check_transformers_version(transformers.__version__)
_CACHE_NAMES = ("cache", "past_key_values", "past_key_value")  # 5.24+, 5.0-5.23, 4.x


def pop_cache(kwargs: dict):
    """Remove and return the KV cache from a layer's keyword arguments, under any of its names."""
    found = [kwargs.pop(name) for name in _CACHE_NAMES if name in kwargs]
    found = [cache for cache in found if cache is not None]
    if len({id(cache) for cache in found}) > 1:
        raise ValueError("harpe_llama attention got two different KV caches (cache= and past_key_values=)")
    return found[0] if found else None


def update_cache(cache, key_states, value_states, layer_idx: int, cos, sin, kwargs: dict):
    """``cache.update`` called the way the installed transformers' Llama attention calls it."""
    if _TRANSFORMERS < (5, 4):
        cache_kwargs = {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")}
        return cache.update(key_states, value_states, layer_idx, cache_kwargs)
    if _TRANSFORMERS < (5, 24):
        return cache.update(key_states, value_states, layer_idx)
    return cache.update(key_states, value_states, layer_idx, kwargs=kwargs)


__all__ = [
    "HarpeLlamaRotaryEmbedding",
    "HarpeLlamaAttention",
    "HarpeLlamaDecoderLayer",
    "HarpeLlamaModel",
    "HarpeLlamaForCausalLM",
    "SelfExtendAttention",
    "apply_self_extend",
    "harpe_group_bases",
    "self_extend_attention",
    "self_extend_of",
    "self_extend_settings",
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


def harpe_inverse_frequencies(bases: list[float], head_dim: int, spec: dict) -> tuple[torch.Tensor, float]:
    """``([len(bases), d/2] fp32 inverse frequencies, attention factor)`` for RoPE type
    ``default``, ``linear`` (position interpolation) or ``yarn``, each base on its own."""
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
    raise ValueError(f"harpe_llama: RoPE type {kind!r} is not supported (default, linear, yarn)")


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


def project_qkv(attention, hidden_states: torch.Tensor):
    """Llama's q/k/v projections of ``[b, s, hidden]``: ``[b, heads|kv_heads, s, head_dim]`` each, unrotated."""
    hidden_shape = (*hidden_states.shape[:-1], -1, attention.head_dim)
    return tuple(proj(hidden_states).view(hidden_shape).transpose(1, 2)
                 for proj in (attention.q_proj, attention.k_proj, attention.v_proj))


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


# ----------------------------------------------------------------------------------------------
# Self-Extend (Jin et al. 2024, "LLM Maybe LongLM"): training-free, inference-time context extension
# ----------------------------------------------------------------------------------------------


def self_extend_settings(value) -> Optional[tuple[int, int]]:
    """``(group_size, window)`` from ``{"group_size": G, "window": W}`` or a ``(G, W)`` pair, validated;
    ``None`` for ``None``. Both must be integers >= 1."""
    if value is None:
        return None
    if isinstance(value, dict):
        if set(value) != {"group_size", "window"}:
            raise ValueError(f"self_extend must be {{'group_size': G, 'window': W}}, got {value!r}")
        group_size, window = value["group_size"], value["window"]
    else:
        group_size, window = value
    for name, v in (("group_size", group_size), ("window", window)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"self_extend {name} must be an integer >= 1, got {v!r}")
    return group_size, window


def self_extend_positions(query_positions: torch.Tensor, key_positions: torch.Tensor, group_size: int,
                          window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped positions: ``(q // G + W - W / G, k // G)`` (floor division, true-division shift).

    The shift makes the two regions join: at distance ``q - k = W`` the grouped relative position is
    ``~W``. It is datamllab/LongLM's convention (``group_query_position = q // g1 + g2 - g2 / g1``,
    ``group_key_position = k // g1``); when ``G`` divides ``W`` (the paper's 1024 / 32) it is
    ``W - W // G``, otherwise the query position is fractional, as in LongLM. (LongLM also drops
    the shift while every query position is below ``W``; no grouped score is used then, so that
    changes nothing and is not repeated here.)
    """
    shift = window - window / group_size
    grouped_q = torch.div(query_positions, group_size, rounding_mode="floor").to(torch.float32) + shift
    grouped_k = torch.div(key_positions, group_size, rounding_mode="floor").to(torch.float32)
    return grouped_q, grouped_k


def _rotate_at(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float):
    """RoPE (rotate-half) of ``x [b, kv_heads, n, s, d]`` at ``positions [b|1, s]`` with ``inv_freq
    [1 | kv_heads, d/2]`` (one row for all heads, or one per KV group); angles in fp32, like Llama."""
    angles = positions.to(torch.float32)[:, None, None, :, None] * inv_freq[None, :, None, None, :]
    emb = torch.cat((angles, angles), dim=-1)
    cos = (emb.cos() * attention_scaling).to(x.dtype)
    sin = (emb.sin() * attention_scaling).to(x.dtype)
    return (x * cos) + (rotate_half(x) * sin)


def _allowed_by_mask(attention_mask: Optional[torch.Tensor], rows: slice, key_len: int):
    """``(bool keep-mask, additive float mask)`` of ``[b, 1, 1, rows, k]`` from a HF attention mask
    (None, a 2-D padding mask, or a 4-D bool / additive mask); either may be None."""
    if attention_mask is None:
        return None, None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"Self-Extend needs a tensor attention mask (attn_implementation 'eager' or 'sdpa'), "
                        f"got {type(attention_mask).__name__}")
    if attention_mask.dim() == 2:  # [b, k] padding mask, 1 = token
        return attention_mask[:, None, None, None, :key_len].bool(), None
    if attention_mask.dim() != 4:
        raise ValueError(f"unexpected attention mask shape {tuple(attention_mask.shape)}")
    mask = attention_mask[:, :, None, rows, :key_len]
    if mask.dtype == torch.bool:
        return mask, None
    return None, mask


def self_extend_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          query_positions: torch.Tensor, key_positions: torch.Tensor, inv_freq: torch.Tensor,
                          attention_scaling: float, scaling: float, group_size: int, window: int,
                          attention_mask: Optional[torch.Tensor] = None, dropout: float = 0.0,
                          max_scores: int = 1 << 26) -> torch.Tensor:
    """Self-Extend attention; returns ``[b, q, heads, d]`` (the layout of HF's attention functions).

    ``query [b, heads, q, d]`` and ``key``/``value [b, kv_heads, k, d]`` come straight from the
    projections: RoPE is applied here, twice. Neighbour attention rotates query and key at their own
    positions; grouped attention at :func:`self_extend_positions`. For every (query, key) pair with
    ``q - k < window`` the neighbour score is used, otherwise the grouped one, and both are merged
    in ONE softmax per query (LongLM's merged attention). Keys with ``k > q`` are masked, as are
    keys the HF ``attention_mask`` masks. ``inv_freq`` has one row for all heads (plain Llama) or one
    row per KV group (HARPE: each head keeps its own base); ``attention_scaling`` multiplies cos and
    sin as Llama's rotary embedding does (YaRN), ``scaling`` is the softmax scale (1/sqrt(d)).
    Scores are computed ``max_scores`` elements at a time (query chunks) to bound memory.
    """
    b, heads, q_len, d = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    inv_freq = inv_freq.to(device=query.device, dtype=torch.float32)
    if inv_freq.shape[0] not in (1, kv_heads) or inv_freq.shape[1] * 2 != d:
        raise ValueError(f"inv_freq {tuple(inv_freq.shape)} does not fit {kv_heads} KV heads of dim {d}")
    qg = query.unflatten(1, (kv_heads, heads // kv_heads))       # [b, kv, rep, q, d]
    kg, vg = key[:, :, None], value[:, :, None]                  # [b, kv, 1, k, d]
    q_near = _rotate_at(qg, query_positions, inv_freq, attention_scaling)
    k_near = _rotate_at(kg, key_positions, inv_freq, attention_scaling).transpose(-1, -2)
    # any (query, key) pair at distance >= window? (without building the q x k distances)
    grouped = bool((query_positions.amax(-1) - key_positions.amin(-1) >= window).any())
    if grouped:
        group_q, group_k = self_extend_positions(query_positions, key_positions, group_size, window)
        q_far = _rotate_at(qg, group_q, inv_freq, attention_scaling)
        k_far = _rotate_at(kg, group_k, inv_freq, attention_scaling).transpose(-1, -2)
    rows = max(1, max_scores // max(1, b * heads * k_len))
    outputs = []
    for start in range(0, q_len, rows):
        part = slice(start, start + rows)
        dist = (query_positions[:, part, None] - key_positions[:, None, :])[:, None, None]   # [b|1, 1, 1, r, k]
        scores = torch.matmul(q_near[..., part, :], k_near)
        if grouped:
            scores = torch.where(dist >= window, torch.matmul(q_far[..., part, :], k_far), scores)
        scores = scores * scaling
        keep, additive = _allowed_by_mask(attention_mask, part, k_len)
        if additive is not None:
            scores = scores + additive
        keep = dist >= 0 if keep is None else keep & (dist >= 0)
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
        if dropout:
            probs = nn.functional.dropout(probs, p=dropout, training=True)
        outputs.append(torch.matmul(probs, vg))                 # [b, kv, rep, r, d]
    return torch.cat(outputs, dim=3).flatten(1, 2).transpose(1, 2).contiguous()


class SelfExtendAttention(nn.Module):
    """A Llama / HARPE attention layer with Self-Extend (see :func:`self_extend_attention`).

    Takes over the projections of an existing attention module (same submodule names, so weights
    load and save as before) and ignores the rotary tables the model passes in: it rotates queries
    and keys itself with ``inv_freq`` (``[1, d/2]`` for a single base, ``[kv_heads, d/2]`` for
    per-group bases). Keys enter the KV cache UNROTATED, because each key is needed at two
    positions (its own and its grouped one) and a query's neighbour window moves with it; every
    step rotates the cached keys again, so ``generate()`` with a cache equals full recomputation.
    Positions: queries at ``position_ids``, cached keys at consecutive positions ending at the last
    query's (what a ``DynamicCache`` holds); a cache whose key slots are not the tokens seen so far
    (static or sliding-window caches) is refused.
    """

    def __init__(self, attention: nn.Module, inv_freq: torch.Tensor, attention_scaling: float,
                 group_size: int, window: int):
        super().__init__()
        self.config = attention.config
        self.layer_idx = attention.layer_idx
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        self.attention_dropout = getattr(attention, "attention_dropout", 0.0)
        self.num_key_value_groups = attention.num_key_value_groups
        self.is_causal = True
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, getattr(attention, name))
        self.group_size, self.window = self_extend_settings((group_size, window))
        self.attention_scaling = float(attention_scaling)
        # A plain fp32 tensor, not a buffer: casting the model to bf16 must not round the frequencies.
        self.inv_freq = inv_freq.detach().to(device="cpu", dtype=torch.float32).reshape(-1, self.head_dim // 2)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, window={self.window}, frequency_rows={self.inv_freq.shape[0]}"

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

        if cache is not None:  # unrotated keys
            key_states, value_states = update_cache(cache, key_states, value_states, self.layer_idx, None, None, kwargs)
            seen = cache.get_seq_length(self.layer_idx)
            if seen != key_states.shape[2]:
                raise ValueError(f"Self-Extend needs a cache that returns every key seen so far (DynamicCache); "
                                 f"{type(cache).__name__} returned {key_states.shape[2]} key slots for {seen} tokens")
        q_len, k_len = query_states.shape[2], key_states.shape[2]
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(k_len - q_len, k_len, device=hidden_states.device)[None]
        query_positions = position_ids.to(device=hidden_states.device, dtype=torch.int64)
        key_positions = (torch.arange(k_len, device=hidden_states.device)[None]
                         + (query_positions[:, -1:] - (k_len - 1)))
        attn_output = self_extend_attention(
            query_states, key_states, value_states, query_positions, key_positions,
            self.inv_freq, self.attention_scaling, self.scaling, self.group_size, self.window,
            attention_mask, dropout=self.attention_dropout if self.training else 0.0)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), None


def _model_frequencies(core: nn.Module) -> tuple[torch.Tensor, float]:
    """``(inv_freq [1 | kv_heads, d/2], attention scaling)`` of a Llama / HARPE model's rotary embedding."""
    rotary = getattr(core, "rotary_emb", None)
    if isinstance(rotary, HarpeLlamaRotaryEmbedding):
        return rotary.inv_freq(torch.device("cpu")), float(rotary.attention_scaling)
    if rotary is None or not isinstance(getattr(rotary, "inv_freq", None), torch.Tensor):
        raise TypeError(f"Self-Extend: {type(core).__name__} has no Llama-style rotary embedding (rotary_emb.inv_freq)")
    rope_type = str(getattr(rotary, "rope_type", "default"))
    if "dynamic" in rope_type or rope_type == "longrope":
        raise ValueError(f"Self-Extend: RoPE type {rope_type!r} changes its frequencies with the sequence "
                         f"length, which Self-Extend's fixed positions do not support")
    inv_freq = getattr(rotary, "original_inv_freq", None)
    inv_freq = rotary.inv_freq if inv_freq is None else inv_freq
    return inv_freq.detach().to("cpu", torch.float32).reshape(1, -1), float(getattr(rotary, "attention_scaling", 1.0))


def apply_self_extend(model: nn.Module, group_size: int, window: int) -> nn.Module:
    """Give every attention layer of a loaded Llama-family model Self-Extend; returns ``model``.

    Works for stock ``LlamaForCausalLM`` / ``LlamaModel`` (one base; ``rope_scaling`` default,
    linear, yarn, llama3 as the model's own rotary embedding computes them) and for HARPE models
    (one base per KV group: every head keeps its own base). Layers already using Self-Extend get
    the new settings. Apply it before generating: a KV cache filled before holds rotated keys.
    """
    group_size, window = self_extend_settings((group_size, window))
    core = model.model if isinstance(getattr(model, "model", None), nn.Module) else model
    if not hasattr(core, "layers"):
        raise TypeError(f"Self-Extend: {type(model).__name__} has no decoder layers (model.layers)")
    inv_freq, attention_scaling = _model_frequencies(core)
    for layer in core.layers:
        attention = layer.self_attn
        if isinstance(attention, SelfExtendAttention):
            attention.group_size, attention.window = group_size, window
        else:
            layer.self_attn = SelfExtendAttention(attention, inv_freq, attention_scaling, group_size, window)
    return model


def self_extend_of(model: nn.Module) -> Optional[tuple[int, int]]:
    """``(group_size, window)`` of the model's Self-Extend layers, or None when it has none."""
    found = {(m.group_size, m.window) for m in model.modules() if isinstance(m, SelfExtendAttention)}
    if len(found) > 1:
        raise ValueError(f"Self-Extend layers with different settings: {sorted(found)}")
    return found.pop() if found else None


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
