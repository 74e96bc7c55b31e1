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

Precedence (first match wins):

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
"""
from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Callable, Mapping, Protocol, Sequence

log = logging.getLogger(__name__)

LAUNCHERS = ("torchrun", "slurm", "mpi", "single")
DEFAULT_MASTER_PORT = 29500  # torch's own default, used when MASTER_ADDR is given without MASTER_PORT
# Slurm master ports are derived from the job id into [SLURM_PORT_BASE, SLURM_PORT_BASE + SLURM_PORT_SPAN):
# unprivileged, and below Linux's default ephemeral range (32768-60999), so an outgoing connection's
# port cannot already hold it.
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 15000
SLURM_PORT_STEPS = 10  # consecutive steps of one job get different ports (two steps may overlap)


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


class MpiComm(Protocol):
    """The part of mpi4py's ``MPI.COMM_WORLD`` this module uses (tests pass a stand-in)."""

    def Get_rank(self) -> int: ...
    def Get_size(self) -> int: ...
    def bcast(self, obj: Any, root: int = 0) -> Any: ...
    def Split_type(self, split_type: Any, key: int = 0) -> Any: ...  # -> a communicator with Get_rank/Get_size/Free


class LaunchError(ValueError):
    """The launcher's environment is inconsistent or incomplete (the message names the variables)."""


# ----------------------------------------------------------------------------------------------
# Slurm's compressed host lists and task counts
# ----------------------------------------------------------------------------------------------

def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: "a[1-2,5],b" -> ["a[1-2,5]", "b"]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"bad Slurm host list {text!r}: nested '['")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"bad Slurm host list {text!r}: ']' without '['")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"bad Slurm host list {text!r}: '[' without ']'")
    parts.append(text[start:])
    return parts


