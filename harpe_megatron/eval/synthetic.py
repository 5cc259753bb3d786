"""Deterministic long-context test generators (passkey, needle grid, RULER-style offline tasks).

Every generator takes ``tokenizer, length, seed`` (plus task options) and returns a :class:`Sample`
whose prompt, encoded by ``tokenizer`` exactly as the runner encodes it (default special tokens),
is as long as possible without exceeding ``length`` tokens. All randomness comes from
``random.Random`` seeded by ``(task, length, depth, seed)``, so the same arguments always give the
same sample. Haystack material is generated, nothing is downloaded.
"""

from __future__ import annotations

import random
import string
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

WORDS = (
    "apple river stone cloud garden window silver forest candle market bridge winter summer ocean "
    "mountain pencil letter travel yellow orange purple castle dragon engine harbor island jacket "
    "kettle ladder mirror needle object pepper quartz rabbit saddle ticket umbrella valley wagon "
    "anchor basket camera desert feather guitar hammer insect jungle kitten lemon magnet napkin "
    "oyster parrot quiver rocket shadow tunnel violin walrus zipper button carpet dinner eagle "
    "fabric goblet helmet icicle jigsaw kernel lizard meadow nickel orbit pillow quarry ribbon "
    "signal timber utensil velvet wallet yogurt bamboo cactus donkey falcon glacier hazel igloo"
).split()

FILLER_SUBJECTS = ["The grass", "The sky", "The sun", "The river", "The old road", "A quiet town",
                   "The morning", "Every tree", "The small boat", "The long wall"]
FILLER_PREDICATES = ["is green", "is blue", "is bright", "flows slowly", "goes on and on",
                     "sleeps at night", "begins again", "stands still", "drifts away", "stays warm"]


@dataclass
class Sample:
    task: str
    length: int                      # requested length in tokens
    prompt: str
    answers: list[str]               # every answer must be produced (RULER "all" rule)
    depth: Optional[float] = None    # requested needle depth in [0, 1] (grid tasks)
    seed: int = 0
    num_tokens: int = 0              # actual prompt length in tokens
    metric: str = "substring"       # "exact" (passkey / needle grid) or "substring" (RULER)
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def count_tokens(tokenizer, text: str) -> int:
    """Tokens the runner will feed for ``text`` (tokenizer's default special tokens included)."""
    if callable(tokenizer) and not hasattr(tokenizer, "encode"):
        return len(tokenizer(text))
    if hasattr(tokenizer, "__call__") and hasattr(tokenizer, "encode"):
        return len(tokenizer.encode(text))
    return len(tokenizer(text))


def _rng(*parts) -> random.Random:
    return random.Random("|".join(str(p) for p in parts))


def _fit(tokenizer, length: int, build: Callable[[int], str], start: int = 16) -> tuple[int, str, int]:
    """Largest n >= 0 with count_tokens(build(n)) <= length (build must grow with n)."""
    base = count_tokens(tokenizer, build(0))
    if base > length:
        raise ValueError(f"length {length} is shorter than the task's fixed text ({base} tokens)")
    lo, hi = 0, max(1, start)
    while count_tokens(tokenizer, build(hi)) <= length:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_tokens(tokenizer, build(mid)) <= length:
            lo = mid
        else:
            hi = mid
    text = build(lo)
    return lo, text, count_tokens(tokenizer, text)


class _Stream:
    """An endless, seeded, append-only list: item i never depends on how many were asked for."""

    def __init__(self, rng: random.Random, make: Callable[[random.Random], str]):
        self.rng, self.make, self.items = rng, make, []

    def take(self, n: int) -> list[str]:
        while len(self.items) < n:
            self.items.append(self.make(self.rng))
        return self.items[:n]


def _filler_sentence(rng: random.Random) -> str:
    return f"{rng.choice(FILLER_SUBJECTS)} {rng.choice(FILLER_PREDICATES)}."


def _essay_sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 12))]
    return " ".join(words).capitalize() + "."


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _value(rng: random.Random, kind: str) -> str:
    if kind == "number":
        return _number(rng, 7)
    if kind == "uuid":
        return _uuid(rng)
    raise ValueError(f"needle value type must be 'number' or 'uuid', not {kind!r}")


