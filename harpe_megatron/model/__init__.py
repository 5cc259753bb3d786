"""HarpeGPTModel (megatron's GPTModel with per-head RoPE), its layer specs, attention and norms.

``gpt`` (the GPTModel subclass), ``spec`` (megatron layer specs, local or Transformer Engine),
``attention`` (SDPA core attention with context parallelism, the per-head-RoPE self-attention),
``norm`` (RMSNorm), ``builder`` (TransformerConfig and the model from the typed config).
Architecture only: nothing here knows about training.
"""
