"""Supported-version checks of megatron-core (harpe_megatron/compat.py): it refuses what it cannot
vouch for, naming both versions. (The exported harpe_llama code has no version window: it handles
each form of the transformers API it uses, tests/unit/test_harpe_llama_model.py.)"""

from __future__ import annotations

import pytest

from harpe_megatron import compat


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
