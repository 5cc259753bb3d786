"""Self-Extend (Jin et al. 2024) in the exported models' code (self_extend_harpe_llama.apply_self_extend).

The oracle is written here from the paper's formula, independently of the implementation: a
whole Llama forward from the weights, with RoPE as complex rotations and, for every (query i,
key j <= i), positions (i, j) when i - j < W and (i // G + W - W // G, j // G) otherwise, all in
one softmax per query. Checked: logits (fp32) of plain Llama and harpe_llama (per-KV-group bases),
greedy generation with and without the KV cache, identity when the window covers the sequence.
"""

from __future__ import annotations

import math

import pytest
import torch

from harpe_megatron.hf.harpe_llama.configuration_harpe_llama import HarpeLlamaConfig
from harpe_megatron.hf.harpe_llama.modeling_harpe_llama import HarpeLlamaForCausalLM
from harpe_megatron.hf.harpe_llama.self_extend_harpe_llama import (
    SelfExtendAttention,
    apply_self_extend,
    self_extend_attention,
    self_extend_positions,
    self_extend_settings,
)
from tests.helpers import tiny_hf_llama, tiny_model_config

HEAD_BASES = [300.0, 300.0, 5000.0, 5000.0]   # 4 query heads, 2 KV groups


def _randomise(model, seed: int = 0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
            else:
                p.uniform_(0.5, 1.5)
    return model.eval()


def tiny_harpe(bases=HEAD_BASES, **extra) -> HarpeLlamaForCausalLM:
    m = tiny_model_config(num_query_groups=2)
    cfg = HarpeLlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, rms_norm_eps=m.norm_epsilon, tie_word_embeddings=False,
        max_position_embeddings=4096, harpe_rope_bases=list(bases), **extra)
    return _randomise(HarpeLlamaForCausalLM(cfg))


def tiny_llama(rope_scaling=None):
    model = tiny_hf_llama(tiny_model_config(num_query_groups=2), rope_theta=1000.0)
    if rope_scaling is not None:   # rebuild with the scaling, same weights
        from transformers import LlamaForCausalLM
        cfg = model.config
        cfg.rope_parameters = {"rope_theta": 1000.0, **rope_scaling}
        scaled = LlamaForCausalLM(cfg).eval()
        scaled.load_state_dict(model.state_dict())
        model = scaled
    return model


# ------------------------------------------------------------------------------------------------
# The oracle: written from the formula, sharing no code with the implementation
# ------------------------------------------------------------------------------------------------

def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE as complex multiplication: pair (x[k], x[k + d/2]) is one complex number."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), -1)


