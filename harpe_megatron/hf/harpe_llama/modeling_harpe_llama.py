"""HARPE Llama: a Llama with one RoPE base per attention head, as its own Hugging Face model.

Shipped into exported HF folders and imported by
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``. What that runs: this
file and its siblings ``configuration_harpe_llama.py`` (the config class), ``layers_harpe_llama.py``
(norm, MLP, attention, decoder layer), ``compat_harpe_llama.py`` (every transformers API whose
form changed inside 5.x, each form handled there) and ``self_extend_harpe_llama.py``
(Self-Extend), imported relatively (transformers copies a module's relative imports with it).
They import only ``torch`` and public transformers API and define classes and functions. Nothing
is downloaded, executed at import time (beyond ``compat_harpe_llama``'s check that the installed
transformers offers a known form of each API it uses) or patched globally.

The model classes are this project's own: :class:`HarpeLlamaModel` and
:class:`HarpeLlamaForCausalLM` subclass transformers' ``PreTrainedModel`` (loading, saving,
dtype/device handling) and ``GenerationMixin`` (``generate()``), and define their ``forward``
signatures themselves; no transformers Llama class is used, so a release that renames a Llama
keyword or reorders a Llama layer's call cannot change what they compute. Weights and their names
are Llama's; only the rotary position embedding differs:

* :class:`HarpeLlamaRotaryEmbedding` returns ``(cos, sin)`` of shape ``[batch, kv_heads, seq,
  head_dim]``: one row per KV group, with the group's base (``config.harpe_rope_bases`` lists one
  base per query head; the heads of a group share it). Frequencies ``base^(-2i/d)`` -- scaled per
  head when ``rope_parameters`` says ``linear`` (position interpolation), ``yarn`` (with YaRN's
  attention factor on cos/sin, as in Llama) or ``llama3`` (Llama 3.1's bands) -- and angles are computed in fp32 and cast to the
  activations' dtype. They are plain tensors, not buffers: casting the model to bf16 or loading
  it on the meta device leaves them alone.
* ``HarpeLlamaAttention`` (``layers_harpe_llama.py``) applies them rotate-half style: keys
  ``[b, kv_heads, s, d]`` directly, queries viewed as ``[b, kv_heads, heads_per_group, s, d]``.
  Keys are rotated before they enter the KV cache, exactly as in Llama, so ``generate()`` with a
  cache works. Attention implementations: ``eager`` (this package's) and ``sdpa`` (transformers'
  registered function; the default).

With every base equal the logits equal transformers' ``LlamaForCausalLM`` bit for bit
(tests/unit/test_harpe_llama_model.py). Self-Extend: the config key ``self_extend:
{"group_size": G, "window": W}`` gives every layer ``SelfExtendAttention``.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache

from .compat_harpe_llama import CACHE_FIELD, causal_lm_output, causal_mask, model_output, pop_cache
from .configuration_harpe_llama import HarpeLlamaConfig
from .layers_harpe_llama import HarpeLlamaDecoderLayer, HarpeLlamaRMSNorm
from .self_extend_harpe_llama import SelfExtendAttention, self_extend_settings

__all__ = [
    "HarpeLlamaRotaryEmbedding",
    "HarpeLlamaPreTrainedModel",
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



class HarpeLlamaPreTrainedModel(PreTrainedModel):
    """Loading, saving and initialisation (transformers' defaults: normal(0, initializer_range) for
    linear and embedding weights, ones for the RMSNorm weights)."""

    config_class = HarpeLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HarpeLlamaDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False  # not tested here (CPU CI); sdpa uses torch's fused kernels on GPU
    _supports_flex_attn = False


class HarpeLlamaModel(HarpeLlamaPreTrainedModel):
    """Embeddings, decoder layers, final norm; ``forward`` returns transformers'
    ``BaseModelOutputWithPast`` (the KV cache in the field ``generate()`` reads)."""

    def __init__(self, config):
        super().__init__(config)
        self.padding_idx = getattr(config, "pad_token_id", None)
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [HarpeLlamaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)])
        self.norm = HarpeLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = HarpeLlamaRotaryEmbedding(config=config)
        settings = self_extend_settings(getattr(config, "self_extend", None))
        if settings is not None:  # config key ``self_extend: {group_size, window}``
            inv_freq = self.rotary_emb.inv_freq(torch.device("cpu"))
            for layer in self.layers:
                layer.self_attn = SelfExtendAttention(layer.self_attn, inv_freq, self.rotary_emb.attention_scaling,
                                                      *settings)
        self.gradient_checkpointing = False  # set by PreTrainedModel.gradient_checkpointing_enable()
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache=None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        """``cache`` (also accepted as ``past_key_values``, the name before transformers 5.24) is a
        ``Cache``; keyword arguments other than these are ignored (transformers passes some, such as
        ``cache_position``, that this model derives itself)."""
        cache = pop_cache(kwargs, cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("harpe_llama: give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = getattr(self.config, "use_cache", False) if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        cache_position = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0)
        mask = causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids, cache_position)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden, all_attentions = [], []
        for layer in self.layers:
            all_hidden.append(hidden_states)
            args = (hidden_states, position_embeddings, mask, position_ids, cache, cache_position)
            if self.gradient_checkpointing and self.training:
                hidden_states, weights = checkpoint(layer, *args, use_reentrant=False)
            else:
                hidden_states, weights = layer(*args)
            all_attentions.append(weights)
        hidden_states = self.norm(hidden_states)
        all_hidden.append(hidden_states)  # embeddings, every layer's input, the normed output
        out = model_output(hidden_states, cache if use_cache else None,
                           tuple(all_hidden) if output_hidden_states else None,
                           tuple(all_attentions) if output_attentions else None)
        return out if return_dict is not False else out.to_tuple()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Next-token cross entropy in fp32: position ``t`` predicts ``labels[t + 1]`` (the last position
    nothing); label -100 is ignored. Mean over the counted tokens, or sum / ``num_items_in_batch``
    when given (gradient accumulation)."""
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:].to(logits.device).flatten()
    logits = logits.float().flatten(0, 1)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets, ignore_index=-100)
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / num_items_in_batch


class HarpeLlamaForCausalLM(HarpeLlamaPreTrainedModel, GenerationMixin):
    """:class:`HarpeLlamaModel` with Llama's LM head (``lm_head``, tied to the embeddings when
    ``tie_word_embeddings``); ``forward`` returns transformers' ``CausalLMOutputWithPast``."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = HarpeLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache=None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        """As :meth:`HarpeLlamaModel.forward`, plus ``labels`` (loss, see :func:`causal_lm_loss`;
        ``num_items_in_batch`` may come as a keyword) and ``logits_to_keep`` (0: every position;
        ``n``: the last ``n``; a tensor: those indices)."""
        cache = pop_cache(kwargs, cache)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=output_hidden_states,
                         output_attentions=output_attentions, return_dict=True)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep, :])
        loss = None if labels is None else causal_lm_loss(logits, labels, num_items_in_batch)
        result = causal_lm_output(loss, logits, getattr(out, CACHE_FIELD), out.hidden_states, out.attentions)
        return result if return_dict is not False else result.to_tuple()


try:  # lets save_pretrained() of a loaded model copy this file and write auto_map again
    HarpeLlamaModel.register_for_auto_class("AutoModel")
    HarpeLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
except Exception:  # pragma: no cover
    pass
