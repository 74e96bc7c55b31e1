"""`harpe-convert`: Hugging Face Llama <-> megatron-core checkpoints, HARPE models exported to Hugging Face.

  harpe-convert hf-to-megatron --hf-dir Llama-2-7b-hf --save ckpt/llama2-7b --tp 8
  harpe-convert hf-to-megatron --hf-dir Llama-2-7b-hf --save ckpt/llama2-7b-harpe \\
      --position-kind harpe --base-strategy paper-llama2-7b --max-position-embeddings 131072
  harpe-convert megatron-to-hf --load runs/harpe/checkpoints --out hf/llama2-7b-harpe-128k

Conversion runs in one process on CPU (no torchrun). Exit codes: 0 done, 2 bad input (the
message names it and the fix). Warnings (e.g. a checkpoint written on another software stack) go to
stderr, one line each, and change no exit code. See docs/convert.md.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from megatron_harpe.cli import run_command

PROG = "harpe-convert"


def _bases(text: str) -> List[float]:
    try:
        return [float(b) for b in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bases wants numbers separated by commas, e.g. 1e4,1e6; got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__[__doc__.index("\n"):])
    sub = parser.add_subparsers(dest="command", required=True)

    a = sub.add_parser("hf-to-megatron", help="HF Llama checkpoint -> megatron torch_dist checkpoint (init_from)")
    a.add_argument("--hf-dir", required=True, help="HF checkpoint directory (config.json + safetensors/bin)")
    a.add_argument("--save", required=True, help="output checkpoint directory")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel size the run will use (checked; the "
                   "checkpoint loads into any layout)")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel size the run will use (checked)")
    a.add_argument("--dtype", default="auto", help="auto (keep the HF dtype) | fp32 | bf16 | fp16")
    a.add_argument("--make-vocab-size-divisible-by", type=int, default=1,
                   help="pad the vocabulary (zero rows) to a multiple of N; megatron-to-hf cuts it back")
    a.add_argument("--max-position-embeddings", type=int, help="the context the model will be trained for")
    p = a.add_argument_group("position encoding (default: the checkpoint's own RoPE settings)")
    p.add_argument("--position-kind", choices=["rope", "pi", "yarn", "llama3", "harpe"],
                   help="rope (any base: ABF is a larger --rope-base), pi, yarn, llama3 (Llama 3.1's scaling), or "
                        "harpe (one base per K/V group; a Llama-3.x checkpoint's llama3 scaling is then dropped)")
    p.add_argument("--rope-base", type=float, help="rope/pi/yarn/llama3 base (default: the checkpoint's rope_theta)")
    p.add_argument("--interpolation-factor", type=float, help="pi: position interpolation factor, e.g. 32")
    p.add_argument("--yarn-factor", type=float)
    p.add_argument("--yarn-original-max-position-embeddings", type=int)
    p.add_argument("--yarn-beta-fast", type=float, default=32.0)
    p.add_argument("--yarn-beta-slow", type=float, default=1.0)
    p.add_argument("--llama3-factor", type=float, help="llama3: scaling factor (Llama 3.1: 8)")
    p.add_argument("--llama3-original-max-position-embeddings", type=int,
                   help="llama3: the context the base was trained at (Llama 3.1: 8192)")
    p.add_argument("--bases", type=_bases, help="harpe: the base set, one per K/V group, e.g. 1e4,1e6")
    p.add_argument("--base-strategy", help="harpe: uniform | uniform-desc | peak-valley | paper-llama2-7b | file")
    p.add_argument("--base-min", type=float, help="harpe uniform/peak-valley: smallest base (default 1e6)")
    p.add_argument("--base-max", type=float, help="harpe uniform/peak-valley: largest base (default 5e6)")
    p.add_argument("--base-stride", type=float, help="harpe peak-valley: candidate stride (default 3e4)")
    p.add_argument("--bases-file")

    b = sub.add_parser("megatron-to-hf", help="megatron checkpoint -> HF directory (safetensors, config, tokenizer)")
    b.add_argument("--load", required=True, help="a converted checkpoint, a trainer checkpoints directory "
                   "(uses 'latest'), an iter_XXXXXXX directory, or a run directory")
    b.add_argument("--out", required=True, help="output HF directory")
    b.add_argument("--tokenizer", help="tokenizer to include: sentencepiece tokenizer.model, tokenizer.json or a "
                   "HF tokenizer directory (default: recorded in the checkpoint / run config)")
    b.add_argument("--config", help="YAML with the model: section, when the checkpoint does not carry it")
    b.add_argument("--dtype", default="auto", help="auto (as saved) | fp32 | bf16 | fp16")
    b.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    b.add_argument("--vocab-size", type=int, help="cut the vocabulary to this size (default: the HF size "
                   "recorded on import, else the model's)")
    b.add_argument("--max-position-embeddings", type=int, help="override config.json's max_position_embeddings")

    for parser_ in (a, b):
        parser_.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
        parser_.add_argument("--no-progress", action="store_true", help="no progress bar")
        parser_.add_argument("--verify", action="store_true",
                             help="load the result with transformers and report the max logit difference (builds the whole "
                                  "model in memory, unlike the conversion itself, which streams)")
        parser_.add_argument("--verbose", action="store_true", help="show upstream warnings too")
        parser_.add_argument("--debug", action="store_true", help="tracebacks for bad-input errors too")
    return parser


def position_from_args(args, hf_dir: str):
    """The PositionEmbeddingConfig the options ask for, or None to keep the checkpoint's."""
    from megatron_harpe.config.model import PositionEmbeddingConfig
    from megatron_harpe.convert.errors import ConversionError
    from megatron_harpe.convert.hf_config import hf_rope_settings, read_hf_config

    names = {"rope_base": "base", "interpolation_factor": "interpolation_factor", "yarn_factor": "yarn_factor",
             "yarn_original_max_position_embeddings": "yarn_original_max_position_embeddings", "bases": "bases",
             "llama3_factor": "llama3_factor",
             "llama3_original_max_position_embeddings": "llama3_original_max_position_embeddings",
             "base_strategy": "base_strategy", "base_min": "base_min", "base_max": "base_max",
             "base_stride": "base_stride", "bases_file": "bases_file"}
    given = {field: getattr(args, option) for option, field in names.items() if getattr(args, option) is not None}
    if args.position_kind is None:
        if given:
            first = next(option for option, field in names.items() if field in given)
            raise ConversionError(f"--{first.replace('_', '-')} needs --position-kind")
        return None
    if args.position_kind != "harpe" and "base" not in given:
        given["base"] = hf_rope_settings(read_hf_config(hf_dir))["rope_theta"]
    try:
        return PositionEmbeddingConfig(kind=args.position_kind, yarn_beta_fast=args.yarn_beta_fast,
                                       yarn_beta_slow=args.yarn_beta_slow, **given)
    except ValueError as err:  # messages name the config keys: position.base is --rope-base, etc.
        raise ConversionError(f"--position-kind {args.position_kind}: {err}") from None


