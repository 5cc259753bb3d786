"""harpe-megatron: long-context continual pretraining on megatron-core with per-head RoPE bases.

Every package below owns one job; docs/design.md draws them with the imports between them
(generated from the code by scripts/lib/package_graph.py, checked by tests/unit/test_architecture.py).
"""
