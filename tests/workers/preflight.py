"""Worker: harpe-preflight runs in one torchrun launch, each with or without a planted fault.

Every rank runs `megatron_harpe.preflight.cli.main(argv)` once per entry of --runs (a JSON list of {"name",
"fault", "argv"}), with the fault planted in this process for that run only, and records the exit code and what
preflight.json says per check. The reference process parity starts is NOT faulted: it is the reference.

Faults (each a bug users met in other tools, planted in our code for one run):
  cp-chunk-order    a CP rank rotates its two chunks' tokens by each other's positions (2cp-1-r first)
  cp-rank-order     CP rank r rotates by the positions of rank cp-1-r
  swapped-base      the first two K/V groups of every TP rank swap their bases
  cp-not-sharding   the batch is not split over the CP group: every CP rank computes the whole sequence
  no-cp-group       attention gets no CP group: each CP rank attends within its own chunks (Megatron-Bridge #2667)
  other-stack       rank 1 runs another torch than the others (a node on another container image)

Usage (under torchrun): preflight.py --out DIR --runs JSON
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
from unittest import mock

import torch


@contextlib.contextmanager
def planted(fault: str | None):
    from megatron_harpe import compat
    from megatron_harpe.parallel import core_attention
    from megatron_harpe.rope import harpe_rotary

    if fault is None:
        yield
        return
    original = harpe_rotary.context_parallel_positions
    if fault == "cp-chunk-order":
        def positions(seq_len, cp_size, cp_rank):
            held = original(seq_len, cp_size, cp_rank)
            half = held.numel() // 2
            return torch.cat([held[half:], held[:half]])
        patch = mock.patch.object(harpe_rotary, "context_parallel_positions", positions)
    elif fault == "cp-rank-order":
        patch = mock.patch.object(harpe_rotary, "context_parallel_positions",
                                  lambda seq_len, cp_size, cp_rank: original(seq_len, cp_size, cp_size - 1 - cp_rank))
    elif fault == "swapped-base":
        frequencies = harpe_rotary.inverse_frequencies

        def swapped(bases, dim):
            bases = list(bases)
            if len(bases) > 1:
                bases[0], bases[1] = bases[1], bases[0]
            return frequencies(bases, dim)
        patch = mock.patch.object(harpe_rotary, "inverse_frequencies", swapped)
    elif fault == "cp-not-sharding":
        patch = mock.patch.object(compat, "batch_on_this_cp_rank", lambda batch: batch)
    elif fault == "no-cp-group":  # what TE's attention does when megatron-core hands it no CP group
        import torch.distributed as dist

        alone, _ = dist.new_subgroups(group_size=1)  # collective: every rank plants it at the same point
        init = core_attention.SDPACoreAttention.__init__

        def without_cp(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.cp_group, self.cp_size, self.cp_rank = alone, 1, 0
        patch = mock.patch.object(core_attention.SDPACoreAttention, "__init__", without_cp)
    elif fault == "other-stack":
        from megatron_harpe.preflight import environment_check

        record = environment_check.environment_record
        other = (lambda: {**record(), "torch": "2.0.0"}) if os.environ.get("RANK") == "1" else record
        patch = mock.patch.object(environment_check, "environment_record", other)
    else:
        raise ValueError(f"unknown fault {fault!r}")
    with patch:
        yield


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", required=True)
    args = parser.parse_args()
    from megatron_harpe.backends import setup_backend

    setup_backend()
    from megatron_harpe.parallel.launch import init_distributed
    from megatron_harpe.preflight.cli import main as preflight

    init_distributed()  # one process group for every run (preflight leaves a caller's group alone)

    results = {}
    for run in json.loads(args.runs):
        with planted(run.get("fault")):
            code = preflight(run["argv"])
        run_dir = Path(run["run_dir"])
        report = json.loads((run_dir / "preflight.json").read_text()) if (run_dir / "preflight.json").is_file() \
            else {}
        results[run["name"]] = {"exit": code, "checks": {c["name"]: {"status": c["status"], "summary": c["summary"],
                                                                       "details": c["details"]}
                                                          for c in report.get("checks", [])}}
    Path(args.out, f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
