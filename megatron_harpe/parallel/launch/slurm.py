"""Slurm: reading an srun step's task environment, and Slurm's compressed host lists.

Only an srun *step* is a Slurm launch (see :func:`is_srun_step`). Host lists are expanded here rather
than with ``scontrol show hostnames`` so that detection needs no Slurm binaries on the compute node.
"""
from __future__ import annotations

import re
from typing import Mapping, NamedTuple

from .env import LaunchError, LaunchInfo, _first, _int, _require, _validate

# Slurm master ports are derived from the job id into [SLURM_PORT_BASE, SLURM_PORT_BASE + SLURM_PORT_SPAN):
# unprivileged, and below Linux's default ephemeral range (32768-60999), so an outgoing connection's
# port cannot already hold it.
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 15000
SLURM_PORT_STEPS = 10  # consecutive steps of one job get different ports (two steps may overlap)


# ----------------------------------------------------------------------------------------------
# Compressed host lists and task counts
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
# An srun step
# ----------------------------------------------------------------------------------------------

def is_srun_step(env: Mapping[str, str]) -> bool:
    """True when srun started this process: only srun's tasks carry a step id.

    An sbatch batch script has SLURM_PROCID=0, SLURM_LOCALID=0 and SLURM_NTASKS=N but no step id; a
    salloc shell has SLURM_NTASKS but neither. Both are single processes, not rank 0 of N.
    """
    return _first(env, "SLURM_STEP_ID", "SLURM_STEPID") is not None


class SrunStep(NamedTuple):
    """The step's LaunchInfo plus what the Slurm/MPI precedence check needs besides it."""

    info: LaunchInfo
    per_node: list[int] | None  # the step's tasks-per-node list, if Slurm exported one
    ntasks_var: str  # the variable the world size came from (for error messages)


