"""Every transformers API the HARPE Llama model calls whose form changed inside 5.x, in one place.

Shipped with the model. The model's classes are its own (``layers_harpe_llama.py``,
``modeling_harpe_llama.py``); they reach transformers through public, documented API only:
``PreTrainedModel``, ``GenerationMixin``, the ``Cache`` classes' public methods, the
attention-function registry ``ALL_ATTENTION_FUNCTIONS``, ``masking_utils.create_causal_mask`` and
the model-output classes. Four of these changed form between transformers 5.0 and 5.25; each form
is handled here, chosen by what the installed API looks like (its signatures and fields), never by
the version number:

1. The KV cache's keyword. ``generate()`` passes it to ``forward`` as ``past_key_values=``
   (5.0-5.23) or ``cache=`` (5.24+): :func:`pop_cache` takes either, and refuses a ``Cache``
   handed over under any other keyword (instead of silently running without it).
2. The output field ``generate()`` reads the cache back from: ``past_key_values`` (5.0-5.23) or
   ``cache`` (5.24+), whichever transformers' own ``CausalLMOutputWithPast`` has
   (:data:`CACHE_FIELD`, :func:`model_output`, :func:`causal_lm_output`).
3. ``Cache.update``: a ``cache_kwargs`` dict up to 5.3 (the static cache writes at its
   ``cache_position``), only ``(key, value, layer_idx)`` from 5.4 (:func:`update_cache`).
4. ``create_causal_mask``: ``input_embeds`` became ``inputs_embeds`` (5.2), ``cache_position``
   went unused (5.4) and then away (by 5.10), ``past_key_values`` became ``cache`` (5.24; 5.25
   lists both, the old one as a deprecated keyword-only alias) (:func:`causal_mask`).

If the installed transformers offers none of the known forms of one of these, importing this file
raises an ImportError naming it (:func:`check_api`): a model that cannot hand its cache to
``generate()`` must not load. Imports ``dataclasses``, ``functools``, ``inspect`` and
``transformers``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = ["CACHE_FIELD", "CACHE_KEYWORDS", "attention_function", "causal_mask", "causal_mask_arguments",
           "causal_lm_output", "check_api", "model_output", "pop_cache", "update_cache"]

#: Keywords a KV cache arrives under: 5.24+ ``cache``, 5.0-5.23 ``past_key_values``.
CACHE_KEYWORDS = ("cache", "past_key_values")


def _cache_field(output_class) -> str:
    names = {f.name for f in dataclasses.fields(output_class)}
    found = [name for name in CACHE_KEYWORDS if name in names]
    if len(found) != 1:
        raise ImportError(f"harpe_llama: transformers' {output_class.__name__} has fields {sorted(names)}, none or "
                          f"several of {list(CACHE_KEYWORDS)}; this model cannot return its KV cache to generate()")
    return found[0]


def causal_mask_arguments(parameters, config, inputs_embeds, attention_mask, cache, position_ids, cache_position):
    """Keyword arguments for a ``create_causal_mask`` whose parameter names are ``parameters``. Where a
    release lists a deprecated alias next to the new name (5.25: ``past_key_values`` beside
    ``cache``), the new name is used."""
    names = set(parameters)
    kwargs = {"config": config, "attention_mask": attention_mask, "position_ids": position_ids}
    embeds = [n for n in ("inputs_embeds", "input_embeds") if n in names]      # 5.2+, 5.0-5.1
    caches = [n for n in ("cache", "past_key_values") if n in names]           # 5.24+, 5.0-5.23
    if not embeds or not caches or not {"config", "attention_mask", "position_ids"} <= names:
        raise ImportError(f"harpe_llama: transformers' create_causal_mask takes {sorted(names)}; expected config, "
                          f"attention_mask, position_ids, inputs_embeds (or input_embeds) and cache (or "
                          f"past_key_values)")
    kwargs[embeds[0]], kwargs[caches[0]] = inputs_embeds, cache
    if "cache_position" in names:   # 5.0-5.5 (unused from 5.4)
        kwargs["cache_position"] = cache_position
    return kwargs


def check_api() -> str:
    """Check that the installed transformers offers a known form of each API above; returns the
    cache output field. Raises ImportError naming what is missing."""
    field = _cache_field(CausalLMOutputWithPast)
    if _cache_field(BaseModelOutputWithPast) != field:
        raise ImportError("harpe_llama: transformers' BaseModelOutputWithPast and CausalLMOutputWithPast name the "
                          "KV cache differently")
    causal_mask_arguments(inspect.signature(create_causal_mask).parameters, *([None] * 6))
    update = inspect.signature(Cache.update).parameters.values()
    positional = [p for p in update if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 4 and not any(p.kind == p.VAR_POSITIONAL for p in update):
        raise ImportError(f"harpe_llama: transformers' Cache.update takes {[p.name for p in update]}; expected "
                          f"(key_states, value_states, layer_idx, ...) by position")
    return field


#: The field of transformers' model outputs that carries the KV cache back to ``generate()``.
CACHE_FIELD = check_api()
_MASK_PARAMETERS = tuple(inspect.signature(create_causal_mask).parameters)


def pop_cache(kwargs: dict, cache=None):
    """The KV cache, given as ``cache`` or under any of :data:`CACHE_KEYWORDS` in ``kwargs`` (removed
    from it). A ``Cache`` under another keyword raises TypeError; two different caches ValueError."""
    found = [c for c in [cache] + [kwargs.pop(name) for name in CACHE_KEYWORDS if name in kwargs] if c is not None]
    if len({id(c) for c in found}) > 1:
        raise ValueError("harpe_llama got two different KV caches (cache= and past_key_values=)")
    strays = sorted(name for name, value in kwargs.items() if isinstance(value, Cache))
    if strays:
        raise TypeError(f"harpe_llama got a KV cache as {strays[0]}=, a keyword it does not know "
                        f"(known: {', '.join(CACHE_KEYWORDS)}); refusing to run without it")
    return found[0] if found else None


@functools.lru_cache(maxsize=None)
def _takes_cache_kwargs(cache_type: type) -> bool:
    return "cache_kwargs" in inspect.signature(cache_type.update).parameters


def update_cache(cache, key_states, value_states, layer_idx: int, cache_position):
    """``cache.update`` in the installed form: with ``cache_kwargs={"cache_position": ...}`` where
    ``update`` declares that parameter (5.0-5.3), else ``(key, value, layer_idx)`` only."""
    if _takes_cache_kwargs(type(cache)):
        return cache.update(key_states, value_states, layer_idx, {"cache_position": cache_position})
    return cache.update(key_states, value_states, layer_idx)


def causal_mask(config, inputs_embeds, attention_mask, cache, position_ids, cache_position):
    """``create_causal_mask`` with the installed argument names: None (causal, no padding: the
    attention function may skip the mask), a 4-D mask, or what the attention implementation uses."""
    return create_causal_mask(**causal_mask_arguments(
        _MASK_PARAMETERS, config, inputs_embeds, attention_mask, cache, position_ids, cache_position))


def attention_function(implementation, eager):
    """``eager`` for ``"eager"``, else the attention function transformers registers under that name."""
    if implementation in (None, "eager"):
        return eager
    return ALL_ATTENTION_FUNCTIONS[implementation]


def model_output(last_hidden_state, cache, hidden_states=None, attentions=None):
    """transformers' ``BaseModelOutputWithPast`` with the cache in :data:`CACHE_FIELD`."""
    return BaseModelOutputWithPast(last_hidden_state=last_hidden_state, hidden_states=hidden_states,
                                   attentions=attentions, **{CACHE_FIELD: cache})


def causal_lm_output(loss, logits, cache, hidden_states=None, attentions=None):
    """transformers' ``CausalLMOutputWithPast`` with the cache in :data:`CACHE_FIELD`."""
    return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=hidden_states, attentions=attentions,
                                  **{CACHE_FIELD: cache})
