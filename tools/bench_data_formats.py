#!/usr/bin/env python
"""Benchmark harpe-preprocess on the same corpus as .jsonl, .jsonl.gz, .jsonl.zst and Parquet, in one run.

    python tools/bench_data_formats.py [--megabytes 20] [--workers 2] [--repeat 2]

Why: the formats are read by the main process and fed to the workers as blocks (see
megatron_harpe/data/pipeline.py); this measures what that costs against plain jsonl. The corpus is
generated here (the demo corpus's records: id, source, meta, text) and written four ways: plain
jsonl, gzip (level 6), zstd (level 3, one frame, as the zstd command and SlimPajama's chunks),
Parquet with pyarrow's defaults (snappy, a row group per million rows: this corpus is a single row
group, read by the main process a batch at a time) and Parquet as Hugging Face datasets writes it
(``hf.parquet``: row groups of 1,000 rows, which the workers read themselves). The tokenizer is trained here (a Llama-2-like sentencepiece model) unless one is given.
Each format runs ``--repeat`` times, the formats taking turns so that the load of the machine meets
them alike; best of N. Printed per format: file size, end-to-end tokens/s (the wall time a user waits,
start-up included), the CPU seconds of the tool and its workers (what a loaded machine's timings
hide), the ratio to jsonl, the throughput of the reader alone (uncompressed MB/s of
the main process's reading, no tokenizing) and whether the outputs are byte-identical to jsonl's.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_harpe.data.corpus import generate_documents  # noqa: E402
from megatron_harpe.data.indexed import read_index  # noqa: E402
from megatron_harpe.data.inputs import open_binary  # noqa: E402
from megatron_harpe.data.parquet_input import ParquetSlice, iter_parquet_tasks, read_slice  # noqa: E402
from megatron_harpe.data.train_tokenizer import iter_training_lines, train_sentencepiece  # noqa: E402

FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "hf.parquet")


def write_formats(work: str, megabytes: float, seed: int = 0) -> dict:
    """The same records in the four formats; returns {format: path} and the counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    records, size = [], 0
    for rec in generate_documents(10**9, seed=seed):
        rec = {"id": rec["id"], "source": rec["source"], "meta": rec["meta"], "text": rec["text"]}
        records.append(rec)
        size += len(json.dumps(rec, ensure_ascii=False).encode("utf-8")) + 1
        if size >= megabytes * 1e6:
            break
    raw = b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records)
    paths = {f: os.path.join(work, f"corpus.{f}") for f in FORMATS}
    with open(paths["jsonl"], "wb") as f:
        f.write(raw)
    with open(paths["jsonl.gz"], "wb") as f:
        f.write(gzip.compress(raw, compresslevel=6, mtime=0))
    with open(paths["jsonl.zst"], "wb") as f:
        f.write(zstandard.ZstdCompressor(level=3, write_checksum=True).compress(raw))
    table = pa.Table.from_pylist(records)
    pq.write_table(table, paths["parquet"])
    pq.write_table(table, paths["hf.parquet"], row_group_size=1000)  # the row groups datasets' to_parquet writes
    return {"paths": paths, "documents": len(records), "bytes": len(raw)}


def reader_mb_per_s(path: str, fmt: str, raw_bytes: int) -> float:
    """Uncompressed MB/s of reading a format (for Parquet also the workers' part: reading their slices)."""
    start = time.perf_counter()
    if fmt.endswith("parquet"):
        for row, task in iter_parquet_tasks(path, ["text"], None, 4 << 20, [0]):
            if isinstance(task, ParquetSlice):
                for _ in read_slice(task, row, ["text"], None):
                    pass
    else:
        with open_binary(path) as f:
            while f.read(4 << 20):
                pass
    return raw_bytes / 1e6 / (time.perf_counter() - start)


def preprocess_cmd(inp: str, model: str, prefix: str, workers: int, kind: str) -> list[str]:
    return [sys.executable, "-m", "megatron_harpe.data.preprocess", "--input", inp, "--tokenizer-type", kind,
            "--tokenizer-model", model, "--output-prefix", prefix, "--workers", str(workers), "--append-eod",
            "--no-progress"]