def reference_logits(model, ids: list[int], head_bases: list[float], group: int, window: int,
                     position_divisor: float = 1.0, shift: float | None = None) -> torch.Tensor:
    """Logits ``[len(ids), vocab]`` of a Llama with Self-Extend, in float64, one pair at a time.
    ``shift``: the grouped query positions' shift, ``W - W // G`` unless given."""
    shift = window - window // group if shift is None else shift
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    n, heads, kv_heads = len(ids), cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // heads
    # positions of every (query i, key j) pair, straight from the paper's formula
    qpos = torch.zeros(n, n, dtype=torch.float64)
    kpos = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1):
            if i - j < window:
                qpos[i, j], kpos[i, j] = i, j
            else:
                qpos[i, j], kpos[i, j] = i // group + shift, j // group
    qpos, kpos = qpos / position_divisor, kpos / position_divisor
    causal = torch.ones(n, n).tril().bool()
    x = sd["model.embed_tokens.weight"][torch.tensor(ids)]
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        h = _rms(x, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(n, heads, d)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(n, kv_heads, d)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(n, kv_heads, d)
        out = torch.zeros(n, heads, d, dtype=torch.float64)
        for head in range(heads):
            kv = head // (heads // kv_heads)
            inv_freq = head_bases[head] ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
            qr = _rotate(q[:, head][:, None, :], qpos[..., None] * inv_freq)    # [i, j, d]
            kr = _rotate(k[:, kv][None, :, :], kpos[..., None] * inv_freq)     # [i, j, d]
            scores = (qr * kr).sum(-1) / math.sqrt(d)
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            out[:, head] = probs @ v[:, kv]
        x = x + out.reshape(n, -1) @ sd[p + "self_attn.o_proj.weight"].T
        h = _rms(x, sd[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate, up = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    return _rms(x, sd["model.norm.weight"], cfg.rms_norm_eps) @ sd["lm_head.weight"].T


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 200, (1, n), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "llama_linear", "llama_yarn", "harpe", "harpe_yarn"])
def test_window_covering_the_sequence_is_plain_attention(kind):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    model = {"llama": lambda: tiny_llama(), "llama_linear": lambda: tiny_llama({"rope_type": "linear", "factor": 2.0}),
             "llama_yarn": lambda: tiny_llama(yarn), "harpe": lambda: tiny_harpe(),
             "harpe_yarn": lambda: tiny_harpe(rope_parameters=yarn)}[kind]()
    ids = _ids(48)
    with torch.no_grad():
        plain = model(ids).logits
        extended = apply_self_extend(model, 4, 48)(ids).logits
        assert isinstance(model.model.layers[0].self_attn, SelfExtendAttention)
        torch.testing.assert_close(extended, plain, rtol=0, atol=1e-5)
        # group size 1 is plain attention too, whatever the window
        torch.testing.assert_close(apply_self_extend(model, 1, 5)(ids).logits, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("group,window", [(4, 8), (4, 6), (3, 10)])   # G does not divide W: (4, 6), (3, 10)
def test_logits_equal_the_formula_plain_llama(group, window):
    model = tiny_llama()
    ids = _ids(40)
    ref = reference_logits(model, ids[0].tolist(), [1000.0] * 4, group, window)
    with torch.no_grad():
        got = apply_self_extend(model, group, window)(ids).logits[0]
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-5)
    assert (ref - reference_logits(model, ids[0].tolist(), [1000.0] * 4, group, 10_000)).abs().max() > 1e-2
    if window % group:  # the true-division shift W - W / G (LongLM before its fix) is measurably different
        true_division = reference_logits(model, ids[0].tolist(), [1000.0] * 4, group, window,
                                         shift=window - window / group)
        assert (got.double() - true_division).abs().max() > 1e-2


def test_grouped_positions_use_floor_division_throughout():
    """LongLM's fixed convention (its commit 715c1e3): query q -> q // G + W - W // G, key k -> k // G,
    integers, also when G does not divide W (W - W / G would put queries at fractional positions)."""
    positions = torch.arange(0, 40)[None]
    for group, window in [(4, 6), (3, 10), (32, 1000), (4, 8)]:
        grouped_q, grouped_k = self_extend_positions(positions, positions, group, window)
        assert grouped_q.dtype == grouped_k.dtype == torch.int64
        assert grouped_q.tolist() == [[q // group + window - window // group for q in range(40)]]
        assert grouped_k.tolist() == [[k // group for k in range(40)]]


def test_logits_equal_the_formula_with_position_interpolation():
    model = tiny_llama({"rope_type": "linear", "factor": 2.0})
    ids = _ids(40)
    ref = reference_logits(model, ids[0].tolist(), [1000.0] * 4, 4, 8, position_divisor=2.0)
    with torch.no_grad():
        got = apply_self_extend(model, 4, 8)(ids).logits[0]
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-5)


def test_per_head_bases_are_respected():
    model = tiny_harpe()
    ids = _ids(40)
    ref = reference_logits(model, ids[0].tolist(), HEAD_BASES, 4, 8)
    with torch.no_grad():
        got = apply_self_extend(model, 4, 8)(ids).logits[0].double()
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)
    for single in (HEAD_BASES[0], HEAD_BASES[-1]):   # one base for all heads is measurably different
        assert (got - reference_logits(model, ids[0].tolist(), [single] * 4, 4, 8)).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["llama", "harpe"])
def test_generate_with_cache_equals_without_and_the_formula(kind):
    model = tiny_llama() if kind == "llama" else tiny_harpe()
    bases = [1000.0] * 4 if kind == "llama" else HEAD_BASES
    apply_self_extend(model, 4, 8)
    prompt, new = _ids(20, seed=3), 12
    with torch.no_grad():
        cached = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                                use_cache=True, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        uncached = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                  do_sample=False, use_cache=False, output_logits=True,
                                  return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(cached.sequences, uncached.sequences)
    full = reference_logits(model, cached.sequences[0].tolist(), bases, 4, 8)
    for step in range(new):
        at = prompt.shape[1] - 1 + step      # the position whose logits chose token at + 1
        torch.testing.assert_close(cached.logits[step][0].double(), full[at], rtol=0, atol=2e-5)
        torch.testing.assert_close(uncached.logits[step][0].double(), full[at], rtol=0, atol=2e-5)


def test_config_key_builds_self_extend_and_survives_save(tmp_path):
    from transformers import AutoModelForCausalLM

    from harpe_megatron.hf.harpe_llama import register

    register()
    plain = tiny_harpe()
    configured = tiny_harpe(self_extend={"group_size": 4, "window": 8})
    configured.load_state_dict(plain.state_dict())
    ids = _ids(30)
    with torch.no_grad():
        expected = apply_self_extend(plain, 4, 8)(ids).logits
        torch.testing.assert_close(configured(ids).logits, expected, rtol=0, atol=1e-6)
    configured.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=False).eval()
    assert loaded.config.self_extend == {"group_size": 4, "window": 8}
    assert isinstance(loaded.model.layers[-1].self_attn, SelfExtendAttention)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=1e-6)


