"""Tokenizers (megatron_harpe.data.tokenizer) and harpe-train-tokenizer, on real models trained here."""
from __future__ import annotations

import json
import os
import pickle
import random
import re

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer

from megatron_harpe.data import train_tokenizer
from megatron_harpe.data.tokenizer import (DATA_TOOL_SETTINGS, HuggingFaceTokenizer, SentencePieceTokenizer,
                                           TokenizerError, load_tokenizer, token_dtype)
from tests.data_fixtures import *  # noqa: F401,F403

TRICKY = ["", " ", "  ", "a", "a ", " a", "a  b", "a   b  ", "\n", "x\ny", "\t tab\t", "end.  ",
          "The pass key is 71432. Remember it.", "naïve café — ünïcödé", "emoji 😀😀 ok", "数字 123 4567",
          "  leading", "trailing   ", "\u2581 literal lower-one-eighth block \u2581\u2581x", "<s> </s> <unk>",
          "<|begin_of_text|> special-looking text <|end_of_text|>", "a" * 3000, "word " * 400]


def _texts(corpus, n=200):
    with open(corpus, encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f)]


def _random_strings(seed=0, n=300):
    rng = random.Random(seed)
    alphabet = list("abcxyz   \n\t.,!?'\"0123456789") + ["é", "ß", "😀", "中", "\u2581", "  ", "\r\n"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


# ----------------------------------------------------------------------------- sentencepiece


def test_sentencepiece_matches_library(spm_model, corpus_jsonl):
    tok = load_tokenizer("sentencepiece", spm_model)
    ref = spm.SentencePieceProcessor(model_file=spm_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == ref.get_piece_size() == 1000
    assert (tok.eod, tok.bos) == (ref.eos_id(), ref.bos_id()) == (2, 1) == (tok.eod_id, tok.bos_id)
    assert tok.dtype == token_dtype(1000)
    for text in _texts(corpus_jsonl) + TRICKY:
        ids = tok.encode(text)
        assert ids == ref.encode(text)
        assert tok.encode_fast(text) == ids
    assert tok.encode_batch(["a b", "c"]) == [ref.encode("a b"), ref.encode("c")]


def test_sentencepiece_word_cache_is_exact(spm_model):
    tok = load_tokenizer("sentencepiece", spm_model)
    assert tok.uses_word_cache, tok.word_cache_reason
    plain = spm.SentencePieceProcessor(model_file=spm_model)
    for text in _random_strings(1) + _random_strings(2):
        assert tok.encode_fast(text) == plain.encode(text), repr(text)


def test_sentencepiece_round_trip(spm_model, corpus_jsonl):
    tok = load_tokenizer("sentencepiece", spm_model)
    # identity normalisation + byte fallback: decoding gives the text back exactly
    for text in _texts(corpus_jsonl, 50) + ["naïve café 😀", "x\n\ny\tz"]:
        assert tok.decode(tok.encode(text)) == text


def test_word_cache_off_for_other_models(tmp_path, corpus_jsonl):
    # a unigram model with NFKC normalisation: not word-decomposable, so sentencepiece encodes directly
    lines = train_tokenizer.iter_training_lines([corpus_jsonl], ["text"], max_lines=3000)
    spm.SentencePieceTrainer.train(sentence_iterator=lines, model_prefix=str(tmp_path / "uni"), vocab_size=500,
                                   model_type="unigram", minloglevel=2)
    tok = load_tokenizer("sentencepiece", str(tmp_path / "uni.model"))
    assert not tok.uses_word_cache and "BPE" in tok.word_cache_reason
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "uni.model"))
    for text in TRICKY:
        assert tok.encode_fast(text) == ref.encode(text)


def test_pickles_by_path(spm_model, hf_tokenizer_dir):
    for tok in (load_tokenizer("sentencepiece", spm_model), load_tokenizer("huggingface", hf_tokenizer_dir)):
        clone = pickle.loads(pickle.dumps(tok))
        assert type(clone) is type(tok) and clone.encode("hello world") == tok.encode("hello world")


# ----------------------------------------------------------------------------- Hugging Face


