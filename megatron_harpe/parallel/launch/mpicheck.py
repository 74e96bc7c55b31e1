"""`srun --mpi=pmi2 python -m megatron_harpe.parallel.launch.mpicheck`: does MPI see the world srun started?

A wrong ``--mpi`` plugin (or an mpi4py linked to another MPI than the launcher's) starts N independent
MPI worlds of size 1 that each look healthy. slurm/train.sbatch runs this check before training when
LAUNCHER=mpi: every rank initialises MPI through mpi4py and compares COMM_WORLD's rank and size with
Slurm's (SLURM_PROCID, SLURM_NTASKS) and PMI's; rank 0 prints one line. Exit 1 on a mismatch, naming it.
"""
from __future__ import annotations

import os
import sys


def main() -> int:
    try:
        from mpi4py import MPI
    except ImportError as err:
        print(f"mpicheck: error: mpi4py cannot be imported ({err}): pip install mpi4py (or the project's "
              "'mpi' extra)", file=sys.stderr)
        return 1
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    slurm_rank = os.environ.get("SLURM_PROCID")
    slurm_size = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS")
    pmi_size = os.environ.get("PMI_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE")
    problems = []
    if slurm_size is not None and int(slurm_size) != size:
        problems.append(f"MPI COMM_WORLD has {size} rank(s) but srun started {slurm_size} task(s)")
    if slurm_rank is not None and int(slurm_rank) != rank:
        problems.append(f"MPI rank {rank} but SLURM_PROCID={slurm_rank}")
    if problems:
        print(f"mpicheck: error: {'; '.join(problems)}. The srun --mpi plugin does not match the MPI library "
              f"({MPI.Get_library_version().splitlines()[0].strip()}): use --mpi=pmi2 for MPICH/Intel MPI, "
              "--mpi=pmix for Open MPI (srun --mpi=list shows what this cluster has)", file=sys.stderr)
        return 1
    sizes = comm.allgather(size)
    if rank == 0:
        print(f"mpicheck: MPI COMM_WORLD size {size} on every rank ({len(sizes)} answered), SLURM_NTASKS "
              f"{slurm_size}, PMI size {pmi_size}: {MPI.Get_library_version().splitlines()[0].strip()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