def _insert(items: list[str], needles: list[tuple[float, str]]) -> list[str]:
    """Put each needle before item round(depth * len(items)) (depth 0: first, 1: last)."""
    out = list(items)
    for depth, needle in sorted(needles, key=lambda x: -x[0]):
        out.insert(round(depth * len(items)), needle)
    return out


def needle_char_depth(sample: Sample, needle: str) -> float:
    """Where ``needle`` sits in the haystack, as a fraction of the haystack's characters."""
    ctx = sample.meta["context"]
    pos = ctx.index(needle)
    return pos / max(1, len(ctx) - len(needle))


# --------------------------------------------------------------------------- passkey / needle grid

PASSKEY_PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                  "memorize it. I will quiz you about the important information there.\n")


def passkey(tokenizer, length: int, seed: int = 0, depth: float = 0.5, digits: int = 5) -> Sample:
    """Passkey retrieval (Mohtashami & Jaggi 2023): a number in repeated filler at ``depth``."""
    rng = _rng("passkey", length, depth, seed)
    key = _number(rng, digits)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    filler = _Stream(_rng("passkey-filler", seed), _filler_sentence)
    question = "\nWhat is the pass key? The pass key is"

    def context(n):
        return " ".join(_insert(filler.take(n), [(depth, needle)]))

    n, prompt, ntok = _fit(tokenizer, length, lambda n: PASSKEY_PREFIX + context(n) + question)
    return Sample("passkey", length, prompt, [key], depth, seed, ntok, "exact",
                  {"needle": needle, "context": context(n), "haystack_units": n})


def _magic_needle(key: str, value: str, kind: str) -> str:
    what = "number" if kind == "number" else "uuid"
    return f"One of the special magic {what}s for {key} is: {value}."


def needle(tokenizer, length: int, seed: int = 0, depth: float = 0.5, value_type: str = "number") -> Sample:
    """Needle in a haystack: one key -> number/UUID sentence at ``depth`` in essay-like text."""
    rng = _rng("needle", length, depth, seed, value_type)
    key = rng.choice(WORDS) + "-" + rng.choice(WORDS)
    value = _value(rng, value_type)
    ndl = _magic_needle(key, value, value_type)
    what = "number" if value_type == "number" else "uuid"
    hay = _Stream(_rng("needle-haystack", seed), _essay_sentence)
    head = "Some special magic " + what + "s are hidden within the following text. Make sure to memorize it.\n"
    tail = (f"\nWhat is the special magic {what} for {key} mentioned in the provided text? "
            f"The special magic {what} for {key} mentioned in the provided text is")

    def context(n):
        return " ".join(_insert(hay.take(n), [(depth, ndl)]))

    n, prompt, ntok = _fit(tokenizer, length, lambda n: head + context(n) + tail)
    return Sample("needle", length, prompt, [value], depth, seed, ntok, "exact",
                  {"needle": ndl, "context": context(n), "haystack_units": n, "value_type": value_type})


# --------------------------------------------------------------------------- RULER-style tasks

def ruler_niah(tokenizer, length: int, seed: int = 0, num_keys: int = 1, num_values: int = 1,
               num_queries: int = 1, value_type: str = "number", task: str = "niah_single") -> Sample:
    """RULER NIAH: ``num_keys`` needles (distractors included), ``num_values`` values for the
    queried key(s), ``num_queries`` keys asked at once. Needle positions are seeded-random."""
    if num_queries > num_keys:
        raise ValueError("num_queries must be <= num_keys")
    rng = _rng(task, length, seed, num_keys, num_values, num_queries, value_type)
    keys = []
    while len(keys) < num_keys:
        k = rng.choice(WORDS) + "-" + rng.choice(WORDS)
        if k not in keys:
            keys.append(k)
    needles, answers = [], []
    for i, k in enumerate(keys):
        vals = [_value(rng, value_type) for _ in range(num_values if i < num_queries else 1)]
        for v in vals:
            needles.append((rng.random(), _magic_needle(k, v, value_type)))
        if i < num_queries:
            answers.extend(vals)
    queried = keys[:num_queries]
    what = "number" if value_type == "number" else "uuid"
    hay = _Stream(_rng(task + "-haystack", seed), _essay_sentence)
    head = f"Some special magic {what}s are hidden within the following text. Make sure to memorize it. I will quiz you about the {what}s afterwards.\n"
    qkeys = ", ".join(queried[:-1]) + (" and " if len(queried) > 1 else "") + queried[-1]
    tail = (f"\nWhat are all the special magic {what}s for {qkeys} mentioned in the provided text? "
            f"The special magic {what}s for {qkeys} mentioned in the provided text are")

    def context(n):
        return " ".join(_insert(hay.take(n), needles))

    n, prompt, ntok = _fit(tokenizer, length, lambda n: head + context(n) + tail)
    return Sample(task, length, prompt, answers, None, seed, ntok, "substring",
                  {"keys": keys, "queried": queried, "context": context(n), "haystack_units": n})


