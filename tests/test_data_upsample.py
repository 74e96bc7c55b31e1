"""Per-source length upsampling and packing (harpe-upsample, Fu et al. 2024)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_harpe.data import upsample
from megatron_harpe.data.corpus import write_demo_corpus, write_source_files
from megatron_harpe.data.indexed import IndexedDatasetWriter, check_indexed_dataset, read_index
from megatron_harpe.data.tokenizer import load_tokenizer
from megatron_harpe.data.upsample import pack_stream, parse_count, select_documents
from tests.data_fixtures import *  # noqa: F401,F403

# ----------------------------------------------------------------------------- the algorithm alone


def _synthetic(seed=0):
    """3 sources with different length profiles, 60k documents: statistics without tokenizing."""
    rng = np.random.default_rng(seed)
    parts, srcs = [], []
    for s, (n, median) in enumerate([(30000, 600), (20000, 1500), (10000, 5000)]):
        parts.append(np.maximum(1, rng.lognormal(np.log(median), 1.0, n)).astype(np.int64))
        srcs.append(np.full(n, s))
    return np.concatenate(parts), np.concatenate(srcs), ["a", "b", "c"]


def test_selection_preserves_shares_and_keeps_short_docs_at_rate_p():
    lengths, sources, names = _synthetic()
    order, rep = select_documents(lengths, sources, names, threshold=4096, keep_prob=0.1, seed=1)
    cost = lengths + 1
    total = cost[order].sum()
    for s, name in enumerate(names):
        info = rep["per_source"][name]
        share_after = cost[order][sources[order] == s].sum() / total
        assert abs(share_after - info["share_before"]) < 0.01, (name, share_after, info["share_before"])
        # the Bernoulli filter keeps short documents at rate p (binomial: 4 sigma)
        n = info["short_documents_before"]
        assert abs(info["short_keep_rate"] - 0.1) < 4 * np.sqrt(0.1 * 0.9 / n)
    # no document repeats (the default budget needs no repetition) and long documents gained weight
    assert len(np.unique(order)) == order.size
    long_before = cost[lengths >= 4096].sum() / cost.sum()
    long_after = cost[order][lengths[order] >= 4096].sum() / total
    assert (1 - long_after) < 0.5 * (1 - long_before)  # short documents' token share at least halved
    # the binding source is used entirely: all its kept documents are in the output
    b = rep["binding_source"]
    assert rep["per_source"][b]["tokens_after_selection"] == rep["per_source"][b]["tokens_kept"]


def test_selection_is_deterministic_for_a_seed():
    lengths, sources, names = _synthetic()
    a, _ = select_documents(lengths, sources, names, seed=5)
    b, _ = select_documents(lengths, sources, names, seed=5)
    c, _ = select_documents(lengths, sources, names, seed=6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_explicit_budget_with_repetition():
    lengths, sources, names = _synthetic()
    cost = lengths + 1
    budget = int(cost.sum() * 1.5)  # more than all the documents: kept documents must repeat
    order, rep = select_documents(lengths, sources, names, keep_prob=0.1, seed=2, target_tokens=budget)
    assert abs(cost[order].sum() - budget) / budget < 0.01
    for s, name in enumerate(names):
        info = rep["per_source"][name]
        assert info["epochs"] > 1
        assert abs(cost[order][sources[order] == s].sum() / cost[order].sum() - info["share_before"]) < 0.01
    # a small budget subsamples instead
    order, rep = select_documents(lengths, sources, names, seed=2, target_tokens=1_000_000)
    assert abs((lengths[order] + 1).sum() - 1_000_000) / 1_000_000 < 0.02
    assert all(info["epochs"] < 1 for info in rep["per_source"].values())


def test_packing_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, 300)
    store = rng.integers(3, 1000, int(lengths.sum())).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum(lengths[:-1])])
    order = rng.permutation(300)
    w = IndexedDatasetWriter(str(tmp_path / "p"), np.uint16)
    res = pack_stream(store, offsets, lengths, order, eod=2, seq_len=64, writer=w,
                      doc_sources=np.zeros(300, dtype=np.int64), num_sources=1)
    w.commit()
    expected = np.concatenate([np.append(store[offsets[d]:offsets[d] + lengths[d]], 2) for d in order])
    full = expected.size // 64
    assert res["sequences"] == full and res["dropped_tail_tokens"] == expected.size - 64 * full
    idx = read_index(str(tmp_path / "p"))
    assert np.all(idx["sequence_lengths"] == 64)
    data = np.fromfile(tmp_path / "p.bin", dtype=np.uint16)
    assert np.array_equal(data, expected[:64 * full])
    assert res["tokens_per_source"][0] == 64 * full


def test_parse_count():
    assert parse_count("131072") == 131072 and parse_count("128k") == 128000
    assert parse_count("5B") == 5 * 10**9 and parse_count("1.5M") == 1_500_000 and parse_count("2e3") == 2000
    with pytest.raises(Exception):
        parse_count("lots")


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def up_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("up") / "corpus.jsonl"
    write_demo_corpus(path, 1200, seed=11, length_scale=0.25, long_words=(800, 3000))
    return str(path)


def _run(capsys, *argv):
    rc = upsample.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_end_to_end_shares_keep_rate_and_lengths(tmp_path, capsys, up_corpus, spm_model):
    prefix = tmp_path / "up"
    rc, out, err = _run(capsys, "--input", up_corpus, "--source-key", "meta.redpajama_set_name",
                        "--tokenizer-type", "sentencepiece", "--tokenizer-model", spm_model, "--seq-length", 1024,
                        "--short-threshold", 512, "--keep-prob", 0.2, "--seed", 3, "--output-prefix", prefix,
                        "--workers", 2)
    assert rc == 0, err
    assert out.startswith("harpe-upsample: done: 1,200 documents -> ")
    rep = json.loads((tmp_path / "up.report.json").read_text())
    tok = load_tokenizer("sentencepiece", spm_model)
    # packed lengths exact
    info = check_indexed_dataset(str(prefix))
    assert info["sequences"] == rep["sequences"] > 10
    assert np.all(read_index(str(prefix))["sequence_lengths"] == 1024)
    # tokens per source before/after in the report; shares kept, short documents kept at ~p
    per = rep["per_source"]
    assert set(per) >= {"RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaBook", "SyntheticPasskey"}
    assert sum(s["tokens_after"] for s in per.values()) == rep["tokens_after"] == 1024 * rep["sequences"]
    for name, s in per.items():
        assert abs(s["share_after"] - s["share_before"]) < 0.02, (name, s)
    shorts = sum(s["short_documents_before"] for s in per.values())
    kept = sum(s["short_documents_kept"] for s in per.values())
    assert shorts > 500 and abs(kept / shorts - 0.2) < 4 * np.sqrt(0.2 * 0.8 / shorts)
    # the stream is whole documents separated by EOD
    data = np.fromfile(f"{prefix}.bin", dtype=np.uint16)
    docs = {tuple(tok.encode(json.loads(line)["text"])) for line in open(up_corpus, encoding="utf-8")}
    pieces = np.split(data, np.flatnonzero(data == tok.eod) + 1)
    inner = [tuple(p[:-1].tolist()) for p in pieces[1:-1]]  # the first and last may be cut
    assert inner and all(p in docs for p in inner)
    # the summary table on stderr
    assert "tokens before" in err and "RedPajamaBook" in err


def test_deterministic_whatever_the_workers(tmp_path, capsys, up_corpus, spm_model):
    outs = []
    for i, (workers, seed) in enumerate([(0, 9), (2, 9), (1, 10)]):
        prefix = tmp_path / f"u{i}"
        rc, _, err = _run(capsys, "--input", up_corpus, "--source-key", "source", "--tokenizer-type", "sentencepiece",
                          "--tokenizer-model", spm_model, "--seq-length", 512, "--short-threshold", 300,
                          "--seed", seed, "--output-prefix", prefix, "--workers", workers, "--block-mb", 0.1)
        assert rc == 0, err
        outs.append(open(f"{prefix}.bin", "rb").read())
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_one_input_per_source_and_extra_token(tmp_path, capsys, spm_model):
    paths = write_source_files(tmp_path / "src", 400, seed=4, length_scale=0.2, long_words=(500, 1500))
    prefix = tmp_path / "per"
    # without --source-key every file is a source, named after the file
    rc, _, err = _run(capsys, "--input", str(tmp_path / "src" / "*.jsonl"), "--tokenizer-type", "huggingface",
                      "--tokenizer-model", _hf_dir(), "--seq-length", 256, "--add-extra-token", "--prepend-bos",
                      "--short-threshold", 200, "--keep-prob", 0.5, "--output-prefix", prefix, "--workers", 1)
    assert rc == 0, err
    rep = json.loads((tmp_path / "per.report.json").read_text())
    assert set(rep["per_source"]) == set(paths)
    assert np.all(read_index(str(prefix))["sequence_lengths"] == 257)
    # --source NAME=GLOB names them explicitly (two files into one source here)
    rc, _, err = _run(capsys, "--source", f"web={paths['commoncrawl']}", "--source", f"web={paths['c4']}",
                      "--source", f"books={paths['book']}", "--tokenizer-type", "huggingface",
                      "--tokenizer-model", _hf_dir(), "--seq-length", 256, "--short-threshold", 200,
                      "--output-prefix", tmp_path / "named", "--workers", 0)
    assert rc == 0, err
    rep = json.loads((tmp_path / "named.report.json").read_text())
    assert set(rep["per_source"]) == {"web", "books"}


_HF = {}


@pytest.fixture(autouse=True)
def _remember_hf(hf_tokenizer_dir):
    _HF["dir"] = hf_tokenizer_dir


def _hf_dir():
    return _HF["dir"]
