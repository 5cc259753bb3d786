"""A converted checkpoint loads at TP=2 (logits == exported HF model) and saves made at TP=2 and
PP=2 export back to the exact weights: a Llama-2-style and a Llama-3-style model (llama3 RoPE
scaling, vocabulary 128,256, 4 query heads per KV group). One 2-rank gloo run each."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from harpe_megatron.hf.export_hf import convert_megatron_to_hf
from harpe_megatron.hf.import_hf import convert_hf_to_megatron
from tests.distributed.convert_workers import tp2_logits_and_saves
from tests.helpers import hf_state, tiny_hf_llama, tiny_model_config
from tests.spawn import run_distributed

pytestmark = pytest.mark.distributed

SEQ = 40
# Measured (CPU fp32, gloo, torch 2.13, transformers 5.23): max |diff| ~1e-6.
LOGITS_ATOL = 1e-5
PER_HEAD = "positional.bases={strategy: uniform, b_min: 20.0, b_max: 20000.0}"


def _llama3_source():
    from tests.unit.test_convert_llama3 import llama3

    return llama3(tied=False, seed=5)


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_tp2_load_logits_and_tp_pp_saves_export_exactly(single_rank, tmp_path, family):
    from transformers import AutoModelForCausalLM

    source = tiny_hf_llama(tiny_model_config(num_query_groups=2), seed=4) if family == "llama2" else _llama3_source()
    source.save_pretrained(tmp_path / "src")
    convert_hf_to_megatron(tmp_path / "src", tmp_path / "mg", tp=2, overrides=[PER_HEAD], progress=False)
    convert_megatron_to_hf(tmp_path / "mg", tmp_path / "hf", progress=False)

    tokens = torch.randint(0, 200, (2, SEQ), generator=torch.Generator().manual_seed(8))
    results = run_distributed(tp2_logits_and_saves, 2, str(tmp_path / "mg"), tokens, str(tmp_path / "save_tp2"),
                              str(tmp_path / "save_pp2"), tp=2)
    ours = results[0]["logits"]
    torch.testing.assert_close(results[1]["logits"], ours, rtol=0, atol=0)  # gathered: same on both ranks
    assert [r["pp_stage_local_layers"] for r in results] == [["0"], ["0"]]  # one layer per stage

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    assert type(hf).__name__ == "HarpeLlamaForCausalLM"
    with torch.no_grad():
        theirs = hf(tokens).logits
    diff = (ours - theirs).abs().max().item()
    logp, logq = F.log_softmax(ours.double(), -1), F.log_softmax(theirs.double(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    print(f"\n[TP=2 per-head, {family}] megatron vs HF logits: max |diff| {diff:.3g}, KL {kl:.3g}")
    assert diff < LOGITS_ATOL and kl < 1e-9

    reference = source.state_dict()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    varies = ids + ("max_position_embeddings",)  # a run's data.seq_length counts for the latter
    for save in ("save_tp2", "save_pp2"):
        summary = convert_megatron_to_hf(tmp_path / save, tmp_path / f"hf_{save}", progress=False)  # its 'latest'
        exported = hf_state(tmp_path / f"hf_{save}")
        assert set(exported) == set(reference)
        for name, t in reference.items():
            assert torch.equal(exported[name], t), (save, name)
        again = json.loads((tmp_path / f"hf_{save}" / "config.json").read_text())
        assert {k: v for k, v in again.items() if k not in varies} == {k: v for k, v in config.items() if k not in varies}
        # a training save records no HF source and here no tokenizer: token ids are not guessed
        assert [again[k] for k in ids] == [None, None, None] and any("token ids not set" in n for n in summary.notes)
