"""The HF modeling code for per-head-RoPE (HARPE) Llama models.

``configuration_harpe_llama.py``, ``modeling_harpe_llama.py`` and its siblings
``layers_harpe_llama.py``, ``compat_harpe_llama.py`` and ``self_extend_harpe_llama.py`` are
self-contained (they import only torch and public transformers API): the export
(tools/convert_to_hf.py) copies them into the HF folder, where
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` imports them.
:func:`register` makes the Auto classes know ``harpe_llama`` inside this process without remote code.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from harpe_megatron.hf.harpe_llama.configuration_harpe_llama import HarpeLlamaConfig
from harpe_megatron.hf.harpe_llama.modeling_harpe_llama import HarpeLlamaForCausalLM, HarpeLlamaModel

__all__ = ["SHIPPED_FILES", "register"]

# Every file an export copies; modeling_harpe_llama.py imports each of the others relatively (directly
# or through a sibling), which is how transformers' dynamic-module loader finds (and copies) them.
SHIPPED_FILES = tuple(Path(__file__).with_name(n) for n in (
    "configuration_harpe_llama.py", "modeling_harpe_llama.py", "layers_harpe_llama.py", "compat_harpe_llama.py",
    "self_extend_harpe_llama.py"))


def register() -> None:
    """Register ``harpe_llama`` with AutoConfig / AutoModel / AutoModelForCausalLM (idempotent)."""
    AutoConfig.register(HarpeLlamaConfig.model_type, HarpeLlamaConfig, exist_ok=True)
    AutoModel.register(HarpeLlamaConfig, HarpeLlamaModel, exist_ok=True)
    AutoModelForCausalLM.register(HarpeLlamaConfig, HarpeLlamaForCausalLM, exist_ok=True)
