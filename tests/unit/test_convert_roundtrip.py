"""HF Llama -> megatron -> HF: bit-exact weights, equal logits, equal greedy generation, tokenizer.

The HF side is transformers' own LlamaForCausalLM (plain RoPE) or the shipped harpe_llama code
loaded with trust_remote_code (per-head bases); the megatron side is HarpeGPTModel loading the
converted checkpoint the way training does (``load_model_weights``).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harpe_megatron.checkpoint.save_load import find_latest, load_model_weights
from harpe_megatron.config.loader import load_config
from harpe_megatron.distributed.bringup import megatron_parallel
from harpe_megatron.hf.export_hf import convert_megatron_to_hf
from harpe_megatron.hf.import_hf import convert_hf_to_megatron
from harpe_megatron.model.builder import build_model, transformer_config
from tests.helpers import hf_state, tiny_hf_llama, tiny_model_config

ROOT = Path(__file__).resolve().parents[2]
SEQ = 40
# Measured (CPU fp32, torch 2.13, transformers 5.23): max |diff| <= 2.4e-6 on logits of size ~5.
LOGITS_ATOL = 1e-5
TOKENIZER_VOCAB = 400  # byte fallback needs 256 + 3 pieces plus the characters
PER_HEAD = "positional.bases={strategy: uniform, b_min: 20.0, b_max: 20000.0}"


def save_sharded_bin(model, folder: Path, shards: int = 3) -> None:
    """The HF sharded ``.bin`` layout: pytorch_model-0000i-of-0000n.bin + pytorch_model.bin.index.json."""
    folder.mkdir(parents=True)
    model.config.save_pretrained(folder)
    names = list(model.state_dict())
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: model.state_dict()[n].clone() for n in part}, folder / file)
        weight_map.update({n: file for n in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def megatron_logits(ckpt: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the converted checkpoint in a TP=1 HarpeGPTModel built from its config.yaml."""
    cfg = load_config(ckpt / "config.yaml", ["parallel.tensor_model_parallel_size=1",
                                             "parallel.pipeline_model_parallel_size=1"])
    with megatron_parallel(), torch.no_grad():
        tcfg = transformer_config(cfg.model, cfg.parallel, use_cpu_initialization=True, positional=cfg.positional)
        model = build_model(cfg.model, cfg.positional, tcfg, max_sequence_length=tokens.size(1)).eval()
        load_model_weights(ckpt, [model])
        return model(tokens, None, None)[..., : cfg.model.vocab_size]


def megatron_greedy(ckpt: Path, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by full recomputation (no cache) with the converted checkpoint."""
    cfg = load_config(ckpt / "config.yaml", ["parallel.tensor_model_parallel_size=1"])
    ids = prompt.clone()
    with megatron_parallel(), torch.no_grad():
        tcfg = transformer_config(cfg.model, cfg.parallel, use_cpu_initialization=True, positional=cfg.positional)
        model = build_model(cfg.model, cfg.positional, tcfg, max_sequence_length=prompt.size(1) + new_tokens).eval()
        load_model_weights(ckpt, [model])
        for _ in range(new_tokens):
            logits = model(ids, None, None)[:, -1, : cfg.model.vocab_size]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    logp, logq = F.log_softmax(p_logits.double(), -1), F.log_softmax(q_logits.double(), -1)
    return (logp.exp() * (logp - logq)).sum(-1).mean().item()


def load_hf(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tiny random HF Llamas on disk: GQA and MHA as safetensors, GQA as sharded .bin, tied MHA."""
    root = tmp_path_factory.mktemp("hf_sources")
    models = {
        "gqa": tiny_hf_llama(tiny_model_config(num_query_groups=2), rope_theta=5e5, seed=1),
        "mha": tiny_hf_llama(tiny_model_config(num_query_groups=4), rope_theta=1e4, seed=2),
    }
    models["gqa"].save_pretrained(root / "gqa")
    models["mha"].save_pretrained(root / "mha", max_shard_size="200KB")  # sharded safetensors + index
    save_sharded_bin(models["gqa"], root / "gqa_bin")
    return root, models


@pytest.mark.parametrize("name,folder", [("gqa", "gqa"), ("mha", "mha"), ("gqa", "gqa_bin")])
def test_roundtrip_is_bit_exact(single_rank, sources, tmp_path, name, folder):
    root, models = sources
    summary = convert_hf_to_megatron(root / folder, tmp_path / "mg", tp=2, progress=False)
    assert find_latest(tmp_path / "mg").name == "iter_0000000"
    assert (tmp_path / "mg" / "config.yaml").is_file()
    assert summary.parameters == sum(p.numel() for p in models[name].parameters())
    convert_megatron_to_hf(tmp_path / "mg", tmp_path / "hf", max_shard_size="150KB", progress=False)
    out = hf_state(tmp_path / "hf")
    ref = models[name].state_dict()
    assert set(out) == set(ref)
    for key, tensor in ref.items():
        assert out[key].dtype == torch.float32 and torch.equal(out[key], tensor), key
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 1
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llama" and not (tmp_path / "hf" / "modeling_harpe_llama.py").exists()
    assert config["rope_theta"] == models[name].config.rope_parameters["rope_theta"]
    # transformers reads the folder back to the same weights
    reloaded = load_hf(tmp_path / "hf")
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, ref[key]), key