def test_bad_settings_and_caches_are_refused():
    for bad in [(0, 8), (4, 0), (2.5, 8), (8, 8), (16, 8), {"group_size": 4}, {"group_size": 4, "window": 8, "x": 1}]:
        with pytest.raises(ValueError):
            self_extend_settings(bad)
    model = tiny_llama({"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="dynamic"):
        apply_self_extend(model, 4, 8)
    from transformers import StaticCache

    model = apply_self_extend(tiny_llama(), 4, 8)
    with torch.no_grad(), pytest.raises(ValueError, match="DynamicCache"):
        model(_ids(10), past_key_values=StaticCache(config=model.config, max_cache_len=32))


def test_left_padded_batch_generates_like_each_prompt_alone():
    """Keys sit at consecutive positions ending at the query's ``position_ids``, so a left-padded
    row keeps its real tokens' positions (and their groups) in a batch."""
    model = apply_self_extend(tiny_harpe(), 4, 8)
    a, b = _ids(20, seed=5), _ids(14, seed=6)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        alone = [model.generate(x, attention_mask=torch.ones_like(x), **kwargs)[0, x.shape[1]:] for x in (a, b)]
        batch = torch.cat([a, torch.cat([torch.zeros(1, 6, dtype=torch.long), b], 1)])
        mask = torch.ones_like(batch)
        mask[1, :6] = 0
        together = model.generate(batch, attention_mask=mask, **kwargs)[:, 20:]
    assert torch.equal(together[0], alone[0]) and torch.equal(together[1], alone[1])


def test_query_chunks_give_the_same_attention():
    """Scores are built a few query rows at a time (bounded memory); the chunking changes nothing."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 30, 8, generator=g)
    k, v = torch.randn(2, 2, 30, 8, generator=g), torch.randn(2, 2, 30, 8, generator=g)
    pos = torch.arange(30)[None]
    inv_freq = torch.tensor([[1.0, 0.1, 0.01, 0.001], [1.0, 0.3, 0.09, 0.027]])
    args = (q, k, v, pos, pos, inv_freq, 1.0, 8 ** -0.5, 4, 6)
    whole = self_extend_attention(*args)
    assert whole.shape == (2, 30, 4, 8)
    torch.testing.assert_close(self_extend_attention(*args, max_scores=2 * 4 * 30 * 7), whole, rtol=0, atol=1e-6)
