"""Haystacks and prompts sized to an exact token budget, with needles at token depths.

A haystack is a deterministic stream of words (each marked when it starts a sentence):

- ``repeat``: the classic passkey filler ("The grass is green. The sky is blue. ...") repeated;
- ``essay``: generated English-like sentences (megatron_harpe.data.corpus, seeded);
- ``needles``: key-value sentences with other keys (RULER's "needle" haystack, for multikey_2/3);
- a local text corpus: the words of a ``.jsonl``/``.jsonl.gz`` (``text`` field) or plain text
  file, in order, never repeated (a file too short for the length is an error).

:func:`build_prompt` puts ``prefix + context + suffix`` together, where the context is the
first ``n`` haystack words with the needles inserted at sentence starts, and picks the largest
``n`` whose prompt (as the model reads it: BOS included) has at most ``budget`` tokens. A
word is one to a few tokens, so the prompt lands within a few tokens of the budget. Each
needle goes before the sentence start whose token position in the haystack (needles not
counted) is closest to ``depth * haystack_tokens``; the token positions of the needles in the
final prompt are measured and returned, so the depth is checked, not assumed.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from megatron_harpe.evaluation.errors import EvalError
from megatron_harpe.evaluation.model import EvalTokenizer

__all__ = ["WordStream", "haystack_stream", "build_prompt", "fit_count", "Prompt", "HAYSTACKS", "measure_spans",
           "PromptTooShort", "HaystackExhausted"]

HAYSTACKS = ("repeat", "essay", "needles")
_SENTENCE_END = (".", "!", "?", ".\"", "?\"", "!\"", ";")


class WordStream:
    """Words drawn from an iterator of sentences (or text blocks), kept for reuse; ``starts[i]`` marks
    words that begin a sentence. ``finite``: the source can run out (a text file), which is then an
    error naming ``name``, never a silent repetition."""

    def __init__(self, sentences: Iterator[str], name: str, finite: bool = False):
        self._sentences = sentences
        self.name = name
        self.finite = finite
        self.words: List[str] = []
        self.starts: List[bool] = []
        self.exhausted = False

    def ensure(self, n: int) -> bool:
        """Make at least ``n`` words available; False when the source ends first."""
        while len(self.words) < n and not self.exhausted:
            try:
                block = next(self._sentences)
            except StopIteration:
                self.exhausted = True
                break
            new_sentence = True
            for word in block.split():
                self.words.append(word)
                self.starts.append(new_sentence or (len(self.words) == 1))
                new_sentence = word.endswith(_SENTENCE_END)
        return len(self.words) >= n

    def take(self, n: int) -> Tuple[List[str], List[bool]]:
        if not self.ensure(n):
            raise HaystackExhausted(self, n)
        return self.words[:n], self.starts[:n]


class PromptTooShort(EvalError):
    """The template and needles alone exceed the token budget."""

    def __init__(self, fixed: int, budget: int):
        self.fixed, self.budget = fixed, budget
        super().__init__(f"the template and needles alone take {fixed} tokens, more than the budget of {budget}")


class HaystackExhausted(EvalError):
    def __init__(self, stream: WordStream, wanted: int):
        self.stream = stream
        super().__init__(f"the haystack {stream.name} holds only {len(stream.words)} words; this length needs more "
                         f"(at least {wanted}): give a larger text file or use the generated haystack "
                         f"(--haystack essay)")


def _repeat_sentences() -> Iterator[str]:
    from megatron_harpe.data.corpus import filler_text

    sentences = filler_text(random.Random(0), 5, "passkey")  # the five classic filler sentences
    while True:
        yield sentences


def _essay_sentences(seed: int) -> Iterator[str]:
    from megatron_harpe.data.corpus import filler_text

    rng = random.Random(f"harpe-eval-essay:{seed}")
    while True:
        yield filler_text(rng, 1, "essay")


def _file_blocks(path: str, text_key: str) -> Iterator[str]:
    from megatron_harpe.data.inputs import open_binary
    from megatron_harpe.data.jsonio import is_jsonl, iter_jsonl_fields

    if not is_jsonl(path):
        with open_binary(path) as f:
            for raw in f:
                line = raw.decode("utf-8", errors="replace")
                if line.strip():
                    yield line
        return

    def bad_line(lineno: int, _key: Optional[str]) -> EvalError:
        return EvalError(f"{path}:{lineno}: not a JSON record with a {text_key!r} field (use --text-key)")

    for _lineno, (value,) in iter_jsonl_fields(path, [text_key], bad_line):
        if isinstance(value, str) and value.strip():
            yield value


_SHARED: Dict[tuple, WordStream] = {}


def haystack_stream(kind: str, seed: int = 0, *, text_key: str = "text") -> WordStream:
    """The shared word stream of a haystack (``repeat``, ``essay`` or a file path); made once per process."""
    key = (kind, seed if kind == "essay" else 0, text_key)
    if key in _SHARED:
        return _SHARED[key]
    if kind == "repeat":
        stream = WordStream(_repeat_sentences(), "repeat (passkey filler)")
    elif kind == "essay":
        stream = WordStream(_essay_sentences(seed), f"essay (generated, seed {seed})")
    elif kind == "needles":
        raise EvalError("the 'needles' haystack is made per sample (it depends on the sample's keys)")
    else:
        if not os.path.isfile(kind):
            raise EvalError(f"--haystack {kind!r}: expected repeat, essay or an existing text/jsonl file")
        stream = WordStream(_file_blocks(kind, text_key), f"file {kind}", finite=True)
    _SHARED[key] = stream
    return stream


# ----------------------------------------------------------------------------- fitting


def fit_count(probe: Callable[[int], int], budget: int, guess: int, *, minimum: int = 0,
              maximum: Optional[int] = None) -> Tuple[int, int]:
    """The largest ``n`` in [minimum, maximum] with ``probe(n) <= budget`` (probe: non-decreasing in n,
    e.g. the token count of a prompt with n haystack words). Returns ``(n, probe(n))``.

    Secant steps from ``guess`` (with the average tokens per unit measured so far), bisection
    when a step leaves the bracket or after 8 steps; a handful of probes for a fair guess.
    Raises EvalError when even ``minimum`` is over the budget.
    """
    c0 = probe(minimum)
    if c0 > budget:
        raise EvalError(f"{c0} tokens without any haystack exceed the budget of {budget}")
    lo, lo_c, hi = minimum, c0, None
    if maximum is not None and maximum <= minimum:
        return lo, lo_c
    n = max(guess, minimum + 1)
    if maximum is not None:
        n = min(n, maximum)
    for step_no in range(80):
        c = probe(n)
        if c <= budget:
            lo, lo_c = n, c
        else:
            hi = n
        if c == budget or (hi is not None and hi - lo <= 1) or (maximum is not None and lo >= maximum):
            break
        upper = hi if hi is not None else (maximum + 1 if maximum is not None else None)
        nxt = None
        if step_no < 8:
            rate = max((c - c0) / max(n - minimum, 1), 1e-3)
            delta = (budget - c) / rate
            nxt = n + (min(math.floor(delta), -1) if c > budget else max(math.floor(delta), 1))
            if nxt <= lo or (upper is not None and nxt >= upper):
                nxt = None
        if nxt is None:  # bisection, or doubling while there is no upper bound
            nxt = (lo + upper) // 2 if upper is not None else max(lo + 1, 2 * lo)
            if nxt <= lo:
                break
        n = nxt
    return lo, lo_c


# ----------------------------------------------------------------------------- prompts


@dataclass
class Prompt:
    """A prompt fitted to a token budget, with where its needles sit."""

    text: str
    ids: List[int]
    haystack_words: int
    haystack_tokens: int                        # context tokens that are not needle tokens
    context_span: Tuple[int, int]               # token span of the context (haystack + needles)
    needle_spans: List[Tuple[int, int]]         # token spans of the needles, in the order given
    depths: List[float]                         # requested depths, in the order given
    measured_depths: List[float] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    def meta(self) -> dict:
        return {"prompt_tokens": self.num_tokens, "haystack_tokens": self.haystack_tokens,
                "context_span": list(self.context_span), "needle_spans": [list(s) for s in self.needle_spans],
                "depths": [round(d, 6) for d in self.depths],
                "measured_depths": [round(d, 6) for d in self.measured_depths]}


def _join(words: Sequence[str], needles: Sequence[str], slots: Sequence[int]) -> Tuple[str, List[Tuple[int, int]]]:
    """Words joined by spaces with needle k inserted before word ``slots[k]``; also the char spans of the needles."""
    by_slot: Dict[int, List[int]] = {}
    for k, s in enumerate(slots):
        by_slot.setdefault(s, []).append(k)
    parts: List[str] = []
    spans: List[Tuple[int, int]] = [(0, 0)] * len(needles)
    pos = 0

    def add(piece: str) -> int:
        nonlocal pos
        if parts:
            parts.append(" ")
            pos += 1
        start = pos
        parts.append(piece)
        pos += len(piece)
        return start

    for i in range(len(words) + 1):
        for k in by_slot.get(i, ()):
            start = add(needles[k])
            spans[k] = (start, start + len(needles[k]))
        if i < len(words):
            add(words[i])
    return "".join(parts), spans


def _proportional_slots(words: Sequence[str], starts: Sequence[bool], depths: Sequence[float]) -> List[int]:
    """Sentence-start slots nearest to each depth by character position (cheap, for the size search)."""
    if not words:
        return [0] * len(depths)
    cum = [0]
    for w in words:
        cum.append(cum[-1] + len(w) + 1)
    candidates = [i for i in range(len(words)) if starts[i]] + [len(words)]
    total = cum[-1]
    slots = []
    for d in depths:
        target = d * total
        slots.append(min(candidates, key=lambda i: (abs(cum[i] - target), i)))
    return slots


def _token_slots(tok: EvalTokenizer, words: Sequence[str], starts: Sequence[bool],
                 depths: Sequence[float]) -> Tuple[List[int], int]:
    """Sentence-start slots nearest to each depth by token position in the haystack alone; also its token count."""
    text = " ".join(words)
    cand = [i for i in range(len(words)) if starts[i]] + [len(words)]
    char_of = []
    pos = 0
    char_at_word = []
    for w in words:
        char_at_word.append(pos)
        pos += len(w) + 1
    for i in cand:
        char_of.append(char_at_word[i] if i < len(words) else len(text))
    prefix = len(tok.prefix)
    token_pos = [p - prefix for p in tok.token_index_at(text, char_of)]
    total = tok.count(text) - prefix
    slots = []
    for d in depths:
        target = d * total
        j = min(range(len(cand)), key=lambda j: (abs(token_pos[j] - target), j))
        slots.append(cand[j])
    return slots, total


def measure_spans(tok: EvalTokenizer, text: str, char_spans: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """Token spans (of ``tok.encode(text)``) covering the given character spans."""
    points = [c for span in char_spans for c in span]
    idx = tok.token_index_at(text, points)
    out = []
    for k in range(len(char_spans)):
        start, end = idx[2 * k], idx[2 * k + 1]
        # the token holding the span's last character ends at or after `end`
        out.append((start, max(end, start + 1)))
    return out


def build_prompt(tok: EvalTokenizer, *, prefix: str, suffix: str, stream: WordStream, needles: Sequence[str],
                 depths: Sequence[float], budget: int) -> Prompt:
    """``prefix + context + suffix`` with at most ``budget`` tokens (see the module docstring)."""
    _check_needles(needles, depths)
    layout = _PromptLayout(tok, prefix, suffix, stream, needles, depths)
    n = _fit_word_count(tok, layout, stream, budget)
    n, slots, text, char_spans, ids = _place_needles_by_tokens(tok, layout, stream, n, depths, budget)
    filled = _fill_gap_with_part_of_next_word(tok, layout, stream, n, slots, budget, len(ids))
    if filled is not None:
        text, char_spans, ids = filled
    context_span, needle_spans, haystack_tokens, measured = _measure_placement(
        tok, text, (len(prefix), len(text) - len(suffix)), char_spans)
    if len(ids) > budget:
        raise EvalError(f"cannot fit the prompt into {budget} tokens")
    return Prompt(text, ids, n, haystack_tokens, context_span, needle_spans, list(depths), measured)


def _check_needles(needles: Sequence[str], depths: Sequence[float]) -> None:
    if len(needles) != len(depths):
        raise ValueError("one depth per needle")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise EvalError(f"needle depth {d} outside [0, 1]")


class _PromptLayout:
    """The prompt with the first ``n`` haystack words. Token counts are cached because the size
    search probes the same word counts more than once, and every probe encodes a whole prompt."""

    def __init__(self, tok: EvalTokenizer, prefix: str, suffix: str, stream: WordStream, needles: Sequence[str],
                 depths: Sequence[float]):
        self.tok, self.prefix, self.suffix, self.stream = tok, prefix, suffix, stream
        self.needles, self.depths = needles, depths
        self._counts: Dict[int, int] = {}

    def render(self, n: int, slots: Optional[List[int]] = None, tail: str = "") -> Tuple[str, List[Tuple[int, int]]]:
        """The text and the needles' char spans in the context; without ``slots``, needles go by character depth."""
        words, starts = self.stream.take(n)
        if tail:  # a cut word closes the haystack (never a sentence start: needles do not go after it)
            words, starts = words + [tail], starts + [False]
        if slots is None:
            slots = _proportional_slots(words, starts, self.depths)
        context, spans = _join(words, self.needles, slots)
        return self.prefix + context + self.suffix, spans

    def count(self, n: int) -> int:
        if n not in self._counts:
            self._counts[n] = self.tok.count(self.render(n)[0])
        return self._counts[n]


