"""`harpe-train --config examples/<name>.yaml [dotted.key=value ...]` (also `python -m megatron_harpe.train`).

The same command runs under torchrun, srun and mpirun: the launcher is detected from the
environment. The config is validated on every rank before any process group is created.
Exit codes: 0 finished; 75 stopped on a signal after checkpointing (requeue me);
3 non-finite loss (last good checkpoint kept); 2 bad config or arguments.
"""
from __future__ import annotations

import argparse
import sys

from megatron_harpe.backends import setup_backend


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="harpe-train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML run config (see examples/)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. training.iterations=20")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # The config is read and checked before torch or megatron-core is imported: a bad config or
    # --print-config answers in well under a second, on every rank, before any process group.
    from megatron_harpe.config.loader import ConfigError, dump_config, load_config
    from megatron_harpe.config.validate import validate_config
    from megatron_harpe.parallel.launch import detect_launch, init_distributed

    try:
        cfg = load_config(args.config, args.overrides)
        launch = detect_launch()
        validate_config(cfg, launch.world_size)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"harpe-train: error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(cfg))
        return 0
    setup_backend()
    from megatron_harpe.training.runtime import check_runtime, detect_machine

    try:  # what the machine must offer (GPU, Transformer Engine, Triton), still before any process group
        check_runtime(cfg, detect_machine())
    except ConfigError as err:
        print(f"harpe-train: error: {err}", file=sys.stderr)
        return 2
    launch = init_distributed(info=launch)
    if launch.rank == 0:
        print(f"harpe-train: {launch.launcher} launch, world size {launch.world_size}\n{dump_config(cfg)}", flush=True)
    from megatron_harpe.training.trainer import run

    import torch.distributed as dist

    try:
        result = run(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
