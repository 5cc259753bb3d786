"""The shipped HARPE Llama model classes (harpe_megatron/hf/harpe_llama) against transformers' own Llama.

Oracle: transformers' ``LlamaForCausalLM``. With every RoPE base equal, a ``HarpeLlamaForCausalLM``
holding the same weights is the same model, so its logits must equal Llama's bit for bit (eager
and sdpa, with and without padding, PI scaling) and its greedy generation must too, with and
without the KV cache. With per-head bases: cached == uncached generation == greedy decoding by
full recomputation. Also each transformers API form ``compat_harpe_llama`` handles, exercised with
the signatures of the releases that are not installed. CI runs this file on the lowest, the
locked and the newest transformers (scripts/run_tests.sh).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM

from harpe_megatron.hf.harpe_llama import SHIPPED_FILES, compat_harpe_llama
from harpe_megatron.hf.harpe_llama.configuration_harpe_llama import HarpeLlamaConfig
from harpe_megatron.hf.harpe_llama.modeling_harpe_llama import HarpeLlamaForCausalLM
from tests.helpers import tiny_hf_llama, tiny_model_config

HEADS = 4
PER_HEAD_BASES = [300.0, 300.0, 5000.0, 5000.0]  # 2 KV groups
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


def _pair(rope: dict | None = None, theta: float = 5e5, impl: str = "sdpa", bases=None):
    """(transformers' Llama, our model with the same weights); ``bases`` None: all equal to theta."""
    llama = tiny_hf_llama(tiny_model_config(num_query_groups=2), rope_theta=theta)
    if rope is not None:  # the same weights under a scaled RoPE
        llama.config.rope_parameters = {"rope_theta": theta, **rope}
        scaled = LlamaForCausalLM(llama.config).eval()
        scaled.load_state_dict(llama.state_dict())
        llama = scaled
    settings = {k: v for k, v in llama.config.to_dict().items() if k not in ("model_type", "architectures")}
    ours = HarpeLlamaForCausalLM(HarpeLlamaConfig(**settings, harpe_rope_bases=list(bases or [theta] * HEADS))).eval()
    assert not ours.load_state_dict(llama.state_dict()).unexpected_keys
    llama.set_attn_implementation(impl)
    ours.set_attn_implementation(impl)
    return llama, ours


def _batch(seed: int = 0, n: int = 40, pad: int = 7):
    ids = torch.randint(0, 200, (2, n), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0  # left padding in row 1
    return ids, mask


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 2.0}], ids=["plain", "linear"])
def test_equal_bases_give_llamas_logits_bit_for_bit(impl, rope):
    llama, ours = _pair(rope, impl=impl)
    ids, mask = _batch()
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, llama(ids).logits)
        assert torch.equal(ours(ids, attention_mask=mask).logits, llama(ids, attention_mask=mask).logits)
        # the same model with other bases is another model (negative control)
        other = HarpeLlamaForCausalLM(HarpeLlamaConfig(**{**ours.config.to_dict(), "harpe_rope_bases": PER_HEAD_BASES}))
        other.load_state_dict(ours.state_dict())
        assert (other.eval()(ids).logits - llama(ids).logits).abs().max() > 1e-2


