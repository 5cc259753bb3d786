"""``model.transformer_impl``: the tested local spec is the default; ``te`` is opt-in and says it is
unverified (Transformer Engine cannot be installed here, so its spec itself is never built)."""

from __future__ import annotations

import logging

import pytest
import torch

from harpe_megatron.config.loader import load_config
from harpe_megatron.config.model import ModelConfig, ParallelConfig, PositionalConfig
from harpe_megatron.distributed.bringup import megatron_parallel
from harpe_megatron.model import builder
from harpe_megatron.model.attention import SDPAttention
from harpe_megatron.model.builder import TE_UNVERIFIED, build_model, transformer_config
from harpe_megatron.positional.bases import UniformBases


def test_default_is_local_and_builds_sdpa_attention(single_rank):
    m = ModelConfig()
    assert m.transformer_impl == "local"
    with megatron_parallel():
        cfg = transformer_config(m, ParallelConfig(), use_cpu_initialization=True)
        with torch.device("meta"):
            model = build_model(m, PositionalConfig(bases=UniformBases()), cfg, max_sequence_length=64)
    assert any(isinstance(mod, SDPAttention) for mod in model.modules())


def test_shipped_7b_config_uses_local():
    assert load_config("configs/llama2_7b_harpe_128k.yaml").model.transformer_impl == "local"


def test_bad_value_names_the_key():
    with pytest.raises(ValueError, match="model.transformer_impl: expected 'local' or 'te'"):
        ModelConfig(transformer_impl="apex")


def test_te_without_transformer_engine_is_an_error(single_rank, monkeypatch):
    monkeypatch.setattr(builder, "transformer_engine_available", lambda: False)
    m = ModelConfig(transformer_impl="te")
    with megatron_parallel():
        cfg = transformer_config(m, ParallelConfig(), use_cpu_initialization=True)
        with pytest.raises(RuntimeError, match="needs transformer_engine"):
            build_model(m, PositionalConfig(bases=UniformBases()), cfg, max_sequence_length=64)


def test_te_warns_once_that_it_is_unverified(single_rank, monkeypatch, caplog):
    """With TE 'installed' the TE spec is requested and one warning says it is unverified."""
    seen = []
    monkeypatch.setattr(builder, "transformer_engine_available", lambda: True)

    def fake_block_spec(config, use_transformer_engine, vp_stage=None, **layer_options):
        seen.append(use_transformer_engine)
        raise RuntimeError("stop before building TE modules")

    monkeypatch.setattr(builder, "block_spec", fake_block_spec)
    m = ModelConfig(transformer_impl="te")
    with megatron_parallel():
        cfg = transformer_config(m, ParallelConfig(), use_cpu_initialization=True)
        with pytest.raises(RuntimeError, match="stop before"):
            build_model(m, PositionalConfig(bases=UniformBases()), cfg, max_sequence_length=64)
    assert seen == [True]
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if "UNVERIFIED" in r.getMessage()]
    assert lines == [(logging.WARNING, TE_UNVERIFIED)]
