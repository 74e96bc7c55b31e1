"""``MetricsLogger``: the one object the trainer talks to; it feeds the interval sums to the writers."""
from __future__ import annotations

import os
import time
from typing import Any, Mapping

from megatron_harpe.training.metrics import console, memory
from megatron_harpe.training.metrics.jsonl import METRICS_FILENAME, MetricsJsonl
from megatron_harpe.training.metrics.tensorboard import TENSORBOARD_DIRNAME, TensorBoardWriter
from megatron_harpe.training.metrics.wandb import WandbWriter
from megatron_harpe.training.metrics.window import SUMMARY_KEYS, Interval, RunTotals

__all__ = ["MetricsLogger"]


class MetricsLogger:
    """Per-iteration training metrics on stdout, TensorBoard, ``run_dir/metrics.jsonl`` and W&B (when on).

    Call :meth:`log_iteration` every iteration on every rank; on ranks with ``is_logging_rank=False``
    every method returns at once and nothing is created on disk (``summary()`` returns the keys with
    ``None`` values), so the trainer needs no rank checks of its own. ``tokens``, ``flops`` and
    ``elapsed_s`` describe one iteration of the whole job (all ranks together); ``world_size`` divides
    the FLOP rate into a per-device number.

    A line is written when ``iteration % interval == 0``, at ``iteration == total_iterations``, and by
    :meth:`close` for a partial interval left over (a run stopped early), so no iteration goes
    unreported. What a line contains is documented in ``window`` (means, rates, ``extra``),
    ``jsonl`` (the file format and the resume rule, which is why ``start_iteration`` is needed),
    ``tensorboard`` (tags, ``extra/<key>`` scalars), ``wandb`` (the same names, the run id kept for resume;
    on when ``wandb``, a ``logging.wandb`` section, is enabled; ``run_config`` becomes the W&B run config)
    and ``console`` (the stdout line, the progress bar, shown only when ``progress_bar`` is true and stderr
    is a terminal). ``mfu`` is
    ``tflops_per_device / peak_tflops_per_device`` (``None`` without a peak); ``peak_memory_bytes`` is
    the process peak from :func:`~.memory.device_peak_memory_bytes` when the line is written.

    Each iteration record in metrics.jsonl has ``iteration``, ``loss``, ``lr``, ``grad_norm``,
    ``tokens_per_s``, ``tflops_per_device``, ``mfu``, ``peak_memory_bytes``, ``seconds_per_iteration``,
    ``time`` (Unix seconds) and the ``extra`` keys. :meth:`log_event` writes ``{"event": message,
    "iteration": <last iteration seen>, "time": ...}``.
    """

    def __init__(
        self,
        run_dir: str,
        *,
        is_logging_rank: bool,
        total_iterations: int | None,
        tensorboard: bool = True,
        progress_bar: bool = True,
        interval: int = 1,
        peak_tflops_per_device: float | None = None,
        start_iteration: int = 0,
        wandb=None,
        run_config: Mapping[str, Any] | None = None,
    ):
        if int(interval) != interval or interval < 1:
            raise ValueError(f"MetricsLogger: interval={interval!r} must be an integer >= 1")
        if peak_tflops_per_device is not None and not peak_tflops_per_device > 0:
            raise ValueError(
                f"MetricsLogger: peak_tflops_per_device={peak_tflops_per_device!r} must be > 0 "
                "(the device's dense peak in TFLOP/s, e.g. 989 for an H100 SXM in bf16), or None"
            )
        if total_iterations is not None and total_iterations < 0:
            raise ValueError(f"MetricsLogger: total_iterations={total_iterations!r} must be >= 0 or None")
        if start_iteration < 0:
            raise ValueError(f"MetricsLogger: start_iteration={start_iteration!r} must be >= 0")

        self.run_dir = str(run_dir)
        self.is_logging_rank = bool(is_logging_rank)
        self.total_iterations = total_iterations
        self.interval = int(interval)
        self.peak_tflops_per_device = peak_tflops_per_device
        self.start_iteration = int(start_iteration)
        self.metrics_path = os.path.join(self.run_dir, METRICS_FILENAME)
        self.tensorboard_dir = os.path.join(self.run_dir, TENSORBOARD_DIRNAME)

        self._closed = False
        # events before the first iteration belong to the checkpoint being resumed from
        self._last_iteration = self.start_iteration
        self._created = time.time()
        self._window = Interval()
        self._totals = RunTotals()

        self._file: MetricsJsonl | None = None
        self._writer: TensorBoardWriter | None = None
        self._wandb: WandbWriter | None = None
        self._bar = None
        self.dropped_on_resume = 0  # records of a crashed earlier attempt removed from metrics.jsonl
        if not self.is_logging_rank:
            return

        os.makedirs(self.run_dir, exist_ok=True)
        self._file = MetricsJsonl(self.metrics_path, self.start_iteration)
        self.dropped_on_resume = self._file.dropped_on_resume
        if self.dropped_on_resume:
            print(
                f"{self.metrics_path}: dropped {self.dropped_on_resume} record(s) after iteration "
                f"{self.start_iteration} left by an earlier attempt",
                flush=True,
            )
        if tensorboard:
            self._writer = TensorBoardWriter.open(self.tensorboard_dir, self.start_iteration)
        if wandb is not None and wandb.enabled:
            self._wandb = WandbWriter.open(wandb, run_dir=self.run_dir, start_iteration=self.start_iteration,
                                           run_config=run_config)
            if self._wandb is not None:
                print(self._wandb.note, flush=True)
        if progress_bar:
            self._bar = console.open_progress_bar(total_iterations, self.start_iteration)

    def log_iteration(
        self,
        iteration: int,
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
        """Record one finished iteration; writes a line every ``interval`` iterations (see class doc)."""
        if not self.is_logging_rank:
            return
        if self._closed:
            raise RuntimeError("MetricsLogger.log_iteration called after close()")
        self._window.add(loss=loss, lr=lr, grad_norm=grad_norm, tokens=tokens, elapsed_s=elapsed_s,
                         flops=flops, world_size=world_size, extra=extra)
        self._last_iteration = int(iteration)
        self._totals.add(iteration, loss=loss, tokens=tokens, elapsed_s=elapsed_s)

        if self._bar is not None:
            self._bar.update(max(int(iteration) - self._bar.n, 0))

        last = self.total_iterations is not None and iteration >= self.total_iterations
        if iteration % self.interval == 0 or last:
            self._write_window(int(iteration))

    def _write_window(self, iteration: int) -> None:
        if self._window.iterations == 0:
            return
        record = self._window.record(
            iteration,
            peak_tflops_per_device=self.peak_tflops_per_device,
            peak_memory_bytes=memory.device_peak_memory_bytes(),
            now=time.time(),
        )
        console.print_line(self.format_line(record), self._bar)
        if self._writer is not None:
            self._writer.write(record, self._window.extra)
        if self._wandb is not None:
            self._wandb.write(record, self._window.extra)
        self._file.write(record)
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss {record['loss']:.4f}", refresh=False)
        self._window.reset()

    def format_line(self, record: dict[str, Any]) -> str:
        """The stdout line for one record (an interval's averaged metrics)."""
        return console.format_line(record, self.total_iterations)

    def log_event(self, message: str) -> None:
        """A free-form line on stdout and ``{"event": message, "iteration": ..., "time": ...}`` in the jsonl."""
        if not self.is_logging_rank:
            return
        if self._closed:
            raise RuntimeError("MetricsLogger.log_event called after close()")
        console.print_line(str(message), self._bar)
        self._file.write({"event": str(message), "iteration": self._last_iteration, "time": time.time()})
        if self._wandb is not None:
            self._wandb.log_event(str(message))

    def log_evaluation(self, iteration: int, values: dict[str, Any], kind: str = "eval") -> None:
        """Evaluation results at ``iteration`` (validation loss, probes): one stdout line, one jsonl record
        ``{"iteration", "kind", <values>..., "time"}`` and TensorBoard scalars ``<kind>/<key>``.

        Kept apart from the iteration records (which carry ``loss``) so a script reading the training
        curve never mistakes a validation number for a training one."""
        if not self.is_logging_rank:
            return
        if self._closed:
            raise RuntimeError("MetricsLogger.log_evaluation called after close()")
        console.print_line(console.format_evaluation(iteration, kind, values), self._bar)
        if self._writer is not None:
            self._writer.write_scalars(iteration, {f"{kind}/{key}": value for key, value in values.items()})
        if self._wandb is not None:
            self._wandb.write_scalars(iteration, {f"{kind}/{key}": value for key, value in values.items()})
        self._file.write({"iteration": int(iteration), "kind": kind, **values, "time": time.time()})

    def summary(self) -> dict[str, Any]:
        """Whole-run numbers over every iteration this logger saw (not only the logged ones).

        Keys: ``iterations`` (count), ``first_iteration``, ``last_iteration``, ``first_loss``, ``last_loss``,
        ``min_loss`` (over finite losses), ``nonfinite_iterations``, ``total_tokens``,
        ``mean_tokens_per_s`` (total tokens / total step time, i.e. time-weighted), ``total_time_s`` (sum of
        the iterations' ``elapsed_s``), ``wall_time_s`` (since the logger was created) and
        ``peak_memory_bytes``. On a non-logging rank every value is ``None``. One line of it:
        :func:`~.console.summary_line`.
        """
        if not self.is_logging_rank:
            return dict.fromkeys(SUMMARY_KEYS)
        return {
            **self._totals.as_dict(),
            "wall_time_s": time.time() - self._created,
            "peak_memory_bytes": memory.device_peak_memory_bytes(),
        }

    def close(self) -> None:
        """Write a partial interval if one is pending, then close the bar, TensorBoard and the jsonl file.

        Safe to call more than once, and on non-logging ranks.
        """
        if self._closed or not self.is_logging_rank:
            self._closed = True
            return
        try:
            self._write_window(self._last_iteration)
        finally:
            self._closed = True
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            if self._wandb is not None:
                summary = self.summary()
                self._wandb.close(summary, console.summary_line(summary))
                self._wandb = None
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
