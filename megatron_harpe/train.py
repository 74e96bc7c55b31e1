"""`harpe-train --config examples/<name>.yaml [dotted.key=value ...]` (also `python -m megatron_harpe.train`).

The same command runs under torchrun, srun and mpirun: the launcher is detected from the
environment. The config is checked on every rank before torch is imported (a bad config answers
in a fraction of a second), the machine (GPU, Transformer Engine, Triton) before any process group.
Exit codes (megatron_harpe/cli.py): 0 finished; 2 bad config, flags or input (one message, no
traceback unless --debug; also token ids past the vocabulary); 3 non-finite loss or gradients (last
good checkpoint kept); 4 no space for a checkpoint (partial save removed; do not requeue); 5
--check-init found the run's step-0 loss is not Hugging Face's (training/init_check.py); 75 stopped
on a signal after checkpointing (requeue me); 1 internal error (traceback), or a rank was lost (one
line naming it, from one survivor: megatron_harpe/parallel/lost_rank.py).
"""
from __future__ import annotations

import argparse
import sys

from megatron_harpe.cli import run_command

PROG = "harpe-train"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML run config (see examples/)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--verbose", action="store_true", help="show upstream warnings too (HARPE_VERBOSE=1)")
    parser.add_argument("--debug", action="store_true", help="tracebacks for bad-input errors too (HARPE_DEBUG=1)")
    parser.add_argument("--check-init", metavar="HF_DIR", default=None,
                        help="train nothing: build the run, run its first forward from training.init_from and compare "
                             "the loss with Hugging Face's on the same tokens, labels and loss mask (exit 0 within "
                             "the tolerance, 5 otherwise; docs/training.md, 'The step-0 check')")
    parser.add_argument("--check-init-tokens", metavar="N", type=int, default=None,
                        help="tokens of the first global batch to compare (default 16384; at least one micro-batch)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. training.iterations=20")
    return parser.parse_args(argv)


def _train(args) -> int:
    from megatron_harpe.config.loader import dump_config, load_config
    from megatron_harpe.config.validate import validate_config
    from megatron_harpe.parallel.launch import detect_launch, init_distributed

    cfg = load_config(args.config, args.overrides)
    launch = detect_launch()
    validate_config(cfg, launch.world_size)
    if cfg.data.tokenizer_model is not None:  # the vocabulary contract, before anything is made (issue 23)
        from megatron_harpe.data.tokenizer import check_tokenizer_fits_model

        check_tokenizer_fits_model(cfg.data.tokenizer_type, cfg.data.tokenizer_model, cfg.model.vocab_size)
        if cfg.data.eod_token is not None:  # a token the tokenizer does not have: exit 2 now
            from megatron_harpe.data.tokenizer import load_tokenizer

            load_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model, eod_token=cfg.data.eod_token)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from megatron_harpe.backends import setup_backend

    setup_backend()
    from megatron_harpe.training.runtime import check_runtime, detect_machine

    check_runtime(cfg, detect_machine())  # what the machine must offer, still before any process group
    reference = None
    if args.check_init is not None:  # a directory that is not a HF checkpoint: exit 2 now, on every rank
        from megatron_harpe.convert.hf_reference import HFReference

        reference = HFReference(args.check_init, show_progress=False)
    launch = init_distributed(info=launch)
    if launch.rank == 0:
        what = (f"--check-init against {args.check_init}: nothing is trained or saved" if reference is not None
                else f"resolved config -> {cfg.run_dir}/config.yaml")
        print(f"{PROG}: {launch.launcher} launch, world size {launch.world_size}; {cfg.model.position.describe()}; "
              f"{what}", flush=True)
    import torch.distributed as dist

    from megatron_harpe.training.trainer import run

    def body() -> int:
        if reference is not None:
            return _check_init(cfg, reference, args, launch.rank)
        return run(cfg).exit_code

    try:
        # a dead peer: one line naming it instead of a traceback per survivor (parallel/lost_rank.py)
        from megatron_harpe.config.validate import parse_signals
        from megatron_harpe.parallel.lost_rank import LostRankWatch

        watch = LostRankWatch.start(launch, parse_signals(cfg.checkpoint.exit_signals), prog=PROG, debug=args.debug)
        if watch is not None:
            return watch.run(body)
        return body()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _check_init(cfg, reference, args, rank: int) -> int:
    """--check-init: the table on stdout (rank 0), one line on stderr when it fails; exit 0 or 5."""
    from megatron_harpe.training.init_check import DEFAULT_MAX_TOKENS, check_init

    def progress(text: str) -> None:
        print(f"{PROG}: --check-init: {text}", flush=True)

    tokens = DEFAULT_MAX_TOKENS if args.check_init_tokens is None else args.check_init_tokens
    result = check_init(cfg, reference, max_tokens=tokens, log=progress)
    if rank == 0:
        print(result.report(f"{PROG} --check-init"), flush=True)
        if not result.passed:
            print(f"{PROG}: --check-init failed: {result.failure}", file=sys.stderr, flush=True)
    return result.exit_code


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.check_init_tokens is not None and args.check_init_tokens < 1:
        print(f"{PROG}: error: --check-init-tokens must be at least 1, got {args.check_init_tokens}", file=sys.stderr)
        return 2
    return run_command(PROG, lambda: _train(args), argv=argv, interrupted="no checkpoint written")


if __name__ == "__main__":
    sys.exit(main())
