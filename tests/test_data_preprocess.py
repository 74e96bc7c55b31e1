"""harpe-preprocess: jsonl -> .bin/.idx that megatron-core reads, with the tokenizer's exact ids."""
from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_harpe.data import preprocess
from megatron_harpe.data.indexed import check_indexed_dataset, read_index
from megatron_harpe.data.tokenizer import load_tokenizer
from tests.data_fixtures import *  # noqa: F401,F403

REPO = Path(__file__).resolve().parents[1]


def _records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _run(capsys, *argv):
    rc = preprocess.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _megatron_dataset(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset(str(prefix), multimodal=False, mmap=True)


@pytest.mark.parametrize("kind", ["sentencepiece", "huggingface"])
def test_round_trip_through_megatron_indexed_dataset(tmp_path, capsys, corpus_jsonl, spm_model, hf_tokenizer_dir,
                                                    kind):
    model = spm_model if kind == "sentencepiece" else hf_tokenizer_dir
    prefix = tmp_path / "out"
    rc, out, err = _run(capsys, "--input", corpus_jsonl, "--tokenizer-type", kind, "--tokenizer-model", model,
                        "--output-prefix", prefix, "--workers", 2, "--append-eod")
    assert rc == 0, err
    tok = load_tokenizer(kind, model)
    recs = _records(corpus_jsonl)
    ds = _megatron_dataset(f"{prefix}_text_document")
    assert len(ds) == len(recs)
    assert ds.index.dtype == np.uint16  # vocab 1000
    for i, rec in enumerate(recs):
        ids = ds[i].tolist()
        assert ids[-1] == tok.eod
        assert ids[:-1] == tok.encode(rec["text"])          # exactly the tokenizer's own ids
        assert tok.decode(ids[:-1]) == rec["text"]          # and the text comes back
    # the summary line and the output line
    assert out.startswith("harpe-preprocess: done: 400 documents, ")
    n_tokens = sum(len(tok.encode(r["text"])) + 1 for r in recs)
    assert f"{n_tokens:,} tokens, 0 bad lines" in out and "docs/s" in out and "tokens/s" in out
    # how to train on it, in harpe-train's own words (config keys; harpe-train has no --data-path)
    assert f"data.kind=indexed 'data.blend=[{prefix}_text_document]' data.tokenizer_model={model}" in err
    assert "--data-path" not in err
    assert check_indexed_dataset(f"{prefix}_text_document")["tokens"] == n_tokens
    assert not list(tmp_path.glob("*incomplete*"))


def test_same_bytes_whatever_the_workers(tmp_path, capsys, corpus_jsonl, spm_model):
    outs = []
    for workers in (0, 1, 2):
        prefix = tmp_path / f"w{workers}"
        # small blocks so that several blocks are in flight
        rc, _, err = _run(capsys, "--input", corpus_jsonl, "--tokenizer-type", "sentencepiece", "--tokenizer-model",
                          spm_model, "--output-prefix", prefix, "--workers", workers, "--block-mb", "0.1")
        assert rc == 0, err
        outs.append([open(f"{prefix}_text_document.{ext}", "rb").read() for ext in ("bin", "idx")])
    assert outs[0] == outs[1] == outs[2]
    # and the word cache changes nothing
    rc, _, _ = _run(capsys, "--input", corpus_jsonl, "--tokenizer-type", "sentencepiece", "--tokenizer-model",
                    spm_model, "--output-prefix", tmp_path / "nc", "--workers", 1, "--no-word-cache")
    assert [open(f"{tmp_path}/nc_text_document.{ext}", "rb").read() for ext in ("bin", "idx")] == outs[0]


def test_index_matches_megatron_core_writer(tmp_path, capsys, corpus_jsonl, spm_model):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    rc, _, _ = _run(capsys, "--input", corpus_jsonl, "--tokenizer-type", "sentencepiece", "--tokenizer-model",
                    spm_model, "--output-prefix", tmp_path / "ours", "--workers", 1, "--append-eod")
    assert rc == 0
    tok = load_tokenizer("sentencepiece", spm_model)
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for rec in _records(corpus_jsonl):
        ids = tok.encode(rec["text"]) + [tok.eod]
        builder.add_document(ids, [len(ids)])
    builder.finalize(str(tmp_path / "ref.idx"))
    for ext in ("bin", "idx"):
        assert open(tmp_path / f"ours_text_document.{ext}", "rb").read() == open(tmp_path / f"ref.{ext}", "rb").read()


def test_gzip_globs_several_files_and_keys(tmp_path, capsys, corpus_jsonl, spm_model):
    recs = _records(corpus_jsonl)[:60]
    d = tmp_path / "in"
    d.mkdir()
    for i in range(3):
        part = recs[i * 20:(i + 1) * 20]
        data = "".join(json.dumps({**r, "title": r["source"].upper(), "meta": {"n": r["id"]}}) + "\n" for r in part)
        if i == 1:
            with gzip.open(d / f"part{i}.jsonl.gz", "wt", encoding="utf-8") as f:
                f.write(data)
        else:
            (d / f"part{i}.jsonl").write_text(data, encoding="utf-8")
    prefix = tmp_path / "multi"
    rc, out, err = _run(capsys, "--input", str(d / "part0.jsonl"), str(d / "part[12]*"), "--json-keys", "text", "title",
                        "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", spm_model,
                        "--output-prefix", prefix, "--workers", 1, "--prepend-bos")
    assert rc == 0, err
    tok = load_tokenizer("sentencepiece", spm_model)
    text_ds = _megatron_dataset(f"{prefix}_text_document")
    title_ds = _megatron_dataset(f"{prefix}_title_document")
    assert len(text_ds) == len(title_ds) == 60
    for i, r in enumerate(recs):       # file order, then line order
        assert text_ds[i].tolist() == [tok.bos] + tok.encode(r["text"])
        assert title_ds[i].tolist() == [tok.bos] + tok.encode(r["source"].upper())


def test_progress_lines_and_stats_json(tmp_path, capsys, corpus_jsonl, spm_model):
    stats = tmp_path / "stats.json"
    rc, out, err = _run(capsys, "--input", corpus_jsonl, "--tokenizer-type", "sentencepiece", "--tokenizer-model",
                        spm_model, "--output-prefix", tmp_path / "p", "--workers", 1, "--log-interval", 100,
                        "--block-mb", "0.1", "--stats-json", stats)
    assert rc == 0
    progress = [line for line in err.splitlines() if "docs/s" in line and "tokens/s" in line]
    assert len(progress) >= 2  # stderr is not a terminal here: a line every --log-interval documents
    s = json.loads(stats.read_text())
    assert s["documents"] == 400 and s["bad_lines"] == 0 and s["tokens"] > 0 and s["seconds"] > 0


def test_gpt_dataset_builds_samples(tmp_path, capsys, corpus_jsonl, spm_model):
    from megatron_harpe.data.gpt_dataset import build_gpt_datasets
    prefix = tmp_path / "gpt"
    assert _run(capsys, "--input", corpus_jsonl, "--tokenizer-type", "sentencepiece", "--tokenizer-model", spm_model,
                "--output-prefix", prefix, "--workers", 1, "--append-eod")[0] == 0
    tok = load_tokenizer("sentencepiece", spm_model)
    train, valid, test = build_gpt_datasets([f"{prefix}_text_document"], seq_length=256,
                                            num_samples=(40, 5, None), split="90,10,0",
                                            cache_dir=str(tmp_path / "cache"), seed=7,
                                            vocab_size=tok.vocab_size, eod_id=tok.eod_id)
    assert test is None and len(train) >= 40 and len(valid) >= 5
    ds = _megatron_dataset(f"{prefix}_text_document")  # keep it alive: its arrays view its mmap
    stream = np.concatenate([np.array(ds[i]) for i in range(len(ds))])
    for i in range(5):
        s = train[i]
        tokens, labels = s["tokens"].numpy(), s["labels"].numpy()
        assert tokens.shape == labels.shape == (256,)
        assert np.array_equal(tokens[1:], labels[:-1])       # next-token labels
        assert tokens.max() < tok.vocab_size
        # every sample is a window of the documents (GPTDataset samples across documents)
        assert any(np.array_equal(stream[j:j + 8], tokens[:8]) for j in np.flatnonzero(stream == tokens[0]))


def test_console_script_and_tools_wrapper(tmp_path, corpus_jsonl, spm_model):
    script = Path(sys.executable).parent / "harpe-preprocess"   # installed beside the interpreter
    if not script.exists():
        script = shutil.which("harpe-preprocess")
    assert script, "harpe-preprocess is not installed (pip install -e .)"
    for cmd in ([str(script)], [sys.executable, str(REPO / "tools" / "preprocess_data.py")]):
        prefix = tmp_path / Path(cmd[-1]).stem
        proc = subprocess.run(cmd + ["--input", corpus_jsonl, "--tokenizer-type", "sentencepiece",
                                     "--tokenizer-model", spm_model, "--output-prefix", str(prefix), "--workers", "1"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "harpe-preprocess: done: 400 documents" in proc.stdout
        assert read_index(f"{prefix}_text_document")["sequence_lengths"].size == 400


def test_progress_bar_on_a_terminal():
    import io
    from megatron_harpe.data.pipeline import Progress

    class FakeTTY(io.StringIO):
        def isatty(self):
            return True

    stream = FakeTTY()
    p = Progress(total_bytes=1000, stream=stream, prog="harpe-preprocess")
    assert p.bar is not None
    p.update(500, 10, 1000)
    p.update(1000, 10, 1000)
    p.close()
    shown = stream.getvalue()
    assert "harpe-preprocess" in shown and "docs/s" in shown and "tokens/s" in shown and "100%" in shown


def test_benchmark_script_runs(tmp_path):
    """tools/bench_preprocess.py on a tiny corpus without Megatron-LM (the figures are in docs/data.md)."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_preprocess.py"), "--megabytes", "0.3",
                           "--workers", "1", "--tokenizers", "sentencepiece", "--vocab-size", "500",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ours tok/s" in proc.stdout
    row = json.loads(out.read_text())["results"][0]
    assert row["tokenizer"] == "sentencepiece" and row["ours"]["tokens_per_s"] > 0 and "megatron" not in row


def test_the_printed_training_hint_is_what_harpe_train_accepts(tmp_path, capsys, corpus_jsonl, spm_model):
    """issue 13: the tools said "train with --data-path ...", which harpe-train rejects; the hint now gives
    harpe-train's config keys, and the config loader takes them as printed."""
    import shlex

    from megatron_harpe.config.loader import load_config
    from megatron_harpe.config.schema import parse_blend

    prefix = tmp_path / "out"
    rc, _, err = _run(capsys, "--input", corpus_jsonl, "--tokenizer-type", "sentencepiece", "--tokenizer-model",
                      spm_model, "--output-prefix", prefix, "--workers", 0, "--no-progress")
    assert rc == 0, err
    hint = next(line for line in err.splitlines() if "train on it with: harpe-train" in line)
    overrides = shlex.split(hint.split("--config CONFIG.yaml", 1)[1])
    cfg = load_config(None, overrides)
    assert cfg.data.kind == "indexed" and parse_blend(cfg.data.blend)[0] == [f"{prefix}_text_document"]
    assert cfg.data.tokenizer_model == spm_model
