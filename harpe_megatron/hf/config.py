"""HF ``config.json`` <-> our model/positional config, plus the other small HF metadata files.

Import (:func:`megatron_trees_from_hf`): a Llama ``config.json`` (``model_type`` ``llama``, or
our own ``harpe_llama`` export) becomes the ``model`` and ``positional`` sections of a RunConfig
tree. Plain Llama gets one constant base, ``rope_theta``; ``harpe_llama`` gets its
``harpe_rope_bases`` as an explicit list. RoPE scaling ``linear`` (PI), ``yarn`` and ``llama3``
(Llama 3.1) map to ``positional.scaling``. Refused, with the key named: other model types, other
RoPE scalings (dynamic NTK, longrope, DeepSeek-style YaRN), partial rotary dims, biases, an activation
other than SiLU, a ``head_dim`` that is not ``hidden_size / num_attention_heads``. Tied
embeddings are supported.

Export (:func:`hf_config_dict`): one base for every head -> a plain ``LlamaForCausalLM`` config
(``rope_theta`` = that base); per-head bases -> ``model_type: harpe_llama`` with
``harpe_rope_bases`` (one float per query head, HF = megatron head order) and an ``auto_map``
pointing at the modeling code shipped in the folder. ``positional.scaling``: ``linear``, ``yarn``
and ``llama3`` become transformers' ``rope_parameters`` of that type (plus ``rope_scaling`` for 4.x),
static ``ntk`` becomes the larger bases ``b * s^(d/(d-2))`` it stands for (each scaling class
maps itself: ``to_hf``, ``hf_bases``, ``from_hf`` in :mod:`harpe_megatron.positional.scaling`).
Both ``rope_theta`` and ``rope_parameters`` are written, and ``torch_dtype`` as well as ``dtype``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from harpe_megatron.config.model import ModelConfig
from harpe_megatron.positional.scaling import HF_ROPE_TYPES, RopeScaling

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "HARPE_MODEL_TYPE",
    "HARPE_AUTO_MAP",
    "read_hf_config",
    "megatron_trees_from_hf",
    "export_bases",
    "hf_config_dict",
    "generation_config_dict",
    "dtype_name",
    "DTYPES",
]

HARPE_MODEL_TYPE = "harpe_llama"
SUPPORTED_MODEL_TYPES = ("llama", HARPE_MODEL_TYPE)
HARPE_AUTO_MAP = {
    "AutoConfig": "configuration_harpe_llama.HarpeLlamaConfig",
    "AutoModel": "modeling_harpe_llama.HarpeLlamaModel",
    "AutoModelForCausalLM": "modeling_harpe_llama.HarpeLlamaForCausalLM",
}
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling of HF configs)."""
    return str(dtype).removeprefix("torch.")


def read_hf_config(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{path}: not found (an HF model folder needs its config.json)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return cfg


def _rope_from_hf(cfg: dict[str, Any], source: str) -> tuple[float, dict[str, Any]]:
    """``(rope_theta, positional.scaling)`` of a Llama config; refuses what has no equivalent.

    transformers gives ``rope_scaling`` (4.x spelling) precedence over ``rope_parameters`` (5.x),
    and a ``rope_theta`` inside the dict over the top-level one; so do we. The ``rope_type``
    picks the scaling class (:data:`~harpe_megatron.positional.scaling.HF_ROPE_TYPES`), which
    reads its own fields (:meth:`~harpe_megatron.positional.scaling.RopeScaling.from_hf`).
    """
    spec = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    if not isinstance(spec, dict):
        raise ValueError(f"{source}: {key} must be a mapping, got {spec!r}")
    theta = spec.get("rope_theta", cfg.get("rope_theta"))
    theta = 10000.0 if theta is None else float(theta)
    if not theta > 1.0:
        raise ValueError(f"{source}: rope_theta must be > 1, got {theta}")
    partial = spec.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"{source}: partial_rotary_factor={partial} is not supported (RoPE on every dimension only)")
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind not in HF_ROPE_TYPES:
        raise ValueError(
            f"{source}: {key}.rope_type={kind!r} is not supported; these convert: "
            f"{', '.join(repr(k) for k in HF_ROPE_TYPES)} (static NTK exports as a larger rope_theta)"
        )
    return theta, HF_ROPE_TYPES[kind].from_hf(spec, cfg, source, key).to_dict()


def export_bases(head_bases: Sequence[float], scaling: RopeScaling, head_dim: int) -> list[float]:
    """The bases an HF model needs: static NTK scaling is a larger base (``b * s^(d/(d-2))``)."""
    return scaling.hf_bases(head_bases, head_dim)


