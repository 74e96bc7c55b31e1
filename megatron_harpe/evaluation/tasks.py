"""Retrieval tasks, generated offline and deterministically from a seed.

The eight "upgraded Needle-in-a-Haystack" tasks follow RULER's NiaH family (Hsieh et al.,
2024): a needle is the sentence ``One of the special magic {numbers|uuids} for {key} is:
{value}.`` hidden in a haystack, and the prompt ends with the question and the start of the
answer (for base models, which continue it):

| task | haystack | key | value | needles (keys x values) | queried keys |
|---|---|---|---|---|---|
| niah_single_1 | repeat | word | 7-digit number | 1 x 1 | 1 |
| niah_single_2 | essay | word | 7-digit number | 1 x 1 | 1 |
| niah_single_3 | essay | word | UUID | 1 x 1 | 1 |
| niah_multikey_1 | essay | word | 7-digit number | 4 x 1 (3 distractor keys) | 1 |
| niah_multikey_2 | needles | word | 7-digit number | 1 x 1 in a haystack of needles | 1 |
| niah_multikey_3 | needles | UUID | UUID | 1 x 1 in a haystack of needles | 1 |
| niah_multivalue | essay | word | 7-digit number | 1 x 4 | 1 (4 answers) |
| niah_multiquery | essay | word | 7-digit number | 4 x 1 | 4 (4 answers) |

Words are ``adjective-noun`` pairs from the demo corpus's word lists; every needle's depth is
drawn uniformly in [0, 1] from the sample's own random stream. Sample ``i`` of task ``t`` at
length ``L`` with seed ``s`` uses ``random.Random(f"harpe-niah:{s}:{t}:{L}:{i}")``, so it is the
same whatever else is evaluated and on any machine; only the haystack's cut depends on the
tokenizer. A prompt plus the task's generation budget fits in ``L`` tokens (RULER's
convention): the prompt has ``L - max_new_tokens`` tokens, give or take a word.

Classic needle (Kamradt-style heatmap): niah_single_2's needle at an exact depth of an essay
(or a local text) haystack, over a grid of lengths x depths. Passkey: the demo corpus's
passkey document (``passkey_document``: "The pass key is 71432. Remember it. ..." in the
grass-is-green filler), sized to the length, key at the depth.
"""
from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from megatron_harpe.evaluation.errors import EvalError
from megatron_harpe.evaluation.model import EvalTokenizer
from megatron_harpe.evaluation.prompts import (PromptTooShort, WordStream, build_prompt, fit_count, haystack_stream,
                                              measure_spans)

__all__ = ["NiahTask", "NIAH_TASKS", "parse_tasks", "Sample", "niah_sample", "needle_sample", "passkey_sample",
           "NEEDLE_TEMPLATE", "PROMPT_PREFIX", "PROMPT_QUESTION"]

NEEDLE_TEMPLATE = "One of the special magic {noun} for {key} is: {value}."
PROMPT_PREFIX = ("A long text follows. Special magic {noun} are hidden in it; memorize them, because a question "
                 "about them comes after the text.\n")
PROMPT_QUESTION = ("\nWhat are all the special magic {noun} for {query} mentioned in the provided text? "
                   "The special magic {noun} for {query} mentioned in the provided text are")
PASSKEY_MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class NiahTask:
    name: str
    haystack: str            # repeat | essay | needles
    key_kind: str            # words | uuids
    value_kind: str          # numbers | uuids
    num_keys: int = 1        # keys with needles in the text (queried ones first, the rest distractors)
    num_values: int = 1      # values (needles) per key
    num_queries: int = 1     # keys asked for
    max_new_tokens: int = 32
    metric: str = "string_match_all"

    @property
    def noun(self) -> str:
        return {"numbers": "numbers", "uuids": "uuids", "words": "words"}[self.value_kind]

    def describe(self) -> dict:
        return {"haystack": self.haystack, "key": self.key_kind, "value": self.value_kind,
                "keys": self.num_keys, "values_per_key": self.num_values, "queries": self.num_queries,
                "max_new_tokens": self.max_new_tokens, "metric": self.metric}


