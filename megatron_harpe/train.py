"""`harpe-train --config examples/<name>.yaml [dotted.key=value ...]` (also `python -m megatron_harpe.train`).

The same command runs under torchrun, srun and mpirun: the launcher is detected from the
environment. The config is checked on every rank before torch is imported (a bad config answers
in a fraction of a second), the machine (GPU, Transformer Engine, Triton) before any process group.
Exit codes (megatron_harpe/cli.py): 0 finished; 2 bad config, flags or input (one message, no
traceback unless --debug; also token ids past the vocabulary); 3 non-finite loss or gradients (last
good checkpoint kept); 4 no space for a checkpoint (partial save removed; do not requeue); 75 stopped
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
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from megatron_harpe.backends import setup_backend

    setup_backend()
    from megatron_harpe.training.runtime import check_runtime, detect_machine

    check_runtime(cfg, detect_machine())  # what the machine must offer, still before any process group
    launch = init_distributed(info=launch)
    if launch.rank == 0:
        print(f"{PROG}: {launch.launcher} launch, world size {launch.world_size}; {cfg.model.position.describe()}; "
              f"resolved config -> {cfg.run_dir}/config.yaml", flush=True)
    import torch.distributed as dist

    from megatron_harpe.training.trainer import run

    try:
        # a dead peer: one line naming it instead of a traceback per survivor (parallel/lost_rank.py)
        from megatron_harpe.config.validate import parse_signals
        from megatron_harpe.parallel.lost_rank import LostRankWatch

        watch = LostRankWatch.start(launch, parse_signals(cfg.checkpoint.exit_signals), prog=PROG, debug=args.debug)
        if watch is not None:
            return watch.run(lambda: run(cfg).exit_code)
        return run(cfg).exit_code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    return run_command(PROG, lambda: _train(args), argv=argv, interrupted="no checkpoint written")


if __name__ == "__main__":
    sys.exit(main())
