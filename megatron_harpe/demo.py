"""The embedded main job (`make demo`, `harpe-demo`): HARPE against single-base RoPE and ABF, from nothing.

  1. a generated corpus: English-like documents from several sources plus short passkey documents
     ("The pass key is 71432. Remember it. ... What is the pass key? The pass key is 71432."), and
     held-out documents for perplexity
  2. a sentencepiece tokenizer trained on it                                   (harpe-train-tokenizer)
  3. the corpus as megatron indexed data                                        (harpe-preprocess)
  4. three tiny Llama-style models trained side by side on CPU from the same data, seed and steps,
     different only in their position encoding: HARPE (one RoPE base per K/V group, 10k and 500k),
     RoPE (base 10k) and ABF (RoPE with the larger base, 500k)                  (harpe-train, one per model)
  5. each exported to Hugging Face (HARPE's own config/modeling files) and asked for a passkey greedily
                                                                                (harpe-convert megatron-to-hf)
  6. perplexity at 1x, 2x and 4x the training length and passkey retrieval at the same lengths, in one
     table, and two sentences on what it means at this scale                    (harpe-eval ppl / passkey)

then one summary line. Each step uses the code path of the command named beside it; the training runs
are `python -m megatron_harpe.train --config examples/demo_<model>.yaml ...` exactly as a user would start
them (their output goes to <run-dir>/<model>/train.log). Steps whose outputs exist are skipped (delete the
run directory to start over). `--quick` is a smoke-test size (the test suite runs it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from megatron_harpe.cli import run_command

PROG = "harpe-demo"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STEPS = 6


#: What torch's env:// rendezvous reads; each demo run is its own world of one and picks its own port.
_RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class DemoModel:
    key: str        # run directory name and examples/demo_<key>.yaml
    label: str      # the table's row name


MODELS = (DemoModel("harpe", "HARPE"), DemoModel("rope", "RoPE"), DemoModel("abf", "ABF"))

#: The settings `make demo` runs (measured in docs/demo.md), and the smoke-test size of `--quick`.
FULL = dict(num_docs=2000, passkey_fraction=0.5, iterations=300, log_interval=25, ppl_docs=8, samples=2,
            depths=(0.0, 0.25, 0.5, 0.75, 1.0), verify=True)
QUICK = dict(num_docs=150, passkey_fraction=0.5, iterations=20, log_interval=10, ppl_docs=2, samples=1,
             depths=(0.5,), verify=False)
#: Passkey documents get 0..PASSKEY_MAX_SENTENCES filler sentences: up to ~230 tokens with the demo's
#: tokenizer, so that whole documents (key, filler, question and answer) fit the training length of 256.
PASSKEY_MAX_SENTENCES = 34
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
        info = write_demo_corpus(corpus, num_docs=num_docs, seed=seed, passkey_fraction=passkey_fraction,
                                 needle_fraction=0.0, passkey_sentences=(0, PASSKEY_MAX_SENTENCES))
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


def _threads_per_run(runs: int, nproc: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, runs * nproc))


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


def train_all(run_dir: Path, tokenizer: Path, data_prefix: Path, overrides: List[str], nproc: int,
              iterations: int, log_interval: int) -> None:
    """Start every model's harpe-train at once and follow their metrics.jsonl: one line per logging interval."""
    runs = {m.key: run_dir / m.key for m in MODELS}
    todo = [m for m in MODELS if not (runs[m.key] / "checkpoints" / "latest").exists()
            or not _finished(runs[m.key], iterations)]
    threads = _threads_per_run(len(todo), nproc)
    _step(4, f"training {len(MODELS)} tiny models side by side, same data, seed and {iterations} steps: "
             f"{', '.join(m.label for m in MODELS)} ({'1 process' if nproc == 1 else f'{nproc} processes, TP={nproc}'}"
             f" and {threads} thread(s) each) -> {run_dir}/<model>", not todo)
    if not todo:
        return
    procs: Dict[str, subprocess.Popen] = {}
    logs = {}
    # three independent jobs: a launcher's rendezvous values inherited from the caller (a shell inside
    # salloc, or a process that made a group and exported MASTER_PORT) would have all three bind one port
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
        print(f"  logs: {run_dir}/<model>/train.log; loss = mean over each {log_interval}-iteration logging "
              f"interval (metrics.jsonl)", flush=True)
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
            losses = {m.key: _losses(runs[m.key] / "metrics.jsonl") for m in MODELS}
            common = set.intersection(*(set(v) for v in losses.values()))
            for it in sorted(i for i in common if i > shown):
                print(f"  iter {it:>4}/{iterations} | loss " + "  ".join(f"{m.label} {losses[m.key][it]:.3f}"
                                                                      for m in MODELS)
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


def export_all(run_dir: Path, tokenizer: Path, verify: bool, seed: int) -> Dict[str, str]:
    from megatron_harpe.convert import export_and_generate

    hf_root = run_dir / "hf"
    prompt, key = passkey_prompt(seed)
    _step(5, f"exporting each model to Hugging Face and asking it for a pass key ({key}) -> {hf_root}/<model>")
    try:  # the weight-loading bars of transformers; the export prints its own one-line summary
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - the hf extra is installed with the demo
        pass
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

    _step(6, f"evaluating: perplexity on {settings['ppl_docs']} held-out documents and passkey retrieval "
             f"({len(settings['depths']) * settings['samples']} prompts per length) at 1x, 2x, 4x the training "
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
        return "base per K/V group: " + ", ".join(f"{b:g}" for b in position["bases"])
    return f"one base: {position['base']:g}"


def _train_length() -> int:
    import yaml

    return int(yaml.safe_load((EXAMPLES / "demo_harpe.yaml").read_text())["data"]["seq_length"])


# ----------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke-test size ({QUICK['num_docs']} documents, {QUICK['iterations']} iterations, "
                             f"fewer evaluation prompts): checks the pipeline, shows nothing about the method")
    parser.add_argument("--num-docs", type=int, help=f"corpus documents (default {FULL['num_docs']})")
    parser.add_argument("--iterations", type=int, help=f"training iterations per model (default {FULL['iterations']})")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes per training run (TP=nproc under torchrun); the runs go side by side")
    parser.add_argument("--seed", type=int, default=0, help="corpus and evaluation seed (training: training.seed)")
    parser.add_argument("--verbose", action="store_true", help="show upstream warnings too (HARPE_VERBOSE=1)")
    parser.add_argument("--debug", action="store_true", help="tracebacks for bad-input errors too (HARPE_DEBUG=1)")
    parser.add_argument("overrides", nargs="*",
                        help="extra harpe-train overrides for every model, e.g. optimizer.lr=1e-3")
    return parser.parse_args(argv)


def _demo(args) -> int:
    started = time.perf_counter()
    settings = dict(QUICK if args.quick else FULL)
    if args.num_docs is not None:
        settings["num_docs"] = args.num_docs
    if args.iterations is not None:
        settings["iterations"] = args.iterations
    iterations = settings["iterations"]
    interval = min(settings["log_interval"], iterations)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    train_length = _train_length()
    tokenizer, prefix, heldout = prepare_data(run_dir, settings["num_docs"], settings["passkey_fraction"],
                                              args.vocab_size, args.seed)
    overrides = [f"training.iterations={iterations}", f"logging.interval={interval}",
                 "checkpoint.save_interval=0", *args.overrides]
    train_all(run_dir, tokenizer, prefix, overrides, args.nproc, iterations, interval)
    hf_dirs = export_all(run_dir, tokenizer, settings["verify"], args.seed)
    rows = evaluate(run_dir, hf_dirs, heldout, settings, args.seed, train_length)

    from megatron_harpe.evaluation.demo import comparison_reading, comparison_table

    table = comparison_table(rows, train_length, loss_label=f"train loss (last {interval} it.)")
    reading = comparison_reading(rows, train_length)
    note = (f"\n(--quick: {iterations} iterations check the pipeline only; the numbers mean nothing)"
            if args.quick else "")
    report = (f"### HARPE vs RoPE vs ABF: {iterations} iterations each, trained at {train_length} tokens\n\n"
              f"{table}\n\n{reading}{note}\n")
    (run_dir / "comparison.md").write_text(report)
    print("\n" + report, flush=True)
    print(f"{PROG}: done in {time.perf_counter() - started:.0f} s | table {run_dir / 'comparison.md'} | checkpoints "
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
