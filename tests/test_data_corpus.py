"""The generated demo corpus (megatron_harpe.data.corpus)."""
from __future__ import annotations

import collections
import gzip
import hashlib
import json
import random
import re

from megatron_harpe.data.corpus import (SOURCES, generate_documents, needle_document, passkey_document,
                                        write_demo_corpus, write_source_files)


def _sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_deterministic_and_seed_dependent(tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    write_demo_corpus(a, 60, seed=3, length_scale=0.2)
    write_demo_corpus(b, 60, seed=3, length_scale=0.2)
    write_demo_corpus(c, 60, seed=4, length_scale=0.2)
    assert _sha(a) == _sha(b)
    assert _sha(a) != _sha(c)
    # a prefix of a longer corpus is the shorter corpus (documents are seeded one by one)
    d = tmp_path / "d.jsonl"
    write_demo_corpus(d, 80, seed=3, length_scale=0.2)
    assert d.read_text().splitlines()[:60] == a.read_text().splitlines()


def test_gzip_output_is_deterministic(tmp_path):
    a, b = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    write_demo_corpus(a, 20, seed=1, length_scale=0.1)
    write_demo_corpus(b, 20, seed=1, length_scale=0.1)
    assert _sha(a) == _sha(b)
    with gzip.open(a, "rt", encoding="utf-8") as f:
        assert len([json.loads(line) for line in f]) == 20


def test_records_sources_lengths_and_text(tmp_path):
    path = tmp_path / "c.jsonl"
    stats = write_demo_corpus(path, 600, seed=0, length_scale=0.3)
    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(recs) == 600 == stats["documents"]
    names = {s.name for s in SOURCES}
    by_source = collections.Counter(r["source"] for r in recs)
    assert set(by_source) >= names | {"passkey"}  # every regular source shows up
    assert stats["per_source"] == dict(sorted(by_source.items()))
    for r in recs:
        assert set(r) >= {"id", "text", "source", "meta"}
        assert r["meta"]["redpajama_set_name"].startswith(("RedPajama", "Synthetic"))
        assert r["text"].strip()
    words = [len(r["text"].split()) for r in recs]
    assert min(words) < 60 and max(words) > 1000       # varied lengths, some long documents
    # books and arxiv papers are long on average, c4 pages short
    mean = {s: sum(len(r["text"].split()) for r in recs if r["source"] == s) / by_source[s] for s in ("book", "c4")}
    assert mean["book"] > 5 * mean["c4"]
    # English-like: sentences start with capitals and end with punctuation, common words dominate
    text = " ".join(r["text"] for r in recs if r["source"] == "commoncrawl")
    top = [w for w, _ in collections.Counter(text.lower().split()).most_common(5)]
    assert "the" in top
    assert re.search(r"[A-Z][a-z]+ [a-z]+ .*?[.!?]", text)


def test_passkey_and_needle_documents():
    rng = random.Random(0)
    text, key = passkey_document(rng, 200, depth=0.5, passkey=71432)
    assert key == "71432"
    assert "The pass key is 71432. Remember it." in text
    assert text.endswith("The pass key is 71432.")
    i = text.index("The pass key is 71432. Remember it.")
    assert 0.3 < i / len(text) < 0.7  # buried in the middle for depth 0.5
    prompt, key2 = passkey_document(random.Random(1), 50, with_answer=False)
    assert prompt.endswith("The pass key is") and key2 in prompt
    text, key, value = needle_document(random.Random(2), 40, depth=0.0)
    assert f"special magic numbers for {key} is: {value}." in text and text.endswith(f"{value}.")
    recs = list(generate_documents(300, seed=5, length_scale=0.1, passkey_fraction=0.1, needle_fraction=0.1))
    pk = [r for r in recs if r["source"] == "passkey"]
    nd = [r for r in recs if r["source"] == "needle"]
    assert pk and nd
    assert all(f"The pass key is {r['answer']}. Remember it." in r["text"] for r in pk)
    assert all(f"{r['key']} is: {r['answer']}." in r["text"] for r in nd)


def test_one_file_per_source(tmp_path):
    paths = write_source_files(tmp_path / "src", 120, seed=0, length_scale=0.1)
    assert "commoncrawl" in paths
    for name, p in paths.items():
        lines = open(p, encoding="utf-8").read().splitlines()
        assert lines and all(json.loads(x)["source"] == name for x in lines)
