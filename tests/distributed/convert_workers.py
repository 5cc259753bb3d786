"""Worker for tests/distributed/test_convert_tp.py (imported by spawned gloo ranks).

Loads a converted checkpoint (``checkpoint.pretrained`` style) into a TP=2 model, computes
TP-gathered logits, and saves training-layout checkpoints at TP=2 and at PP=2 for the export test.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state

from harpe_megatron.checkpoint.save_load import load_model_weights, save_checkpoint
from harpe_megatron.config.loader import config_to_dict, load_config
from harpe_megatron.distributed.bringup import megatron_parallel
from harpe_megatron.model.builder import build_model, transformer_config


def _model(cfg, seq: int):
    tcfg = transformer_config(cfg.model, cfg.parallel, use_cpu_initialization=True, positional=cfg.positional)
    return build_model(cfg.model, cfg.positional, tcfg, max_sequence_length=seq,
                       pre_process=parallel_state.is_pipeline_first_stage(),
                       post_process=parallel_state.is_pipeline_last_stage()).eval()


def tp2_logits_and_saves(ckpt: str, tokens: torch.Tensor, save_tp: str, save_pp: str) -> dict:
    """Runs under a TP=2 layout (run_distributed(tp=2)); switches to PP=2 for the second save."""
    cfg = load_config(Path(ckpt) / "config.yaml", ["parallel.tensor_model_parallel_size=2"])
    model = _model(cfg, tokens.size(1))
    load_model_weights(ckpt, [model])
    with torch.no_grad():
        logits = model(tokens, None, None, runtime_gather_output=True)[..., : cfg.model.vocab_size]
    save_checkpoint(save_tp, 3, [model], None, None, consumed_samples=0,
                    config_yaml=yaml.safe_dump(config_to_dict(cfg), sort_keys=False), keep_last=0)

    with megatron_parallel(pp=2):
        cfg_pp = load_config(Path(ckpt) / "config.yaml", ["parallel.tensor_model_parallel_size=1",
                                                         "parallel.pipeline_model_parallel_size=2"])
        stage = _model(cfg_pp, tokens.size(1))
        load_model_weights(ckpt, [stage])
        layers = sorted({n.split(".")[2] for n, _ in stage.named_parameters() if n.startswith("decoder.layers.")})
        save_checkpoint(save_pp, 5, [stage], None, None, consumed_samples=0,
                        config_yaml=yaml.safe_dump(config_to_dict(cfg_pp), sort_keys=False), keep_last=0)
    return {"logits": logits, "rank": dist.get_rank(), "pp_stage_local_layers": layers}
