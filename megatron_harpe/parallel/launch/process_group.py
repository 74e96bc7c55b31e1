"""Creating the torch.distributed process group from a LaunchInfo, and checking it is that world."""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import replace
from datetime import timedelta
from typing import Sequence

from .detect import detect_launch
from .env import LaunchInfo

log = logging.getLogger(__name__)

_INFO: LaunchInfo | None = None
# (what detect_launch said, what init_distributed exported): a re-init in the same process (after
# destroy_process_group) must not mistake our own exported RANK/WORLD_SIZE/... for an env:// launch.
_DETECTED: tuple[LaunchInfo, dict[str, str]] | None = None


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
            _INFO = _check_foreign_group(detect_launch())
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
    info, exported = _create_group(info, backend, timedelta(seconds=timeout_s))
    if verify:
        _verify_group(info)
    _INFO, _DETECTED = info, (detected, exported)
    return info


def _check_foreign_group(info: LaunchInfo) -> LaunchInfo:
    import torch.distributed as dist

    if dist.get_world_size() != info.world_size or dist.get_rank() != info.rank:
        raise RuntimeError(f"torch.distributed was initialised elsewhere as rank {dist.get_rank()} of "
                           f"{dist.get_world_size()}, but the {info.launcher} launcher says rank "
                           f"{info.rank} of {info.world_size}")
    return info


def _create_group(info: LaunchInfo, backend: str, timeout: timedelta) -> tuple[LaunchInfo, dict[str, str]]:
    """init_process_group from `info`; returns `info` with the port really used, and what was exported."""
    import torch.distributed as dist

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
    return info, exported


def _verify_group(info: LaunchInfo) -> None:
    """Gather every rank's layout once; tear the group down if it is not the launcher's world."""
    import torch.distributed as dist

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
