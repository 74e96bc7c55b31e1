"""Which launcher started this process: the precedence between the per-launcher readers.

The order, and why, is in the package docstring (megatron_harpe/parallel/launch/__init__.py).
"""
from __future__ import annotations

import os
from typing import Callable, Mapping

from .env import LaunchError, LaunchInfo
from .mpi import MpiComm, MpiEnvRanks, lazy_comm, mpi_env_ranks, mpi_flavour, read_mpi
from .single import read_single
from .slurm import SrunStep, is_srun_step, read_srun_step, srun_started_mpi_daemons
from .torchrun import check_stale_torch_vars, is_torchrun_launch, read_torchrun


def detect_launch(env: Mapping[str, str] | None = None,
                  comm: MpiComm | Callable[[], MpiComm] | None = None) -> LaunchInfo:
    """Describe this process's place in the job from the launcher's environment variables.

    `env` defaults to os.environ. `comm` is only used under an MPI launcher without MASTER_ADDR
    (to broadcast rank 0's address and port), with PMIx (world size) and where the node-local
    layout is not in the environment: an mpi4py-like communicator, or a callable returning one;
    by default mpi4py's COMM_WORLD is imported then, and only then.
    Raises LaunchError (a ValueError) naming the variables when they are inconsistent or incomplete.
    """
    env = os.environ if env is None else env
    get_comm = lazy_comm(comm)
    if is_torchrun_launch(env):
        return read_torchrun(env)
    if is_srun_step(env):
        info = _srun_step(env, get_comm)
    elif mpi_flavour(env) is not None:
        info = read_mpi(env, get_comm)
    else:
        return read_single(env)
    check_stale_torch_vars(env, info)
    return info


def _srun_step(env: Mapping[str, str], get_comm: Callable[[], MpiComm]) -> LaunchInfo:
    """Slurm's view, unless srun only started an MPI launcher's per-node daemons: then MPI's."""
    step = read_srun_step(env)
    if mpi_flavour(env) is None:
        return step.info
    mpi = mpi_env_ranks(env)
    if srun_started_mpi_daemons(env, step, mpi.world):
        return read_mpi(env, get_comm)
    _check_slurm_and_mpi_agree(step, mpi)
    return step.info


def _check_slurm_and_mpi_agree(step: SrunStep, mpi: MpiEnvRanks) -> None:
    """srun --mpi=pmi2|pmix exports both sets; they differ only when two launchers were mixed."""
    slurm = step.info
    if mpi.rank != slurm.rank or (mpi.world is not None and mpi.world != slurm.world_size):
        raise LaunchError(
            f"slurm+mpi disagree: SLURM_PROCID={slurm.rank}, {step.ntasks_var}={slurm.world_size} but "
            f"{mpi.names['rank']}={mpi.rank}" + (f", {mpi.names['world_size']}={mpi.world}"
                                                 if mpi.world is not None else "")
            + f" ({mpi.flavour}). Launch either with srun (--mpi=pmi2|pmix) or with mpirun, not a mix.")
