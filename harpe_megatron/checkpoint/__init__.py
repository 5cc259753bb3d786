"""Training checkpoints on disk: a save directory's layout, safety checks, collective save/load.

``layout`` (``iter_*`` directories, ``latest``, the manifest with sizes and CRC-32s: what counts as
complete and what to resume from; files only, no collectives), ``safety`` (nothing pickled in a
checkpoint can run code when it is loaded) and ``save_load`` (model, optimizer, scheduler and RNG
state through megatron's dist checkpointing, atomically). Below both training and the converters.
"""