def _expand_range_set(body: str, whole: str) -> list[str]:
    """"001-003,007" -> ["001", "002", "003", "007"] (the start's zero-padding is kept)."""
    out = []
    for item in body.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise ValueError(f"bad Slurm host list {whole!r}: {item!r} in [...] is not N or N-M")
        lo_text, hi_text = m.group(1), m.group(2)
        lo = int(lo_text)
        hi = lo if hi_text is None else int(hi_text)
        if hi < lo:
            raise ValueError(f"bad Slurm host list {whole!r}: range {item!r} runs backwards")
        width = len(lo_text) if lo_text.startswith("0") else 0
        out.extend(str(n).zfill(width) for n in range(lo, hi + 1))
    return out


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm compressed host list, in Slurm's order, without ``scontrol``.

    ``"gpu[001-003,007],login5,a[1-2]-ib"`` -> gpu001 gpu002 gpu003 gpu007 login5 a1-ib a2-ib.
    Several bracket groups in one name expand as a product (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1
    r2n2). Raises ValueError on unbalanced brackets, empty names or malformed ranges.
    """
    text = hostlist.strip()
    if not text:
        raise ValueError("empty Slurm host list")
    hosts: list[str] = []
    for part in _split_top_level(text):
        part = part.strip()
        if not part:
            raise ValueError(f"bad Slurm host list {hostlist!r}: empty host name")
        names = [""]
        for literal, body in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", part):
            if body:
                names = [n + literal + x for n in names for x in _expand_range_set(body, hostlist)]
            else:
                names = [n + literal for n in names]
        if "[]" in part:
            raise ValueError(f"bad Slurm host list {hostlist!r}: empty brackets")
        hosts.extend(names)
    return hosts


def first_host(hostlist: str) -> str:
    """The first host of a Slurm host list (where srun places task 0 of a block distribution)."""
    return expand_hostlist(hostlist)[0]


def parse_tasks_per_node(value: str) -> list[int]:
    """``"8(x2),4"`` -> [8, 8, 4] (the format of SLURM_TASKS_PER_NODE / SLURM_STEP_TASKS_PER_NODE)."""
    counts: list[int] = []
    for item in value.strip().split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ValueError(f"bad Slurm tasks-per-node value {value!r}: {item!r} is not N or N(xK)")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def slurm_master_port(job_id: int, step_id: int = 0) -> int:
    """A port every task of a step derives alike from its job and step id (no communication).

    Different jobs sharing a node get different ports (unless their ids collide modulo 1500), and
    the first 10 steps of one job get different ports, so overlapping steps do not clash.
    """
    slots = SLURM_PORT_SPAN // SLURM_PORT_STEPS
    return SLURM_PORT_BASE + (job_id % slots) * SLURM_PORT_STEPS + step_id % SLURM_PORT_STEPS


# ----------------------------------------------------------------------------------------------
# Reading the environment
# ----------------------------------------------------------------------------------------------

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


def _master_port(env: Mapping[str, str], launcher: str, default: int) -> int:
    return _int(env, "MASTER_PORT", launcher) if env.get("MASTER_PORT", "").strip() else default


_TORCHRUN_CORE = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")


def _torchrun(env: Mapping[str, str]) -> LaunchInfo:
    why = "TORCHELASTIC_RUN_ID is set (started by torchrun)" if env.get("TORCHELASTIC_RUN_ID") else \
        "an env:// launch"
    _require(env, "torchrun", _TORCHRUN_CORE, why)
    world = _int(env, "WORLD_SIZE", "torchrun")
    local_world = _int(env, "LOCAL_WORLD_SIZE", "torchrun") if _first(env, "LOCAL_WORLD_SIZE") else world
    node = _int(env, "GROUP_RANK", "torchrun") if _first(env, "GROUP_RANK") else None
    info = LaunchInfo("torchrun", _int(env, "RANK", "torchrun"), world, _int(env, "LOCAL_RANK", "torchrun"),
                      local_world, env["MASTER_ADDR"].strip(), _master_port(env, "torchrun", DEFAULT_MASTER_PORT),
                      node)
    return _validate(info, {"rank": "RANK", "world_size": "WORLD_SIZE", "local_rank": "LOCAL_RANK",
                            "local_world_size": "LOCAL_WORLD_SIZE" if _first(env, "LOCAL_WORLD_SIZE")
                            else "WORLD_SIZE (LOCAL_WORLD_SIZE unset)", "master_port": "MASTER_PORT",
                            "master_addr": "MASTER_ADDR"})


def is_srun_step(env: Mapping[str, str]) -> bool:
    """True when srun started this process: only srun's tasks carry a step id.

    An sbatch batch script has SLURM_PROCID=0, SLURM_LOCALID=0 and SLURM_NTASKS=N but no step id; a
    salloc shell has SLURM_NTASKS but neither. Both are single processes, not rank 0 of N.
    """
    return _first(env, "SLURM_STEP_ID", "SLURM_STEPID") is not None


def _slurm(env: Mapping[str, str]) -> tuple[LaunchInfo, dict]:
    """The srun step's view; also returns the step's tasks-per-node list (for the MPI-daemon check)."""
    ntasks_var = _first(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    _require(env, "slurm", ["SLURM_PROCID", "SLURM_LOCALID", ntasks_var or "SLURM_NTASKS"],
             "this process is an srun task (SLURM_STEP_ID is set)")
    rank = _int(env, "SLURM_PROCID", "slurm")
    world = _int(env, ntasks_var, "slurm")
    local_rank = _int(env, "SLURM_LOCALID", "slurm")
    node_id = _int(env, "SLURM_NODEID", "slurm") if _first(env, "SLURM_NODEID") else None

    tpn_var = _first(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    per_node: list[int] | None = None
    if tpn_var:
        try:
            per_node = parse_tasks_per_node(env[tpn_var])
        except ValueError as e:
            raise LaunchError(f"slurm: {tpn_var}: {e}") from None
        if sum(per_node) != world:
            raise LaunchError(f"slurm: {tpn_var}={env[tpn_var]!r} adds up to {sum(per_node)} tasks but "
                              f"{ntasks_var}={world}")
        if node_id is None:
            if len(set(per_node)) != 1:
                raise LaunchError(f"slurm: {tpn_var}={env[tpn_var]!r} differs between nodes and SLURM_NODEID "
                                  "is not set, so this node's task count is unknown")
            local_world = per_node[0]
        elif node_id >= len(per_node):
            raise LaunchError(f"slurm: SLURM_NODEID={node_id} but {tpn_var}={env[tpn_var]!r} lists "
                              f"{len(per_node)} node(s)")
        else:
            local_world = per_node[node_id]
        local_var = f"{tpn_var}[SLURM_NODEID]"
    elif _first(env, "SLURM_NTASKS_PER_NODE"):
        local_world = _int(env, "SLURM_NTASKS_PER_NODE", "slurm")
        local_var = "SLURM_NTASKS_PER_NODE"
    else:
        nnodes_var = _first(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
        if nnodes_var and _int(env, nnodes_var, "slurm") == 1:
            local_world, local_var = world, f"{ntasks_var} ({nnodes_var}=1)"
        else:
            raise LaunchError("slurm: cannot tell how many tasks run on this node: none of "
                              "SLURM_STEP_TASKS_PER_NODE, SLURM_TASKS_PER_NODE, SLURM_NTASKS_PER_NODE is set")

    if env.get("MASTER_ADDR", "").strip():
        addr, addr_var = env["MASTER_ADDR"].strip(), "MASTER_ADDR"
    else:
        addr_var = _first(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        if addr_var is None:
            raise LaunchError("slurm: no master address: none of MASTER_ADDR, SLURM_STEP_NODELIST, "
                              "SLURM_JOB_NODELIST, SLURM_NODELIST is set")
        try:
            addr = first_host(env[addr_var])
        except ValueError as e:
            raise LaunchError(f"slurm: {addr_var}: {e}") from None

    if env.get("MASTER_PORT", "").strip():
        port, port_var = _int(env, "MASTER_PORT", "slurm"), "MASTER_PORT"
    else:
        job_var = _first(env, "SLURM_JOB_ID", "SLURM_JOBID")
        if job_var is None:
            raise LaunchError("slurm: MASTER_PORT is not set and neither is SLURM_JOB_ID (the port is derived "
                              "from the job id); export MASTER_PORT")
        step_var = _first(env, "SLURM_STEP_ID", "SLURM_STEPID")
        step_raw = env.get(step_var, "0").strip() if step_var else "0"
        step = int(step_raw) if step_raw.isdigit() else 0
        port, port_var = slurm_master_port(_int(env, job_var, "slurm"), step), f"derived from {job_var}"

    info = LaunchInfo("slurm", rank, world, local_rank, local_world, addr, port, node_id)
    _validate(info, {"rank": "SLURM_PROCID", "world_size": ntasks_var, "local_rank": "SLURM_LOCALID",
                     "local_world_size": local_var, "master_port": port_var, "master_addr": addr_var})
    return info, {"per_node": per_node, "ntasks_var": ntasks_var}


# MPI flavours whose environment carries rank, size and the node-local layout. Order matters only
# for picking which names an error message shows; a process normally has one flavour.
_MPI_FLAVOURS = (
    ("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("MVAPICH2", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK",
     "MV2_COMM_WORLD_LOCAL_SIZE"),
    ("MPICH/Hydra or PMI-2", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)


def mpi_flavour(env: Mapping[str, str]) -> str | None:
    """Which MPI launcher's variables are present ("Open MPI", ..., "PMIx"), or None."""
    for name, rank_var, *_ in _MPI_FLAVOURS:
        if _first(env, rank_var):
            return name
    return "PMIx" if _first(env, "PMIX_RANK") else None


