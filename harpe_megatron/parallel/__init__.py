"""The context-parallel layouts: which tokens of a sequence a CP rank holds.

Pure index math shared by the rotary tables (positional/), the attention (model/) and the batch
split (data/), so all three follow one convention: zigzag.py (chunks r and 2cp-1-r; checked
against megatron-core's ``get_batch_on_this_cp_rank``) and cp_layout.py (layouts as token
indices, and the layout balanced by attention work that document masking uses).
"""
