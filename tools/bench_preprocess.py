#!/usr/bin/env python
"""Benchmark harpe-preprocess beside Megatron-LM's tools/preprocess_data.py, in one run.

    python tools/bench_preprocess.py --megatron-lm /path/to/Megatron-LM [--megatron-pythonpath DIR]

Both tools get the same corpus (generated here), the same tokenizer files (trained here: a
Llama-2-like sentencepiece model and a Llama-3-like tokenizer.json), the same flags
(--append-eod) and the same --workers, one after the other on this machine. For every
configuration it prints documents/s and tokens/s end to end (the wall time a user waits,
start-up included) and without start-up (wall time minus that of the same command on a
20-document input), the ratio ours / Megatron-LM's, and whether the two outputs are
byte-identical (.bin and .idx).

Megatron-LM: use the checkout that matches the installed megatron-core (tag core_v0.16.1),
because the checkout's megatron/core shadows the installed one. Its tool imports
megatron.training, which needs ``six`` and (through megatron.training.initialize ->
batch_invariant_kernels) ``triton`` even on CPU; install them outside the project's
environment, e.g. ``pip install --target /tmp/mlm_deps six triton``, and pass
``--megatron-pythonpath /tmp/mlm_deps``. See docs/data.md for the figures and how to get the
checkout. Without --megatron-lm only our own figures are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_harpe.data.corpus import generate_documents  # noqa: E402
from megatron_harpe.data.indexed import read_index  # noqa: E402
from megatron_harpe.data.train_tokenizer import (iter_training_lines, train_huggingface,  # noqa: E402
                                                 train_sentencepiece)

MEGATRON_TYPES = {"sentencepiece": "GPTSentencePieceTokenizer", "huggingface": "HuggingFaceTokenizer"}


def make_corpus(path: str, megabytes: float, style: str, seed: int = 0) -> dict:
    """~`megabytes` of demo corpus; style 'rare-words' replaces 15% of the words with random
    strings (a heavy vocabulary tail, the word cache's worst case)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    n, size = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        for rec in generate_documents(10**9, seed=seed):
            if style == "rare-words":
                words = rec["text"].split(" ")
                for i in range(len(words)):
                    if rng.random() < 0.15:
                        words[i] = "".join(rng.choice(letters) for _ in range(rng.randint(3, 11)))
                rec["text"] = " ".join(words)
            line = json.dumps(rec, ensure_ascii=False) + "\n"
            f.write(line)
            n += 1
            size += len(line.encode("utf-8"))
            if size >= megabytes * 1e6:
                break
    return {"documents": n, "bytes": size}


def head(src: str, dst: str, lines: int) -> None:
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as g:
        for _, line in zip(range(lines), f):
            g.write(line)


def run(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    return time.perf_counter() - start, proc


def ours_cmd(inp, kind, model, prefix, workers, extra=()):
    return [sys.executable, "-m", "megatron_harpe.data.preprocess", "--input", inp, "--tokenizer-type", kind,
            "--tokenizer-model", model, "--output-prefix", prefix, "--workers", str(workers), "--append-eod",
            "--no-progress", *extra]


def megatron_cmd(mlm, inp, kind, model, prefix, workers):
    return [sys.executable, os.path.join(mlm, "tools", "preprocess_data.py"), "--input", inp,
            "--tokenizer-type", MEGATRON_TYPES[kind], "--tokenizer-model", model, "--output-prefix", prefix,
            "--workers", str(workers), "--append-eod", "--log-interval", "100000000"]


def timed(label, cmd, small_cmd, env, cwd, repeat):
    """Best-of-`repeat` wall time of `cmd` and of `small_cmd` (the start-up)."""
    walls, startups = [], []
    for _ in range(repeat):
        t, proc = run(cmd, env, cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"{label} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        walls.append(t)
        t, proc = run(small_cmd, env, cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"{label} (start-up run) failed:\n{proc.stderr[-3000:]}")
        startups.append(t)
    return min(walls), min(startups)


def same_files(a: str, b: str) -> bool:
    for ext in (".bin", ".idx"):
        with open(a + ext, "rb") as f, open(b + ext, "rb") as g:
            if f.read() != g.read():
                return False
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--megatron-lm", default=None, help="a Megatron-LM checkout (tag core_v0.16.1)")
    p.add_argument("--megatron-pythonpath", default="", help="extra PYTHONPATH for Megatron-LM's tool (six, triton)")
    p.add_argument("--megabytes", type=float, default=50.0, help="corpus size (default 50 MB)")
    p.add_argument("--style", choices=["demo", "rare-words"], default="demo")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokenizers", nargs="+", choices=list(MEGATRON_TYPES), default=list(MEGATRON_TYPES))
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--repeat", type=int, default=1, help="best of N runs")
    p.add_argument("--work-dir", default=None, help="default: a temporary folder, removed at the end")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    work = args.work_dir or tempfile.mkdtemp(prefix="harpe-bench-")
    os.makedirs(work, exist_ok=True)
    try:
        corpus = os.path.join(work, f"corpus-{args.style}.jsonl")
        info = make_corpus(corpus, args.megabytes, args.style)
        small = os.path.join(work, "small.jsonl")
        head(corpus, small, 20)
        print(f"corpus: {info['documents']:,} documents, {info['bytes'] / 1e6:.1f} MB ({args.style}); "
              f"{os.cpu_count()} CPUs", flush=True)
        models = {}
        lines = lambda: iter_training_lines([corpus], ["text"], max_lines=200_000)  # noqa: E731
        if "sentencepiece" in args.tokenizers:
            models["sentencepiece"] = train_sentencepiece(lines(), os.path.join(work, "spm"), args.vocab_size,
                                                          threads=os.cpu_count() or 1, hard_vocab_limit=False)
        if "huggingface" in args.tokenizers:
            models["huggingface"] = os.path.dirname(train_huggingface(lines(), os.path.join(work, "hf"),
                                                                      args.vocab_size))
        mlm_env = None
        if args.megatron_lm:
            mlm = os.path.abspath(args.megatron_lm)
            if not os.path.isfile(os.path.join(mlm, "tools", "preprocess_data.py")):
                print(f"error: {mlm} has no tools/preprocess_data.py", file=sys.stderr)
                return 2
            mlm_env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                x for x in (mlm, args.megatron_pythonpath, os.environ.get("PYTHONPATH", "")) if x),
                PYTHONWARNINGS="ignore")
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        results = []
        for kind, model in models.items():
            for workers in args.workers:
                row = {"tokenizer": kind, "workers": workers}
                variants = [("ours", ())]
                if kind == "sentencepiece":
                    variants.append(("ours-no-word-cache", ("--no-word-cache",)))
                for name, extra in variants:
                    prefix = os.path.join(work, f"{name}-{kind}-{workers}")
                    wall, startup = timed(name, ours_cmd(corpus, kind, model, prefix, workers, extra),
                                          ours_cmd(small, kind, model, prefix + "-small", workers, extra),
                                          env, None, args.repeat)
                    row[name] = {"wall_s": wall, "startup_s": startup, "prefix": prefix + "_text_document"}
                if mlm_env is not None:
                    prefix = os.path.join(work, f"megatron-{kind}-{workers}")
                    wall, startup = timed("Megatron-LM", megatron_cmd(mlm, corpus, kind, model, prefix, workers),
                                          megatron_cmd(mlm, small, kind, model, prefix + "-small", workers),
                                          mlm_env, mlm, args.repeat)
                    row["megatron"] = {"wall_s": wall, "startup_s": startup, "prefix": prefix + "_text_document"}
                    row["identical_output"] = same_files(row["ours"]["prefix"], row["megatron"]["prefix"])
                idx = read_index(row["ours"]["prefix"])
                row["documents"] = int(idx["sequence_lengths"].size)
                row["tokens"] = int(idx["sequence_lengths"].sum())
                for name in ("ours", "ours-no-word-cache", "megatron"):
                    if name in row:
                        r = row[name]
                        r["tokens_per_s"] = row["tokens"] / r["wall_s"]
                        r["tokens_per_s_steady"] = row["tokens"] / max(r["wall_s"] - r["startup_s"], 1e-6)
                        r["docs_per_s"] = row["documents"] / r["wall_s"]
                results.append(row)
                print(_format_row(row), flush=True)
        print()
        print(_table(results))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"corpus": info, "style": args.style, "cpus": os.cpu_count(), "results": results}, f,
                          indent=2)
        return 0
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def _format_row(row) -> str:
    parts = [f"{row['tokenizer']:<13} workers={row['workers']}"]
    for name in ("ours", "ours-no-word-cache", "megatron"):
        if name in row:
            r = row[name]
            parts.append(f"{name}: {r['tokens_per_s']:,.0f} tok/s ({r['wall_s']:.2f} s, start-up {r['startup_s']:.2f} s)")
    if "megatron" in row:
        parts.append(f"identical output: {'yes' if row['identical_output'] else 'NO'}")
    return " | ".join(parts)


def _num(x) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _ratio(a, b) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def _table(results) -> str:
    head_ = (f"{'tokenizer':<14}{'workers':>7}{'ours tok/s':>14}{'ours steady':>14}{'no-cache':>12}"
             f"{'Megatron tok/s':>16}{'Megatron steady':>17}{'ratio':>8}{'ratio steady':>14}{'same':>6}")
    lines = [head_, "-" * len(head_)]
    for row in results:
        o = row["ours"]
        nc = row.get("ours-no-word-cache") or {}
        m = row.get("megatron") or {}
        same = "-" if not m else ("yes" if row.get("identical_output") else "NO")
        lines.append(
            f"{row['tokenizer']:<14}{row['workers']:>7}{_num(o['tokens_per_s']):>14}"
            f"{_num(o['tokens_per_s_steady']):>14}{_num(nc.get('tokens_per_s')):>12}"
            f"{_num(m.get('tokens_per_s')):>16}{_num(m.get('tokens_per_s_steady')):>17}"
            f"{_ratio(o['tokens_per_s'], m.get('tokens_per_s')):>8}"
            f"{_ratio(o['tokens_per_s_steady'], m.get('tokens_per_s_steady')):>14}{same:>6}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