def _fit_word_count(tok: EvalTokenizer, layout: _PromptLayout, stream: WordStream, budget: int) -> int:
    """The largest word count that fits, with needles placed by characters: cheap enough to probe
    many times; the exact placement by tokens afterwards only ever removes words."""
    fixed = layout.count(0)
    if fixed > budget:
        raise PromptTooShort(fixed, budget)
    per_word = _tokens_per_word(tok, stream)
    guess = int((budget - fixed) / per_word)
    maximum = _finite_word_limit(layout, stream, budget, guess, per_word) if stream.finite else None
    n, _ = fit_count(layout.count, budget, guess, maximum=maximum)
    return n


def _tokens_per_word(tok: EvalTokenizer, stream: WordStream) -> float:
    """Measured on a sample of the stream, for the first guess of the size search."""
    sample_n = 400
    if not stream.ensure(sample_n):
        sample_n = len(stream.words)
    words_sample = stream.words[:sample_n]
    return max((tok.count(" ".join(words_sample)) - len(tok.prefix)) / max(len(words_sample), 1), 0.2)


def _finite_word_limit(layout: _PromptLayout, stream: WordStream, budget: int, guess: int,
                       per_word: float) -> Optional[int]:
    """All the words of a text file that runs out (None while it lasts); a file that cannot come
    near the budget is an error rather than a silently short prompt."""
    stream.ensure(int(guess * 1.2) + 64)
    if not stream.exhausted:
        return None
    maximum = len(stream.words)
    if layout.count(maximum) < budget - 8 * max(per_word, 1):
        raise HaystackExhausted(stream, guess)
    return maximum


