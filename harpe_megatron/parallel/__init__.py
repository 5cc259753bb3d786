"""The zigzag context-parallel layout: which chunks of a sequence a CP rank holds.

Pure index math in zigzag.py, shared by the rotary tables (positional/), the attention (model/) and
the batch split (data/), so all three follow one convention; it is checked against megatron-core's
``get_batch_on_this_cp_rank``.
"""
