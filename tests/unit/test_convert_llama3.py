"""The Llama-3 family through both converters: Llama 3.1's ``llama3`` RoPE scaling, GQA, the
128,256-token vocabulary, tied (Llama 3.2) and untied (Llama 3/3.1 8B) embeddings, at tiny width.

Oracles: transformers' own ``LlamaForCausalLM`` (the source model, and the exported folder loaded
back with stock classes), and for per-head bases on top of a Llama-3 model the shipped harpe_llama
code; megatron loads the converted checkpoint the way training does.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from harpe_megatron.config.loader import load_config
from harpe_megatron.hf.export_hf import convert_megatron_to_hf
from harpe_megatron.hf.import_hf import convert_hf_to_megatron
from harpe_megatron.positional.scaling import Llama3Scaling
from tests.helpers import hf_state
from tests.unit.test_convert_roundtrip import LOGITS_ATOL, kl_divergence, megatron_logits

VOCAB = 128256
# head_dim 8, theta 5e5, original 256: wavelengths 6.3 (kept), 167 (blended), 4443 and 1.2e5 (divided)
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
PER_HEAD = "positional.bases={strategy: uniform, b_min: 5.0e+5, b_max: 2.5e+7}"


def llama3(tied: bool, seed: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=224, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5, rope_parameters=dict(ROPE),
                      max_position_embeddings=2048, tie_word_embeddings=tied, bos_token_id=128000,
                      eos_token_id=128001, attention_bias=False, mlp_bias=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            (p.normal_(0.0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5))
    return model


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama3")
    models = {"untied": llama3(False, 11), "tied": llama3(True, 12)}
    models["untied"].save_pretrained(root / "untied", max_shard_size="20MB")
    models["tied"].to(torch.bfloat16).save_pretrained(root / "tied", max_shard_size="10MB")
    return root, models


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_llama3_round_trip_bit_exact_and_logits(single_rank, sources, tmp_path, name):
    root, _ = sources
    convert_hf_to_megatron(root / name, tmp_path / "mg", tp=2, progress=False)
    cfg = load_config(tmp_path / "mg" / "config.yaml")
    assert cfg.positional.scaling == Llama3Scaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                   original_max_position_embeddings=256)
    assert cfg.positional.bases.to_dict() == {"strategy": "constant", "base": 500000.0}
    assert cfg.model.num_query_groups == 2 and cfg.model.vocab_size == VOCAB
    assert cfg.model.untie_embeddings_and_output_weights is (name == "untied")

    convert_megatron_to_hf(tmp_path / "mg", tmp_path / "hf", progress=False)
    exported, reference = hf_state(tmp_path / "hf"), hf_state(root / name)
    assert set(exported) == set(reference) - ({"lm_head.weight"} if name == "tied" else set())
    for key, tensor in exported.items():
        assert tensor.dtype == reference[key].dtype and torch.equal(tensor, reference[key]), key
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["rope_parameters"] == ROPE
    assert (config["bos_token_id"], config["eos_token_id"]) == (128000, 128001)  # from the imported config

    tokens = torch.randint(0, VOCAB, (1, 264), generator=torch.Generator().manual_seed(3))  # past 256: scaled band
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf) is LlamaForCausalLM  # stock transformers, no custom code
    original_model = AutoModelForCausalLM.from_pretrained(root / name, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs, original = hf(tokens).logits, original_model(tokens).logits
    ours = megatron_logits(tmp_path / "mg", tokens)
    diff = (ours - theirs).abs().max().item()
    print(f"\n[llama3 {name}] megatron vs exported HF logits: max |diff| {diff:.3g}")
    assert diff < LOGITS_ATOL and kl_divergence(ours, theirs) < 1e-9
    torch.testing.assert_close(theirs, original, rtol=0, atol=0)  # the export is the source model


def test_per_head_bases_on_a_llama3_model(single_rank, sources, tmp_path):
    """HARPE on top of Llama 3.1's scaling: each head gets llama3(b_h) (positional/scaling.py)."""
    root, models = sources
    convert_hf_to_megatron(root / "untied", tmp_path / "mg", overrides=[PER_HEAD], progress=False)
    convert_megatron_to_hf(tmp_path / "mg", tmp_path / "hf", progress=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "harpe_llama" and config["rope_parameters"]["rope_type"] == "llama3"
    assert len(set(config["harpe_rope_bases"])) == 2  # one base per KV group
    tokens = torch.randint(0, VOCAB, (1, 264), generator=torch.Generator().manual_seed(4))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(tokens).logits
        plain = models["untied"](tokens).logits
    ours = megatron_logits(tmp_path / "mg", tokens)
    diff = (ours - theirs).abs().max().item()
    print(f"\n[llama3 per-head] megatron vs exported harpe_llama logits: max |diff| {diff:.3g}")
    assert diff < LOGITS_ATOL and kl_divergence(ours, theirs) < 1e-9
    assert (theirs - plain).abs().max().item() > 1e-2  # the bases matter
