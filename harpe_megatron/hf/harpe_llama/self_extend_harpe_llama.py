"""Self-Extend (Jin et al. 2024, "LLM Maybe LongLM"; reference implementation datamllab/LongLM)
for Llama-family models: training-free, inference-time context extension (shipped with the model).

:func:`apply_self_extend` swaps every layer's attention of a loaded stock Llama or HARPE model for
:class:`SelfExtendAttention`; a HARPE config key ``self_extend: {"group_size": G, "window": W}``
makes ``modeling_harpe_llama`` build it. Within the neighbour window (``q - k < W``) scores use
the normal positions; beyond it both positions are floor-divided by ``G`` and the query's shifted
by ``W - W // G`` (:func:`self_extend_positions`; LongLM's fixed convention); the two score maps
are merged per query in one softmax. Per-group bases and YaRN/PI scalings are kept. Keys are
cached unrotated (each key is rotated at two positions), so cached and uncached generation agree.

The layer is called by this package's own decoder layer (``layers_harpe_llama``) and, after
:func:`apply_self_extend` on a stock ``LlamaForCausalLM``, by transformers' Llama decoder layer,
whose keywords differ between releases: the KV cache comes as ``cache=`` or ``past_key_values=``
(``compat_harpe_llama.pop_cache``; a cache under an unknown keyword is refused, never dropped).
Imports only ``torch``, ``compat_harpe_llama`` and ``layers_harpe_llama``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .compat_harpe_llama import pop_cache, update_cache
from .layers_harpe_llama import project_qkv, rotate_half

__all__ = [
    "SelfExtendAttention",
    "apply_self_extend",
    "self_extend_attention",
    "self_extend_of",
    "self_extend_positions",
    "self_extend_settings",
]


def self_extend_settings(value) -> Optional[tuple[int, int]]:
    """``(group_size, window)`` from ``{"group_size": G, "window": W}`` or a ``(G, W)`` pair, validated;
    ``None`` for ``None``. Both must be integers >= 1, the group smaller than the window (keys
    within the window keep their positions, farther ones are grouped)."""
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
    if group_size >= window:
        raise ValueError(f"self_extend group_size ({group_size}) must be smaller than window ({window}): keys within "
                         "the window keep their positions, farther ones are grouped (e.g. 32 and 1024)")
    return group_size, window


def self_extend_positions(query_positions: torch.Tensor, key_positions: torch.Tensor, group_size: int,
                          window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped positions: ``(q // G + W - W // G, k // G)``, integers (floor division throughout).

    The shift makes the two regions join: at distance ``q - k = W`` the grouped relative position is
    about ``W``. It is datamllab/LongLM's fixed convention, ``group_query_position = q // g1 + g2 -
    g2 // g1``: its commit 715c1e3 replaced ``g2 / g1`` (true division, "we accidentally use '/'")
    in ``self_extend_patch/Llama_4_40.py``; its older ``self_extend_patch/Llama.py`` still divides
    with ``/``. The two agree when ``G`` divides ``W`` (the paper's 1024 / 32); otherwise ``/``
    gives fractional query positions. (LongLM also drops the shift while every query position is
    below ``W``; no grouped score is used then, so that changes nothing and is not repeated here.)
    """
    grouped_q = torch.div(query_positions, group_size, rounding_mode="floor") + (window - window // group_size)
    grouped_k = torch.div(key_positions, group_size, rounding_mode="floor")
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
        position_ids: Optional[torch.Tensor] = None,
        cache=None,
        cache_position: Optional[torch.Tensor] = None,
        **kwargs,
    ):
        cache = pop_cache(kwargs, cache)  # ``cache=`` or, from transformers' Llama before 5.24, ``past_key_values=``
        input_shape = hidden_states.shape[:-1]
        query_states, key_states, value_states = project_qkv(self, hidden_states)

        if cache is not None:  # unrotated keys
            key_states, value_states = update_cache(cache, key_states, value_states, self.layer_idx, cache_position)
            seen = cache.get_seq_length(self.layer_idx)
            if seen != key_states.shape[2]:
                raise ValueError(f"Self-Extend needs a cache that returns every key seen so far (DynamicCache); "
                                 f"{type(cache).__name__} returned {key_states.shape[2]} key slots for {seen} tokens")
        q_len, k_len = query_states.shape[2], key_states.shape[2]
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
    if callable(getattr(rotary, "inv_freq", None)):  # HarpeLlamaRotaryEmbedding: one row per KV group
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
