"""HARPE Llama configuration (shipped into exported HF folders; loaded with trust_remote_code=True).

A ``LlamaConfig`` with ``model_type = "harpe_llama"`` and one extra key, ``harpe_rope_bases``: the
RoPE base of every query head, in head order (query head ``h`` uses its KV group
``h // (num_attention_heads // num_key_value_heads)``; heads of a group share one base). Optional:
``self_extend: {"group_size": G, "window": W}`` builds every attention layer with Self-Extend
(inference-time; see ``modeling_harpe_llama.py``). Every other key means what it means for Llama;
``rope_theta`` is not used by the HARPE model.

This file only imports transformers; it runs no other code.
"""

from transformers import LlamaConfig


class HarpeLlamaConfig(LlamaConfig):
    model_type = "harpe_llama"


try:  # lets save_pretrained() of a loaded model copy this file and write auto_map again
    HarpeLlamaConfig.register_for_auto_class()
except Exception:  # pragma: no cover - older/newer transformers without this hook
    pass
