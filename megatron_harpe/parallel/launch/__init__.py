"""Process-group setup from any launcher: torchrun, Slurm's srun, MPI (Open MPI, MPICH/Hydra, PMI-2, PMIx).

The trainer calls :func:`init_distributed` once and runs unchanged under::

    torchrun --nproc-per-node 8 ...            # also `srun torchrun ...` (one torchrun per node)
    srun --ntasks-per-node 8 python ...         # one task per GPU, no torchrun
    mpirun -n 16 python ... / mpiexec -n 16 python ...
    srun --mpi=pmi2 python ... / srun --mpi=pmix python ...

:func:`detect_launch` reads the environment only (it is a pure function of the mapping it is
given, so every launcher's case is testable with a constructed environment). The one thing the
environment cannot say is *where rank 0 is* under a bare MPI launch: then rank 0's address and a
free port are broadcast with mpi4py, through the ``comm`` argument (mpi4py's ``COMM_WORLD`` by
default, a stand-in in tests). See docs/launch.md for the variables read and the precedence.

Precedence (first match wins; applied in detect.py):

1. torchrun: ``TORCHELASTIC_RUN_ID`` is set, or all of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
   (any env:// launcher). torchrun wins also under ``srun torchrun`` / ``mpirun torchrun``, whose
   SLURM_*/PMI_* variables describe the torchrun processes, not the ranks.
2. Slurm: an srun *step* (``SLURM_STEP_ID``/``SLURM_STEPID`` set; measured: an sbatch batch script
   has SLURM_PROCID=0 and SLURM_NTASKS=N but no step id; a salloc shell has neither). MPI variables
   present in the same process (``srun --mpi=pmi2|pmix``) must agree with Slurm's; Slurm's are used.
   Exception: an MPI launcher started *inside* the allocation (``mpirun``/``mpiexec`` in a batch
   script) starts one daemon per node with srun, so its ranks inherit that daemon step's
   SLURM_* (one task per node, or SLURM_EXTERNAL_LAUNCHER=1) - then the MPI variables are the truth.
3. MPI: Open MPI (OMPI_COMM_WORLD_*), MVAPICH2 (MV2_COMM_WORLD_*), MPICH/Hydra/Intel MPI and
   PMI-2 (PMI_RANK/PMI_SIZE, MPI_LOCALRANKID/MPI_LOCALNRANKS), PMIx (PMIX_RANK, size from mpi4py).
4. single: none of the above - a world of one process.

Modules: env (LaunchInfo, LaunchError, env readers), torchrun, slurm, mpi, single (one reader each),
detect (the precedence), process_group (init_distributed); mpicheck (``python -m``, run by
slurm/train.sbatch before an MPI launch: does MPI's COMM_WORLD match the tasks srun started?).
"""
from __future__ import annotations

from .detect import detect_launch
from .env import LAUNCHERS, LaunchError, LaunchInfo
from .mpi import MpiComm, Mpi4pyMissing, find_free_port, mpi4py_comm_world, mpi_broadcast_master, mpi_flavour
from .process_group import check_world, init_distributed, pick_cuda_device
from .slurm import expand_hostlist, first_host, is_srun_step, parse_tasks_per_node, slurm_master_port

__all__ = ["LaunchInfo", "LaunchError", "Mpi4pyMissing", "MpiComm", "LAUNCHERS", "detect_launch", "init_distributed",
           "expand_hostlist", "first_host", "parse_tasks_per_node", "slurm_master_port", "mpi_broadcast_master",
           "mpi4py_comm_world", "is_srun_step", "mpi_flavour", "check_world", "pick_cuda_device", "find_free_port"]
