"""What a metrics line and the run summary say, from the iterations seen: pure arithmetic, no I/O.

A line covers every iteration since the previous line, not only the iteration it is written at, so
a sparse logging interval still describes the whole run:

* ``loss`` and ``grad_norm``: means over the interval (``grad_norm`` over the iterations that gave
  one; ``None`` if none did). A non-finite loss anywhere in the interval makes the mean non-finite,
  so a NaN is never averaged away.
* ``lr``: the value at the logged iteration (averaging a schedule would describe no step).
* ``tokens_per_s`` = sum(tokens) / sum(elapsed_s); ``tflops_per_device`` = sum(flops / world_size) /
  sum(elapsed_s) / 1e12; ``seconds_per_iteration`` = sum(elapsed_s) / iterations in the interval:
  ratios of sums, so a slow iteration weighs by its time instead of being one sample among many.
* ``extra``: the dicts passed during the interval merged in order (later values win), so a value
  given on a non-logged iteration (say an eval loss) still reaches the next line. Its keys may not
  reuse the standard ones, which would silently overwrite a metric in every output.
"""
from __future__ import annotations

import math
from typing import Any

from megatron_harpe.training.metrics.flops import mfu
from megatron_harpe.training.metrics.values import to_plain

__all__ = ["RECORD_KEYS", "RESERVED_KEYS", "SUMMARY_KEYS", "Interval", "RunTotals"]

# The keys every iteration record has, in the order they are written.
RECORD_KEYS = (
    "iteration",
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "tflops_per_device",
    "mfu",
    "peak_memory_bytes",
    "seconds_per_iteration",
)
# Also taken by the writers (time stamp, events, non-finite marking), so `extra` may not use them either.
RESERVED_KEYS = frozenset(RECORD_KEYS) | {"time", "event", "nonfinite", "nonfinite_keys"}

SUMMARY_KEYS = (
    "iterations",
    "first_iteration",
    "last_iteration",
    "first_loss",
    "last_loss",
    "min_loss",
    "nonfinite_iterations",
    "total_tokens",
    "mean_tokens_per_s",
    "total_time_s",
    "wall_time_s",
    "peak_memory_bytes",
)


class Interval:
    """Running sums of the iterations since the last written line (see the module doc)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.iterations = 0
        self._loss = 0.0
        self._grad = 0.0
        self._grad_n = 0
        self._tokens = 0
        self._elapsed = 0.0
        self._flops_per_dev = 0.0
        self._lr = float("nan")
        self.extra: dict[str, Any] = {}

    def add(
        self,
        *,
        loss: float,
        lr: float,
        grad_norm: float | None,
        tokens: int,
        elapsed_s: float,
        flops: float,
        world_size: int,
        extra: dict | None = None,
    ) -> None:
        # checked before anything is added, so a rejected call leaves the interval as it was
        if extra:
            clash = RESERVED_KEYS.intersection(extra)
            if clash:
                raise ValueError(
                    f"MetricsLogger.log_iteration: extra keys {sorted(clash)} reuse standard metric names; "
                    "rename them (e.g. with a prefix)"
                )
            self.extra.update(extra)
        self.iterations += 1
        self._loss += float(loss)
        if grad_norm is not None:
            self._grad += float(grad_norm)
            self._grad_n += 1
        self._tokens += int(tokens)
        self._elapsed += float(elapsed_s)
        self._flops_per_dev += float(flops) / max(int(world_size), 1)
        self._lr = float(lr)

    def record(
        self,
        iteration: int,
        *,
        peak_tflops_per_device: float | None,
        peak_memory_bytes: int,
        now: float,
    ) -> dict[str, Any]:
        """The line's values: :data:`RECORD_KEYS`, then ``time``, then the extras (as plain values).

        Memory and time are passed in because they are read from the process and the clock, not
        from the iterations.
        """
        n = self.iterations
        elapsed = self._elapsed
        tflops = self._flops_per_dev / elapsed / 1e12 if elapsed > 0 else None
        record: dict[str, Any] = {
            "iteration": iteration,
            "loss": self._loss / n,
            "lr": self._lr,
            "grad_norm": self._grad / self._grad_n if self._grad_n else None,
            "tokens_per_s": self._tokens / elapsed if elapsed > 0 else None,
            "tflops_per_device": tflops,
            "mfu": mfu(tflops, peak_tflops_per_device),
            "peak_memory_bytes": peak_memory_bytes,
            "seconds_per_iteration": elapsed / n,
            "time": now,
        }
        record.update(to_plain(self.extra))
        return record


class RunTotals:
    """Whole-run numbers over every iteration seen, logged or not, for the end-of-run summary."""

    def __init__(self) -> None:
        self.iterations = 0
        self.first_iteration: int | None = None
        self.last_iteration: int | None = None
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.min_loss: float | None = None
        self.nonfinite_iterations = 0
        self.total_tokens = 0
        self.total_time_s = 0.0

    def add(self, iteration: int, *, loss: float, tokens: int, elapsed_s: float) -> None:
        loss = float(loss)
        if self.first_iteration is None:
            self.first_iteration = int(iteration)
            self.first_loss = loss
        self.iterations += 1
        self.last_iteration = int(iteration)
        self.last_loss = loss
        # min() with a NaN depends on argument order (a NaN seen first sticks), so count, don't compare
        if math.isfinite(loss):
            self.min_loss = loss if self.min_loss is None else min(self.min_loss, loss)
        else:
            self.nonfinite_iterations += 1
        self.total_tokens += int(tokens)
        self.total_time_s += float(elapsed_s)

    def as_dict(self) -> dict[str, Any]:
        """:data:`SUMMARY_KEYS` up to ``total_time_s``; the caller adds the clock and memory ones.

        ``mean_tokens_per_s`` is total tokens / total step time, i.e. time-weighted, like the lines.
        """
        return {
            "iterations": self.iterations,
            "first_iteration": self.first_iteration,
            "last_iteration": self.last_iteration,
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "min_loss": self.min_loss,
            "nonfinite_iterations": self.nonfinite_iterations,
            "total_tokens": self.total_tokens,
            "mean_tokens_per_s": self.total_tokens / self.total_time_s if self.total_time_s > 0 else None,
            "total_time_s": self.total_time_s,
        }
