"""Corpora as they are published: .jsonl.zst (SlimPajama's chunks) and Parquet (Hugging Face datasets).

The files are written here with the libraries themselves (zstandard, pyarrow) from the same
documents as a .jsonl file, and every tool must treat them exactly as the jsonl: byte-identical
harpe-preprocess outputs with several workers, the same harpe-upsample selection and report, the
same trained tokenizer; and their bad forms (truncated, corrupt, a column missing or of another
type, a null) end with exit code 2, a message naming the file, and nothing left behind.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import zstandard

from megatron_harpe.data import preprocess, train_tokenizer, upsample
from megatron_harpe.data.inputs import CorruptInputError, open_binary
from megatron_harpe.data.parquet_input import ParquetSlice, iter_parquet_tasks
from tests.data_fixtures import *  # noqa: F401,F403

NULL_TEXT_ROW = 7        # a record whose text is null (a bad line/row in every format)
NULL_SOURCE_ROW = 11     # a record whose meta.redpajama_set_name is null (a bad source)
EMPTY_TEXT_ROW = 13      # an empty text (an empty document, counted and skipped)
SOURCE_KEY = "meta.redpajama_set_name"


def _records(corpus: str) -> list[dict]:
    """The corpus records with the same fields in every row (Parquet needs one schema), and the three
    special rows above."""
    out = []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            out.append({"id": r["id"], "meta": {"redpajama_set_name": r["meta"]["redpajama_set_name"]},
                        "text": r["text"]})
    out[NULL_TEXT_ROW]["text"] = None
    out[NULL_SOURCE_ROW]["meta"]["redpajama_set_name"] = None
    out[EMPTY_TEXT_ROW]["text"] = ""
    return out


BLOCK_MB = 0.0625           # 64 KB blocks: many work items from a 1.5 MB corpus
ROW_GROUPS = [4] * 10 + [150] + [7] * 20 + [70]   # small ones (grouped, read by the workers) and large ones
#                                                   (read by the main process in batches)


@pytest.fixture(scope="module")
def formats(tmp_path_factory, corpus_jsonl) -> dict:
    """The same documents as .jsonl, .jsonl.zst (many frames, cut mid-line; and one frame) and Parquet
    (row groups of ROW_GROUPS rows, ``meta`` a struct column)."""
    d = tmp_path_factory.mktemp("formats")
    records = _records(corpus_jsonl)
    raw = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    paths = {"jsonl": d / "docs.jsonl", "zst": d / "many" / "docs.jsonl.zst", "zst1": d / "one" / "docs.jsonl.zst",
             "parquet": d / "docs.parquet"}
    paths["jsonl"].write_bytes(raw)
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
    frame = 50_000  # frames end in the middle of lines: reading must go on across them
    frames = [cctx.compress(raw[i:i + frame]) for i in range(0, len(raw), frame)]
    assert len(frames) > 10
    for key, data in (("zst", b"".join(frames)), ("zst1", cctx.compress(raw))):
        paths[key].parent.mkdir()
        paths[key].write_bytes(data)
    table = pa.Table.from_pylist(records)
    assert pa.types.is_struct(table.schema.field("meta").type) and sum(ROW_GROUPS) == table.num_rows
    with pq.ParquetWriter(paths["parquet"], table.schema) as w:
        start = 0
        for n in ROW_GROUPS:
            w.write_table(table.slice(start, n))
            start += n
    # both ways a row group becomes work: slices of small row groups, batches of a large one
    tasks = list(iter_parquet_tasks(str(paths["parquet"]), ["text"], SOURCE_KEY, int(BLOCK_MB * (1 << 20)), [0]))
    kinds = [type(t).__name__ for _, t in tasks]
    assert kinds.count("ArrowBlock") > 4 and kinds.count("ParquetSlice") > 4
    assert any(len(t.row_groups) > 1 for _, t in tasks if isinstance(t, ParquetSlice))
    assert [r for r, _ in tasks] == list(np.cumsum([0] + [t.rows for _, t in tasks])[:-1])
    return {k: str(v) for k, v in paths.items()}


def _main(capsys, tool, argv) -> tuple[int, str, str]:
    rc = tool.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _untimed(summary: str) -> str:
    return re.sub(r", [0-9.]+ s \(.*\)$", "", summary.strip())


def test_preprocess_outputs_are_byte_identical_across_formats(tmp_path, capsys, formats, spm_model):
    outputs, summaries = {}, {}
    for kind, path in formats.items():
        prefix = tmp_path / kind
        rc, out, err = _main(capsys, preprocess, [
            "--input", path, "--json-keys", "text", SOURCE_KEY, "--tokenizer-type", "sentencepiece",
            "--tokenizer-model", spm_model, "--output-prefix", prefix, "--workers", 2, "--append-eod",
            "--skip-bad-lines", "--block-mb", BLOCK_MB, "--no-progress"])
        assert rc == 0, err
        summaries[kind] = _untimed(out)
        outputs[kind] = {p.name.replace(kind, "X"): p.read_bytes() for p in sorted(tmp_path.glob(f"{kind}_*"))}
        where = f"{path}: row {NULL_TEXT_ROW}" if kind == "parquet" else f"{path}:{NULL_TEXT_ROW + 1}"
        assert f"skipped bad line {where}:" in err
    assert len(outputs["jsonl"]) == 4     # .bin/.idx for the text and for the struct field meta.redpajama_set_name
    for kind in formats:
        assert outputs[kind] == outputs["jsonl"], kind
        assert summaries[kind] == summaries["jsonl"], kind
    # two bad rows (null text, null meta field: a document needs every key), one empty text
    assert "2 bad lines (2 not a string), 1 empty documents skipped" in summaries["jsonl"]


def _report(prefix: Path) -> dict:
    report = json.loads(Path(f"{prefix}.report.json").read_text())
    for k in ("inputs", "seconds", "output_prefix"):
        report.pop(k)
    return report


def test_upsample_is_the_same_from_every_format(tmp_path, capsys, formats, spm_model):
    common = ["--tokenizer-type", "sentencepiece", "--tokenizer-model", spm_model, "--seq-length", 2048,
              "--short-threshold", 800, "--keep-prob", 0.5, "--workers", 2, "--skip-bad-lines", "--block-mb", BLOCK_MB,
              "--no-progress"]
    results = {}
    for kind in ("jsonl", "zst", "parquet"):
        prefix = tmp_path / kind
        rc, out, err = _main(capsys, upsample, ["--input", formats[kind], "--source-key", SOURCE_KEY,
                                                "--output-prefix", prefix, *common])
        assert rc == 0, err
        results[kind] = (Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes(), _report(prefix))
    jsonl = results["jsonl"]
    assert len(jsonl[2]["per_source"]) >= 7 and jsonl[2]["bad_lines"] == 2
    for kind in ("zst", "parquet"):
        assert results[kind] == jsonl, kind
    # without --source-key a file is a source, named without its extensions, whatever its format
    rc, _, err = _main(capsys, upsample, ["--input", formats["parquet"], formats["zst"], "--output-prefix",
                                          tmp_path / "byfile", *common])
    assert rc == 0, err
    assert sorted(_report(tmp_path / "byfile")["per_source"]) == ["docs"]


def _spm_vocab(path: str) -> list:
    m = spm.SentencePieceProcessor(model_file=path)
    return [(m.id_to_piece(i), m.get_score(i)) for i in range(m.get_piece_size())]


def test_train_tokenizer_reads_zst_and_parquet(tmp_path, capsys, formats, corpus_jsonl):
    models = {}
    for kind in ("jsonl", "zst", "parquet"):
        rc, out, err = _main(capsys, train_tokenizer, ["--input", formats[kind], "--vocab-size", 400, "--output-dir",
                                                       tmp_path / kind, "--threads", 1, "--max-lines", 3000])
        assert rc == 0, err
        models[kind] = str(tmp_path / kind / "tokenizer.model")
    with open(corpus_jsonl, encoding="utf-8") as f:
        probes = [json.loads(line)["text"] for _, line in zip(range(50), f)] + ["The pass key is 71432.", "x  y\tz"]
    ref = spm.SentencePieceProcessor(model_file=models["jsonl"])
    for kind in ("zst", "parquet"):
        # the model files differ only in where they were trained (the trainer records its temporary path)
        assert _spm_vocab(models[kind]) == _spm_vocab(models["jsonl"]), kind
        other = spm.SentencePieceProcessor(model_file=models[kind])
        assert [other.encode(t) for t in probes] == [ref.encode(t) for t in probes], kind


def test_zstd_reader_reads_frames_and_skippable_frames(tmp_path):
    cctx = zstandard.ZstdCompressor()
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    path = tmp_path / "x.jsonl.zst"
    path.write_bytes(skippable + cctx.compress(b'{"text": "a"}\n{"te') + cctx.compress(b'xt": "b"}\n'))
    with open_binary(str(path)) as f:
        assert list(f) == [b'{"text": "a"}\n', b'{"text": "b"}\n']


# ----------------------------------------------------------------------------- bad inputs


def _bad_zst(kind: str, raw: bytes) -> bytes:
    cctx = zstandard.ZstdCompressor(write_checksum=True)
    halves = cctx.compress(raw[: len(raw) // 2]) + cctx.compress(raw[len(raw) // 2:])
    if kind == "truncated":
        return halves[: len(halves) * 3 // 4]
    if kind == "corrupt":          # flipped bits in the compressed data: the checksum or the decoder finds them
        b = bytearray(halves)
        for i in range(len(b) // 3, len(b) // 3 + 40):
            b[i] ^= 0x55
        return bytes(b)
    if kind == "trailing garbage":
        return halves + b"not zstd"
    raise AssertionError(kind)


def _bad_parquet(kind: str, path: Path, good: str) -> None:
    if kind == "truncated":
        data = Path(good).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "corrupt page":   # uncompressed pages with checksums: flipped bytes are found, in a worker
        pq.write_table(pa.table({"text": [f"document {i} " * 50 for i in range(200)]}), path, row_group_size=20,
                       compression="none", write_page_checksum=True)
        b = bytearray(path.read_bytes())
        for i in range(len(b) // 2, len(b) // 2 + 16):
            b[i] ^= 0x55
        path.write_bytes(bytes(b))
    elif kind == "missing column":
        pq.write_table(pa.table({"body": ["some text"]}), path)
    elif kind == "not a string":
        pq.write_table(pa.table({"text": [1, 2, 3]}), path)
    elif kind == "null row":
        pq.write_table(pa.table({"text": ["a document", None, "another"]}), path)
    elif kind == "dotted key into a string column":
        pq.write_table(pa.table({"text": ["a document"], "meta": ['{"redpajama_set_name": "x"}']}), path)
    else:
        raise AssertionError(kind)


BAD_ZST = {"truncated": "the zstd data ends inside a frame", "corrupt": "corrupt zstd data",
           "trailing garbage": "corrupt zstd data"}
BAD_PARQUET = {"truncated": "not a readable Parquet file", "corrupt page": "(a truncated or corrupt Parquet file?",
               "missing column": "no column 'text' (columns: ['body'])",
               "not a string": "column 'text' holds int64 values, not strings; choose the text column with --json-keys",
               "null row": "row 1: column 'text' is null, not a string",
               "dotted key into a string column": "column 'meta' holds string, not a struct"}


def _leftovers(out_dir: Path) -> list:
    return sorted(p.name for p in out_dir.rglob("*")) if out_dir.exists() else []


@pytest.mark.parametrize("fmt,kind", [("zst", k) for k in BAD_ZST] + [("parquet", k) for k in BAD_PARQUET])
def test_bad_zst_and_parquet_exit_2_naming_the_file(tmp_path, capsys, formats, spm_model, fmt, kind):
    if fmt == "zst":
        bad = tmp_path / "bad.jsonl.zst"
        bad.write_bytes(_bad_zst(kind, Path(formats["jsonl"]).read_bytes()))
        expected = BAD_ZST[kind]
    else:
        bad = tmp_path / "bad.parquet"
        _bad_parquet(kind, bad, formats["parquet"])
        expected = BAD_PARQUET[kind]
    dotted = kind == "dotted key into a string column"
    source = ["--source-key", SOURCE_KEY] if dotted else []
    runs = [
        (preprocess, ["--input", bad, "--json-keys", *(["text", SOURCE_KEY] if dotted else ["text"]),
                      "--tokenizer-type", "sentencepiece", "--tokenizer-model", spm_model,
                      "--output-prefix", tmp_path / "out" / "p", "--workers", 2, "--no-progress"]),
        (upsample, ["--input", bad, *source, "--tokenizer-type", "sentencepiece", "--tokenizer-model", spm_model,
                    "--seq-length", 64, "--output-prefix", tmp_path / "out" / "u", "--workers", 1, "--no-progress"]),
    ]
    if kind not in ("null row", "dotted key into a string column"):  # the trainer passes over nulls; has no source
        runs.append((train_tokenizer, ["--input", bad, "--vocab-size", 300, "--output-dir", tmp_path / "out" / "tok"]))
    for tool, argv in runs:
        rc, out, err = _main(capsys, tool, argv)
        assert rc == 2, (tool.PROG, err)
        assert str(bad) in err and expected in err, (tool.PROG, err)
        assert "Traceback" not in err and err.count(f"{tool.PROG}: error:") == 1, err
        assert _leftovers(tmp_path / "out") == [], tool.PROG     # not even the output directory
    if kind == "null row":   # a bad row like a bad line: --skip-bad-lines counts and skips it
        rc, out, err = _main(capsys, preprocess, runs[0][1] + ["--skip-bad-lines"])
        assert rc == 0 and "2 documents" in out and "1 bad lines (1 not a string)" in out


def test_invalid_utf8_in_a_parquet_string_column(tmp_path, capsys, spm_model):
    # pyarrow does not check that a Parquet string column is UTF-8; a careless writer can store anything
    values = [b"good text", b"bad \xff byte", b"more text"]
    offsets = np.cumsum([0] + [len(v) for v in values], dtype=np.int32)
    array = pa.Array.from_buffers(pa.string(), 3, [None, pa.py_buffer(offsets.tobytes()),
                                                   pa.py_buffer(b"".join(values))])
    bad = tmp_path / "utf8.parquet"
    pq.write_table(pa.table({"text": array}), bad)
    argv = ["--input", bad, "--tokenizer-type", "sentencepiece", "--tokenizer-model", spm_model,
            "--output-prefix", tmp_path / "out" / "p", "--workers", 1, "--no-progress"]
    rc, out, err = _main(capsys, preprocess, argv)
    assert rc == 2 and f"{bad}: row 1: column 'text': invalid UTF-8 (byte 0xff" in err
    assert "--replace-invalid-utf8" in err and _leftovers(tmp_path / "out") == []
    rc, out, err = _main(capsys, preprocess, argv + ["--replace-invalid-utf8", "--stats-json", tmp_path / "s.json"])
    assert rc == 0 and "3 documents" in out
    assert json.loads((tmp_path / "s.json").read_text())["invalid_utf8_replaced"] == 1


def test_corrupt_input_error_says_what_to_do(tmp_path):
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "a"}\n' * 1000)[:-5])
    with pytest.raises(CorruptInputError) as info, open_binary(str(path)) as f:
        f.read()
    assert str(path) in str(info.value) and "download it again" in str(info.value)
    assert os.path.basename(str(path)) in str(info.value)
