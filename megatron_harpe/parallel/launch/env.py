"""What every launcher reader shares: the result type, the error type, and strict env readers.

The readers take the environment as a plain mapping (never os.environ directly), so each launcher's
case is testable with a constructed environment.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from megatron_harpe.cli import InputError

LAUNCHERS = ("torchrun", "slurm", "mpi", "single")
DEFAULT_MASTER_PORT = 29500  # torch's own default, used when MASTER_ADDR is given without MASTER_PORT


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits in the job, as the launcher described it."""

    launcher: str  # "torchrun" | "slurm" | "mpi" | "single"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    node_rank: int | None = None


class LaunchError(InputError):
    """The launcher's environment is inconsistent or incomplete (the message names the variables)."""


def _int(env: Mapping[str, str], name: str, launcher: str) -> int:
    raw = env[name]
    try:
        return int(raw.strip())
    except ValueError:
        raise LaunchError(f"{launcher}: {name}={raw!r} is not an integer") from None


def _first(env: Mapping[str, str], *names: str) -> str | None:
    """The first of `names` that is set (to a non-empty value), or None."""
    for name in names:
        if env.get(name, "").strip():
            return name
    return None


def _require(env: Mapping[str, str], launcher: str, names: Sequence[str], why: str) -> None:
    missing = [n for n in names if not env.get(n, "").strip()]
    if missing:
        raise LaunchError(f"{launcher}: {why}, but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                          f"not set (set: {', '.join(n for n in names if n not in missing) or 'none'})")


def _master_port(env: Mapping[str, str], launcher: str, default: int) -> int:
    return _int(env, "MASTER_PORT", launcher) if env.get("MASTER_PORT", "").strip() else default


def _validate(info: LaunchInfo, names: Mapping[str, str]) -> LaunchInfo:
    """Check the ranks and sizes fit together; `names` maps field -> the variable it came from."""
    def n(field: str) -> str:
        return names.get(field, field)

    if info.world_size < 1:
        raise LaunchError(f"{info.launcher}: {n('world_size')}={info.world_size} must be >= 1")
    if not 0 <= info.rank < info.world_size:
        raise LaunchError(f"{info.launcher}: {n('rank')}={info.rank} is not in [0, {n('world_size')}="
                          f"{info.world_size})")
    if not 1 <= info.local_world_size <= info.world_size:
        raise LaunchError(f"{info.launcher}: {n('local_world_size')}={info.local_world_size} is not in "
                          f"[1, {n('world_size')}={info.world_size}]")
    if not 0 <= info.local_rank < info.local_world_size:
        raise LaunchError(f"{info.launcher}: {n('local_rank')}={info.local_rank} is not in [0, "
                          f"{n('local_world_size')}={info.local_world_size})")
    if not 0 < info.master_port < 65536:
        raise LaunchError(f"{info.launcher}: master port {info.master_port} ({n('master_port')}) is not a "
                          "valid TCP port")
    if not info.master_addr:
        raise LaunchError(f"{info.launcher}: empty master address ({n('master_addr')})")
    return info