def variable_tracking(tokenizer, length: int, seed: int = 0, num_chains: int = 1, num_hops: int = 4) -> Sample:
    """RULER variable tracking: ``VAR A = 12345`` then ``VAR B = VAR A`` ... hidden in filler;
    answer: every variable that ends up holding the queried value."""
    rng = _rng("variable_tracking", length, seed, num_chains, num_hops)
    names: list[str] = []
    while len(names) < num_chains * (num_hops + 1):
        v = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if v not in names:
            names.append(v)
    values = []
    while len(values) < num_chains:
        v = _number(rng, 5)
        if v not in values:
            values.append(v)
    statements = []
    for c in range(num_chains):
        chain = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        stmts = [f"VAR {chain[0]} = {values[c]}."] + [f"VAR {chain[i]} = VAR {chain[i - 1]}." for i in range(1, len(chain))]
        positions = sorted(rng.random() for _ in stmts)   # keep the chain in order
        statements += list(zip(positions, stmts))
    answers = names[: num_hops + 1]
    filler = _Stream(_rng("vt-filler", seed), _filler_sentence)
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    tail = (f"\nQuestion: Find all variables that are assigned the value {values[0]} in the text above. "
            f"Answer: According to the chain(s) of variable assignment in the text above, "
            f"{len(answers)} variables are assigned the value {values[0]}, they are:")

    def context(n):
        return " ".join(_insert(filler.take(n), statements))

    n, prompt, ntok = _fit(tokenizer, length, lambda n: head + context(n) + tail)
    return Sample("variable_tracking", length, prompt, answers, None, seed, ntok, "substring",
                  {"value": values[0], "context": context(n), "haystack_units": n})


def _pseudo_word(rng: random.Random) -> str:
    cons, vows = "bcdfghjklmnprstvz", "aeiou"
    return "".join(rng.choice(cons) + rng.choice(vows) for _ in range(rng.randint(2, 4)))


def common_words(tokenizer, length: int, seed: int = 0, num_common: int = 10,
                 common_freq: int = 30, uncommon_freq: int = 3) -> Sample:
    """RULER common-word extraction: a numbered word list where ``num_common`` words appear
    ``common_freq`` times and the rest ``uncommon_freq`` times; name the common ones.
    At short lengths the common frequency is scaled down so the task still fits."""
    rng = _rng("common_words", length, seed, num_common)
    stream = _Stream(_rng("cwe-vocab", seed), _pseudo_word)
    common: list[str] = []
    while len(common) < num_common:
        w = stream.take(len(stream.items) + 1)[-1]
        if w not in common:
            common.append(w)
    order_seed = rng.random()
    pool = _Stream(_rng("cwe-uncommon", seed), _pseudo_word)
    uncommon_all: list[str] = []

    def words_for(n_uncommon, freq):
        while len(uncommon_all) < n_uncommon:
            w = pool.take(len(pool.items) + 1)[-1]
            if w not in common and w not in uncommon_all:
                uncommon_all.append(w)
        words = common * freq + uncommon_all[:n_uncommon] * uncommon_freq
        random.Random(order_seed).shuffle(words)
        return words

    head = "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n"
    tail = f"\nQuestion: What are the {num_common} most common words in the above list? Answer: The top {num_common} words that appear most often in the list are:"

    def build(n_uncommon, freq):
        return head + " ".join(f"{i + 1}. {w}" for i, w in enumerate(words_for(n_uncommon, freq))) + tail

    freq = common_freq
    while freq > uncommon_freq + 1 and count_tokens(tokenizer, build(0, freq)) > length:
        freq -= 1
    while len(common) > 1 and count_tokens(tokenizer, build(0, freq)) > length:
        common.pop()   # very short lengths: fewer common words (the question names how many)
        num_common = len(common)
        tail = (f"\nQuestion: What are the {num_common} most common words in the above list? Answer: "
                f"The top {num_common} words that appear most often in the list are:")
    n, prompt, ntok = _fit(tokenizer, length, lambda n: build(n, freq))
    return Sample("common_words", length, prompt, list(common), None, seed, ntok, "substring",
                  {"common_freq": freq, "num_uncommon": n, "num_common": num_common})


