"""Stop-on-signal: every rank agrees, the run checkpoints, and exits with EXIT_CODE_REQUEUE.

Schedulers send a signal before a time limit (Slurm: `--signal=B:USR1@120`, or SIGTERM at
preemption). A signal can reach some ranks and not others (under mpirun or srun only the
launched processes, or only the batch shell), so the handler only raises a local flag; once
per iteration the flags are combined with an all-reduce (MAX) and, if any rank saw a signal,
all ranks checkpoint together and leave with the documented exit code. A scheduler script
requeues on that code and not on others (see slurm/).
"""
from __future__ import annotations

import signal
from typing import Iterable, List

import torch
import torch.distributed as dist

from megatron_harpe.config.validate import parse_signals

EXIT_CODE_REQUEUE = 75  # EX_TEMPFAIL: "temporary failure; try again" — checkpoint written, resume me
EXIT_CODE_NONFINITE_LOSS = 3


class SignalWatcher:
    """Records configured signals; `should_stop()` is a collective that all ranks call together."""

    def __init__(self, names: Iterable[str]):
        self.signals = parse_signals(names)
        self.received: List[str] = []
        self._previous = {}

    def __enter__(self) -> "SignalWatcher":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.received.append(signal.Signals(signum).name)

    def should_stop(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
