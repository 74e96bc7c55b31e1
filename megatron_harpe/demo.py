"""The embedded main job (`make demo`, `harpe-demo`): from nothing to a trained tiny HARPE model.

  1. a generated corpus (English-like documents from several sources, passkey/needle documents)
  2. a sentencepiece tokenizer trained on it          (harpe-train-tokenizer)
  3. the corpus as megatron indexed data               (harpe-preprocess)
  4. a tiny Llama-style HARPE model trained on CPU by 2 processes, TP=2   (harpe-train under torchrun)
  5. the trained model exported to Hugging Face (HARPE's own config/modeling files) and a greedy
     generation from it                                 (harpe-convert megatron-to-hf)
  6. a passkey / needle / perplexity evaluation of the exported model (harpe-eval), as a table
  7. a summary: the loss curve, where the checkpoints, TensorBoard logs, metrics and export are

Each step uses the same command a user would run, so the demo is also a smoke test of them.
Steps whose outputs already exist are skipped (delete the run directory to start over).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "demo_harpe.yaml"


def _step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def prepare_data(run_dir: Path, num_docs: int, vocab_size: int, seed: int) -> tuple[Path, Path]:
    """Corpus, tokenizer, indexed data; returns (tokenizer model, data prefix)."""
    from megatron_harpe.data.corpus import write_demo_corpus
    from megatron_harpe.data.preprocess import main as preprocess_main
    from megatron_harpe.data.train_tokenizer import main as train_tokenizer_main

    corpus = run_dir / "corpus.jsonl"
    tokenizer_dir = run_dir / "tokenizer"
    prefix = run_dir / "data" / "corpus"
    document_prefix = Path(f"{prefix}_text_document")
    if not corpus.exists():
        _step(f"1/5 generating a corpus of {num_docs} documents -> {corpus}")
        info = write_demo_corpus(corpus, num_docs=num_docs, seed=seed)
        print(f"{info['documents']} documents, {info['chars_text'] / 1e6:.1f}M characters, sources: "
              f"{', '.join(f'{k} {v}' for k, v in sorted(info['per_source'].items()))}")
    if not (tokenizer_dir / "tokenizer.model").exists():
        _step(f"2/5 training a sentencepiece tokenizer (vocab {vocab_size}) -> {tokenizer_dir}")
        code = train_tokenizer_main(["--input", str(corpus), "--type", "sentencepiece", "--vocab-size",
                                     str(vocab_size), "--output-dir", str(tokenizer_dir), "--max-lines", "200000"])
        if code:
            raise SystemExit(code)
    if not Path(f"{document_prefix}.idx").exists():
        _step(f"3/5 preprocessing -> {document_prefix}.bin/.idx")
        code = preprocess_main(["--input", str(corpus), "--tokenizer-type", "sentencepiece", "--tokenizer-model",
                                str(tokenizer_dir / "tokenizer.model"), "--output-prefix", str(prefix),
                                "--append-eod", "--workers", "2"])
        if code:
            raise SystemExit(code)
    return tokenizer_dir / "tokenizer.model", document_prefix


def train(run_dir: Path, tokenizer: Path, data_prefix: Path, overrides: list[str], nproc: int) -> int:
    _step(f"4/5 training a tiny HARPE model on CPU: {nproc} processes (TP={nproc}) -> {run_dir}")
    from megatron_harpe.data.tokenizer import load_tokenizer

    vocab = load_tokenizer("sentencepiece", str(tokenizer)).vocab_size
    padded_vocab = -(-vocab // 128) * 128  # divisible by TP, like Megatron's vocabulary padding
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "megatron_harpe.train", "--config", str(DEMO_CONFIG), f"run_dir={run_dir}",
           f"parallel.tensor={nproc}", f"model.vocab_size={padded_vocab}", f"data.blend=[{data_prefix}]",
           f"data.tokenizer_model={tokenizer}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    print(" ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


def loss_curve(metrics_path: Path, width: int = 48) -> str:
    """A text plot of the loss from metrics.jsonl (one bar per bucket of iterations)."""
    points = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    losses = [(p["iteration"], p["loss"]) for p in points if "loss" in p and p["loss"] is not None]
    if not losses:
        return "(no losses logged)"
    bucket = max(1, len(losses) // 12)
    rows = []
    top = max(loss for _, loss in losses)
    for i in range(0, len(losses), bucket):
        chunk = losses[i:i + bucket]
        mean = sum(loss for _, loss in chunk) / len(chunk)
        rows.append(f"  iter {chunk[0][0]:>4}-{chunk[-1][0]:<4} {mean:7.3f} {'#' * max(1, round(width * mean / top))}")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="harpe-demo", description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--num-docs", type=int, default=400)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="extra harpe-train overrides, e.g. training.iterations=50")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, prefix = prepare_data(run_dir, args.num_docs, args.vocab_size, args.seed)
    train_dir = run_dir / "train"
    code = train(train_dir, tokenizer, prefix, args.overrides, args.nproc)
    if code != 0:
        print(f"harpe-demo: training exited with code {code}", file=sys.stderr)
        return code
    metrics = train_dir / "metrics.jsonl"
    print("\nloss curve (mean per bucket):\n" + loss_curve(metrics))
    _step(f"5/5 exporting to Hugging Face and generating -> {run_dir / 'hf'}")
    from megatron_harpe.convert import export_and_generate

    exported = export_and_generate(train_dir, str(tokenizer), "The pass key is", out_dir=str(run_dir / "hf"))
    _step("evaluating the exported model: passkey, needle, perplexity")
    from megatron_harpe.evaluation import demo_eval

    # trained at 256 tokens: 384 and 512 show how the model does beyond its training length
    print(demo_eval(run_dir / "hf", "sentencepiece", corpus=run_dir / "corpus.jsonl", lengths=(256, 384, 512)))
    first_last = [json.loads(l) for l in metrics.read_text().splitlines() if '"loss"' in l]
    print(f"\nharpe-demo: done in {time.perf_counter() - started:.0f} s | loss {first_last[0]['loss']:.3f} -> "
          f"{first_last[-1]['loss']:.3f} | checkpoints {train_dir / 'checkpoints'} | TensorBoard "
          f"{train_dir / 'tensorboard'} (tensorboard --logdir {train_dir / 'tensorboard'}) | metrics {metrics} | "
          f"Hugging Face model {exported['hf_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
