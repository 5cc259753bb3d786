"""The HF Llama <-> megatron-core weight map: one table, from which import, export, the expected
HF shapes and tensor-parallel (un)sharding all derive.

Megatron names are those of ``HarpeGPTModel.state_dict()`` with the local spec at TP=1 (the
"full" layout). Each :class:`Entry` of :data:`LLAMA_MAP` names one megatron tensor, the HF
tensors it is made of (with their shapes in named dimensions) and how they combine:

* ``copy``: the same tensor under another name.
* ``vocab``: word embeddings / output layer. Megatron pads the vocabulary (rows appended, zero)
  to a multiple of ``make_vocab_size_divisible_by * TP`` (``config.model.padded_vocab_size``);
  import pads with :func:`pad_vocab_rows`, export drops the padding rows.
* ``qkv``: ``linear_qkv.weight`` rows are grouped per KV group: for group g,
  ``[q heads of g; k_g; v_g]`` (each head ``head_dim`` rows). No q/k row permutation: HF and
  megatron both use rotate-half.
* ``glu``: ``linear_fc1.weight = cat(gate_proj, up_proj)``; under TP each rank holds
  ``[gate_shard; up_shard]``, so fc1 is sharded per half.

Tensor parallelism (``Entry.tp``): column-parallel (split along dim 0): word embeddings, output
layer, qkv, fc1 (per half); row-parallel (dim 1): ``linear_proj``, ``linear_fc2``; norm weights
(and any name not in the table) are replicated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional

import torch
from torch import Tensor

from harpe_megatron.config.model import ModelConfig

__all__ = [
    "Entry",
    "LLAMA_MAP",
    "expected_hf_shapes",
    "hf_groups",
    "hf_to_megatron",
    "hf_views",
    "iter_hf_to_megatron",
    "megatron_to_hf",
    "pad_vocab_rows",
    "tp_shard",
    "tp_gather",
]


@dataclass(frozen=True)
class Entry:
    """One megatron tensor and the HF tensors it is made of.

    Names in a per-layer entry are relative to ``decoder.layers.{i}.`` (megatron) and
    ``model.layers.{i}.`` (HF). ``hf`` pairs each HF name with its shape in named dimensions
    (:func:`_dims`). ``combine``: ``copy`` | ``vocab`` | ``qkv`` | ``glu``; ``tp``: ``column`` |
    ``row`` | ``glu`` | ``replicated``. ``untied_only``: present only with untied embeddings.
    """

    megatron: str
    hf: tuple[tuple[str, tuple[str, ...]], ...]
    combine: str = "copy"
    tp: str = "replicated"
    per_layer: bool = False
    untied_only: bool = False


def _layer(megatron: str, hf: tuple[tuple[str, tuple[str, ...]], ...], combine: str = "copy",
           tp: str = "replicated") -> Entry:
    return Entry(megatron, hf, combine, tp, per_layer=True)


# In checkpoint order: embeddings, the layers, the final norm, the output layer.
LLAMA_MAP: tuple[Entry, ...] = (
    Entry("embedding.word_embeddings.weight", (("model.embed_tokens.weight", ("vocab", "hidden")),),
          "vocab", "column"),
    _layer("input_layernorm.weight", (("input_layernorm.weight", ("hidden",)),)),
    _layer("self_attention.linear_qkv.weight", (("self_attn.q_proj.weight", ("q", "hidden")),
                                                ("self_attn.k_proj.weight", ("kv", "hidden")),
                                                ("self_attn.v_proj.weight", ("kv", "hidden"))), "qkv", "column"),
    _layer("self_attention.linear_proj.weight", (("self_attn.o_proj.weight", ("hidden", "q")),), tp="row"),
    _layer("pre_mlp_layernorm.weight", (("post_attention_layernorm.weight", ("hidden",)),)),
    _layer("mlp.linear_fc1.weight", (("mlp.gate_proj.weight", ("ffn", "hidden")),
                                     ("mlp.up_proj.weight", ("ffn", "hidden"))), "glu", "glu"),
    _layer("mlp.linear_fc2.weight", (("mlp.down_proj.weight", ("hidden", "ffn")),), tp="row"),
    Entry("decoder.final_layernorm.weight", (("model.norm.weight", ("hidden",)),)),
    Entry("output_layer.weight", (("lm_head.weight", ("vocab", "hidden")),), "vocab", "column", untied_only=True),
)

_MEGATRON_LAYER = "decoder.layers.{i}."
_HF_LAYER = "model.layers.{i}."
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_GLOBAL = {e.megatron: e for e in LLAMA_MAP if not e.per_layer}
_PER_LAYER = {e.megatron: e for e in LLAMA_MAP if e.per_layer}


def _dims(m: ModelConfig) -> dict[str, int]:
    return {"vocab": m.vocab_size, "hidden": m.hidden_size, "q": m.num_attention_heads * m.head_dim,
            "kv": m.num_query_groups * m.head_dim, "ffn": m.ffn_hidden_size}


def _instances(m: ModelConfig) -> Iterator[tuple[Entry, str, tuple[str, ...]]]:
    """``(entry, megatron name, HF names)`` of every tensor of architecture ``m``, in checkpoint order."""
    layer_done = False
    for e in LLAMA_MAP:
        if e.per_layer:
            if not layer_done:  # layer by layer, each layer's tensors in table order
                for i in range(m.num_layers):
                    mp, hp = _MEGATRON_LAYER.format(i=i), _HF_LAYER.format(i=i)
                    for le in _PER_LAYER.values():
                        yield le, mp + le.megatron, tuple(hp + name for name, _ in le.hf)
            layer_done = True
        elif m.untie_embeddings_and_output_weights or not e.untied_only:
            yield e, e.megatron, tuple(name for name, _ in e.hf)


def expected_hf_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of an HF Llama checkpoint with architecture ``m``."""
    dims = _dims(m)
    out: dict[str, tuple[int, ...]] = {}
    for e, _, hf_names in _instances(m):
        for name, (_, shape) in zip(hf_names, e.hf):
            out[name] = tuple(dims[d] for d in shape)
    return out