def megatron_trees_from_hf(cfg: dict[str, Any], source: str = "config.json") -> dict[str, dict[str, Any]]:
    """``{"model": {...}, "positional": {...}}`` (RunConfig sections) for an HF Llama config."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not supported; this converter handles Llama "
            f"checkpoints ({', '.join(SUPPORTED_MODEL_TYPES)})"
        )

    def need(key: str) -> Any:
        if cfg.get(key) is None:
            raise ValueError(f"{source}: missing required key {key!r}")
        return cfg[key]

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    groups = int(cfg.get("num_key_value_heads") or heads)
    if cfg.get("head_dim") is not None and heads and int(cfg["head_dim"]) * heads != hidden:
        raise ValueError(
            f"{source}: head_dim={cfg['head_dim']} differs from hidden_size/num_attention_heads "
            f"= {hidden}/{heads}; such models are not supported"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act={act!r} is not supported (Llama uses 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ValueError(f"{source}: {key}=true is not supported (the megatron model has no linear biases)")
    theta, scaling = _rope_from_hf(cfg, source)
    model = {
        "num_layers": int(need("num_hidden_layers")),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_query_groups": groups,
        "ffn_hidden_size": int(need("intermediate_size")),
        "vocab_size": int(need("vocab_size")),
        "norm_epsilon": float(cfg.get("rms_norm_eps", 1e-6)),
        "init_method_std": float(cfg.get("initializer_range", 0.02)),
        "untie_embeddings_and_output_weights": not bool(cfg.get("tie_word_embeddings", False)),
        "pretrained_context_length": int(cfg.get("max_position_embeddings", 4096)),
    }
    if model_type == HARPE_MODEL_TYPE:
        bases = cfg.get("harpe_rope_bases")
        if not isinstance(bases, list) or len(bases) != heads:
            raise ValueError(f"{source}: harpe_rope_bases must list one base per query head ({heads})")
        bases_spec = {"strategy": "explicit", "values": [float(b) for b in bases]}
    else:
        bases_spec = {"strategy": "constant", "base": theta}
    return {"model": model, "positional": {"bases": bases_spec, "scaling": scaling, "position_ids": "sequential",
                                          "rotary_interleaved": False}}


def hf_config_dict(
    m: ModelConfig,
    head_bases: Sequence[float],
    scaling: RopeScaling,
    dtype: torch.dtype,
    max_position_embeddings: int,
    bos_token_id: Optional[int] = 1,
    eos_token_id: Optional[int] = 2,
    pad_token_id: Optional[int] = None,
) -> dict[str, Any]:
    """``config.json`` for an exported model (see module docstring)."""
    import transformers

    bases = export_bases(head_bases, scaling, m.head_dim)
    if len(bases) != m.num_attention_heads:
        raise ValueError(f"need one base per query head ({m.num_attention_heads}), got {len(bases)}")
    per_head = len(set(bases)) > 1
    theta = min(bases)
    rope = scaling.to_hf(theta)
    cfg: dict[str, Any] = {
        "architectures": ["HarpeLlamaForCausalLM" if per_head else "LlamaForCausalLM"],
        "model_type": HARPE_MODEL_TYPE if per_head else "llama",
    }
    if per_head:
        cfg["auto_map"] = dict(HARPE_AUTO_MAP)
    cfg.update({
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(max_position_embeddings),
        "initializer_range": m.init_method_std,
        "rms_norm_eps": m.norm_epsilon,
        "use_cache": True,
        "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
        # Per-head models ignore rope_theta (harpe_rope_bases drive the rotary embedding); it is
        # kept because LlamaConfig expects it.
        "rope_theta": theta,
        "rope_parameters": rope,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": dtype_name(dtype),
        "torch_dtype": dtype_name(dtype),
        "transformers_version": transformers.__version__,
    })
    if rope["rope_type"] != "default":  # what transformers 4.x reads
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if per_head:
        cfg["harpe_rope_bases"] = bases
    return cfg


def generation_config_dict(bos_token_id: Optional[int], eos_token_id: Optional[int],
                           pad_token_id: Optional[int] = None) -> dict[str, Any]:
    import transformers

    out: dict[str, Any] = {"_from_model_config": True}
    for key, value in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id),
                       ("pad_token_id", pad_token_id)):
        if value is not None:
            out[key] = value
    out["transformers_version"] = transformers.__version__
    return out
