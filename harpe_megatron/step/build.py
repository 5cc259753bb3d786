"""The model and optimizer of a run: megatron's GPT chunk under DDP, (distributed) Adam and its LR schedule.

Shared by the trainer and the memory planner (:mod:`harpe_megatron.planner.plan`), which builds the
same objects on fake tensors.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from harpe_megatron.config.run import RunConfig
from harpe_megatron.distributed.bringup import current_device
from harpe_megatron.model.builder import build_model, transformer_config

__all__ = ["DTYPES", "build_training_model", "build_optimizer"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_training_model(cfg: RunConfig):
    """``([DDP-wrapped model chunk], TransformerConfig)`` for ``cfg`` on this rank (bf16/fp16 under
    Float16Module, on CUDA when available); parallel state must be initialised."""
    dtype = DTYPES[cfg.training.precision]
    on_gpu = torch.cuda.is_available()
    t = cfg.training
    tconfig = transformer_config(
        cfg.model, cfg.parallel, params_dtype=dtype, use_cpu_initialization=not on_gpu, positional=cfg.positional,
        calculate_per_token_loss=True,
        recompute_granularity=t.recompute_granularity, recompute_method=t.recompute_method,
        recompute_num_layers=t.recompute_num_layers,
        deallocate_pipeline_outputs=True,
    )
    model = build_model(
        cfg.model, cfg.positional, tconfig, max_sequence_length=cfg.data.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        document_masking=cfg.data.document_masking,
    )
    if on_gpu:
        model.cuda(current_device())
    if dtype != torch.float32:
        model = Float16Module(tconfig, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=t.overlap_grad_reduce,
        overlap_param_gather=t.overlap_param_gather,
        use_distributed_optimizer=t.use_distributed_optimizer,
    )
    ddp = DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=model)
    tconfig.finalize_model_grads_func = finalize_model_grads
    if t.overlap_grad_reduce:
        tconfig.no_sync_func = ddp.no_sync
        tconfig.grad_sync_func = ddp.start_grad_sync
    return [ddp], tconfig


def build_optimizer(cfg: RunConfig, model_chunks: list, train_iters: int, use_gloo_process_groups: bool = True):
    """megatron's (distributed) Adam with grad clipping, and its LR/WD scheduler, from ``cfg.training``.

    ``use_gloo_process_groups=False``: without megatron's gloo groups (used only to save/load the
    distributed optimizer's state; the memory planner's fake process groups have none)."""
    t = cfg.training
    opt_config = OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad,
        bf16=t.precision == "bf16", fp16=t.precision == "fp16", params_dtype=DTYPES[t.precision],
        use_distributed_optimizer=t.use_distributed_optimizer,
        overlap_param_gather=t.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(opt_config, model_chunks, use_gloo_process_groups=use_gloo_process_groups)
    # The config's values win over a checkpoint's at a load (override_opt_param_scheduler): a resume
    # that would change them was refused or accepted by choice before (training/resume_checks.py).
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if t.lr_warmup_iters else t.lr, max_lr=t.lr, min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters, lr_decay_steps=t.lr_decay_steps(train_iters),
        lr_decay_style=t.lr_decay_style, start_wd=t.weight_decay, end_wd=t.weight_decay,
        wd_incr_steps=max(train_iters, 1), wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
    )
    return optimizer, scheduler