def _place_needles_by_tokens(tok: EvalTokenizer, layout: _PromptLayout, stream: WordStream, n: int,
                             depths: Sequence[float], budget: int):
    """(n, slots, text, char spans, ids) with the needles at their token depths. Moving a needle
    can move a token boundary, so the prompt is encoded again and loses a word while it is over."""
    while True:
        words, starts = stream.take(n)
        slots, _ = _token_slots(tok, words, starts, depths)
        text, char_spans = layout.render(n, slots)
        ids = tok.encode(text)
        if len(ids) <= budget or n == 0:
            return n, slots, text, char_spans, ids
        n -= 1


def _fill_gap_with_part_of_next_word(tok: EvalTokenizer, layout: _PromptLayout, stream: WordStream, n: int,
                                     slots: List[int], budget: int, num_tokens: int):
    """(text, char spans, ids) with the longest fitting start of the next word, or None. A long next
    word (a UUID, a number with digit-split tokens) would otherwise leave the prompt short of the budget."""
    if budget - num_tokens <= 2 or not stream.ensure(n + 1):
        return None
    word = stream.words[n]
    lo, hi, best = 1, len(word) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        cand_text, cand_spans = layout.render(n, slots, word[:mid])
        cand_ids = tok.encode(cand_text)
        if len(cand_ids) <= budget:
            best = (cand_text, cand_spans, cand_ids)
            lo = mid + 1
        else:
            hi = mid - 1
    return best


def _measure_placement(tok: EvalTokenizer, text: str, context_chars: Tuple[int, int],
                       char_spans: Sequence[Tuple[int, int]]):
    """(context span, needle spans, haystack tokens, measured depths) in tokens of the final text,
    so that the reported depth is the one the model saw, not the one asked for."""
    ctx_start, ctx_end = context_chars
    spans = measure_spans(tok, text, [(ctx_start, ctx_end)]
                          + [(ctx_start + a, ctx_start + b) for a, b in char_spans])
    context_span, needle_spans = spans[0], spans[1:]
    needle_tokens = sum(e - s for s, e in needle_spans)
    haystack_tokens = (context_span[1] - context_span[0]) - needle_tokens
    measured = []
    for k, (s, _) in enumerate(needle_spans):
        before = sum(e2 - s2 for j, (s2, e2) in enumerate(needle_spans) if s2 < s or (s2 == s and j < k))
        measured.append((s - context_span[0] - before) / max(haystack_tokens, 1))
    return context_span, needle_spans, haystack_tokens, measured