def frequent_words(tokenizer, length: int, seed: int = 0, alpha: float = 2.0, top_k: int = 3) -> Sample:
    """RULER frequent-word extraction: coded words drawn from a Zipf(alpha) law; name the
    ``top_k`` most frequent (ranks are strict since counts are fixed by the law, not sampled)."""
    vocab = list(dict.fromkeys(_Stream(_rng("fwe-vocab", seed), _pseudo_word).take(4000)))
    shuffle_seed = _rng("frequent_words", length, seed).random()

    weights = [1.0 / (r + 1) ** alpha for r in range(len(vocab))]
    total = sum(weights)

    def words_for(n):
        counts = [int(n * w / total) for w in weights]
        words = [w for w, c in zip(vocab, counts) for _ in range(c)]
        random.Random(shuffle_seed).shuffle(words)
        return words

    head = "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words.\n"
    tail = (f"\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the "
            f"{top_k} most frequently appeared words in the above coded text? Answer: According to the coded text above, "
            f"the {top_k} most frequently appeared words are:")

    def build(n):
        return head + " .... ".join(words_for(n)) + tail

    n, prompt, ntok = _fit(tokenizer, length, build, start=64)
    # top_k ranks need distinct counts; Zipf with alpha=2 gives n/1.64, n/6.6, n/14.8, ...
    counts = [int(n * w / total) for w in weights[:top_k]]
    answers = [w for w, c in zip(vocab[:top_k], counts) if c > 0]   # very short: fewer present
    return Sample("frequent_words", length, prompt, answers, None, seed, ntok, "substring",
                  {"num_words": n, "alpha": alpha})


GRID_TASKS = {"passkey": passkey, "needle": needle}
RULER_TASKS = {
    "niah_single": lambda tok, L, seed: ruler_niah(tok, L, seed, task="niah_single"),
    "niah_single_uuid": lambda tok, L, seed: ruler_niah(tok, L, seed, value_type="uuid", task="niah_single_uuid"),
    "niah_multikey": lambda tok, L, seed: ruler_niah(tok, L, seed, num_keys=4, task="niah_multikey"),
    "niah_multivalue": lambda tok, L, seed: ruler_niah(tok, L, seed, num_values=4, task="niah_multivalue"),
    "niah_multiquery": lambda tok, L, seed: ruler_niah(tok, L, seed, num_keys=4, num_queries=4, task="niah_multiquery"),
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "frequent_words": frequent_words,
}
ALL_TASKS = list(GRID_TASKS) + list(RULER_TASKS)


def make_sample(task: str, tokenizer, length: int, seed: int = 0, depth: Optional[float] = None) -> Sample:
    """One sample of ``task`` (``depth`` only for the grid tasks; default 0.5)."""
    if task in GRID_TASKS:
        return GRID_TASKS[task](tokenizer, length, seed=seed, depth=0.5 if depth is None else depth)
    if task in RULER_TASKS:
        return RULER_TASKS[task](tokenizer, length, seed)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(ALL_TASKS)}")


def training_document(task: str, tokenizer, length: int, seed: int = 0, depth: Optional[float] = None) -> str:
    """A sample of ``task`` followed by its answer(s), as one training document: the prompt (at
    most ``length`` tokens, as in :func:`make_sample`), a space, the answers joined by ", ", a
    full stop. Used to teach a small model the task's format (docs/reproduction.md); give seeds
    that an evaluation does not use."""
    s = make_sample(task, tokenizer, length, seed, depth)
    return f"{s.prompt} {', '.join(s.answers)}."