def _mpi_ranks(env: Mapping[str, str], comm_factory: Callable[[], MpiComm]) -> tuple[int, int, int | None,
                                                                                      int | None, dict]:
    """(rank, world, local_rank, local_world, var names) from the MPI launcher's environment.

    Local rank/size may be None (PMIx, or PMI without Hydra's MPI_LOCAL* variables); the caller
    fills them from mpi4py when needed.
    """
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
        return rank, world, local_rank, local_world, {"rank": rank_var, "world_size": size_var,
                                                      "local_rank": lrank_var, "local_world_size": lsize_var}
    # PMIx exports the rank but not the size: ask MPI.
    rank = _int(env, "PMIX_RANK", "mpi")
    comm = _get_comm(comm_factory, "PMIx exports the rank (PMIX_RANK) but not the world size")
    return rank, comm.Get_size(), None, None, {"rank": "PMIX_RANK", "world_size": "MPI_Comm_size (mpi4py)",
                                               "local_rank": "mpi4py shared-memory split",
                                               "local_world_size": "mpi4py shared-memory split"}


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


def _mpi(env: Mapping[str, str], comm_factory: Callable[[], MpiComm]) -> LaunchInfo:
    rank, world, local_rank, local_world, names = _mpi_ranks(env, comm_factory)
    if not env.get("MASTER_ADDR", "").strip():
        comm = _get_comm(comm_factory, "MASTER_ADDR is not set, so rank 0's address and port are shared over MPI",
                         " or export MASTER_ADDR (rank 0's host) and MASTER_PORT before launching")
    elif local_rank is None or mpi_flavour(env) == "PMIx":
        comm = _get_comm(comm_factory, f"the node-local rank ({names['local_rank']}, {names['local_world_size']}) "
                                       "is not in the environment")
    else:
        comm = None
    if comm is not None:
        _check_comm(comm, rank, world, names)
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
    info = LaunchInfo("mpi", rank, world, local_rank, local_world, addr, port, None)
    return _validate(info, {**names, "master_addr": addr_var, "master_port": "MASTER_PORT or mpi4py broadcast"})


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