NIAH_TASKS: Dict[str, NiahTask] = {t.name: t for t in (
    NiahTask("niah_single_1", "repeat", "words", "numbers"),
    NiahTask("niah_single_2", "essay", "words", "numbers"),
    NiahTask("niah_single_3", "essay", "words", "uuids", max_new_tokens=64),
    NiahTask("niah_multikey_1", "essay", "words", "numbers", num_keys=4),
    NiahTask("niah_multikey_2", "needles", "words", "numbers"),
    NiahTask("niah_multikey_3", "needles", "uuids", "uuids", max_new_tokens=64),
    NiahTask("niah_multivalue", "essay", "words", "numbers", num_values=4, max_new_tokens=96),
    NiahTask("niah_multiquery", "essay", "words", "numbers", num_keys=4, num_queries=4, max_new_tokens=96),
)}


def parse_tasks(spec: str | Sequence[str]) -> List[str]:
    """``all``, or names separated by commas (``niah_single_1,niah_multikey_2``); unknown names are an error."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise EvalError("--tasks is empty: give 'all' or task names such as niah_single_1")
    out: List[str] = []
    for n in names:
        if n == "all":
            out.extend(t for t in NIAH_TASKS if t not in out)
        elif n in NIAH_TASKS:
            if n not in out:
                out.append(n)
        else:
            raise EvalError(f"unknown task {n!r}; known tasks: all, {', '.join(NIAH_TASKS)}")
    return out


@dataclass
class Sample:
    """One prompt, its expected strings and what to record about it."""

    ids: List[int]
    answers: List[str]
    max_new_tokens: int
    meta: dict = field(default_factory=dict)
    text: str = ""


# ----------------------------------------------------------------------------- keys and values


def _word_key(rng: random.Random) -> str:
    from megatron_harpe.data.corpus import _ADJECTIVES, _NOUNS

    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _make(kind: str, rng: random.Random) -> str:
    if kind == "words":
        return _word_key(rng)
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(kind)


def _distinct(kind: str, rng: random.Random, count: int, used: set) -> List[str]:
    out = []
    tries = 0
    while len(out) < count:
        v = _make(kind, rng)
        tries += 1
        if tries > 1000 * (count + 1):
            # the word-pair space is exhausted: lengthen the keys
            v = f"{v}-{_make(kind, rng)}"
        if v not in used:
            used.add(v)
            out.append(v)
    return out


def _query_phrase(keys: Sequence[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


def _needle_haystack(rng: random.Random, task: NiahTask, used: set) -> WordStream:
    """RULER's 'needle' haystack: an endless run of needles for other keys (per sample)."""
    def sentences():
        while True:
            key = _distinct(task.key_kind, rng, 1, used)[0]
            value = _make(task.value_kind, rng)
            yield NEEDLE_TEMPLATE.format(noun=task.noun, key=key, value=value)
    return WordStream(sentences(), "needles")


# ----------------------------------------------------------------------------- samples


def _fitted(what: str, length: int, gen: int, **kwargs):
    try:
        return build_prompt(**kwargs)
    except PromptTooShort as err:
        raise EvalError(f"{what}: a length of {length} tokens is too short: the template and needles take "
                        f"{err.fixed} tokens and {gen} more are kept for the answer; use lengths of at least "
                        f"{err.fixed + gen}") from None


def _budget(length: int, max_new_tokens: int) -> int:
    budget = length - max_new_tokens
    if budget <= 0:
        raise EvalError(f"length {length} leaves no room for a prompt besides {max_new_tokens} generated tokens")
    return budget


def niah_sample(task: NiahTask | str, length: int, index: int, tok: EvalTokenizer, *, seed: int = 0,
                haystack: Optional[str] = None, max_new_tokens: Optional[int] = None, text_key: str = "text") -> Sample:
    """Sample ``index`` of a NiaH task at ``length`` tokens (prompt + generation budget)."""
    if isinstance(task, str):
        task = NIAH_TASKS[parse_tasks(task)[0]]
    gen = int(max_new_tokens or task.max_new_tokens)
    rng = random.Random(f"harpe-niah:{seed}:{task.name}:{length}:{index}")
    used: set = set()
    keys = _distinct(task.key_kind, rng, task.num_keys, used)
    values = {k: _distinct(task.value_kind, rng, task.num_values, used) for k in keys}
    needles, owners = [], []
    for k in keys:
        for v in values[k]:
            needles.append(NEEDLE_TEMPLATE.format(noun=task.noun, key=k, value=v))
            owners.append(k)
    order = list(range(len(needles)))
    rng.shuffle(order)
    needles = [needles[i] for i in order]
    owners = [owners[i] for i in order]
    depths = [rng.random() for _ in needles]
    queried = keys[:task.num_queries]
    answers = [v for k in queried for v in values[k]]
    query = _query_phrase(queried)
    if task.haystack == "needles":
        stream = _needle_haystack(rng, task, used)
        hay_name = "needles"
    else:
        hay_name = haystack if (haystack and task.haystack == "essay") else task.haystack
        stream = haystack_stream(hay_name, seed, text_key=text_key)
    prompt = _fitted(task.name, length, gen, tok=tok, prefix=PROMPT_PREFIX.format(noun=task.noun),
                     suffix=PROMPT_QUESTION.format(noun=task.noun, query=query), stream=stream,
                     needles=needles, depths=depths, budget=_budget(length, gen))
    meta = {"task": task.name, "length": length, "index": index, "haystack": hay_name, "keys": keys,
            "queried": queried, "needle_keys": owners, **prompt.meta()}
    return Sample(prompt.ids, answers, gen, meta, prompt.text)