def test_equal_bases_yarn_matches_llama():
    """transformers computes YaRN's frequency blend in another order (ulps apart), so not bitwise."""
    llama, ours = _pair(YARN)
    ids, mask = _batch(1)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, llama(ids, attention_mask=mask).logits,
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_equal_bases_generate_like_llama_with_and_without_cache(impl):
    llama, ours = _pair(impl=impl)
    ids, mask = _batch(2, n=16, pad=5)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = llama.generate(ids, **kwargs)
        assert torch.equal(ours.generate(ids, use_cache=True, **kwargs), expected)
        assert torch.equal(ours.generate(ids, use_cache=False, **kwargs), expected)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_per_head_generation_cached_equals_uncached_equals_recomputation(impl):
    _, ours = _pair(YARN, bases=PER_HEAD_BASES, impl=impl)
    prompt = torch.randint(0, 200, (1, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cached = ours.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = ours.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=False, pad_token_id=0)
        ids = prompt
        for _ in range(16):  # full recomputation, no generate(), no cache
            ids = torch.cat([ids, ours(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, uncached) and torch.equal(cached, ids)


def test_static_cache_and_tied_embeddings(tmp_path):
    """A StaticCache (written at cache positions: transformers < 5.4 takes them in ``cache_kwargs``)
    generates what the default DynamicCache does; tied embeddings save without ``lm_head`` and load
    tied again."""
    _, ours = _pair(YARN, bases=PER_HEAD_BASES)
    prompt, mask = _batch(7, n=14, pad=3)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        static = ours.generate(prompt, cache_implementation="static", **kwargs)
        assert torch.equal(static, ours.generate(prompt, **kwargs))
    tied = HarpeLlamaForCausalLM(HarpeLlamaConfig(**{**ours.config.to_dict(), "tie_word_embeddings": True})).eval()
    tied.save_pretrained(tmp_path)
    back = HarpeLlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(back(prompt).logits, tied(prompt).logits)


def test_loss_hidden_states_tuples_and_logits_to_keep():
    llama, ours = _pair(impl="eager")
    ids, mask = _batch(4)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask, labels=labels, output_hidden_states=True, output_attentions=True)
        theirs = llama(ids, attention_mask=mask, labels=labels, output_hidden_states=True, output_attentions=True)
        torch.testing.assert_close(mine.loss, theirs.loss, rtol=1e-6, atol=0)
        assert len(mine.hidden_states) == len(theirs.hidden_states) == 3
        for a, b in zip(mine.hidden_states, theirs.hidden_states):
            assert torch.equal(a, b)
        assert [tuple(a.shape) for a in mine.attentions] == [(2, HEADS, 40, 40)] * 2
        for a, b in zip(mine.attentions, theirs.attentions):
            assert torch.equal(a, b)
        as_tuple = ours(ids, attention_mask=mask, return_dict=False, use_cache=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], mine.logits)
        last = ours(ids, attention_mask=mask, logits_to_keep=1).logits  # lm_head on fewer rows: ulps apart
        torch.testing.assert_close(last, mine.logits[:, -1:], rtol=0, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    _, ours = _pair(bases=PER_HEAD_BASES, impl="eager")
    ids, _ = _batch(5)
    grads = []
    for checkpointing in (False, True):
        ours.zero_grad()
        ours.train()
        if checkpointing:
            ours.gradient_checkpointing_enable()
        ours(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
    assert ours.model.gradient_checkpointing
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=1e-6, msg=name)


def test_cache_keywords_of_every_release_reach_the_model():
    """``cache=`` (transformers >= 5.24) and ``past_key_values=`` (5.0-5.23) are the same cache; a
    cache under any other keyword is refused instead of silently ignored."""
    _, ours = _pair(bases=PER_HEAD_BASES)
    ids, _ = _batch(6)
    with torch.no_grad():
        full = ours(ids, use_cache=False).logits
        for keyword in compat_harpe_llama.CACHE_KEYWORDS:
            cache = DynamicCache()
            first = ours(ids[:, :30], use_cache=True, **{keyword: cache})
            assert getattr(first, compat_harpe_llama.CACHE_FIELD) is cache and cache.get_seq_length() == 30
            rest = ours(ids[:, 30:], use_cache=True, **{keyword: cache}).logits
            torch.testing.assert_close(torch.cat([first.logits, rest], 1), full, rtol=0, atol=1e-5)
        with pytest.raises(TypeError, match="KV cache as kv_cache="):
            ours(ids, kv_cache=DynamicCache())
        with pytest.raises(ValueError, match="two different KV caches"):
            ours(ids, cache=DynamicCache(), past_key_values=DynamicCache())


def test_output_cache_field_is_the_one_transformers_outputs_use():
    from dataclasses import fields

    from transformers.modeling_outputs import CausalLMOutputWithPast

    names = {f.name for f in fields(CausalLMOutputWithPast)}
    assert compat_harpe_llama.CACHE_FIELD in names and compat_harpe_llama.CACHE_FIELD in ("cache", "past_key_values")


# transformers' create_causal_mask parameters: 5.0-5.1, 5.2-5.5, 5.10-5.23, 5.24, 5.25 (deprecated alias listed)
MASK_SIGNATURES = {
    "5.0": ["config", "input_embeds", "attention_mask", "cache_position", "past_key_values", "position_ids",
            "or_mask_function", "and_mask_function"],
    "5.2": ["config", "inputs_embeds", "attention_mask", "cache_position", "past_key_values", "position_ids",
            "or_mask_function", "and_mask_function"],
    "5.10": ["config", "inputs_embeds", "attention_mask", "past_key_values", "position_ids", "or_mask_function",
             "and_mask_function", "block_sequence_ids"],
    "5.24": ["config", "inputs_embeds", "attention_mask", "cache", "position_ids", "or_mask_function",
             "and_mask_function", "block_sequence_ids", "layer_idx", "allow_is_causal_skip"],
    "5.25": ["config", "inputs_embeds", "attention_mask", "cache", "position_ids", "or_mask_function",
             "and_mask_function", "block_sequence_ids", "layer_idx", "allow_is_causal_skip", "past_key_values"],
}


@pytest.mark.parametrize("release", sorted(MASK_SIGNATURES))
def test_causal_mask_arguments_for_each_form(release):
    cfg, emb, mask, cache, pos, cpos = object(), object(), object(), object(), object(), object()
    got = compat_harpe_llama.causal_mask_arguments(MASK_SIGNATURES[release], cfg, emb, mask, cache, pos, cpos)
    params = MASK_SIGNATURES[release]
    assert set(got) <= set(params)
    assert got["config"] is cfg and got["attention_mask"] is mask and got["position_ids"] is pos
    assert got["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] is emb
    assert got["cache" if "cache" in params else "past_key_values"] is cache
    assert not ("cache" in got and "past_key_values" in got)  # the new name only
    assert got.get("cache_position") is (cpos if "cache_position" in params else None)
    with pytest.raises(ImportError, match="create_causal_mask takes"):
        compat_harpe_llama.causal_mask_arguments([p for p in params if p not in ("cache", "past_key_values")],
                                                 cfg, emb, mask, cache, pos, cpos)


def test_cache_update_in_both_forms():
    calls = []

    class Before54:  # Cache.update up to transformers 5.3
        def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
            calls.append(("cache_kwargs", layer_idx, cache_kwargs))
            return key_states, value_states

    class From54:  # 5.4+
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            calls.append(("plain", layer_idx, args, kwargs))
            return key_states, value_states

    k, v, position = torch.zeros(1), torch.ones(1), torch.arange(3)
    assert compat_harpe_llama.update_cache(Before54(), k, v, 2, position) == (k, v)
    assert compat_harpe_llama.update_cache(From54(), k, v, 3, position) == (k, v)
    assert calls == [("cache_kwargs", 2, {"cache_position": position}), ("plain", 3, (), {})]
    # the installed transformers' own cache is updated in its own form
    installed = "cache_kwargs" in inspect.signature(DynamicCache.update).parameters
    assert compat_harpe_llama._takes_cache_kwargs(DynamicCache) == installed


def test_shipped_code_has_no_version_gate():
    """Compatibility is decided by the API's form, never by a version string or an environment variable."""
    for f in SHIPPED_FILES:
        text = f.read_text()
        assert "__version__" not in text and "os.environ" not in text and "TESTED_TRANSFORMERS" not in text, f.name
