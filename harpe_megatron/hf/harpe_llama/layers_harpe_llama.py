"""The layers of the HARPE Llama model (shipped with it): norm, MLP, attention, decoder layer.

This project's own restatement of Llama's decoder layer, with one change: the rotary tables hold
one row per KV group (one RoPE base per group; see ``modeling_harpe_llama.py``). Parameter
names are Llama's (``self_attn.q_proj``, ``mlp.gate_proj``, ``input_layernorm``, ...), so
Llama checkpoints and this project's exports load unchanged. The arithmetic is Llama's, op for
op: with every base equal, logits equal transformers' ``LlamaForCausalLM`` bit for bit (eager
and sdpa; tests/unit/test_harpe_llama_model.py).

The call signatures are this file's own: :class:`HarpeLlamaDecoderLayer` calls its
``self_attn(hidden_states=, position_embeddings=, attention_mask=, position_ids=, cache=,
cache_position=)`` and nothing else; a transformers release cannot change them. transformers is
reached only through ``compat_harpe_llama`` (KV-cache update, the attention-function registry).
Imports ``torch`` and ``compat_harpe_llama``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .compat_harpe_llama import attention_function, update_cache

__all__ = [
    "HarpeLlamaRMSNorm",
    "HarpeLlamaMLP",
    "HarpeLlamaAttention",
    "HarpeLlamaDecoderLayer",
    "apply_harpe_rotary",
    "eager_attention",
    "project_qkv",
    "rotate_half",
]

_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[-x2, x1]`` for ``x = [x1, x2]`` split in halves along the last dim (rotate-half RoPE)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_harpe_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate ``q [b, heads, s, d]`` and ``k [b, groups, s, d]`` with group tables ``[b|1, groups, s, d]``."""
    groups = k.shape[1]
    qg = q.unflatten(1, (groups, q.shape[1] // groups))
    cq, sq = cos[:, :, None], sin[:, :, None]
    q_embed = ((qg * cq) + (rotate_half(qg) * sq)).flatten(1, 2)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def project_qkv(attention: nn.Module, hidden_states: torch.Tensor):
    """Llama's q/k/v projections of ``[b, s, hidden]``: ``[b, heads|kv_heads, s, head_dim]`` each, unrotated."""
    hidden_shape = (*hidden_states.shape[:-1], -1, attention.head_dim)
    return tuple(proj(hidden_states).view(hidden_shape).transpose(1, 2)
                 for proj in (attention.q_proj, attention.k_proj, attention.v_proj))


def eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Optional[torch.Tensor], scaling: float, dropout: float = 0.0, **kwargs):
    """Softmax attention in plain torch (``attn_implementation="eager"``): ``query [b, heads, q, d]``,
    ``key``/``value [b, kv_heads, k, d]``, ``attention_mask`` None, a 4-D bool keep-mask or a 4-D
    additive float mask. Returns ``([b, q, heads, d], probabilities [b, heads, q, k])``, the layout
    of transformers' attention functions."""
    rep = module.num_key_value_groups
    key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        if mask.dtype == torch.bool:
            weights = weights.masked_fill(~mask, torch.finfo(weights.dtype).min)
        else:
            weights = weights + mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class HarpeLlamaRMSNorm(nn.Module):
    """Llama's RMSNorm: normalised in fp32, cast back, then scaled by ``weight``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class HarpeLlamaMLP(nn.Module):
    """Llama's gated MLP: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, config):
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"harpe_llama: hidden_act {act!r} is not supported ({', '.join(_ACTIVATIONS)})")
        self.act_fn = _ACTIVATIONS[act]
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class HarpeLlamaAttention(nn.Module):
    """Llama attention whose rotary tables hold one row per KV group.

    Keys are rotated before they enter the KV cache, as in Llama, so cached and uncached
    generation agree. The attention itself is :func:`eager_attention` or the function transformers
    registers for ``config._attn_implementation`` (sdpa).
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.num_key_value_groups = heads // kv_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = float(getattr(config, "attention_dropout", 0.0) or 0.0)
        self.is_causal = True
        bias = bool(getattr(config, "attention_bias", False))
        self.q_proj = nn.Linear(config.hidden_size, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask=None, position_ids: Optional[torch.Tensor] = None, cache=None,
                cache_position: Optional[torch.Tensor] = None):
        input_shape = hidden_states.shape[:-1]
        query_states, key_states, value_states = project_qkv(self, hidden_states)
        cos, sin = position_embeddings
        query_states, key_states = apply_harpe_rotary(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = update_cache(cache, key_states, value_states, self.layer_idx, cache_position)
        attention = attention_function(self.config._attn_implementation, eager_attention)
        attn_output, attn_weights = attention(
            self, query_states, key_states, value_states, attention_mask,
            dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class HarpeLlamaDecoderLayer(nn.Module):
    """Pre-norm Llama block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``; returns
    ``(hidden_states, attention probabilities or None)``."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = HarpeLlamaAttention(config, layer_idx)
        self.mlp = HarpeLlamaMLP(config)
        self.input_layernorm = HarpeLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = HarpeLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask=None, position_ids: Optional[torch.Tensor] = None, cache=None,
                cache_position: Optional[torch.Tensor] = None):
        residual = hidden_states
        hidden_states, attn_weights = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states), position_embeddings=position_embeddings,
            attention_mask=attention_mask, position_ids=position_ids, cache=cache, cache_position=cache_position)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = residual + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, attn_weights