def needle_sample(length: int, depth: float, index: int, tok: EvalTokenizer, *, seed: int = 0,
                  haystack: str = "essay", max_new_tokens: int = 32, text_key: str = "text") -> Sample:
    """The classic single needle at ``depth`` (0 = start of the haystack, 1 = end) of a ``length``-token prompt."""
    task = NIAH_TASKS["niah_single_2"]
    rng = random.Random(f"harpe-needle:{seed}:{length}:{round(depth, 6)}:{index}")
    key = _word_key(rng)
    value = _make("numbers", rng)
    stream = haystack_stream(haystack, seed, text_key=text_key)
    prompt = _fitted("needle", length, max_new_tokens, tok=tok, prefix=PROMPT_PREFIX.format(noun=task.noun),
                     suffix=PROMPT_QUESTION.format(noun=task.noun, query=key), stream=stream,
                     needles=[NEEDLE_TEMPLATE.format(noun=task.noun, key=key, value=value)], depths=[depth],
                     budget=_budget(length, max_new_tokens))
    meta = {"task": "needle", "length": length, "depth": depth, "index": index, "haystack": haystack, "key": key,
            **prompt.meta()}
    return Sample(prompt.ids, [value], max_new_tokens, meta, prompt.text)


def passkey_sample(length: int, depth: float, index: int, tok: EvalTokenizer, *, seed: int = 0,
                   max_new_tokens: int = PASSKEY_MAX_NEW_TOKENS) -> Sample:
    """The passkey document of the demo corpus (evaluation form: it ends with "The pass key is"), with as many
    filler sentences as fit in ``length - max_new_tokens`` tokens, the key ``depth`` of the way in."""
    from megatron_harpe.data.corpus import passkey_document

    rng = random.Random(f"harpe-passkey:{seed}:{length}:{round(depth, 6)}:{index}")
    key = rng.randint(10000, 99999)
    budget = _budget(length, max_new_tokens)

    def render(n: int) -> str:
        return passkey_document(random.Random(0), n, depth=depth, passkey=key, with_answer=False)[0]

    counts: Dict[int, int] = {}

    def probe(n: int) -> int:
        if n not in counts:
            counts[n] = tok.count(render(n))
        return counts[n]

    if probe(0) > budget:
        raise EvalError(f"passkey: a length of {length} tokens is too short: the prompt without filler takes "
                        f"{probe(0)} tokens and {max_new_tokens} more are kept for the answer; use lengths of at "
                        f"least {probe(0) + max_new_tokens}")
    per_sentence = max((probe(40) - probe(0)) / 40, 1.0)
    n, _ = fit_count(probe, budget, int((budget - probe(0)) / per_sentence))
    text = render(n)
    ids = tok.encode(text)
    needle = f"The pass key is {key}."
    start = text.index(needle)
    intro_end = text.index("there.") + len("there.")
    context_end = text.rindex(" What is the pass key?")
    spans = measure_spans(tok, text, [(intro_end, context_end), (start, start + len(needle))])
    ctx, nd = spans
    hay = (ctx[1] - ctx[0]) - (nd[1] - nd[0])
    meta = {"task": "passkey", "length": length, "depth": depth, "index": index, "filler_sentences": n,
            "prompt_tokens": len(ids), "needle_spans": [list(nd)], "context_span": list(ctx),
            "measured_depths": [round((nd[0] - ctx[0]) / max(hay, 1), 6)]}
    return Sample(ids, [str(key)], max_new_tokens, meta, text)
