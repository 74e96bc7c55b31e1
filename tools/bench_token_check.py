#!/usr/bin/env python
"""What the per-iteration token-id check costs, beside what assembling the same batches costs, in one run.

    python tools/bench_token_check.py [--repeat 20] [--shapes 1x131072,8x4096,4x32768] [--micro-batches 1]

Why: harpe-train checks every batch's token and label ids against model.vocab_size before the step
(megatron_harpe/training/token_ids.py): a min and a max over host tensors and one one-element
all-reduce. The baseline is what the trainer already does for the same batches every iteration:
read them from the dataset and stack them (MicroBatches.iteration on the mock dataset; an indexed
dataset reads from a memory map, usually slower). Printed per shape: best-of-N milliseconds of each
and the ratio. The all-reduce is a world of one here (gloo, a real process group); on a cluster it
is one latency-bound collective (tens of microseconds on NCCL), next to steps of seconds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def best_ms(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--shapes", default="1x131072,4x32768,8x4096", help="micro-batch x sequence length, ...")
    parser.add_argument("--micro-batches", type=int, default=1, help="micro-batches per iteration on this rank")
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args(argv)

    import torch
    import torch.distributed as dist

    from megatron_harpe.training.data import MicroBatches, MockArithmeticDataset
    from megatron_harpe.training.token_ids import check_token_ids

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", rank=0, world_size=1)
    print(f"{'shape':>12} | {'batches (ms)':>12} | {'check (ms)':>10} | check / batches")
    ratios = []
    for shape in args.shapes.split(","):
        micro, seq = (int(x) for x in shape.split("x"))
        dataset = MockArithmeticDataset(args.vocab, seq, micro * args.micro_batches * 4, seed=0)
        data = MicroBatches(dataset, global_batch=micro * args.micro_batches, micro_batch=micro, dp_rank=0, dp_size=1)
        batches = data.iteration(0)
        assemble = best_ms(lambda: data.iteration(0), args.repeat)
        check = best_ms(lambda: check_token_ids(batches, args.vocab, locate=lambda j, r: "", device=torch.device("cpu"),
                                                what="bench"), args.repeat)
        ratios.append(check / assemble)
        print(f"{shape:>12} | {assemble:12.3f} | {check:10.3f} | {check / assemble:.3f}")
    dist.destroy_process_group()
    print(f"token-id check: {min(ratios):.3f}-{max(ratios):.3f} x the time to assemble the same batches "
          f"(best of {args.repeat}, {len(ratios)} shapes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