def hf_groups(m: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Megatron tensor name -> the names of the HF tensors it is made of, in the order
    :func:`iter_hf_to_megatron` yields them, for architecture ``m``."""
    return {name: hf_names for _, name, hf_names in _instances(m)}


def pad_vocab_rows(t: Tensor, rows: int, where: str) -> Tensor:
    """``t`` with zero rows appended up to the padded vocabulary ``rows`` (the one place that pads)."""
    if t.size(0) > rows:
        raise ValueError(f"{where}: {t.size(0)} vocabulary rows exceed the padded vocabulary {rows}")
    if t.size(0) == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.size(0), *t.shape[1:])], dim=0)


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


def _combine(e: Entry, parts: list[Tensor], m: ModelConfig, padded_vocab: int, where: str) -> Tensor:
    if e.combine == "qkv":
        return _qkv_merge(*parts, m)
    if e.combine == "glu":
        return torch.cat(parts)
    if e.combine == "vocab":
        return pad_vocab_rows(parts[0], padded_vocab, where)
    return parts[0]


def _separate(e: Entry, t: Tensor, m: ModelConfig) -> tuple[Tensor, ...]:
    if e.combine == "qkv":
        return _qkv_split(t, m)
    if e.combine == "glu":
        return tuple(torch.chunk(t, 2, dim=0))
    if e.combine == "vocab":
        return (t[: m.vocab_size],)
    return (t,)


def _combine_into(e: Entry, parts: list[Tensor], m: ModelConfig, out: Tensor, where: str) -> None:
    """:func:`_combine` written into ``out`` (any dtype: parts are cast as they are copied)."""
    if e.combine == "qkv":
        d, g = m.head_dim, m.num_query_groups
        per = m.num_attention_heads // g
        grouped = out.view(g, (per + 2) * d, -1)
        for part, (lo, hi) in zip(parts, ((0, per * d), (per * d, (per + 1) * d), ((per + 1) * d, (per + 2) * d))):
            grouped[:, lo:hi].copy_(part.view(g, hi - lo, -1))
    elif e.combine == "glu":
        out[: parts[0].size(0)].copy_(parts[0])
        out[parts[0].size(0):].copy_(parts[1])
    elif e.combine == "vocab":
        rows = parts[0].size(0)
        if rows > out.size(0):
            raise ValueError(f"{where}: {rows} vocabulary rows exceed the padded vocabulary {out.size(0)}")
        out[:rows].copy_(parts[0])
        out[rows:].zero_()
    else:
        out.copy_(parts[0])


def _megatron_shape(e: Entry, parts: list[Tensor], padded_vocab: int) -> tuple[int, ...]:
    if e.combine == "vocab":
        return (padded_vocab, *parts[0].shape[1:])
    if e.combine in ("qkv", "glu"):
        return (sum(p.size(0) for p in parts), *parts[0].shape[1:])
    return tuple(parts[0].shape)


def iter_hf_to_megatron(get: Callable[[str], Tensor], m: ModelConfig, padded_vocab: int,
                        alloc: Optional[Callable[[tuple[int, ...]], Tensor]] = None) -> Iterator[tuple[str, Tensor]]:
    """Megatron tensors in checkpoint order; ``get(hf_name)`` returns one HF tensor (read lazily).

    With ``alloc(shape)`` (a tensor of the wanted dtype, e.g. a pooled buffer) every megatron
    tensor that is not its HF tensor unchanged is written into ``alloc``'s tensor (cast to its
    dtype); a plain copy of the same dtype is yielded as the HF tensor itself."""
    for e, name, hf_names in _instances(m):
        parts = [get(n) for n in hf_names]
        if alloc is None:
            yield name, _combine(e, parts, m, padded_vocab, hf_names[0])
            continue
        out = alloc(_megatron_shape(e, parts, padded_vocab))
        if e.combine == "copy" and parts[0].dtype == out.dtype:
            yield name, parts[0]  # ``out`` is not used: the caller may give it back
            continue
        _combine_into(e, parts, m, out, hf_names[0])
        yield name, out


def hf_to_megatron(hf: Mapping[str, Tensor], m: ModelConfig, padded_vocab: int) -> dict[str, Tensor]:
    """Full megatron state dict from a full HF Llama state dict."""
    def get(name: str) -> Tensor:
        if name not in hf:
            raise KeyError(f"HF checkpoint is missing tensor {name!r}")
        return hf[name]

    return dict(iter_hf_to_megatron(get, m, padded_vocab))


def _entry_of(name: str) -> tuple[Entry, str]:
    """The table entry of a megatron name and the HF name prefix of its tensors."""
    if name in _GLOBAL:
        return _GLOBAL[name], ""
    if (match := _LAYER_NAME.match(name)) and match.group(2) in _PER_LAYER:
        return _PER_LAYER[match.group(2)], _HF_LAYER.format(i=match.group(1))
    raise KeyError(f"megatron tensor {name!r} has no HF Llama counterpart")


def hf_views(name: str, t: Tensor, m: ModelConfig) -> list[tuple[str, Tensor]]:
    """The HF tensors of one (TP=1) megatron tensor as views of it, without copies: each holds the
    HF tensor's elements in row-major order but may have another shape (q/k/v come as
    ``[groups, rows, hidden]``); vocabulary padding dropped."""
    e, prefix = _entry_of(name)
    if e.combine == "qkv":
        d, g = m.head_dim, m.num_query_groups
        per = m.num_attention_heads // g
        grouped = t.view(g, (per + 2) * d, -1)
        parts = (grouped[:, : per * d], grouped[:, per * d: (per + 1) * d], grouped[:, (per + 1) * d:])
    else:
        parts = _separate(e, t, m)
    return [(prefix + hf_name, part) for (hf_name, _), part in zip(e.hf, parts)]


def megatron_to_hf(state: Mapping[str, Tensor], m: ModelConfig) -> dict[str, Tensor]:
    """Full HF Llama state dict from a full (TP=1) megatron state dict (vocab padding dropped)."""
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        if name.endswith("._extra_state"):
            continue
        e, prefix = _entry_of(name)
        for (hf_name, _), part in zip(e.hf, _separate(e, t, m)):
            out[prefix + hf_name] = part
    return out


def _split_kind(name: str) -> str:
    for e in LLAMA_MAP:
        if name.endswith(e.megatron):
            return e.tp
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
