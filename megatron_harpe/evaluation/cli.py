"""`harpe-eval`: long-context evaluation of Hugging Face (and exported megatron) checkpoints, offline.

  harpe-eval ppl     --model DIR --data proofpile.jsonl --lengths 2k:128k:2k --window 256
  harpe-eval niah    --model DIR --lengths 4k,8k,16k,32k,64k,128k --tasks all --samples 25
  harpe-eval needle  --model DIR --lengths 4k:128k:4k --depths 0:100:10          (heatmap.png)
  harpe-eval passkey --model DIR --lengths 1k,2k,4k --depths 0,25,50,75,100
  harpe-eval report  out/harpe/niah out/abf/niah --names HARPE,ABF              (one comparison table)

Lengths are token counts: 4096, 4k (= 4096) or ranges START:STOP:STEP (2k:128k:2k). Depths are
percentages: 0,50,100 or 0:100:10. Every command writes results.jsonl (resumable: rerun the
same command after an interruption and it continues), summary.json, table.md (printed too)
and, for needle/passkey, heatmap.png into --output (default eval-results/<model>/<command>).
--model is a Hugging Face directory (HARPE exports load with trust_remote_code) or a megatron
checkpoint, exported first. Exit codes: 0 done (also when --max-units stopped it early),
2 bad input (the message names it and the fix), 130 interrupted. See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import List, Optional

from megatron_harpe.cli import run_command
from megatron_harpe.evaluation.errors import EvalError

PROG = "harpe-eval"

DEFAULT_NIAH_LENGTHS = "4k,8k,16k,32k,64k,128k"
DEFAULT_PPL_LENGTHS = "2k,4k,8k,16k,32k,64k,128k"


def _token_count(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count (4096, 4k, 128k)")
    value = float(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
    if value != int(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number of tokens")
    return int(value)


def parse_lengths(text: str) -> List[int]:
    """'4096,8k' or '2k:128k:2k' (inclusive range) -> token counts."""
    out: List[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if ":" in part:
            pieces = part.split(":")
            if len(pieces) != 3:
                raise argparse.ArgumentTypeError(f"range {part!r}: expected START:STOP:STEP, e.g. 2k:128k:2k")
            start, stop, step = (_token_count(p) for p in pieces)
            out.extend(range(start, stop + 1, step))
        else:
            out.append(_token_count(part))
    if not out:
        raise argparse.ArgumentTypeError("no lengths given")
    return out


def parse_depths(text: str) -> List[float]:
    """'0,50,100' or '0:100:10' (percent, inclusive) -> fractions."""
    out: List[float] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            if ":" in part:
                start, stop, step = (float(p) for p in part.split(":"))
                if step <= 0:
                    raise ValueError
                v = start
                while v <= stop + 1e-9:
                    out.append(v)
                    v += step
            else:
                out.append(float(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--depths {text!r}: expected percentages like 0,50,100 or 0:100:10") \
            from None
    if not out or any(not 0 <= v <= 100 for v in out):
        raise argparse.ArgumentTypeError(f"--depths {text!r}: percentages between 0 and 100")
    return [round(v / 100.0, 6) for v in out]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model directory (config.json + weights; HARPE "
                   "exports use trust_remote_code) or a megatron checkpoint (exported to HF first)")
    p.add_argument("--tokenizer", help="tokenizer to use instead of the model directory's own (a HF tokenizer "
                   "directory, or a file with --tokenizer-type)")
    p.add_argument("--tokenizer-type", choices=["sentencepiece", "huggingface"],
                   help="read --tokenizer (tokenizer.model / tokenizer.json) with megatron-harpe's own loader")
    p.add_argument("--output", help="output directory (default: eval-results/<model name>/<command>)")
    p.add_argument("--name", help="the model's name in tables (default: the model directory's name)")
    p.add_argument("--overwrite", action="store_true", help="start over instead of continuing results.jsonl")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:1 ...")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16")
    p.add_argument("--attn-implementation", help="transformers attention backend: sdpa (default), "
                   "flash_attention_2, eager")
    p.add_argument("--batch-size", type=int, help="prompts/documents per forward (default: --batch-tokens / length)")
    p.add_argument("--batch-tokens", type=int, help="tokens per batch when --batch-size is not given "
                   "(default 32768 on GPU, 8192 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated samples (default 0)")
    p.add_argument("--export-dir", help="megatron checkpoints: export to this directory (reused on reruns) instead "
                   "of a temporary one")
    p.add_argument("--max-units", type=int, help="evaluate at most this many new samples/documents, then stop "
                   "(rerun to continue; for jobs with a time limit)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__[__doc__.index("\n"):])
    parser.add_argument("--verbose", action="store_true", help="show upstream warnings too (HARPE_VERBOSE=1)")
    parser.add_argument("--debug", action="store_true", help="tracebacks for bad-input errors too (HARPE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ppl", help="sliding-window perplexity per length")
    _common(p)
    p.add_argument("--data", nargs="+", required=True, help="jsonl/jsonl.gz (--text-key), text files (one "
                   "document each) or a megatron indexed dataset prefix")
    p.add_argument("--lengths", type=parse_lengths, default=parse_lengths(DEFAULT_PPL_LENGTHS),
                   help=f"token counts (default {DEFAULT_PPL_LENGTHS}; the paper: 2k:128k:2k)")
    p.add_argument("--window", type=int, default=256, help="sliding-window stride S: new tokens scored per window "
                   "(default 256)")
    p.add_argument("--mode", choices=["truncate", "sliding"], default="truncate",
                   help="truncate: documents cut to L, context L (the paper's Proof-pile numbers); sliding: context "
                        "L over the first --span tokens, stride --window")
    p.add_argument("--span", type=_token_count, help="sliding mode: tokens of each document scored (default: the "
                   "longest length)")
    p.add_argument("--num-docs", type=int, default=10, help="documents (the first ones long enough; default 10)")
    p.add_argument("--text-key", default="text", help="jsonl field with the text (dotted for nested; default text)")
    p.add_argument("--no-bos", action="store_true", help="do not put the tokenizer's BOS in front of documents")

    p = sub.add_parser("niah", help="the 8 RULER-style needle-in-a-haystack tasks (per-task x per-length tables)")
    _common(p)
    p.add_argument("--lengths", type=parse_lengths, default=parse_lengths(DEFAULT_NIAH_LENGTHS),
                   help=f"token counts, prompt + generation (default {DEFAULT_NIAH_LENGTHS})")
    p.add_argument("--tasks", default="all", help="all, or names separated by commas: niah_single_1/2/3, "
                   "niah_multikey_1/2/3, niah_multivalue, niah_multiquery")
    p.add_argument("--samples", type=int, default=25, help="samples per task and length (default 25; RULER uses "
                   "500)")
    p.add_argument("--haystack", help="for the essay-haystack tasks: essay (generated, default), repeat, or a local "
                   "text/jsonl file (RULER uses Paul Graham's essays)")
    p.add_argument("--text-key", default="text", help="jsonl field of a --haystack file")
    p.add_argument("--max-new-tokens", type=int, help="generation budget for every task (default: per task, "
                   "32 for numbers, 64 for UUIDs, 96 for 4-answer tasks)")

    for kind, help_, depths, samples, lengths in (
            ("needle", "classic single needle over lengths x depths (heatmap)", "0:100:10", 1, "1k,2k,4k,8k,16k,32k"),
            ("passkey", "passkey retrieval over lengths x depths (quick check)", "0,25,50,75,100", 2, "1k,2k,4k,8k")):
        p = sub.add_parser(kind, help=help_)
        _common(p)
        p.add_argument("--lengths", type=parse_lengths, default=parse_lengths(lengths),
                       help=f"token counts, prompt + generation (default {lengths})")
        p.add_argument("--depths", type=parse_depths, default=parse_depths(depths),
                       help=f"needle depths in percent of the haystack (default {depths})")
        p.add_argument("--samples", type=int, default=samples, help=f"samples per cell (default {samples})")
        p.add_argument("--max-new-tokens", type=int, help="generation budget (default "
                       f"{16 if kind == 'passkey' else 32})")
        if kind == "needle":
            p.add_argument("--haystack", default="essay", help="essay (generated, default), repeat, or a local "
                           "text/jsonl file")
            p.add_argument("--text-key", default="text", help="jsonl field of a --haystack file")

    p = sub.add_parser("report", help="several runs' results side by side (rows = runs)")
    p.add_argument("runs", nargs="+", help="harpe-eval --output directories (or their summary.json)")
    p.add_argument("--names", help="row names separated by commas (default: each run's --name)")
    p.add_argument("--out", help="also write the table to this file")
    return parser


def _default_output(args) -> Path:
    name = args.name or Path(os.path.abspath(args.model)).name or "model"
    return Path("eval-results") / re.sub(r"[^A-Za-z0-9._-]+", "_", name) / args.command


def _load(args):
    from megatron_harpe.evaluation.model import load_model

    return load_model(args.model, tokenizer=args.tokenizer, tokenizer_type=args.tokenizer_type, device=args.device,
                      dtype=args.dtype, attn_implementation=args.attn_implementation, export_dir=args.export_dir,
                      show_progress=not args.no_progress, lazy=True)


def _run(args) -> int:
    if args.command == "report":
        from megatron_harpe.evaluation.report import compare_table, load_summary

        summaries = [load_summary(r) for r in args.runs]
        names = args.names.split(",") if args.names else [s.get("name") or Path(r).name
                                                          for s, r in zip(summaries, args.runs)]
        if len(names) != len(summaries):
            raise EvalError(f"--names has {len(names)} names for {len(summaries)} runs")
        table = compare_table(summaries, names)
        print(table, end="")
        if args.out:
            Path(args.out).write_text(table)
        return 0

    from megatron_harpe.evaluation.commands import run_grid, run_niah, run_ppl

    for opt in ("batch_size", "batch_tokens", "max_units"):
        v = getattr(args, opt, None)
        if v is not None and v < (0 if opt == "max_units" else 1):
            raise EvalError(f"--{opt.replace('_', '-')} must be positive, got {v}")
    started = time.perf_counter()
    lm = _load(args)
    out = Path(args.output) if args.output else _default_output(args)
    common = dict(batch_size=args.batch_size, batch_tokens=args.batch_tokens, overwrite=args.overwrite,
                  progress=not args.no_progress, max_units=args.max_units, name=args.name or "")
    if args.command == "ppl":
        summary, markdown, stats = run_ppl(lm, out, data=args.data, lengths=args.lengths, window=args.window,
                                           mode=args.mode, span=args.span, num_docs=args.num_docs,
                                           text_key=args.text_key, add_bos=not args.no_bos, **common)
        new, resumed, stopped = stats["new"], stats["resumed"], stats["stopped"]
        headline = f"mean perplexity over lengths {summary['average']:.3f}"
    elif args.command == "niah":
        from megatron_harpe.evaluation.tasks import parse_tasks

        tasks = parse_tasks(args.tasks)
        haystack = args.haystack
        if haystack:
            _check_haystack(haystack, args.text_key)
        summary, markdown, stats = run_niah(lm, out, tasks=tasks, lengths=args.lengths, samples=args.samples,
                                            seed=args.seed, haystack=haystack, max_new_tokens=args.max_new_tokens,
                                            text_key=args.text_key, **common)
        new, resumed, stopped = stats.new, stats.resumed, stats.stopped
        headline = f"average {summary['average']:.2f}"
    else:
        haystack = getattr(args, "haystack", "essay")
        if args.command == "needle":
            _check_haystack(haystack, args.text_key)
        summary, markdown, stats = run_grid(args.command, lm, out, lengths=args.lengths, depths=args.depths,
                                            samples=args.samples, seed=args.seed, haystack=haystack,
                                            max_new_tokens=args.max_new_tokens,
                                            text_key=getattr(args, "text_key", "text"), **common)
        new, resumed, stopped = stats.new, stats.resumed, stats.stopped
        headline = f"average {summary['average']:.2f}"
    print(markdown)
    extra = f" | heatmap {summary['heatmap']}" if summary.get("heatmap") else ""
    state = "stopped by --max-units (rerun to continue)" if stopped else "complete"
    seconds = time.perf_counter() - started
    print(f"{PROG} {args.command}: {new} evaluated, {resumed} resumed, {state} in {seconds:.1f} s "
          f"| {headline} | {out / 'table.md'}, {out / 'summary.json'}{extra}", flush=True)
    return 0


def _check_haystack(haystack: str, text_key: str) -> None:
    if haystack in ("essay", "repeat"):
        return
    if not os.path.isfile(haystack):
        raise EvalError(f"--haystack {haystack!r}: expected essay, repeat or an existing text/jsonl file")


def _run_quietly(args) -> int:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")
        return _run(args)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: _run_quietly(args), argv=argv,
                       interrupted="the results so far are saved: rerun the same command to continue")


if __name__ == "__main__":
    sys.exit(main())
