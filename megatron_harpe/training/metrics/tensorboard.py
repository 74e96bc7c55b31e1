"""``<run_dir>/tensorboard``: the metrics lines as TensorBoard scalars, the iteration as the step.

TensorBoard is optional: without it, training must not fail (stdout and metrics.jsonl carry the same
numbers), but a silently empty TensorBoard directory would be a surprise, so the first logger that
cannot open it warns once per process.

**Resume.** ``SummaryWriter(purge_step=start_iteration + 1)`` makes TensorBoard hide the steps after
``start_iteration`` in the older event files, the same rule metrics.jsonl applies (see ``jsonl``): the
crashed attempt's steps after the checkpoint would otherwise be drawn over the resumed run's.
"""
from __future__ import annotations

import warnings
from typing import Any

from megatron_harpe.training.metrics.values import is_number, to_plain

__all__ = ["TENSORBOARD_DIRNAME", "TAGS", "TensorBoardWriter"]

TENSORBOARD_DIRNAME = "tensorboard"

# TensorBoard tag for each record key; prefixes group the charts into sections in the UI.
TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "throughput/tokens_per_s",
    "tflops_per_device": "throughput/tflops_per_device",
    "mfu": "throughput/mfu",
    "peak_memory_bytes": "memory/peak_memory_bytes",
    "seconds_per_iteration": "time/seconds_per_iteration",
}

_warned = False


def _warn_missing(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"TensorBoard logging is off: {reason}. Metrics still go to stdout and metrics.jsonl; "
            "`pip install tensorboard` (or pass tensorboard=False) to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )


class TensorBoardWriter:
    """A ``SummaryWriter`` that knows the tags; make one with :meth:`open`."""

    def __init__(self, summary_writer):
        self._sw = summary_writer

    @classmethod
    def open(cls, log_dir: str, start_iteration: int) -> "TensorBoardWriter | None":
        """The writer, or ``None`` (after the one-time warning) when tensorboard is not installed."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            _warn_missing(f"the tensorboard package is not installed ({exc})")
            return None
        return cls(SummaryWriter(log_dir=log_dir, purge_step=start_iteration + 1))

    def write(self, record: dict[str, Any], extra: dict[str, Any]) -> None:
        """The record's :data:`TAGS` that have a value, and each numeric ``extra`` as ``extra/<key>``."""
        step = record["iteration"]
        for key, tag in TAGS.items():
            value = record.get(key)
            if value is not None:
                self._sw.add_scalar(tag, float(value), step)
        for key, value in extra.items():
            value = to_plain(value)
            if is_number(value):
                self._sw.add_scalar(f"extra/{key}", float(value), step)
        self._sw.flush()

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        """Numeric values under their own tags (evaluation results: ``eval/eval_loss``, ``probe/...``)."""
        for tag, value in scalars.items():
            value = to_plain(value)
            if is_number(value):
                self._sw.add_scalar(tag, float(value), step)
        self._sw.flush()

    def close(self) -> None:
        self._sw.close()