class Mpi4pyMissing(LaunchError):
    """mpi4py is needed for this MPI launch but cannot be imported."""


def mpi4py_comm_world() -> MpiComm:
    """mpi4py's COMM_WORLD (importing it initialises MPI); Mpi4pyMissing when it is not installed."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise Mpi4pyMissing(f"mpi4py cannot be imported ({e})") from None
    return MPI.COMM_WORLD


def _get_comm(comm_factory: Callable[[], MpiComm], why: str, alternative: str = "") -> MpiComm:
    try:
        return comm_factory()
    except Mpi4pyMissing as e:
        raise LaunchError(f"mpi: {why}; that needs mpi4py: `pip install mpi4py` (or the project's `mpi` extra: "
                          f"pip install -e '.[mpi]'){alternative}. [{e}]") from None


def _slurm_hosts_external_mpi(env: Mapping[str, str], slurm: LaunchInfo, per_node: list[int] | None,
                              mpi_world: int | None) -> bool:
    """True when srun started MPI launcher daemons (one per node) rather than the ranks themselves.

    `mpirun`/`mpiexec` inside an allocation launch their per-node daemons (orted, hydra_pmi_proxy)
    with srun; the ranks inherit that step's SLURM_* (one task per node, SLURM_PROCID = node index;
    measured with MPICH's mpiexec in sbatch: SLURM_NTASKS=1, SLURM_EXTERNAL_LAUNCHER=1).
    """
    if env.get("SLURM_EXTERNAL_LAUNCHER", "").strip() not in ("", "0"):
        return True
    one_per_node = (per_node is not None and all(c == 1 for c in per_node)) or slurm.local_world_size == 1
    return one_per_node and mpi_world is not None and mpi_world > slurm.world_size


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
    if comm is None:
        comm_factory: Callable[[], MpiComm] = mpi4py_comm_world
    elif callable(comm) and not hasattr(comm, "Get_rank"):
        comm_factory = comm  # type: ignore[assignment]
    else:
        comm_factory = lambda: comm  # type: ignore[assignment,return-value]  # noqa: E731
    cache: list[MpiComm] = []

    def get_comm() -> MpiComm:
        if not cache:
            cache.append(comm_factory())
        return cache[0]

    # 1. torchrun (or another env:// launcher).
    torch_vars = [n for n in _TORCHRUN_CORE if env.get(n, "").strip()]
    if env.get("TORCHELASTIC_RUN_ID", "").strip() or len(torch_vars) == len(_TORCHRUN_CORE):
        info = _torchrun(env)
        if not env.get("TORCHELASTIC_RUN_ID", "").strip() and is_srun_step(env):
            _check_not_copied_into_tasks(env, info)
        return info

    # 2. Slurm srun step.
    flavour = mpi_flavour(env)
    if is_srun_step(env):
        slurm, extra = _slurm(env)
        if flavour is not None:
            if flavour == "PMIx":
                mpi_rank, mpi_world = _int(env, "PMIX_RANK", "mpi"), None
                mpi_names = {"rank": "PMIX_RANK", "world_size": "?"}
            else:
                mpi_rank, mpi_world, _, _, mpi_names = _mpi_ranks(env, get_comm)
            if _slurm_hosts_external_mpi(env, slurm, extra["per_node"], mpi_world):
                info = _mpi(env, get_comm)
                _check_partial_torch_vars(env, info)
                return info
            if mpi_rank != slurm.rank or (mpi_world is not None and mpi_world != slurm.world_size):
                raise LaunchError(
                    f"slurm+mpi disagree: SLURM_PROCID={slurm.rank}, {extra['ntasks_var']}={slurm.world_size} but "
                    f"{mpi_names['rank']}={mpi_rank}" + (f", {mpi_names['world_size']}={mpi_world}"
                                                         if mpi_world is not None else "")
                    + f" ({flavour}). Launch either with srun (--mpi=pmi2|pmix) or with mpirun, not a mix.")
        _check_partial_torch_vars(env, slurm)
        return slurm

    # 3. MPI launcher.
    if flavour is not None:
        info = _mpi(env, get_comm)
        _check_partial_torch_vars(env, info)
        return info

    # 4. A single process.
    single_values = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    present = [n for n in single_values if env.get(n, "").strip()]
    if present:
        if any(env[n].strip() != single_values[n] for n in present):
            missing = [n for n in _TORCHRUN_CORE if not env.get(n, "").strip()]
            raise LaunchError(f"incomplete env:// launch: {', '.join(present)} set but {', '.join(missing)} not "
                              "(and no torchrun, srun or MPI launcher variables found). Set all of RANK, "
                              "WORLD_SIZE, LOCAL_RANK, MASTER_ADDR (and MASTER_PORT), or unset them.")
    ntasks = _first(env, "SLURM_NTASKS", "SLURM_NPROCS")
    if ntasks and env[ntasks].strip().isdigit() and int(env[ntasks]) > 1:
        log.warning("%s=%s but this process was not started by srun (no SLURM_STEP_ID): running as a single "
                    "process. Start the trainer with `srun` to get %s ranks.", ntasks, env[ntasks], env[ntasks])
    port = _master_port(env, "single", 0)  # 0: init_distributed lets the store pick a free port
    return LaunchInfo("single", 0, 1, 0, 1, env.get("MASTER_ADDR", "").strip() or "127.0.0.1", port, None)


def _check_partial_torch_vars(env: Mapping[str, str], info: LaunchInfo) -> None:
    """RANK/WORLD_SIZE/LOCAL_RANK left in the environment must agree with the launcher's values."""
    bad = [f"{name}={env[name].strip()} (launcher: {value})"
           for name, value in (("RANK", info.rank), ("WORLD_SIZE", info.world_size), ("LOCAL_RANK", info.local_rank))
           if env.get(name, "").strip() and env[name].strip() != str(value)]
    if bad:
        raise LaunchError(f"{info.launcher}: stale torch variables contradict the launcher: {', '.join(bad)}. "
                          "Unset them (they are set from the launcher's values by init_distributed).")