def _convert(args) -> int:
    # Conversion is CPU work (the model is built on the CPU, one process); the CPU backend also runs
    # --verify's megatron-core forward. A caller that already chose a backend keeps it.
    from megatron_harpe.backends import backend_name, setup_backend

    if backend_name() is None:
        setup_backend(force_cpu=True)
    if args.command == "hf-to-megatron":
        from megatron_harpe.convert.hf_to_megatron import convert_hf_to_megatron

        summary = convert_hf_to_megatron(
            args.hf_dir, args.save, tp=args.tp, pp=args.pp, position=position_from_args(args, args.hf_dir),
            max_position_embeddings=args.max_position_embeddings, dtype=args.dtype,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, overwrite=args.overwrite,
            show_progress=not args.no_progress, verify=args.verify)
    else:
        from megatron_harpe.convert.megatron_to_hf import convert_megatron_to_hf

        summary = convert_megatron_to_hf(
            args.load, args.out, tokenizer=args.tokenizer, config=args.config, dtype=args.dtype,
            max_shard_size=args.max_shard_size, vocab_size=args.vocab_size,
            max_position_embeddings=args.max_position_embeddings, overwrite=args.overwrite,
            show_progress=not args.no_progress, verify=args.verify)
    for warning in summary.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr, flush=True)
    print(summary.line(), flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: _convert(args), argv=argv, interrupted="nothing written")


if __name__ == "__main__":
    sys.exit(main())
