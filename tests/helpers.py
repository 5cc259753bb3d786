"""Test helpers: tiny HF Llama models and the matching configs, a stand-in process group."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from harpe_megatron.config.model import ModelConfig


def process_threads() -> int:
    """Threads of this process, native ones (gloo's) included (Linux ``/proc``)."""
    return len(os.listdir("/proc/self/task"))


def tiny_model_config(num_query_groups: int = 2, vocab_size: int = 200, num_layers: int = 2) -> ModelConfig:
    return ModelConfig(num_layers=num_layers, hidden_size=64, num_attention_heads=4,
                       num_query_groups=num_query_groups, ffn_hidden_size=176, vocab_size=vocab_size)


TINY_CPU_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml")


def tiny_run_overrides(demo_data: dict, steps: int) -> list[str]:
    """Overrides of configs/tiny_cpu.yaml for short multi-rank training tests on the demo data:
    64-token sequences, 8 per step (micro-batches of 2), ``steps`` steps, no eval, no TensorBoard."""
    return [
        f"data.paths=[{demo_data['prefix']}]", f"data.tokenizer_model={demo_data['tokenizer']}",
        "data.seq_length=64", "model.vocab_size=512",
        "training.micro_batch_size=2", "training.global_batch_size=8", f"training.train_iters={steps}",
        "training.lr_warmup_iters=2", "training.eval_interval=0", "logging.tensorboard=false",
    ]


def tiny_hf_llama(m: ModelConfig, rope_theta: float = 10000.0, seed: int = 0) -> LlamaForCausalLM:
    """A random HF Llama with the shapes of ``m``; weights large enough that every part matters."""
    cfg = LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, rms_norm_eps=m.norm_epsilon, rope_theta=rope_theta,
        tie_word_embeddings=False, max_position_embeddings=4096, attention_bias=False, mlp_bias=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
            else:
                p.uniform_(0.5, 1.5)
    return model


def hf_state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an exported folder, read with the safetensors library and the index."""
    index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(Path(folder) / shard))
    assert set(out) == set(index["weight_map"])
    return out


def checkpoint_tensors(ckpt_dir: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a megatron torch_dist checkpoint (global, unsharded), read with torch's own
    DCP converter. (megatron's ``load_plain_tensors`` fails on torch >= 2.15: its metadata reader
    passes TensorProperties' new ``strides`` field to ``torch.empty``.)"""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    scratch.mkdir(parents=True, exist_ok=True)
    out = scratch / (Path(ckpt_dir).name + ".pt")
    dcp_to_torch_save(str(ckpt_dir), str(out))
    state = torch.load(out, weights_only=False)  # a file this test wrote itself
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


class FakeGroup:
    """Stands in for a process group where only ``rank()``/``size()`` are read (table slicing)."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size
