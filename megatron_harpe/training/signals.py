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

EXIT_CODE_REQUEUE = 75  # EX_TEMPFAIL: "temporary failure; try again" — checkpoint written, resume me
EXIT_CODE_NONFINITE_LOSS = 3


def parse_signals(names: Iterable[str]) -> List[signal.Signals]:
    result = []
    for name in names:
        key = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
        if not hasattr(signal.Signals, key):
            raise ValueError(f"checkpoint.exit_signals: unknown signal {name!r}; use names like SIGTERM, SIGUSR1")
        result.append(signal.Signals[key])
    return result


def start_checkpoint_writer_shielded(signals: Iterable[signal.Signals]) -> None:
    """Start megatron-core's checkpoint-writer helper process with the exit signals ignored.

    megatron-core's torch_dist writer spawns a multiprocessing manager process at the first save.
    Schedulers deliver signals to every process of a job step (Slurm's `scancel --signal`, srun's
    forwarding, preemption SIGTERM), so that helper would die of the very signal that asks us to
    checkpoint, and the save would fail (BrokenPipeError). An ignored disposition survives exec,
    so starting the helper while the signals are ignored makes it immune; the trainer's own
    handlers are installed afterwards.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        filesystem_async._get_write_results_queue()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
