"""Glue between the HARPE Llama attentions and the installed transformers (shipped with the model).

Both attentions of this model (``modeling_harpe_llama.HarpeLlamaAttention`` and
``self_extend_harpe_llama.SelfExtendAttention``) restate Llama's forward, so they depend on how
transformers hands the KV cache to the layer (``past_key_values=`` before 5.24, ``cache=`` from
5.24) and to ``Cache.update`` (a ``cache_kwargs`` dict before 5.4, nothing from 5.4, ``kwargs=``
from 5.24). Each spelling is accepted; the versions in ``TESTED_TRANSFORMERS`` were tested and any
other version is refused at import with a message naming both, unless
``HARPE_LLAMA_ALLOW_UNTESTED_TRANSFORMERS=1`` is set (then the newest convention is used, with a
warning). Imports only ``transformers``.
"""

from __future__ import annotations

import os
import re
import warnings

import transformers

__all__ = ["TESTED_TRANSFORMERS", "ALLOW_UNTESTED_ENV", "check_transformers_version", "pop_cache", "update_cache",
           "project_qkv"]

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


def project_qkv(attention, hidden_states):
    """Llama's q/k/v projections of ``[b, s, hidden]``: ``[b, heads|kv_heads, s, head_dim]`` each, unrotated."""
    hidden_shape = (*hidden_states.shape[:-1], -1, attention.head_dim)
    return tuple(proj(hidden_states).view(hidden_shape).transpose(1, 2)
                 for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