def read_srun_step(env: Mapping[str, str]) -> SrunStep:
    """This srun task's place in the step; LaunchError naming the variables if they do not add up."""
    ntasks_var = _first(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    _require(env, "slurm", ["SLURM_PROCID", "SLURM_LOCALID", ntasks_var or "SLURM_NTASKS"],
             "this process is an srun task (SLURM_STEP_ID is set)")
    assert ntasks_var is not None
    rank = _int(env, "SLURM_PROCID", "slurm")
    world = _int(env, ntasks_var, "slurm")
    local_rank = _int(env, "SLURM_LOCALID", "slurm")
    node_id = _int(env, "SLURM_NODEID", "slurm") if _first(env, "SLURM_NODEID") else None
    per_node, local_world, local_var = _tasks_on_this_node(env, world, ntasks_var, node_id)
    addr, addr_var = _step_master_addr(env)
    port, port_var = _step_master_port(env)
    info = LaunchInfo("slurm", rank, world, local_rank, local_world, addr, port, node_id)
    _validate(info, {"rank": "SLURM_PROCID", "world_size": ntasks_var, "local_rank": "SLURM_LOCALID",
                     "local_world_size": local_var, "master_port": port_var, "master_addr": addr_var})
    return SrunStep(info, per_node, ntasks_var)


def _tasks_on_this_node(env: Mapping[str, str], world: int, ntasks_var: str,
                        node_id: int | None) -> tuple[list[int] | None, int, str]:
    """(the step's tasks-per-node list or None, this node's task count, the variable it came from)."""
    tpn_var = _first(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if tpn_var:
        per_node = _per_node_counts(env, tpn_var, world, ntasks_var)
        return per_node, _this_nodes_count(env, tpn_var, per_node, node_id), f"{tpn_var}[SLURM_NODEID]"
    if _first(env, "SLURM_NTASKS_PER_NODE"):
        return None, _int(env, "SLURM_NTASKS_PER_NODE", "slurm"), "SLURM_NTASKS_PER_NODE"
    nnodes_var = _first(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    if nnodes_var and _int(env, nnodes_var, "slurm") == 1:
        return None, world, f"{ntasks_var} ({nnodes_var}=1)"
    raise LaunchError("slurm: cannot tell how many tasks run on this node: none of "
                      "SLURM_STEP_TASKS_PER_NODE, SLURM_TASKS_PER_NODE, SLURM_NTASKS_PER_NODE is set")


def _per_node_counts(env: Mapping[str, str], tpn_var: str, world: int, ntasks_var: str) -> list[int]:
    try:
        per_node = parse_tasks_per_node(env[tpn_var])
    except ValueError as e:
        raise LaunchError(f"slurm: {tpn_var}: {e}") from None
    if sum(per_node) != world:
        raise LaunchError(f"slurm: {tpn_var}={env[tpn_var]!r} adds up to {sum(per_node)} tasks but "
                          f"{ntasks_var}={world}")
    return per_node


def _this_nodes_count(env: Mapping[str, str], tpn_var: str, per_node: list[int], node_id: int | None) -> int:
    if node_id is None:
        if len(set(per_node)) != 1:
            raise LaunchError(f"slurm: {tpn_var}={env[tpn_var]!r} differs between nodes and SLURM_NODEID "
                              "is not set, so this node's task count is unknown")
        return per_node[0]
    if node_id >= len(per_node):
        raise LaunchError(f"slurm: SLURM_NODEID={node_id} but {tpn_var}={env[tpn_var]!r} lists "
                          f"{len(per_node)} node(s)")
    return per_node[node_id]


def _step_master_addr(env: Mapping[str, str]) -> tuple[str, str]:
    """MASTER_ADDR, else the step's first host: where srun places task 0 (block distribution)."""
    if env.get("MASTER_ADDR", "").strip():
        return env["MASTER_ADDR"].strip(), "MASTER_ADDR"
    addr_var = _first(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if addr_var is None:
        raise LaunchError("slurm: no master address: none of MASTER_ADDR, SLURM_STEP_NODELIST, "
                          "SLURM_JOB_NODELIST, SLURM_NODELIST is set")
    try:
        return first_host(env[addr_var]), addr_var
    except ValueError as e:
        raise LaunchError(f"slurm: {addr_var}: {e}") from None


def _step_master_port(env: Mapping[str, str]) -> tuple[int, str]:
    """MASTER_PORT, else one derived from the job and step id, so that no task has to tell the others."""
    if env.get("MASTER_PORT", "").strip():
        return _int(env, "MASTER_PORT", "slurm"), "MASTER_PORT"
    job_var = _first(env, "SLURM_JOB_ID", "SLURM_JOBID")
    if job_var is None:
        raise LaunchError("slurm: MASTER_PORT is not set and neither is SLURM_JOB_ID (the port is derived "
                          "from the job id); export MASTER_PORT")
    step_var = _first(env, "SLURM_STEP_ID", "SLURM_STEPID")
    step_raw = env.get(step_var, "0").strip() if step_var else "0"
    step = int(step_raw) if step_raw.isdigit() else 0
    return slurm_master_port(_int(env, job_var, "slurm"), step), f"derived from {job_var}"


def srun_started_mpi_daemons(env: Mapping[str, str], step: SrunStep, mpi_world: int | None) -> bool:
    """True when srun started MPI launcher daemons (one per node) rather than the ranks themselves.

    `mpirun`/`mpiexec` inside an allocation launch their per-node daemons (orted, hydra_pmi_proxy)
    with srun; the ranks inherit that step's SLURM_* (one task per node, SLURM_PROCID = node index;
    measured with MPICH's mpiexec in sbatch: SLURM_NTASKS=1, SLURM_EXTERNAL_LAUNCHER=1).
    """
    if env.get("SLURM_EXTERNAL_LAUNCHER", "").strip() not in ("", "0"):
        return True
    one_per_node = (step.per_node is not None and all(c == 1 for c in step.per_node)) \
        or step.info.local_world_size == 1
    return one_per_node and mpi_world is not None and mpi_world > step.info.world_size
