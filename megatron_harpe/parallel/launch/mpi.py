"""MPI launchers: Open MPI, MVAPICH2, MPICH/Hydra/Intel MPI/PMI-2, PMIx.

The environment gives rank and size (PMIx: the rank only) and mostly the node-local layout, but
never where rank 0 is. What it lacks comes from mpi4py, imported only when needed, through a
communicator that tests replace with a stand-in (:class:`MpiComm`).
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from .env import DEFAULT_MASTER_PORT, LaunchError, LaunchInfo, _first, _int, _master_port, _require, _validate

# MPI flavours whose environment carries rank, size and the node-local layout. Order matters only
# for picking which names an error message shows; a process normally has one flavour.
_MPI_FLAVOURS = (
    ("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("MVAPICH2", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK",
     "MV2_COMM_WORLD_LOCAL_SIZE"),
    ("MPICH/Hydra or PMI-2", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)
_PMIX_NAMES = {"rank": "PMIX_RANK", "world_size": "MPI_Comm_size (mpi4py)",
               "local_rank": "mpi4py shared-memory split", "local_world_size": "mpi4py shared-memory split"}


# ----------------------------------------------------------------------------------------------
# The communicator (mpi4py's COMM_WORLD, or a stand-in)
# ----------------------------------------------------------------------------------------------

class MpiComm(Protocol):
    """The part of mpi4py's ``MPI.COMM_WORLD`` this package uses (tests pass a stand-in)."""

    def Get_rank(self) -> int: ...
    def Get_size(self) -> int: ...
    def bcast(self, obj: Any, root: int = 0) -> Any: ...
    def Split_type(self, split_type: Any, key: int = 0) -> Any: ...  # -> a communicator with Get_rank/Get_size/Free


class Mpi4pyMissing(LaunchError):
    """mpi4py is needed for this MPI launch but cannot be imported."""


def mpi4py_comm_world() -> MpiComm:
    """mpi4py's COMM_WORLD (importing it initialises MPI); Mpi4pyMissing when it is not installed."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise Mpi4pyMissing(f"mpi4py cannot be imported ({e})") from None
    return MPI.COMM_WORLD


def lazy_comm(comm: MpiComm | Callable[[], MpiComm] | None) -> Callable[[], MpiComm]:
    """A getter that makes the communicator on first use only, then returns that one.

    `comm`: a communicator, a callable returning one, or None for mpi4py's COMM_WORLD. Lazy because
    importing mpi4py initialises MPI, which a launch whose environment says everything must not need.
    """
    if comm is None:
        factory: Callable[[], MpiComm] = mpi4py_comm_world
    elif callable(comm) and not hasattr(comm, "Get_rank"):
        factory = comm  # type: ignore[assignment]
    else:
        factory = lambda: comm  # type: ignore[assignment,return-value]  # noqa: E731
    cache: list[MpiComm] = []

    def get_comm() -> MpiComm:
        if not cache:
            cache.append(factory())
        return cache[0]

    return get_comm


def _get_comm(get_comm: Callable[[], MpiComm], why: str, alternative: str = "") -> MpiComm:
    try:
        return get_comm()
    except Mpi4pyMissing as e:
        raise LaunchError(f"mpi: {why}; that needs mpi4py: `pip install mpi4py` (or the project's `mpi` extra: "
                          f"pip install -e '.[mpi]'){alternative}. [{e}]") from None


def _check_comm(comm: MpiComm, rank: int, world: int, names: Mapping[str, str]) -> None:
    """mpi4py must see the world the launcher started; a different MPI library gives size-1 worlds."""
    c_rank, c_size = comm.Get_rank(), comm.Get_size()
    if (c_rank, c_size) != (rank, world):
        raise LaunchError(
            f"mpi: the launcher says rank {rank} of {world} ({names['rank']}, {names['world_size']}) but mpi4py's "
            f"COMM_WORLD is rank {c_rank} of {c_size}. mpi4py is linked to a different MPI library than the "
            "launcher (e.g. Open MPI's mpi4py under MPICH's mpiexec) or srun's --mpi plugin does not match; "
            "use the matching launcher / `srun --mpi=...`, or export MASTER_ADDR and MASTER_PORT so no MPI call "
            "is needed.")


def _mpi_local_layout(comm: MpiComm) -> tuple[int, int]:
    """Node-local rank and size by splitting COMM_WORLD into shared-memory (per node) groups."""
    try:
        from mpi4py import MPI

        shared = MPI.COMM_TYPE_SHARED
    except ImportError:  # a stand-in communicator (tests) without mpi4py installed
        shared = None
    local = comm.Split_type(shared, 0)
    try:
        return local.Get_rank(), local.Get_size()
    finally:
        local.Free()


def mpi_broadcast_master(comm: MpiComm, single_node: bool, port: int = 0) -> tuple[str, int]:
    """Rank 0 picks its address and a free port (unless `port` is given); every rank gets them.

    Collective: every rank must call it. On a single node the loopback address is used (it
    needs no name resolution); otherwise rank 0's hostname's address, or the hostname itself when
    that resolves to loopback only.
    """
    payload = None
    if comm.Get_rank() == 0:
        payload = (_local_address(single_node), port or find_free_port())
    addr, port = comm.bcast(payload, root=0)
    return str(addr), int(port)


def _local_address(single_node: bool) -> str:
    if single_node:
        return "127.0.0.1"
    host = socket.gethostname()
    try:
        ip = socket.gethostbyname(host)
    except OSError:
        return host
    return host if ip.startswith("127.") else ip


def find_free_port(host: str = "") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# Reading an MPI launch
# ----------------------------------------------------------------------------------------------

def mpi_flavour(env: Mapping[str, str]) -> str | None:
    """Which MPI launcher's variables are present ("Open MPI", ..., "PMIx"), or None."""
    for name, rank_var, *_ in _MPI_FLAVOURS:
        if _first(env, rank_var):
            return name
    return "PMIx" if _first(env, "PMIX_RANK") else None


