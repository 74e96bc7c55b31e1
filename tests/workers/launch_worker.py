"""Worker for tests/test_launch.py: init_distributed() under a real launcher, one gloo all_reduce.

Writes OUT/rank{RANK}.json with what the launcher detection said, what the process group says,
and the all_reduce result (sum over ranks of rank + 1). Started by torchrun, mpiexec, or as
constructed Slurm-style tasks; it must not know which.
"""
import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_harpe.parallel.launch import init_distributed

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
args = parser.parse_args()

info = init_distributed(timeout_s=60, backend="gloo")
again = init_distributed(timeout_s=60, backend="gloo")  # idempotent: same answer, no second group
total = torch.tensor([float(info.rank + 1)])
dist.all_reduce(total)
result = {
    "info": dataclasses.asdict(info),
    "launcher": info.launcher, "rank": info.rank, "world_size": info.world_size,
    "local_rank": info.local_rank, "local_world_size": info.local_world_size,
    "master_addr": info.master_addr, "master_port": info.master_port, "node_rank": info.node_rank,
    "idempotent": again == info,
    "group_rank": dist.get_rank(), "group_size": dist.get_world_size(), "sum": total.item(),
    "environ": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                "MASTER_ADDR", "MASTER_PORT")},
}
if "mpi4py.MPI" in sys.modules:  # imported by the launcher detection (MPI without MASTER_ADDR)
    comm = sys.modules["mpi4py.MPI"].COMM_WORLD
    result["mpi4py"] = {"rank": comm.Get_rank(), "size": comm.Get_size()}
dist.destroy_process_group()
if info.world_size == 1:
    # A second group in the same process (a trainer's main() run twice in one test process): the same
    # launcher, not our own export of RANK/WORLD_SIZE/... mistaken for an env:// launch. (Only for one
    # rank: re-initialising a multi-rank group over torchrun's agent store races on the old group's keys.)
    again = init_distributed(timeout_s=60, backend="gloo")
    total = torch.tensor([1.0])
    dist.all_reduce(total)
    result["reinit"] = {"launcher": again.launcher, "rank": again.rank, "world_size": again.world_size,
                        "sum": total.item()}
    dist.destroy_process_group()
Path(args.out, f"rank{info.rank}.json").write_text(json.dumps(result, indent=1))
