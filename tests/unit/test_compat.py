"""Supported-version checks: megatron-core (harpe_megatron/compat.py) and the exported harpe_llama
code's transformers window (both refuse what they cannot vouch for, naming both versions)."""

from __future__ import annotations

import pytest

from harpe_megatron import compat
from harpe_megatron.hf.harpe_llama import compat_harpe_llama as harpe_llama


def test_installed_megatron_passes_and_is_in_range():
    version = compat.check_megatron()
    lo, hi = compat.SUPPORTED_MEGATRON
    assert lo <= compat.megatron_version(version) and compat.megatron_version(version)[:2] <= hi


@pytest.mark.parametrize("version", ["0.16.0", "0.15.3", "0.20.0", "1.0.0"])
def test_megatron_outside_range_is_refused(version):
    with pytest.raises(compat.MegatronVersionError, match=rf"megatron-core {version} is installed; "
                                                          r"harpe-megatron supports megatron-core 0\.16\.1 to 0\.19\.x"):
        compat.check_version(version)


@pytest.mark.parametrize("version", ["0.16.1", "0.17.0", "0.19.2", "0.19.9rc1"])
def test_megatron_inside_range_is_accepted(version):
    compat.check_version(version)


def test_every_listed_internal_resolves_with_our_arguments():
    compat.check_internals()  # the installed version: every entry present, every argument accepted
    assert {i.where for i in compat.INTERNALS} >= {"model/gpt.py", "model/self_attention.py", "checkpoint/save_load.py"}


def test_missing_or_changed_internal_is_named():
    gone = compat.Internal("megatron.core.models.gpt.gpt_model:GPTModel._no_such_hook", "a use", "model/x.py")
    changed = compat.Internal("megatron.core.models.gpt.gpt_model:GPTModel._preprocess", "a use", "model/y.py",
                              ("input_ids", "renamed_argument"))
    with pytest.raises(compat.MegatronVersionError) as info:
        compat.check_internals((gone, changed), version="9.9")
    message = str(info.value)
    assert "GPTModel._no_such_hook is missing" in message and "model/x.py" in message
    assert "no longer takes ['renamed_argument']" in message and "model/y.py" in message


@pytest.mark.parametrize("version,expected", [("5.0.0", (5, 0)), ("5.24.0", (5, 24)), ("5.10.2", (5, 10))])
def test_transformers_inside_tested_window(version, expected):
    assert harpe_llama.check_transformers_version(version) == expected


@pytest.mark.parametrize("version", ["4.57.6", "5.25.0", "5.25.0.dev0", "6.0.0"])
def test_transformers_outside_tested_window_is_refused(version, monkeypatch):
    monkeypatch.delenv(harpe_llama.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(RuntimeError, match=rf"transformers {version} is installed, but this model's code was "
                                           r"tested with transformers 5\.0 to 5\.24\.x"):
        harpe_llama.check_transformers_version(version)


def test_untested_transformers_allowed_on_request(monkeypatch):
    monkeypatch.setenv(harpe_llama.ALLOW_UNTESTED_ENV, "1")
    with pytest.warns(UserWarning, match="Continuing because"):
        assert harpe_llama.check_transformers_version("5.30.1") == (5, 24)


def test_cache_found_under_either_name():
    cache = object()
    for name in ("cache", "past_key_values", "past_key_value"):
        kwargs = {name: cache, "other": 1}
        assert harpe_llama.pop_cache(kwargs) is cache and kwargs == {"other": 1}
    assert harpe_llama.pop_cache({"cache": None, "past_key_values": cache}) is cache
    assert harpe_llama.pop_cache({"cache": cache, "past_key_values": cache}) is cache
    with pytest.raises(ValueError, match="two different KV caches"):
        harpe_llama.pop_cache({"cache": cache, "past_key_values": object()})