@dataclass(frozen=True)
class MpiEnvRanks:
    """What the MPI launcher's environment says; None where it is silent (PMIx, PMI without Hydra)."""

    flavour: str
    rank: int
    world: int | None  # None only for PMIx: it exports the rank but not the size
    local_rank: int | None
    local_world: int | None
    names: dict[str, str]  # field -> the variable it came from (for error messages)


def mpi_env_ranks(env: Mapping[str, str]) -> MpiEnvRanks:
    """Rank, size and node-local layout as far as the environment has them (no MPI call)."""
    flavour = mpi_flavour(env)
    for name, rank_var, size_var, lrank_var, lsize_var in _MPI_FLAVOURS:
        if name != flavour:
            continue
        _require(env, "mpi", [rank_var, size_var], f"{rank_var} is set ({name})")
        rank, world = _int(env, rank_var, "mpi"), _int(env, size_var, "mpi")
        local_rank = _int(env, lrank_var, "mpi") if _first(env, lrank_var) else None
        local_world = _int(env, lsize_var, "mpi") if _first(env, lsize_var) else None
        if (local_rank is None) != (local_world is None):
            _require(env, "mpi", [lrank_var, lsize_var], f"one of {lrank_var}/{lsize_var} is set")
        return MpiEnvRanks(name, rank, world, local_rank, local_world, {
            "rank": rank_var, "world_size": size_var, "local_rank": lrank_var, "local_world_size": lsize_var})
    return MpiEnvRanks("PMIx", _int(env, "PMIX_RANK", "mpi"), None, None, None, dict(_PMIX_NAMES))


def read_mpi(env: Mapping[str, str], get_comm: Callable[[], MpiComm]) -> LaunchInfo:
    """The MPI launcher's view, completed over MPI where the environment is silent."""
    ranks = mpi_env_ranks(env)
    world = ranks.world
    if world is None:
        world = _get_comm(get_comm, "PMIx exports the rank (PMIX_RANK) but not the world size").Get_size()
    comm = _comm_if_needed(env, ranks, get_comm)
    local_rank, local_world = ranks.local_rank, ranks.local_world
    if comm is not None:
        _check_comm(comm, ranks.rank, world, ranks.names)
        if local_rank is None:
            local_rank, local_world = _mpi_local_layout(comm)
    assert local_rank is not None and local_world is not None
    if env.get("MASTER_ADDR", "").strip():
        addr, addr_var = env["MASTER_ADDR"].strip(), "MASTER_ADDR"
        port = _master_port(env, "mpi", DEFAULT_MASTER_PORT)
    else:
        assert comm is not None
        fixed_port = _master_port(env, "mpi", 0)
        addr, port = mpi_broadcast_master(comm, single_node=local_world == world, port=fixed_port)
        addr_var = "rank 0's address (mpi4py broadcast)"
    info = LaunchInfo("mpi", ranks.rank, world, local_rank, local_world, addr, port, None)
    return _validate(info, {**ranks.names, "master_addr": addr_var,
                            "master_port": "MASTER_PORT or mpi4py broadcast"})


def _comm_if_needed(env: Mapping[str, str], ranks: MpiEnvRanks,
                    get_comm: Callable[[], MpiComm]) -> MpiComm | None:
    """The communicator when the environment lacks the master address or the node-local layout."""
    if not env.get("MASTER_ADDR", "").strip():
        return _get_comm(get_comm, "MASTER_ADDR is not set, so rank 0's address and port are shared over MPI",
                         " or export MASTER_ADDR (rank 0's host) and MASTER_PORT before launching")
    if ranks.local_rank is None or ranks.flavour == "PMIx":
        return _get_comm(get_comm, f"the node-local rank ({ranks.names['local_rank']}, "
                                   f"{ranks.names['local_world_size']}) is not in the environment")
    return None
