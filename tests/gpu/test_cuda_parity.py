"""CUDA bf16 vs CPU fp32 for one forward/backward of a tiny HARPE model at 8k tokens.

Skipped without CUDA. Reports (prints) the max |diff| of the loss, the logits and the gradients;
asserts bf16-level agreement. Run on a GPU machine with ``pytest tests/gpu -s``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from harpe_megatron.config.model import ParallelConfig, PositionalConfig
from harpe_megatron.distributed.bringup import free_port, init_process_group, megatron_parallel
from harpe_megatron.model.builder import build_model, transformer_config
from harpe_megatron.positional.bases import UniformBases
from tests.helpers import tiny_model_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SEQ = 8192


def _run(model, tokens):
    logits = model(tokens, None, None)
    loss = model(tokens[:, :-1], None, None, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()}
    return logits.detach().float().cpu(), loss.item(), grads


def test_bf16_cuda_matches_fp32_cpu_at_8k():
    init_process_group("cpu", rank=0, world_size=1, port=free_port())
    m = dataclasses.replace(tiny_model_config(num_query_groups=2, vocab_size=256), init_method_std=0.05)
    positional = PositionalConfig(bases=UniformBases(b_min=1e4, b_max=5e5))
    tokens = torch.randint(0, m.vocab_size, (1, SEQ + 1), generator=torch.Generator().manual_seed(0))
    with megatron_parallel():
        cfg32 = transformer_config(m, ParallelConfig(), params_dtype=torch.float32, use_cpu_initialization=True)
        ref_model = build_model(m, positional, cfg32, SEQ + 1, use_transformer_engine=False)
        state = {k: v.detach().clone() for k, v in ref_model.state_dict().items() if torch.is_tensor(v)}
        cfg16 = transformer_config(m, ParallelConfig(), params_dtype=torch.bfloat16)
        gpu_model = build_model(m, positional, cfg16, SEQ + 1, use_transformer_engine=False).cuda()
        gpu_model.load_state_dict({k: v.to(torch.bfloat16) for k, v in state.items()}, strict=False)
        ref_model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in state.items()}, strict=False)
        cpu_logits, cpu_loss, cpu_grads = _run(ref_model, tokens[:, :SEQ].clone().cpu())
        gpu_logits, gpu_loss, gpu_grads = _run(gpu_model, tokens[:, :SEQ].cuda())
    logit_diff = (gpu_logits - cpu_logits).abs().max().item()
    grad_diff = max((gpu_grads[n] - g).abs().max().item() / (g.abs().max().item() + 1e-12)
                    for n, g in cpu_grads.items())
    print(f"\n[cuda-parity] seq={SEQ} loss cpu={cpu_loss:.6f} gpu={gpu_loss:.6f} "
          f"max|dlogits|={logit_diff:.3e} max relative |dgrad|={grad_diff:.3e}")
    assert abs(gpu_loss - cpu_loss) < 2e-2
    assert logit_diff < 0.1 * cpu_logits.abs().max().item()
    assert grad_diff < 0.1
