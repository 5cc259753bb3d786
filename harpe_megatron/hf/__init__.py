"""Hugging Face interop for Llama: one name map, import into and export from megatron checkpoints.

``llama_names`` (the one map: every megatron tensor, its HF tensors and how TP splits them),
``config`` (HF config <-> typed config), ``safetensors_io``, ``session`` (the one-process CPU
megatron conversion runs in), ``import_hf`` / ``export_hf`` / ``tokenizer_export``, ``output_dir``
(atomic output folders), ``summary``, and ``harpe_llama/`` (the modeling code an export ships).
"""
