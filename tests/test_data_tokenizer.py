"""Tokenizers (megatron_harpe.data.tokenizer) and harpe-train-tokenizer, on real models trained here."""
from __future__ import annotations

import json
import os
import pickle
import random

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer

from megatron_harpe.data import train_tokenizer
from megatron_harpe.data.tokenizer import (HuggingFaceTokenizer, SentencePieceTokenizer, TokenizerError,
                                           load_tokenizer, token_dtype)
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
    # a tokenizer.json handed to the sentencepiece loader says what to do instead
    with pytest.raises(TokenizerError, match="--tokenizer-type huggingface"):
        load_tokenizer("sentencepiece", os.path.join(hf_tokenizer_dir, "tokenizer.json"))
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