def test_huggingface_matches_library(hf_tokenizer_dir, corpus_jsonl):
    tok = load_tokenizer("huggingface", hf_tokenizer_dir)
    ref = HFTokenizer.from_file(os.path.join(hf_tokenizer_dir, "tokenizer.json"))
    assert isinstance(tok, HuggingFaceTokenizer)
    assert tok.vocab_size == ref.get_vocab_size() == 1000
    assert tok.bos == ref.token_to_id("<|begin_of_text|>") and tok.eod == ref.token_to_id("<|end_of_text|>")
    for text in _texts(corpus_jsonl) + TRICKY:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids
        assert tok.encode_fast(text) == tok.encode(text)
    assert tok.encode_batch(["a b", "c d"]) == [tok.encode("a b"), tok.encode("c d")]
    # the tokenizer's own post-processor adds BOS; our encode does not (the preprocessor's --prepend-bos does)
    assert ref.encode("hi").ids[0] == tok.bos and tok.encode("hi")[0] != tok.bos
    # byte-level BPE decodes back exactly
    for text in _texts(corpus_jsonl, 30) + ["naïve 😀\n\tx"]:
        assert tok.decode(tok.encode(text)) == text


def test_huggingface_file_path_and_eod_fallbacks(hf_tokenizer_dir, tmp_path):
    tok_file = os.path.join(hf_tokenizer_dir, "tokenizer.json")
    # a bare tokenizer.json without tokenizer_config.json: EOS found by its usual name
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "tokenizer.json").write_bytes(open(tok_file, "rb").read())
    tok = load_tokenizer("huggingface", str(lone / "tokenizer.json"))
    assert tok.eod == load_tokenizer("huggingface", hf_tokenizer_dir).eod
    # an explicit --eod-token wins; an unknown one is an error
    assert load_tokenizer("huggingface", str(lone), eod_token="<|begin_of_text|>").eod == tok.bos
    with pytest.raises(TokenizerError, match="not in"):
        load_tokenizer("huggingface", str(lone), eod_token="<nope>")
    # Megatron-LM's type names are accepted
    assert load_tokenizer("HuggingFaceTokenizer", str(lone)).kind == "huggingface"


# ----------------------------------------------------------------------------- bad tokenizers


