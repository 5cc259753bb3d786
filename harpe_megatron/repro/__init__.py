"""The small-scale reproduction of HARPE against its baselines (docs/reproduction.md):
``bash scripts/reproduce.sh --tier smoke|cpu|gpu``. Protocol (arms, tiers, the paper's numbers),
the pipeline of public commands it runs, and the multi-seed summary."""
