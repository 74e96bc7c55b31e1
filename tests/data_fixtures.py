"""Shared data fixtures: a generated corpus and two real tokenizers trained on it.

Import the fixtures into a test module with ``from tests.data_fixtures import *``. They are
session-scoped, and the builders below are memoised, so the corpus and the tokenizers are
made once per test session however many modules use them (a few seconds in all).

- ``corpus_jsonl``: 400 documents of the demo corpus (7 sources + passkey/needle), ~1.5 MB
- ``spm_model``: a Llama-2-like sentencepiece model (BPE, byte fallback, vocab 1000)
- ``hf_tokenizer_dir``: a Llama-3-like byte-level BPE tokenizer.json (vocab 1000), trained
  with the ``tokenizers`` library, with tokenizer_config.json naming BOS/EOS
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from megatron_harpe.data.corpus import write_demo_corpus
from megatron_harpe.data.train_tokenizer import iter_training_lines, train_huggingface, train_sentencepiece

__all__ = ["corpus_jsonl", "spm_model", "hf_tokenizer_dir", "data_dir", "make_corpus", "CORPUS_DOCS"]

CORPUS_DOCS = 400
CORPUS_KW = dict(length_scale=0.25, long_words=(1500, 5000))


@functools.lru_cache(maxsize=None)
def make_corpus(base: str, num_docs: int = CORPUS_DOCS, seed: int = 0) -> str:
    path = os.path.join(base, f"corpus-{num_docs}-{seed}.jsonl")
    if not os.path.exists(path):
        write_demo_corpus(path, num_docs, seed, **CORPUS_KW)
    return path


@functools.lru_cache(maxsize=None)
def _spm(base: str) -> str:
    corpus = make_corpus(base)
    return train_sentencepiece(iter_training_lines([corpus], ["text"]), os.path.join(base, "spm"), 1000, threads=2)


@functools.lru_cache(maxsize=None)
def _hf(base: str) -> str:
    corpus = make_corpus(base)
    path = train_huggingface(iter_training_lines([corpus], ["text"]), os.path.join(base, "hf"), 1000)
    return os.path.dirname(path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp() / "harpe-data-shared"
    base.mkdir(exist_ok=True)
    return base


@pytest.fixture(scope="session")
def corpus_jsonl(data_dir) -> str:
    return make_corpus(str(data_dir))


@pytest.fixture(scope="session")
def spm_model(data_dir) -> str:
    return _spm(str(data_dir))


@pytest.fixture(scope="session")
def hf_tokenizer_dir(data_dir) -> str:
    return _hf(str(data_dir))
