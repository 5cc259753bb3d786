"""Base-selection strategies: the paper's table, uniform spacing, constant, explicit lists, GQA."""

from __future__ import annotations

import pytest

from harpe_megatron.positional.bases import (
    PAPER_LLAMA2_7B_BASES,
    ConstantBase,
    ExplicitBases,
    PaperBases,
    UniformBases,
    base_strategy_from_dict,
    per_query_head_bases,
)

# HARPE Table 2 as printed (units of 1e6), typed in independently of the module's copy.
TABLE2 = "1.00 1.15 1.30 1.45 2.17 2.20 2.23 2.47 2.50 2.65 2.68 2.71 2.74 2.80 2.83 2.92 " \
         "3.01 3.04 3.10 3.13 3.16 3.22 3.43 3.46 3.61 3.88 4.09 4.15 4.39 4.45 4.51 4.54"


def test_paper_strategy_is_table_2_exactly():
    bases = PaperBases().resolve(32, 128)
    assert bases == [int(round(float(v) * 100)) * 10000.0 for v in TABLE2.split()]
    assert bases == list(PAPER_LLAMA2_7B_BASES)
    # Table 2 lies on the paper's search grid: b_min=1e6, stride=3e4, within [b_min, b_max].
    assert all((b - 1e6) % 3e4 == 0 and 1e6 <= b <= 5e6 for b in bases)
    assert bases == sorted(bases) and len(set(bases)) == 32


def test_paper_strategy_rejects_other_head_counts():
    with pytest.raises(ValueError, match="32 heads, but the model needs 8"):
        PaperBases().resolve(8, 128)


@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_uniform_spacing(order):
    bases = UniformBases(b_min=1e6, b_max=5e6, order=order).resolve(5, 128)
    expected = [1e6, 2e6, 3e6, 4e6, 5e6]
    assert bases == (expected if order == "ascending" else expected[::-1])


def test_uniform_validation():
    with pytest.raises(ValueError, match="order"):
        UniformBases(order="random")
    with pytest.raises(ValueError, match="b_min < b_max"):
        UniformBases(b_min=5e6, b_max=1e6)


def test_constant_and_explicit():
    assert ConstantBase(base=5e6).resolve(3, 64) == [5e6] * 3
    assert ExplicitBases(values=[1e4, 2e4]).resolve(2, 64) == [1e4, 2e4]
    with pytest.raises(ValueError, match="expected 3 bases"):
        ExplicitBases(values=[1e4, 2e4]).resolve(3, 64)
    with pytest.raises(ValueError, match="finite number > 1"):
        ExplicitBases(values=[1e4, 0.5]).resolve(2, 64)


def test_from_dict_errors_name_the_key():
    assert base_strategy_from_dict({"strategy": "uniform", "b_min": 2e6}) == UniformBases(b_min=2e6)
    with pytest.raises(ValueError, match=r"positional.bases.strategy: unknown strategy 'harpe'"):
        base_strategy_from_dict({"strategy": "harpe"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stride'\] for strategy 'uniform'"):
        base_strategy_from_dict({"strategy": "uniform", "stride": 3e4})
    with pytest.raises(ValueError, match="'strategy' key"):
        base_strategy_from_dict({"b_min": 1e6})


def test_gqa_expansion_one_base_per_kv_group():
    bases = per_query_head_bases(UniformBases(b_min=1e6, b_max=2e6), num_attention_heads=8,
                                 num_query_groups=2, head_dim=64)
    assert bases == [1e6] * 4 + [2e6] * 4


def test_gqa_explicit_per_query_head_list():
    ok = per_query_head_bases(ExplicitBases(values=[1e4, 1e4, 3e4, 3e4]), 4, 2, 64)
    assert ok == [1e4, 1e4, 3e4, 3e4]
    with pytest.raises(ValueError, match="query heads 0..1 share KV group 0"):
        per_query_head_bases(ExplicitBases(values=[1e4, 2e4, 3e4, 3e4]), 4, 2, 64)


def test_paper_with_gqa_is_rejected():
    with pytest.raises(ValueError, match="needs 8 distinct bases"):
        per_query_head_bases(PaperBases(), num_attention_heads=32, num_query_groups=8, head_dim=128)
