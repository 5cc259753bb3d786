"""One training step on megatron-core, as the trainer runs it and the planner plans it.

``build`` (the model chunk under DDP and Float16Module, the (distributed) optimizer and its LR
schedule), ``schedule`` (the forward step and its per-token loss, one pass of megatron's
forward/backward schedule with the global loss) and ``metrics`` (FLOPs per token, MFU, the console
line, the metric sinks). The trainer (training/) runs these on real tensors, the memory planner
(planner/) on fake ones, so the plan is of the very step that trains.
"""