def test_missing_and_bad_tokenizers(tmp_path, spm_model, hf_tokenizer_dir):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer("sentencepiece", str(tmp_path / "nope.model"))
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer("huggingface", str(tmp_path / "nope"))
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00\x01 this is not a model" * 10)
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        load_tokenizer("sentencepiece", str(garbage))
    with pytest.raises(TokenizerError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer("huggingface", str(garbage))
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer("huggingface", str(tmp_path))
    # a tokenizer.json handed to the sentencepiece loader says what to do instead, in the words of the caller:
    # the data tools' flags, or (harpe-train's data.tokenizer_* keys, harpe-eval) no other tool's flag
    hf_json = os.path.join(hf_tokenizer_dir, "tokenizer.json")
    with pytest.raises(TokenizerError, match="set --tokenizer-type to huggingface"):
        load_tokenizer("sentencepiece", hf_json, settings=DATA_TOOL_SETTINGS)
    with pytest.raises(TokenizerError, match="set data.tokenizer_type to huggingface"):
        load_tokenizer("sentencepiece", hf_json, settings={"type": "data.tokenizer_type"})
    with pytest.raises(TokenizerError) as exc:
        load_tokenizer("sentencepiece", hf_json)
    assert "set the tokenizer type to huggingface" in str(exc.value) and "--" not in str(exc.value)
    with pytest.raises(TokenizerError) as exc:
        load_tokenizer("sentencepiece", str(tmp_path / "nope.model"))
    assert "--tokenizer-model" not in str(exc.value)
    with pytest.raises(TokenizerError, match="set --tokenizer-model to a tokenizer.model"):
        load_tokenizer("sentencepiece", str(tmp_path / "nope.model"), settings=DATA_TOOL_SETTINGS)
    with pytest.raises(TokenizerError, match="unknown tokenizer type"):
        load_tokenizer("wordpiece", spm_model)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_tokenizer(tmp_path, spm_model):
    p = tmp_path / "locked.model"
    p.write_bytes(open(spm_model, "rb").read())
    p.chmod(0)
    with pytest.raises(TokenizerError, match="not readable"):
        load_tokenizer("sentencepiece", str(p))


# ----------------------------------------------------------------------------- harpe-train-tokenizer


def test_train_tokenizer_cli(tmp_path, corpus_jsonl, capsys):
    out = tmp_path / "sp"
    assert train_tokenizer.main(["--input", corpus_jsonl, "--vocab-size", "600", "--output-dir", str(out),
                                 "--threads", "1"]) == 0
    line = capsys.readouterr().out
    assert "harpe-train-tokenizer: wrote" in line and "vocab 600" in line
    tok = load_tokenizer("sentencepiece", str(out))  # a directory with tokenizer.model
    assert tok.vocab_size == 600 and tok.decode(tok.encode("The pass key is 12345.")) == "The pass key is 12345."
    # text files too, and the Hugging Face flavour
    txt = tmp_path / "plain.txt"
    txt.write_text("\n".join(_texts(corpus_jsonl, 100)), encoding="utf-8")
    assert train_tokenizer.main(["--input", str(txt), "--type", "huggingface", "--vocab-size", "400",
                                 "--output-dir", str(tmp_path / "hf")]) == 0
    hf = load_tokenizer("huggingface", str(tmp_path / "hf"))
    assert hf.vocab_size == 400 and hf.bos is not None and hf.eod != hf.bos
    cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|end_of_text|>"


def test_train_tokenizer_cli_errors(tmp_path, corpus_jsonl, capsys):
    assert train_tokenizer.main(["--input", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path)]) == 2
    assert "input file not found" in capsys.readouterr().err
    assert train_tokenizer.main(["--input", corpus_jsonl, "--vocab-size", "100", "--output-dir", str(tmp_path)]) == 2
    assert "too small" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{broken\n')
    assert train_tokenizer.main(["--input", str(bad), "--output-dir", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err


# ----------------------------------------------------------------------------- harpe-train-tokenizer's bad inputs
#
# Each: exit code 2, one message naming the input, no traceback, and no directory left that was not there.


def _tt(capsys, *argv):
    rc = train_tokenizer.main([str(a) for a in argv])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return rc, cap.out, cap.err


@pytest.mark.parametrize("kind", ["sentencepiece", "huggingface"])
@pytest.mark.parametrize("content", ["", "\n  \n\t\n", '{"text": ""}\n{"text": "   "}\n',
                                     '{"text": 42}\n{"text": null}\n'],
                         ids=["empty", "blank lines", "empty texts", "no string texts"])
def test_train_tokenizer_no_text_is_a_clear_error_and_leaves_nothing(tmp_path, capsys, kind, content):
    inp = tmp_path / "in.jsonl"
    inp.write_text(content)
    out = tmp_path / "new" / "tok"
    rc, stdout, err = _tt(capsys, "--input", inp, "--type", kind, "--vocab-size", 500, "--output-dir", out)
    assert rc == 2 and f"no text in {inp}" in err and "--json-keys" in err and stdout == ""
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]  # no output directory, no staging directory


def test_train_tokenizer_no_text_in_a_plain_text_file(tmp_path, capsys):
    inp = tmp_path / "in.txt"
    inp.write_text("\n\n   \n")
    rc, _, err = _tt(capsys, "--input", inp, "--output-dir", tmp_path / "tok")
    assert rc == 2 and f"no text in {inp}" in err and "--json-keys" not in err
    assert sorted(os.listdir(tmp_path)) == ["in.txt"]


def test_train_tokenizer_vocab_size_minimum_is_what_sentencepiece_needs(tmp_path, capsys, corpus_jsonl):
    """The fixed minimum (259 fixed pieces + at least 2 characters = 261) is checked before any input is
    read; above it, the text decides, and the message names the exact size that then trains."""
    rc, _, err = _tt(capsys, "--input", tmp_path / "not-read.jsonl", "--vocab-size", 260,
                     "--output-dir", tmp_path / "o")
    assert rc == 2 and "--vocab-size 260 is too small" in err and "259" in err and "at least 261" in err
    tiny = tmp_path / "a.txt"
    tiny.write_text("aaaa aaa aa a\n" * 20)  # 2 characters: the word mark and 'a'
    rc, _, err = _tt(capsys, "--input", tiny, "--vocab-size", 261, "--output-dir", tmp_path / "t261",
                     "--soft-vocab-limit", "--threads", 1)
    assert rc == 0, err
    assert load_tokenizer("sentencepiece", str(tmp_path / "t261")).vocab_size == 261
    # issue 13: --vocab-size 280 said "needs 259 pieces" while refusing anything below 300
    args = ["--input", corpus_jsonl, "--max-lines", 3000, "--threads", 1]
    rc, _, err = _tt(capsys, *args, "--vocab-size", 280, "--output-dir", tmp_path / "new" / "t280")
    need = int(re.search(r"sentencepiece needs (\d+) pieces", err).group(1))
    assert rc == 2 and need > 280 and f"use --vocab-size {need} or more" in err
    assert not (tmp_path / "new").exists()
    rc, _, err = _tt(capsys, *args, "--vocab-size", need - 1, "--output-dir", tmp_path / "below")
    assert rc == 2 and f"needs {need} pieces" in err and not (tmp_path / "below").exists()
    rc, _, err = _tt(capsys, *args, "--vocab-size", need, "--output-dir", tmp_path / "exact")
    assert rc == 0, err
    assert load_tokenizer("sentencepiece", str(tmp_path / "exact")).vocab_size == need
    # Hugging Face: 256 byte tokens + 2 specials
    rc, _, err = _tt(capsys, "--input", corpus_jsonl, "--type", "huggingface", "--vocab-size", 257,
                     "--output-dir", tmp_path / "hf")
    assert rc == 2 and "at least 258" in err and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("case", ["vocab too large", "output dir is a file", "max-lines 0", "bad json",
                                  "missing input", "bad choice"])
def test_train_tokenizer_other_bad_inputs(tmp_path, capsys, case):
    small = tmp_path / "small.jsonl"
    small.write_text('{"text": "hello world, this is a tiny text"}\n')
    a_file = tmp_path / "file"
    a_file.write_text("x")
    argv, message = {
        "vocab too large": (["--input", small, "--vocab-size", 2000, "--output-dir", tmp_path / "new" / "o"],
                            "more than this text can fill"),
        "output dir is a file": (["--input", small, "--output-dir", a_file], f"--output-dir {a_file} is a file"),
        "max-lines 0": (["--input", small, "--max-lines", 0, "--output-dir", tmp_path / "new" / "o"], "--max-lines 0"),
        "bad json": (["--input", tmp_path / "bad.jsonl", "--output-dir", tmp_path / "new" / "o"],
                     "bad.jsonl:2: not valid JSON"),
        "missing input": (["--input", tmp_path / "nope.jsonl", "--output-dir", tmp_path / "new" / "o"],
                          "input file not found"),
        "bad choice": (["--input", small, "--type", "wordpiece", "--output-dir", tmp_path / "new" / "o"], "--type"),
    }[case]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    rc, out, err = _tt(capsys, *argv)
    assert rc == 2 and message in err and out == ""
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
    assert not (tmp_path / "new").exists() and a_file.read_text() == "x"


def test_train_tokenizer_failure_in_an_existing_directory_leaves_it_as_it_was(tmp_path, capsys, corpus_jsonl):
    out = tmp_path / "tok"
    assert _tt(capsys, "--input", corpus_jsonl, "--vocab-size", 600, "--output-dir", out, "--threads", 1)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc, _, err = _tt(capsys, "--input", corpus_jsonl, "--vocab-size", 280, "--output-dir", out, "--threads", 1)
    assert rc == 2 and "too small for this text" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp files, the model untouched
    # a run killed earlier left its staging directory: the next run replaces it
    stale = tmp_path / ".fresh.incomplete"
    stale.mkdir()
    (stale / "junk").write_text("x")
    assert _tt(capsys, "--input", corpus_jsonl, "--vocab-size", 600, "--output-dir", tmp_path / "fresh",
               "--threads", 1)[0] == 0
    assert sorted(os.listdir(tmp_path / "fresh")) == ["tokenizer.model"] and not stale.exists()


def test_train_tokenizer_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HARPE_DEBUG", raising=False)
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    assert train_tokenizer.main(["--input", str(empty), "--output-dir", str(tmp_path / "o"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "no text in" in err and "Traceback" in err


def test_train_tokenizer_replaces_lone_surrogates(tmp_path, capsys):
    inp = tmp_path / "s.jsonl"
    inp.write_text("".join('{"text": "word %d and \\ud800 half a pair"}\n' % i for i in range(50)))
    rc, _, err = _tt(capsys, "--input", inp, "--vocab-size", 300, "--soft-vocab-limit", "--output-dir",
                     tmp_path / "o", "--threads", 1)
    assert rc == 0, err
