"""Per-head RoPE: rotary tables and their fused kernel, base strategies, scalings, position schemes.

``rotary`` (one base per query head, for this TP rank's heads and CP rank's tokens), ``rope_apply``
and ``rope_kernel`` (the fused Triton kernel and its torch reference), ``bases`` (paper table,
uniform, constant, explicit; ``peak_valley``: the paper's search), ``scaling`` (PI, NTK, YaRN, each
owning its Hugging Face mapping) and ``position_ids`` (CREAM, PoSE). Each variant owns its small
config class; config/ composes the tree from them.
"""