def same_files(a: str, b: str) -> bool:
    for ext in (".bin", ".idx"):
        with open(a + ext, "rb") as f, open(b + ext, "rb") as g:
            if f.read() != g.read():
                return False
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--megabytes", type=float, default=20.0, help="corpus size (default 20 MB of jsonl)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2, help="best of N runs")
    p.add_argument("--tokenizer-type", default="sentencepiece", choices=["sentencepiece", "huggingface"])
    p.add_argument("--tokenizer-model", default=None, help="default: a sentencepiece model trained here")
    p.add_argument("--vocab-size", type=int, default=8000, help="of the model trained here")
    p.add_argument("--work-dir", default=None, help="default: a temporary folder, removed at the end")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.tokenizer_type == "huggingface" and not args.tokenizer_model:
        p.error("--tokenizer-type huggingface needs --tokenizer-model")

    work = args.work_dir or tempfile.mkdtemp(prefix="harpe-bench-formats-")
    os.makedirs(work, exist_ok=True)
    try:
        info = write_formats(work, args.megabytes)
        paths = info["paths"]
        print(f"corpus: {info['documents']:,} documents, {info['bytes'] / 1e6:.1f} MB of jsonl; "
              f"{os.cpu_count()} CPUs; --workers {args.workers}", flush=True)
        model = args.tokenizer_model or train_sentencepiece(
            iter_training_lines([paths["jsonl"]], ["text"], max_lines=200_000), os.path.join(work, "spm"),
            args.vocab_size, threads=os.cpu_count() or 1, hard_vocab_limit=False)
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        walls = {f: [] for f in FORMATS}
        cpus = {f: [] for f in FORMATS}
        for _ in range(args.repeat):
            for fmt in FORMATS:
                prefix = os.path.join(work, f"out-{fmt}")
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                start = time.perf_counter()
                proc = subprocess.run(preprocess_cmd(paths[fmt], model, prefix, args.workers, args.tokenizer_type),
                                      capture_output=True, text=True, env=env)
                walls[fmt].append(time.perf_counter() - start)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the tool and its workers
                cpus[fmt].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
                if proc.returncode != 0:
                    print(f"error: {fmt} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
                    return 1
        ref = os.path.join(work, "out-jsonl_text_document")
        tokens = int(read_index(ref)["sequence_lengths"].sum())
        results = []
        for fmt in FORMATS:
            wall = min(walls[fmt])
            results.append({"format": fmt, "file_mb": os.path.getsize(paths[fmt]) / 1e6, "wall_s": wall,
                            "cpu_s": min(cpus[fmt]),
                            "tokens_per_s": tokens / wall,
                            "reader_mb_per_s": reader_mb_per_s(paths[fmt], fmt, info["bytes"]),
                            "identical_to_jsonl": same_files(os.path.join(work, f"out-{fmt}_text_document"), ref)})
        base = results[0]["tokens_per_s"]
        head = (f"{'format':<11}{'file MB':>9}{'wall s':>8}{'CPU s':>7}{'tokens/s':>13}{'vs jsonl':>10}"
                f"{'reader MB/s':>13}{'same':>6}")
        print(f"\n{tokens:,} tokens\n{head}\n{'-' * len(head)}")
        for r in results:
            print(f"{r['format']:<11}{r['file_mb']:>9.1f}{r['wall_s']:>8.2f}{r['cpu_s']:>7.2f}{r['tokens_per_s']:>13,.0f}"
                  f"{r['tokens_per_s'] / base:>9.2f}x{r['reader_mb_per_s']:>13,.0f}"
                  f"{'yes' if r['identical_to_jsonl'] else 'NO':>6}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"corpus": {k: v for k, v in info.items() if k != "paths"}, "tokens": tokens,
                           "workers": args.workers, "cpus": os.cpu_count(), "results": results}, f, indent=2)
        return 0 if all(r["identical_to_jsonl"] for r in results) else 1
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