def _check_not_copied_into_tasks(env: Mapping[str, str], info: LaunchInfo) -> None:
    """An env:// set exported once and copied into every srun task gives every task the same RANK."""
    ntasks_var = _first(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    if not ntasks_var or not env[ntasks_var].strip().isdigit():
        return
    procid = env["SLURM_PROCID"].strip()
    if int(env[ntasks_var]) == info.world_size and procid.isdigit() and int(procid) != info.rank:
        raise LaunchError(f"RANK={info.rank} but SLURM_PROCID={procid} with the same world size "
                          f"({ntasks_var}=WORLD_SIZE={info.world_size}): RANK/WORLD_SIZE/LOCAL_RANK look exported "
                          "into every srun task. Unset them and let srun's variables decide.")


# ----------------------------------------------------------------------------------------------
# Process group
# ----------------------------------------------------------------------------------------------

_INFO: LaunchInfo | None = None
# (what detect_launch said, what init_distributed exported): a re-init in the same process (after
# destroy_process_group) must not mistake our own exported RANK/WORLD_SIZE/... for an env:// launch.
_DETECTED: tuple[LaunchInfo, dict[str, str]] | None = None


def launch_info() -> LaunchInfo | None:
    """The LaunchInfo of the process group :func:`init_distributed` created, or None."""
    return _INFO


def pick_cuda_device(local_rank: int, local_world_size: int, device_count: int) -> int:
    """The GPU a rank uses: its local rank, or 0 when the launcher gave each task one GPU."""
    if device_count >= local_world_size and local_rank < device_count:
        return local_rank
    if device_count == 1:  # e.g. srun --gpus-per-task=1: every task sees its own GPU as device 0
        return 0
    raise RuntimeError(f"local rank {local_rank} of {local_world_size} ranks on this node, but {device_count} GPU(s) "
                       "are visible: start one rank per GPU (--nproc-per-node / --ntasks-per-node) or give each "
                       "task exactly one GPU (CUDA_VISIBLE_DEVICES, srun --gpus-per-task=1)")


def check_world(info: LaunchInfo, group_size: int, gathered: Sequence[tuple]) -> list[str]:
    """Check the process group is the world the launcher described; return warnings (raise on errors).

    `gathered` is every rank's (rank, hostname, local_rank, local_world_size) in rank order. A world
    size mismatch is an error (a wrong ``srun --mpi`` choice or an unrecognised launcher can start N
    independent worlds of 1). Node-local layout problems are warnings: hostnames can repeat across
    nodes (containers), so they cannot prove two ranks share a GPU.
    """
    if group_size != info.world_size or len(gathered) != info.world_size:
        raise RuntimeError(f"{info.launcher}: the launcher says world size {info.world_size}, but the process "
                           f"group has {group_size} rank(s) ({len(gathered)} answered). With MPI check the "
                           "launcher matches the MPI library (srun --mpi=pmi2|pmix, mpirun of the same MPI).")
    bad_ranks = [(i, g[0]) for i, g in enumerate(gathered) if g[0] != i]
    if bad_ranks:
        raise RuntimeError(f"{info.launcher}: ranks disagree with their positions in the group: {bad_ranks}")
    warnings = []
    by_host: dict[str, list[tuple[int, int]]] = {}
    for rank, host, local_rank, local_world in gathered:
        by_host.setdefault(host, []).append((local_rank, local_world))
    for host, entries in sorted(by_host.items()):
        locals_ = sorted(lr for lr, _ in entries)
        sizes = {lw for _, lw in entries}
        if locals_ != list(range(len(entries))) or sizes != {len(entries)}:
            warnings.append(f"host {host}: {len(entries)} rank(s) with local ranks {locals_} and local world "
                            f"size(s) {sorted(sizes)}; expected local ranks 0..{len(entries) - 1}")
    return warnings


def _fill_environ(info: LaunchInfo) -> dict[str, str]:
    values = {"MASTER_ADDR": info.master_addr, "MASTER_PORT": str(info.master_port), "RANK": str(info.rank),
              "WORLD_SIZE": str(info.world_size), "LOCAL_RANK": str(info.local_rank),
              "LOCAL_WORLD_SIZE": str(info.local_world_size)}
    os.environ.update(values)
    return values


def init_distributed(timeout_s: float = 600, backend: str | None = None, verify: bool = True,
                     info: LaunchInfo | None = None) -> LaunchInfo:
    """Detect the launcher, export its values as torch's env:// variables and create the process group.

    Fills MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE in os.environ; with an
    NCCL backend selects the rank's GPU (``torch.cuda.set_device``); initialises torch.distributed with
    `backend` (default: :func:`megatron_harpe.backends.distributed_backend`, "gloo" on the CPU backend).
    A single process gets a world of one. `verify` gathers every rank's (rank, host, local rank) once
    and raises if the group is not the world the launcher described. Idempotent: later calls return the
    first call's LaunchInfo. `info`: a :func:`detect_launch` result already at hand (saves a second
    detection, which under MPI without MASTER_ADDR is a collective broadcast).
    """
    global _INFO, _DETECTED
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        if _INFO is None:  # someone else created the group: describe it, check it fits
            info = detect_launch()
            if dist.get_world_size() != info.world_size or dist.get_rank() != info.rank:
                raise RuntimeError(f"torch.distributed was initialised elsewhere as rank {dist.get_rank()} of "
                                   f"{dist.get_world_size()}, but the {info.launcher} launcher says rank "
                                   f"{info.rank} of {info.world_size}")
            _INFO = info
        return _INFO

    if info is None:
        if _DETECTED is not None and all(os.environ.get(k) == v for k, v in _DETECTED[1].items()):
            info = _DETECTED[0]  # re-init after destroy_process_group: the environment is our own export
        else:
            info = detect_launch()
    detected = info
    if backend is None:
        from megatron_harpe.backends import distributed_backend

        backend = distributed_backend()
    if "nccl" in backend and torch.cuda.is_available():
        torch.cuda.set_device(pick_cuda_device(info.local_rank, info.local_world_size, torch.cuda.device_count()))

    timeout = timedelta(seconds=timeout_s)
    if info.launcher == "single" and info.master_port == 0:
        # One process: let the store bind a free port itself (no race with other single runs).
        store = dist.TCPStore(info.master_addr, 0, 1, True, timeout=timeout)
        info = replace(info, master_port=store.port)
        exported = _fill_environ(info)
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    else:
        exported = _fill_environ(info)
        dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.world_size,
                                timeout=timeout)
    if verify:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (info.rank, socket.gethostname(), info.local_rank, info.local_world_size))
        try:
            problems = check_world(info, dist.get_world_size(), gathered)
        except RuntimeError:
            dist.destroy_process_group()
            raise
        if info.rank == 0:
            for problem in problems:
                log.warning("%s", problem)
    _INFO, _DETECTED = info, (detected, exported)
    return info


__all__ = ["LaunchInfo", "LaunchError", "Mpi4pyMissing", "detect_launch", "init_distributed", "launch_info", "expand_hostlist",
           "first_host", "parse_tasks_per_node", "slurm_master_port", "mpi_broadcast_master", "mpi4py_comm_world",
           "is_srun_step", "mpi_flavour", "check_world", "pick_cuda_device", "find_free_port"]