def test_tied_embeddings_and_dtypes(single_rank, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = tiny_model_config(num_query_groups=4)
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=m.vocab_size, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, tie_word_embeddings=True)
    hf = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    hf.save_pretrained(tmp_path / "src")
    summary = convert_hf_to_megatron(tmp_path / "src", tmp_path / "mg", progress=False)
    assert summary.dtype == "bfloat16"  # auto: the HF tensors' dtype
    mg_cfg = load_config(tmp_path / "mg" / "config.yaml")
    assert mg_cfg.model.untie_embeddings_and_output_weights is False
    convert_megatron_to_hf(tmp_path / "mg", tmp_path / "out", progress=False)
    out = hf_state(tmp_path / "out")
    assert "lm_head.weight" not in out
    for key, tensor in hf.state_dict().items():
        if key != "lm_head.weight":
            assert out[key].dtype == torch.bfloat16 and torch.equal(out[key], tensor), key
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    convert_megatron_to_hf(tmp_path / "mg", tmp_path / "out32", dtype="fp32", progress=False)
    assert hf_state(tmp_path / "out32")["model.norm.weight"].dtype == torch.float32


@pytest.mark.parametrize("overrides,model_type", [
    ([], "llama"),
    ([PER_HEAD], "harpe_llama"),
    ([PER_HEAD, "positional.scaling={type: yarn, factor: 4.0, original_max_position_embeddings: 16}"], "harpe_llama"),
    (["positional.scaling.type=linear", "positional.scaling.factor=2.0"], "llama"),
    (["positional.bases={strategy: constant, base: 300.0}",
      "positional.scaling={type: ntk, factor: 3.0}"], "llama"),
], ids=["constant", "per_head", "per_head_yarn", "constant_pi", "constant_ntk"])
def test_megatron_logits_equal_exported_hf_logits(single_rank, sources, tmp_path, overrides, model_type):
    root, _ = sources
    convert_hf_to_megatron(root / "gqa", tmp_path / "mg", overrides=overrides, progress=False)
    convert_megatron_to_hf(tmp_path / "mg", tmp_path / "hf", progress=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == model_type
    tokens = torch.randint(0, 200, (2, SEQ), generator=torch.Generator().manual_seed(5))
    ours = megatron_logits(tmp_path / "mg", tokens)
    hf = load_hf(tmp_path / "hf")
    with torch.no_grad():
        theirs = hf(tokens).logits
    diff, kl = (ours - theirs).abs().max().item(), kl_divergence(ours, theirs)
    print(f"\n[{'/'.join(overrides) or 'constant'}] megatron vs HF ({type(hf).__name__}) logits: "
          f"max |diff| {diff:.3g}, KL {kl:.3g}")
    assert diff < LOGITS_ATOL and kl < 1e-9


def test_per_head_bases_matter(single_rank, sources, tmp_path):
    """Negative control: the per-head export differs from the source model (and from Llama)."""
    root, models = sources
    convert_hf_to_megatron(root / "gqa", tmp_path / "mg", overrides=[PER_HEAD], progress=False)
    convert_megatron_to_hf(tmp_path / "mg", tmp_path / "hf", progress=False)
    tokens = torch.randint(0, 200, (1, SEQ), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        diff = (load_hf(tmp_path / "hf")(tokens).logits - models["gqa"](tokens).logits).abs().max().item()
    assert diff > 1e-2


@pytest.mark.parametrize("overrides,model_type", [([PER_HEAD], "harpe_llama"), ([], "llama")],
                         ids=["per_head", "single_base"])
def test_greedy_generation_matches_megatron(single_rank, sources, tmp_path, overrides, model_type):
    """generate() with the KV cache == without it == megatron's greedy decoding, on the installed
    transformers (CI runs this on the lowest and the newest transformers claimed)."""
    root, _ = sources
    convert_hf_to_megatron(root / "gqa", tmp_path / "mg", overrides=overrides, progress=False)
    convert_megatron_to_hf(tmp_path / "mg", tmp_path / "hf", progress=False)
    hf = load_hf(tmp_path / "hf")
    assert hf.config.model_type == model_type
    hf.generation_config.eos_token_id = None  # generate all 20 tokens
    prompt = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        cached = hf.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = hf.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=False, pad_token_id=0)
    reference = megatron_greedy(tmp_path / "mg", prompt, 20)
    assert cached.shape == (1, 32)
    assert torch.equal(cached, uncached), (cached, uncached)
    assert torch.equal(cached, reference), (cached, reference)


def _train_sentencepiece(path: Path) -> None:
    import sentencepiece as spm

    lines = []
    for module in (json, argparse, textwrap, importlib.util):
        lines += [ln for ln in Path(module.__file__).read_text().splitlines() if ln.strip() and ln.isascii()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=TOKENIZER_VOCAB, model_type="bpe",
        byte_fallback=True, character_coverage=1.0,
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2,
    )
    path.write_bytes(buf.getvalue())


def test_tokenizer_export_and_cli(single_rank, tmp_path, capsys):
    """The tools' main() (in process): overrides in both spellings, tokenizer files, summaries."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tiny_hf_llama(tiny_model_config(num_query_groups=4, vocab_size=TOKENIZER_VOCAB)).save_pretrained(tmp_path / "src")

    def tool(name):
        return importlib.import_module(f"harpe_megatron.cli.{name}")

    rc = tool("convert_from_hf").main([str(tmp_path / "src"), str(tmp_path / "mg"), "--tp", "2", "--no-progress",
                                       "--positional.bases.strategy", "uniform",
                                       "--positional.bases.b_min=100", "positional.bases.b_max=1e4"])
    assert rc == 0
    assert "converted HF -> megatron" in capsys.readouterr().out
    cfg = load_config(tmp_path / "mg" / "config.yaml")
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.positional.bases.to_dict() == {"strategy": "uniform", "b_min": 100.0, "b_max": 1e4, "order": "ascending"}

    _train_sentencepiece(tmp_path / "tok.model")
    rc = tool("convert_to_hf").main([str(tmp_path / "mg"), str(tmp_path / "hf"), "--dtype", "bf16", "--no-progress",
                                     "--tokenizer-model", str(tmp_path / "tok.model")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "harpe_llama" in out and "tokenizer.model + tokenizer.json" in out
    hf = tmp_path / "hf"
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
              "generation_config.json", "configuration_harpe_llama.py", "modeling_harpe_llama.py",
              "compat_harpe_llama.py", "self_extend_harpe_llama.py"):
        assert (hf / f).is_file(), f
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    tok = AutoTokenizer.from_pretrained(str(hf))
    text = "def convert(x):\n    return {'a': 12, 'b': [3.5, None]}  # ok, ünïcödé 中文 😀"
    assert tok(text)["input_ids"] == [sp.bos_id()] + sp.encode(text)
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    generation = json.loads((hf / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (sp.bos_id(), sp.eos_id())
    assert all(t.dtype == torch.bfloat16 for t in hf_state(hf).values())
    # refused without --overwrite (exit code 2, message), accepted with it
    assert tool("convert_to_hf").main([str(tmp_path / "mg"), str(hf), "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert tool("convert_to_hf").main([str(tmp_path / "mg"), str(hf), "--no-progress", "--overwrite"]) == 0
    assert not (hf / "tokenizer.model").exists()  # replaced as a whole
