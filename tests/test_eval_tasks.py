"""Evaluation tasks without a model: generation (deterministic per seed), token lengths, needle depths
(token positions measured independently of the library), scoring, windows, result files, CLI parsing."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from megatron_harpe.evaluation.errors import EvalError  # noqa: E402
from megatron_harpe.evaluation.model import load_tokenizer_for_eval  # noqa: E402
from megatron_harpe.evaluation.perplexity import press_windows  # noqa: E402
from megatron_harpe.evaluation.prompts import fit_count  # noqa: E402
from megatron_harpe.evaluation.results import ResultStore  # noqa: E402
from megatron_harpe.evaluation.scoring import mean_score, string_match_all, string_match_part  # noqa: E402
from megatron_harpe.evaluation.tasks import (NEEDLE_TEMPLATE, NIAH_TASKS, PROMPT_QUESTION, needle_sample,  # noqa: E402
                                             niah_sample, parse_tasks, passkey_sample)
from tests.eval_fixtures import *  # noqa: E402,F401,F403

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(eval_tokenizer_dir):
    return load_tokenizer_for_eval(eval_tokenizer_dir)


@pytest.fixture(scope="module")
def hf(eval_tokenizer_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(eval_tokenizer_dir)
    t.model_max_length = 1 << 30
    return t


# ----------------------------------------------------------------------------- generation


def test_eight_tasks_and_task_names():
    assert parse_tasks("all") == ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
                                  "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery"]
    assert parse_tasks("niah_multiquery, niah_single_1") == ["niah_multiquery", "niah_single_1"]
    with pytest.raises(EvalError, match="unknown task 'niah_single_9'.*known tasks: all, niah_single_1"):
        parse_tasks("niah_single_1,niah_single_9")
    with pytest.raises(EvalError, match="--tasks is empty"):
        parse_tasks(" , ")


def test_generation_is_deterministic_per_seed(tok):
    for task in NIAH_TASKS:
        a = niah_sample(task, 1024, 3, tok, seed=7)
        b = niah_sample(task, 1024, 3, tok, seed=7)
        c = niah_sample(task, 1024, 3, tok, seed=8)
        assert a.ids == b.ids and a.answers == b.answers and a.meta == b.meta and a.text == b.text
        assert a.answers != c.answers and a.text != c.text
        # another sample index, or another length, is another sample
        assert niah_sample(task, 1024, 4, tok, seed=7).answers != a.answers
    assert needle_sample(512, 0.5, 0, tok, seed=1).text == needle_sample(512, 0.5, 0, tok, seed=1).text
    assert passkey_sample(512, 0.5, 0, tok, seed=1).answers != passkey_sample(512, 0.5, 0, tok, seed=2).answers


def test_generation_is_the_same_in_another_process(tok, eval_tokenizer_dir):
    """String seeds are hashed with SHA-512 (not Python's randomised hash): same samples in any process."""
    code = ("import sys, json; from megatron_harpe.evaluation.model import load_tokenizer_for_eval; "
            "from megatron_harpe.evaluation.tasks import niah_sample; "
            f"t = load_tokenizer_for_eval({eval_tokenizer_dir!r}); "
            "s = niah_sample('niah_multikey_3', 768, 5, t, seed=3); print(json.dumps([s.ids, s.answers]))")
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    s = niah_sample("niah_multikey_3", 768, 5, tok, seed=3)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [s.ids, s.answers]


@pytest.mark.parametrize("length", [1024, 4096])
def test_prompts_hit_the_requested_token_count(tok, hf, length):
    """Prompt + the task's generation budget = the length, within 3 tokens (counted by transformers itself)."""
    for task, spec in NIAH_TASKS.items():
        s = niah_sample(task, length, 0, tok)
        assert s.max_new_tokens == spec.max_new_tokens
        counted = len(hf(s.text).input_ids)          # independent count: the HF tokenizer on the prompt text
        assert counted == len(s.ids), task
        assert length - 3 <= counted + s.max_new_tokens <= length, (task, counted)
    for s in (needle_sample(length, 0.3, 0, tok), passkey_sample(length, 0.3, 0, tok)):
        counted = len(hf(s.text).input_ids)
        # passkey fills with whole filler sentences (5-6 tokens each), the rest word by word
        slack = 7 if s.meta["task"] == "passkey" else 3
        assert length - slack <= counted + s.max_new_tokens <= length, (s.meta["task"], counted)


def _token_start(hf, text: str, char: int) -> int:
    """Index of the token that starts the text at ``char`` (a needle preceded by a space): the number of tokens of
    everything before the space."""
    return len(hf(text[:char].rstrip(" ")).input_ids)


@pytest.mark.parametrize("haystack,length,tolerance", [("repeat", 2048, 8), ("essay", 4096, 40)])
def test_needles_sit_at_the_requested_depth(tok, hf, haystack, length, tolerance):
    """The needle's first token, found by re-tokenizing the prompt up to it, is depth x haystack tokens into the
    context, within one sentence (needles go between sentences)."""
    for depth in [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]:
        s = needle_sample(length, depth, 0, tok, haystack=haystack)
        text = s.text
        needle = NEEDLE_TEMPLATE.format(noun="numbers", key=s.meta["key"], value=s.answers[0])
        at = text.index(needle)
        assert text.count(needle) == 1
        ctx_start = text.index("\n") + 1
        ctx_end = text.rindex(PROMPT_QUESTION.split("{")[0])
        t_ctx0 = len(hf(text[:ctx_start]).input_ids)
        t_ctx1 = len(hf(text[:ctx_end]).input_ids)
        t_needle = _token_start(hf, text, at)
        needle_tokens = len(hf(text[:at + len(needle)]).input_ids) - t_needle
        haystack_tokens = (t_ctx1 - t_ctx0) - needle_tokens
        expected = t_ctx0 + depth * haystack_tokens
        assert abs(t_needle - expected) <= tolerance, (depth, t_needle, expected)
        # the library's own measurement agrees, and the ids at its span are the needle
        lib_start, lib_end = s.meta["needle_spans"][0]
        assert abs(lib_start - t_needle) <= 1
        assert needle.split(" is: ")[0][4:] in hf.decode(s.ids[lib_start:lib_end])
        assert abs(s.meta["measured_depths"][0] - depth) <= tolerance / haystack_tokens + 1e-9


def test_multi_needle_depths_and_passkey_depth(tok):
    for task in ("niah_multikey_1", "niah_multivalue", "niah_multiquery"):
        s = niah_sample(task, 4096, 1, tok)
        assert len(s.meta["depths"]) == 4
        for want, got in zip(s.meta["depths"], s.meta["measured_depths"]):
            assert abs(want - got) < 0.02, (task, want, got)
    for depth in (0.0, 0.5, 1.0):
        p = passkey_sample(2048, depth, 0, tok)
        assert abs(p.meta["measured_depths"][0] - depth) < 0.01


def test_task_structure(tok):
    import re

    uuid_re = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
    for task, spec in NIAH_TASKS.items():
        s = niah_sample(task, 2048, 2, tok)
        text, answers = s.text, s.answers
        expected_answers = spec.num_values * spec.num_queries
        assert len(answers) == expected_answers and len(set(answers)) == expected_answers, task
        for a in answers:   # every answer is in the prompt, in a needle sentence for a queried key
            assert re.search(rf"One of the special magic {spec.noun} for (\S+) is: {re.escape(a)}\.", text), (task, a)
            assert (uuid_re.match(a) if spec.value_kind == "uuids" else re.fullmatch(r"\d{7}", a)), (task, a)
        needles = re.findall(rf"One of the special magic {spec.noun} for (\S+) is: ", text)
        keys = s.meta["keys"]
        assert len(keys) == spec.num_keys and s.meta["queried"] == keys[:spec.num_queries]
        if spec.key_kind == "uuids":
            assert all(uuid_re.match(k) for k in keys)
        else:
            assert all(re.fullmatch(r"[a-z]+-[a-z]+", k) for k in keys)
        if spec.haystack == "needles":     # a haystack made of needles for other keys
            assert len(needles) > 10 and needles.count(keys[0]) == 1
        else:
            assert sorted(needles) == sorted(k for k in keys for _ in range(spec.num_values))
        if spec.haystack == "repeat":
            assert "The grass is green. The sky is blue." in text
        query = text[text.rindex("What are all"):]
        for k in s.meta["queried"]:
            assert k in query
        for k in keys[spec.num_queries:]:   # distractor keys are not asked for
            assert k not in query


def test_short_lengths_and_file_haystacks_are_clear_errors(tok, tmp_path):
    with pytest.raises(EvalError, match=r"niah_multiquery: a length of 200 tokens is too short: .* use lengths of "
                                        r"at least \d+"):
        niah_sample("niah_multiquery", 200, 0, tok)
    with pytest.raises(EvalError, match="passkey: a length of 64 tokens is too short"):
        passkey_sample(64, 0.5, 0, tok)
    small = tmp_path / "haystack.jsonl"
    small.write_text(json.dumps({"text": "A short text. It has two sentences."}) + "\n")
    with pytest.raises(EvalError, match=r"haystack file .*haystack.jsonl holds only 7 words; this length needs more"):
        needle_sample(1024, 0.5, 0, tok, haystack=str(small))
    big = tmp_path / "book.txt"
    rng = random.Random(0)
    from megatron_harpe.data.corpus import filler_text

    big.write_text("\n".join(filler_text(rng, 5, "essay") for _ in range(200)))
    s = needle_sample(1024, 0.5, 0, tok, haystack=str(big))
    assert s.text.split("\n")[1].startswith(big.read_text().split()[0])
    with pytest.raises(EvalError, match="--haystack 'nonexistent.txt': expected repeat, essay or an existing"):
        needle_sample(1024, 0.5, 0, tok, haystack="nonexistent.txt")


# ----------------------------------------------------------------------------- scoring


def test_scorer_on_hand_made_outputs():
    assert string_match_all(" 1234567.", ["1234567"]) == 1.0
    assert string_match_all("the number is 7654321", ["1234567"]) == 0.0
    assert string_match_all("1234567, 2345678 and 9", ["1234567", "2345678", "3456789", "4567890"]) == 0.5
    assert string_match_all("ABCDEF01-aaaa", ["abcdef01-AAAA"]) == 1.0               # case-insensitive
    assert string_match_all("12345678", ["1234567"]) == 1.0                         # substring counts, as in RULER
    assert string_match_part("nothing, then 3456789", ["1234567", "3456789"]) == 1.0
    assert string_match_part("nothing", ["1234567", "3456789"]) == 0.0
    assert mean_score([1.0, 0.5, 0.0, 0.25]) == pytest.approx(43.75)
    with pytest.raises(ValueError):
        string_match_all("x", [])


def test_niah_summary_tables():
    from megatron_harpe.evaluation.report import niah_markdown, niah_summary

    records = [{"task": "niah_single_1", "length": 4096, "score": s} for s in (1.0, 0.0)] + \
              [{"task": "niah_single_1", "length": 8192, "score": 1.0}] + \
              [{"task": "niah_multivalue", "length": 4096, "score": 0.75},
               {"task": "niah_multivalue", "length": 8192, "score": 0.25}]
    s = niah_summary(records, ["niah_single_1", "niah_multivalue"], [4096, 8192])
    assert s["scores"]["niah_single_1"] == {"4096": 50.0, "8192": 100.0}
    assert s["per_length"] == {"4096": 62.5, "8192": 62.5}
    assert s["per_task"] == {"niah_single_1": 75.0, "niah_multivalue": 50.0}
    assert s["average"] == 62.5
    md = niah_markdown(s)
    assert "| task | 4k | 8k | Avg |" in md and "| niah_single_1 | 50.00 | 100.00 | 75.00 |" in md
    assert "| **Average** | **62.50** | **62.50** | **62.50** |" in md


# ----------------------------------------------------------------------------- pieces


def test_fit_count_finds_the_largest_fitting_count():
    for rate in (0.7, 1.0, 1.3, 7.0):
        for budget in (5, 100, 1000, 131072):
            calls = []

            def probe(n, rate=rate):
                calls.append(n)
                return 10 + int(n * rate)
            if budget < 10:
                with pytest.raises(EvalError):
                    fit_count(probe, budget, 3)
                continue
            for guess in (1, budget // 2, budget * 3):
                n, c = fit_count(probe, budget, guess)
                assert c <= budget < probe(n + 1) and c == probe(n)
    n, c = fit_count(lambda n: n, 100, 50, maximum=40)
    assert (n, c) == (40, 40)


def test_press_windows_score_every_token_once():
    for total in (2, 7, 300, 1000):
        for context in (2, 16, 64, 1000):
            for stride in (1, 8, 16, 64):
                if stride > context:
                    with pytest.raises(EvalError):
                        press_windows(total, context, stride)
                    continue
                wins = press_windows(total, context, stride)
                scored = [t for b, e, s in wins for t in range(s, e)]
                expected = [t for t in range(1, total) if not (context == stride and t % stride == 0)]
                assert scored == expected, (total, context, stride)
                for b, e, s in wins:
                    assert e - b <= context and b < s <= e
                    if b > 0:
                        assert s - b >= context - stride          # at least C - S tokens of context
    # truncate mode: the span equals the context -> one window scoring tokens 1..L-1
    assert press_windows(4096, 4096, 256) == [(0, 4096, 1)]


def test_result_store_resumes_and_refuses_other_settings(tmp_path):
    path = tmp_path / "results.jsonl"
    store = ResultStore(path, {"seed": 0}, ("task", "length", "index"))
    store.append([{"task": "a", "length": 8, "index": i, "score": i} for i in range(3)])
    with open(path, "a") as f:
        f.write('{"task": "a", "length": 8, "index": 3, "sco')       # killed mid-write
    again = ResultStore(path, {"seed": 0}, ("task", "length", "index"))
    assert again.resumed == 3 and not again.has({"task": "a", "length": 8, "index": 3})
    assert path.read_text().endswith('"score": 2}\n')                # the cut line is gone
    again.append([{"task": "a", "length": 8, "index": 3, "score": 3}])
    assert ResultStore(path, {"seed": 0}, ("task", "length", "index")).resumed == 4
    with pytest.raises(EvalError, match=r"holds results of other settings \(seed: 0 -> 1\).*--overwrite"):
        ResultStore(path, {"seed": 1}, ("task", "length", "index"))
    assert ResultStore(path, {"seed": 1}, ("task", "length", "index"), overwrite=True).resumed == 0
    (tmp_path / "bad.jsonl").write_text('{"header": {"seed": 0}}\nnot json\n{"task": 1}\n')
    with pytest.raises(EvalError, match=r"bad.jsonl:2 is not valid JSON"):
        ResultStore(tmp_path / "bad.jsonl", {"seed": 0}, ("task",))


def test_cli_lengths_and_depths():
    import argparse

    from megatron_harpe.evaluation.cli import parse_depths, parse_lengths

    assert parse_lengths("4k,8k,131072") == [4096, 8192, 131072]
    assert parse_lengths("2k:8k:2k") == [2048, 4096, 6144, 8192]
    assert parse_lengths("1.5k") == [1536]
    assert parse_depths("0:100:25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_depths("10,90") == [0.1, 0.9]
    for bad in ("4q", "0", "2k:8k", "-5"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_lengths(bad)
    for bad in ("101", "a,b", "0:100:0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_depths(bad)
