"""Worker: what megatron-core hands Transformer Engine's attention for a parallel config, built by the trainer.

Builds harpe-train's Trainer for the config (init_distributed + Trainer.__init__: the real process-group set-up)
and records the hierarchical context-parallel groups megatron-core's TE attention would pass to TE as its
cp_group for cp_comm_type a2a+p2p (extensions/transformer_engine.py: get_hierarchical_context_parallel_groups(
check_initialized=False)), and the transformer config's hierarchical sizes.

Usage (under torchrun): combinations_worker.py --out DIR -- <config> [overrides]
"""
import argparse
import json
import os

from megatron_harpe.backends import setup_backend

setup_backend()

import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402

from megatron_harpe.config.loader import load_config  # noqa: E402
from megatron_harpe.parallel.launch import init_distributed  # noqa: E402
from megatron_harpe.training.trainer import Trainer  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    rest = args.rest[1:] if args.rest and args.rest[0] == "--" else args.rest
    cfg = load_config(rest[0], rest[1:])
    init_distributed()
    trainer = Trainer(cfg)
    groups = ps.get_hierarchical_context_parallel_groups(check_initialized=False)
    tcfg = trainer._transformer_config(cfg.model)
    result = {"rank": dist.get_rank(),
              "cp_group": dist.get_process_group_ranks(ps.get_context_parallel_group()),
              "hierarchical_groups": None if groups is None else [dist.get_process_group_ranks(g) for g in groups],
              "config_hierarchical_sizes": tcfg.hierarchical_context_parallel_sizes,
              "config_cp_comm_type": tcfg.cp_comm_type}
    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
