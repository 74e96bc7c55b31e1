"""torchrun and any other env:// launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR (MASTER_PORT).

Also the checks on these variables when another launcher wins: left over from an earlier launch or
exported by hand, they must not silently contradict the launcher that really started the process.
"""
from __future__ import annotations

from typing import Mapping

from .env import DEFAULT_MASTER_PORT, LaunchError, LaunchInfo, _first, _int, _master_port, _require, _validate
from .slurm import is_srun_step

_TORCHRUN_CORE = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")


def is_torchrun_launch(env: Mapping[str, str]) -> bool:
    """torchrun itself (TORCHELASTIC_RUN_ID), or a complete hand-made env:// set."""
    return bool(env.get("TORCHELASTIC_RUN_ID", "").strip()) or all(env.get(n, "").strip() for n in _TORCHRUN_CORE)


def read_torchrun(env: Mapping[str, str]) -> LaunchInfo:
    """The env:// variables' view; LaunchError naming them if they are incomplete or do not add up."""
    why = "TORCHELASTIC_RUN_ID is set (started by torchrun)" if env.get("TORCHELASTIC_RUN_ID") else \
        "an env:// launch"
    _require(env, "torchrun", _TORCHRUN_CORE, why)
    world = _int(env, "WORLD_SIZE", "torchrun")
    local_world = _int(env, "LOCAL_WORLD_SIZE", "torchrun") if _first(env, "LOCAL_WORLD_SIZE") else world
    node = _int(env, "GROUP_RANK", "torchrun") if _first(env, "GROUP_RANK") else None
    info = LaunchInfo("torchrun", _int(env, "RANK", "torchrun"), world, _int(env, "LOCAL_RANK", "torchrun"),
                      local_world, env["MASTER_ADDR"].strip(), _master_port(env, "torchrun", DEFAULT_MASTER_PORT),
                      node)
    _validate(info, {"rank": "RANK", "world_size": "WORLD_SIZE", "local_rank": "LOCAL_RANK",
                     "local_world_size": "LOCAL_WORLD_SIZE" if _first(env, "LOCAL_WORLD_SIZE")
                     else "WORLD_SIZE (LOCAL_WORLD_SIZE unset)", "master_port": "MASTER_PORT",
                     "master_addr": "MASTER_ADDR"})
    if not env.get("TORCHELASTIC_RUN_ID", "").strip() and is_srun_step(env):
        _check_not_copied_into_tasks(env, info)
    return info


def _check_not_copied_into_tasks(env: Mapping[str, str], info: LaunchInfo) -> None:
    """An env:// set exported once and copied into every srun task gives every task the same RANK."""
    ntasks_var = _first(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    if not ntasks_var or not env[ntasks_var].strip().isdigit():
        return
    procid = env.get("SLURM_PROCID", "").strip()
    if int(env[ntasks_var]) == info.world_size and procid.isdigit() and int(procid) != info.rank:
        raise LaunchError(f"RANK={info.rank} but SLURM_PROCID={procid} with the same world size "
                          f"({ntasks_var}=WORLD_SIZE={info.world_size}): RANK/WORLD_SIZE/LOCAL_RANK look exported "
                          "into every srun task. Unset them and let srun's variables decide.")


def check_stale_torch_vars(env: Mapping[str, str], info: LaunchInfo) -> None:
    """RANK/WORLD_SIZE/LOCAL_RANK left in the environment must agree with the launcher's values."""
    bad = [f"{name}={env[name].strip()} (launcher: {value})"
           for name, value in (("RANK", info.rank), ("WORLD_SIZE", info.world_size), ("LOCAL_RANK", info.local_rank))
           if env.get(name, "").strip() and env[name].strip() != str(value)]
    if bad:
        raise LaunchError(f"{info.launcher}: stale torch variables contradict the launcher: {', '.join(bad)}. "
                          "Unset them (they are set from the launcher's values by init_distributed).")


def check_no_partial_env_url(env: Mapping[str, str]) -> None:
    """Without any launcher, a partial env:// set is a mistake - except one that says "rank 0 of 1"."""
    single_values = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    present = [n for n in single_values if env.get(n, "").strip()]
    if any(env[n].strip() != single_values[n] for n in present):
        missing = [n for n in _TORCHRUN_CORE if not env.get(n, "").strip()]
        raise LaunchError(f"incomplete env:// launch: {', '.join(present)} set but {', '.join(missing)} not "
                          "(and no torchrun, srun or MPI launcher variables found). Set all of RANK, "
                          "WORLD_SIZE, LOCAL_RANK, MASTER_ADDR (and MASTER_PORT), or unset them.")
