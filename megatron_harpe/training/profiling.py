"""torch.profiler traces of a few training iterations (config: logging.profile; docs/training.md, "Profiling").

The trainer wraps each train step in `profiler.iteration(i)` (i = iterations done before the step).
The window follows Megatron-LM's --profile-step-start/--profile-step-end: steps start..end-1 (0-based),
which metrics.jsonl numbers start+1..end. The step before the window is the profiler's warm-up (Kineto
is set up, nothing recorded) so the first recorded step is not slowed by the profiler's start-up;
`torch.profiler.schedule` does the warm-up/record/stop, as Megatron-LM's --use-pytorch-profiler does.

Why one gzipped Chrome-trace file per rank (rank{r}_iters{start}-{end}.pt.trace.json.gz) and no
other format: it opens in ui.perfetto.dev and chrome://tracing as it is, and its name matches what
TensorBoard's PyTorch profiler plugin looks for (*.pt.trace.json.gz), so one file serves all three;
gzip makes it ~10x smaller. It is written under a temporary name and renamed (files.atomic_write_by),
so a trace that is there is whole. The ranges that name our code in it (harpe/forward_backward,
harpe/optimizer_step, harpe/rotary, harpe/query_key_angles, harpe/apply_rotary, harpe/core_attention,
harpe/iteration_N) come from megatron_harpe/profile_ranges.py, which costs nothing without a profiler.

When the window ends every rank (profiled or not) joins one all_gather of what was written, so the
logging rank (the last one, which is usually not profiled) can log one event with each trace's path
and size. Every rank ends the window at the same step (the window, a non-finite loss and a stop signal
are the same on all ranks), so nobody waits alone in that collective; a step that raises stops the
profiler and keeps the partial trace without it.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_harpe.config.schema import ProfileConfig
from megatron_harpe.files import atomic_write_by
from megatron_harpe.profile_ranges import profile_range

TRACE_SUFFIX = ".pt.trace.json.gz"
MEMORY_SUFFIX = ".memory.pickle"
MEMORY_HISTORY_ENTRIES = 100_000  # allocator events kept (torch's default for _record_memory_history)


class IterationProfiler:
    """Starts torch.profiler before the window, records it, writes the trace when it ends.

    Args:
        profile: logging.profile.
        run_dir: where <run_dir>/profile is, unless profile.dir says otherwise.
        rank: this process's global rank (records only if listed in profile.ranks).
        first_iteration: the iteration the run starts at (a resumed run may start inside or past the
            window: it profiles what is left of it).
        log_event: called on every rank with the one-line notes (the MetricsLogger prints them on its
            logging rank only).
    """

    def __init__(self, profile: ProfileConfig, *, run_dir: str | Path, rank: int, first_iteration: int,
                 log_event: Callable[[str], None]):
        self.profile, self.rank, self.log_event = profile, rank, log_event
        self.dir = Path(profile.dir) if profile.dir else Path(run_dir) / "profile"
        self.enabled = profile.enabled
        self.records = self.enabled and rank in profile.ranks
        self._torch: Optional[torch.profiler.profile] = None
        self._memory = False
        self._open = False
        self.written: List[Tuple[int, str, int]] = []  # (rank, path, bytes) this rank wrote
        if not self.enabled:
            return
        self.end = profile.last
        self.first = max(profile.start, first_iteration)
        # the warm-up step, when the run has one before the window
        self.begin = self.first - 1 if self.first - 1 >= first_iteration else self.first
        if self.first >= self.end:
            self.enabled = self.records = False
            log_event(f"logging.profile: iterations {profile.start + 1}-{self.end} were done before this run "
                      f"started at iteration {first_iteration}; nothing profiled")

    def path(self, suffix: str) -> Path:
        """This rank's output file, named after the rank and the window it records (start and end as in the
        config; a run resumed inside the window starts at its resume point)."""
        return self.dir / f"rank{self.rank}_iters{self.first}-{self.end}{suffix}"

    @contextlib.contextmanager
    def iteration(self, index: int):
        """Wrap one train step; `index` = iterations done before it (the trainer's counter)."""
        if not self.enabled or not self.begin <= index < self.end:
            yield
            return
        if index == self.begin:
            self._start()
        if self.records and index == self.first and self.profile.memory_snapshot:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
            self._memory = True
        label = profile_range(f"harpe/iteration_{index + 1}") if index >= self.first else contextlib.nullcontext()
        try:
            with label:
                yield
        except BaseException:
            self._stop()  # keep what was recorded; no collective: other ranks may not be here
            self._open = False
            raise
        if self._torch is not None:
            self._torch.step()
        if index + 1 == self.end:
            self.close()

    def close(self) -> None:
        """End the window now: after its last step, or when the run stops inside it (a stop signal, a
        non-finite loss): writes what was recorded and logs it. Call it on every rank; no-op otherwise."""
        if not self._open:
            return
        self._open = False
        self._stop()
        self._report()

    # ------------------------------------------------------------------ internals
    def _start(self) -> None:
        self._open = True
        if not self.records:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with warnings.catch_warnings():  # no warm-up step when the window opens the run: known, documented
            warnings.filterwarnings("ignore", message="Profiler won't be using warmup")
            schedule = torch.profiler.schedule(wait=0, warmup=self.first - self.begin,
                                               active=self.end - self.first, repeat=1)
        self._torch = torch.profiler.profile(activities=activities, schedule=schedule,
                                             on_trace_ready=self._write_trace,
                                             record_shapes=self.profile.record_shapes,
                                             with_stack=self.profile.with_stack)
        self._torch.__enter__()  # start(); __exit__ also clears its step counter

    def _stop(self) -> None:
        if self._torch is not None:
            self._torch.__exit__(None, None, None)  # stop(): inside the window it writes the partial trace
            self._torch = None
        if self._memory:
            self._memory = False
            path = self.path(MEMORY_SUFFIX)
            try:
                atomic_write_by(path, lambda tmp: torch.cuda.memory._dump_snapshot(str(tmp)))
            finally:
                torch.cuda.memory._record_memory_history(enabled=None)
            self.written.append((self.rank, str(path), path.stat().st_size))

    def _write_trace(self, prof: torch.profiler.profile) -> None:
        path = self.path(TRACE_SUFFIX)
        atomic_write_by(path, lambda tmp: prof.export_chrome_trace(str(tmp)))
        self.written.append((self.rank, str(path), path.stat().st_size))

    def _report(self) -> None:
        everyone = [self.written]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, self.written)
        files = [entry for written in everyone for entry in written]
        window = f"iterations {self.first + 1}-{self.end}"
        if not files:
            self.log_event(f"profile of {window}: no rank wrote a trace (logging.profile.ranks "
                           f"{self.profile.ranks})")
            return
        listed = "; ".join(f"rank {r}: {p} ({size:,} bytes)" for r, p, size in files)
        self.log_event(f"profile of {window} -> {listed}. Open a .pt.trace.json.gz in https://ui.perfetto.dev "
                       f"(a .memory.pickle in https://pytorch.org/memory_viz)")


__all__ = ["IterationProfiler", "TRACE_SUFFIX", "MEMORY_SUFFIX"]
