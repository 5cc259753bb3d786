"""Synthetic long-context generators: deterministic, right length, needle at the requested depth."""

from __future__ import annotations

import pytest

from harpe_megatron.eval import synthetic


class WordTokenizer:
    """One token per whitespace-separated word (fast, no files)."""

    def encode(self, text):
        return text.split()

    def __call__(self, text):
        return self.encode(text)


TOK = WordTokenizer()


@pytest.mark.parametrize("task", synthetic.ALL_TASKS)
def test_deterministic_and_fits(task):
    a = synthetic.make_sample(task, TOK, 600, seed=3, depth=0.5)
    b = synthetic.make_sample(task, TOK, 600, seed=3, depth=0.5)
    c = synthetic.make_sample(task, TOK, 600, seed=4, depth=0.5)
    assert a.prompt == b.prompt and a.answers == b.answers
    assert a.prompt != c.prompt
    assert a.num_tokens == len(TOK.encode(a.prompt)) <= 600
    assert a.num_tokens > 500            # filled close to the target
    assert a.answers and all(ans in a.prompt for ans in a.answers)


@pytest.mark.parametrize("task", ["passkey", "needle"])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_at_depth(task, depth):
    s = synthetic.make_sample(task, TOK, 1000, seed=1, depth=depth)
    where = synthetic.needle_char_depth(s, s.meta["needle"])
    assert abs(where - depth) < 0.03, where
    ctx = s.meta["context"]
    if depth == 0.0:
        assert ctx.startswith(s.meta["needle"])
    if depth == 1.0:
        assert ctx.endswith(s.meta["needle"])


def test_uuid_needle_and_real_tokenizer_lengths():
    s = synthetic.needle(TOK, 300, seed=0, depth=0.25, value_type="uuid")
    assert len(s.answers[0]) == 36 and s.answers[0].count("-") == 4


def test_variable_tracking_chain_in_order():
    s = synthetic.variable_tracking(TOK, 800, seed=2)
    ctx = s.meta["context"]
    pos = [ctx.index(f"VAR {v} =") for v in s.answers]
    assert pos == sorted(pos)
    assert f"VAR {s.answers[0]} = {s.meta['value']}." in ctx


def test_common_and_frequent_words_are_most_frequent():
    s = synthetic.common_words(TOK, 3000, seed=0)
    words = [w for w in s.prompt.split() if w.isalpha()]
    for ans in s.answers:
        assert words.count(ans) == s.meta["common_freq"]
    f = synthetic.frequent_words(TOK, 3000, seed=0)
    counts = [f.prompt.split().count(w) for w in f.answers]
    assert counts == sorted(counts, reverse=True) and counts[-1] > 1


def test_too_short_length_raises():
    with pytest.raises(ValueError):
        synthetic.passkey(TOK, 10)
