"""HF Llama <-> megatron-core weight layout, both directions, plus tensor-parallel (un)sharding.

Megatron names are those of ``HarpeGPTModel.state_dict()`` with the local spec at TP=1 (the
"full" layout). Layout facts:

* ``linear_qkv.weight`` rows are grouped per KV group: for group g, ``[q heads of g; k_g; v_g]``
  (each head ``head_dim`` rows). No q/k row permutation: HF and megatron both use rotate-half.
* ``linear_fc1.weight = cat(gate_proj, up_proj)``; under TP each rank holds
  ``[gate_shard; up_shard]``, so fc1 is sharded per half.
* The vocabulary is padded (rows appended) to a multiple of ``make_vocab_size_divisible_by * TP``;
  padding rows are dropped on export.
* Column-parallel (split along dim 0): word embeddings, output layer, qkv, fc1.
  Row-parallel (dim 1): attention output projection ``linear_proj``, ``linear_fc2``.
  Norm weights are replicated.
"""

from __future__ import annotations

import re
from typing import Iterator, Mapping

import torch
from torch import Tensor

from harpe_megatron.config.model import ModelConfig

__all__ = [
    "hf_layer_to_megatron",
    "hf_to_megatron",
    "megatron_to_hf",
    "tp_shard",
    "tp_gather",
]

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_COLUMN_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight",
                    "self_attention.linear_qkv.weight")
_ROW_PARALLEL = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def _qkv_merge(q: Tensor, k: Tensor, v: Tensor, m: ModelConfig) -> Tensor:
    d, g = m.head_dim, m.num_query_groups
    per = m.num_attention_heads // g
    q = q.reshape(g, per * d, -1)
    k = k.reshape(g, d, -1)
    v = v.reshape(g, d, -1)
    return torch.cat([q, k, v], dim=1).reshape(-1, q.size(-1))


def _qkv_split(qkv: Tensor, m: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    d, g = m.head_dim, m.num_query_groups
    per = m.num_attention_heads // g
    qkv = qkv.reshape(g, (per + 2) * d, -1)
    q, k, v = torch.split(qkv, [per * d, d, d], dim=1)
    cols = qkv.size(-1)
    return q.reshape(-1, cols), k.reshape(-1, cols), v.reshape(-1, cols)


def _pad_rows(t: Tensor, rows: int, where: str) -> Tensor:
    if t.size(0) > rows:
        raise ValueError(f"{where}: {t.size(0)} vocabulary rows exceed the padded vocabulary {rows}")
    if t.size(0) == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.size(0), *t.shape[1:])], dim=0)


def hf_layer_to_megatron(i: int, get: callable, m: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    """Megatron tensors of decoder layer ``i``; ``get(hf_name)`` returns one HF tensor."""
    p = f"model.layers.{i}."
    o = f"decoder.layers.{i}."
    yield o + "input_layernorm.weight", get(p + "input_layernorm.weight")
    yield o + "self_attention.linear_qkv.weight", _qkv_merge(
        get(p + "self_attn.q_proj.weight"), get(p + "self_attn.k_proj.weight"),
        get(p + "self_attn.v_proj.weight"), m,
    )
    yield o + "self_attention.linear_proj.weight", get(p + "self_attn.o_proj.weight")
    yield o + "pre_mlp_layernorm.weight", get(p + "post_attention_layernorm.weight")
    yield o + "mlp.linear_fc1.weight", torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
    yield o + "mlp.linear_fc2.weight", get(p + "mlp.down_proj.weight")


def hf_to_megatron(hf: Mapping[str, Tensor], m: ModelConfig, padded_vocab: int) -> dict[str, Tensor]:
    """Full megatron state dict from a full HF Llama state dict."""
    def get(name: str) -> Tensor:
        if name not in hf:
            raise KeyError(f"HF checkpoint is missing tensor {name!r}")
        return hf[name]

    out = {"embedding.word_embeddings.weight": _pad_rows(get("model.embed_tokens.weight"), padded_vocab,
                                                         "model.embed_tokens.weight")}
    for i in range(m.num_layers):
        out.update(hf_layer_to_megatron(i, get, m))
    out["decoder.final_layernorm.weight"] = get("model.norm.weight")
    if m.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = _pad_rows(get("lm_head.weight"), padded_vocab, "lm_head.weight")
    return out


def megatron_to_hf(state: Mapping[str, Tensor], m: ModelConfig) -> dict[str, Tensor]:
    """Full HF Llama state dict from a full (TP=1) megatron state dict (vocab padding dropped)."""
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        if name.endswith("._extra_state"):
            continue
        if name == "embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = t[: m.vocab_size]
        elif name == "output_layer.weight":
            out["lm_head.weight"] = t[: m.vocab_size]
        elif name == "decoder.final_layernorm.weight":
            out["model.norm.weight"] = t
        elif match := _LAYER.match(name):
            i, rest = match.groups()
            p = f"model.layers.{i}."
            if rest == "input_layernorm.weight":
                out[p + "input_layernorm.weight"] = t
            elif rest == "pre_mlp_layernorm.weight":
                out[p + "post_attention_layernorm.weight"] = t
            elif rest == "self_attention.linear_qkv.weight":
                q, k, v = _qkv_split(t, m)
                out[p + "self_attn.q_proj.weight"], out[p + "self_attn.k_proj.weight"] = q, k
                out[p + "self_attn.v_proj.weight"] = v
            elif rest == "self_attention.linear_proj.weight":
                out[p + "self_attn.o_proj.weight"] = t
            elif rest == "mlp.linear_fc1.weight":
                gate, up = torch.chunk(t, 2, dim=0)
                out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
            elif rest == "mlp.linear_fc2.weight":
                out[p + "mlp.down_proj.weight"] = t
            else:
                raise KeyError(f"megatron tensor {name!r} has no HF Llama counterpart")
        else:
            raise KeyError(f"megatron tensor {name!r} has no HF Llama counterpart")
    return out


def _split_kind(name: str) -> str:
    if name.endswith("mlp.linear_fc1.weight"):
        return "glu"
    if name.endswith(_COLUMN_PARALLEL):
        return "column"
    if name.endswith(_ROW_PARALLEL):
        return "row"
    return "replicated"


def tp_shard(name: str, full: Tensor, tp_rank: int, tp_size: int) -> Tensor:
    """This TP rank's shard of a full megatron tensor."""
    kind = _split_kind(name)
    if kind == "replicated" or tp_size == 1:
        return full
    if kind == "glu":
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp_size)[tp_rank], torch.chunk(up, tp_size)[tp_rank]])
    return torch.chunk(full, tp_size, dim=0 if kind == "column" else 1)[tp_rank].contiguous()


def tp_gather(name: str, shards: list[Tensor]) -> Tensor:
    """Inverse of :func:`tp_shard`: the full tensor from every TP rank's shard (rank order)."""
    kind = _split_kind(name)
    if kind == "replicated" or len(shards) == 1:
        return shards[0]
    if kind == "glu":
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(shards, dim=0 if kind == "column" else 1)
