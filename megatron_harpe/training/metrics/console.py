"""What a person watching the run sees: one stdout line per interval, a summary line, a progress bar.

The line looks like::

    iter 120/1000 | loss 2.3145 | lr 1.20e-05 | grad norm 0.842 | 12,345 tok/s | 98.3 TFLOP/s/dev |
    MFU 9.9% | mem 61.2 GiB | 1.84 s/it

The tqdm bar is drawn on stderr, and only when stderr is a terminal: batch jobs and CI logs (where
stderr is a file or a pipe) get the plain stdout lines and no carriage-return noise. While a bar is up,
lines go through ``tqdm.write`` so the two do not garble each other.
"""
from __future__ import annotations

import sys
from typing import Any

__all__ = ["GiB", "format_line", "format_evaluation", "summary_line", "open_progress_bar", "print_line"]

GiB = float(1 << 30)


def format_line(record: dict[str, Any], total_iterations: int | None) -> str:
    """The stdout line for one record (an interval's averaged metrics); absent metrics are left out."""
    total = f"/{total_iterations}" if total_iterations is not None else ""
    parts = [f"iter {record['iteration']}{total}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}"]
    if record.get("grad_norm") is not None:
        parts.append(f"grad norm {record['grad_norm']:.3f}")
    if record.get("tokens_per_s") is not None:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if record.get("tflops_per_device") is not None:
        tflops = record["tflops_per_device"]
        # CPU and tiny models run at GFLOP/s: keep the number readable instead of "0.0 TFLOP/s"
        parts.append(f"{tflops:.1f} TFLOP/s/dev" if tflops >= 1.0 else f"{tflops * 1e3:.2f} GFLOP/s/dev")
    if record.get("mfu") is not None:
        parts.append(f"MFU {100.0 * record['mfu']:.1f}%")
    parts.append(f"mem {record['peak_memory_bytes'] / GiB:.1f} GiB")
    parts.append(f"{record['seconds_per_iteration']:.2f} s/it")
    return " | ".join(parts)


def format_evaluation(iteration: int, kind: str, values: dict[str, Any]) -> str:
    """``eval @ iter 200 | eval_loss 2.1034 | eval_perplexity 8.194 | ...``: floats to 4 significant digits."""
    parts = [f"{kind} @ iter {iteration}"]
    for key, value in values.items():
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


def summary_line(summary: dict) -> str:
    """The end-of-run fragment, e.g. ``loss 3.0000 -> 2.5000, 800 tok/s, peak mem 61.20 GiB``.

    From :meth:`MetricsLogger.summary`. A part whose value is missing (no iteration ran, a
    non-logging rank) or zero (no timed step, no memory reading) is left out rather than printed as
    a misleading number; with nothing to say the result is empty.
    """
    parts = []
    if summary.get("first_loss") is not None:
        parts.append(f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}")
    if summary.get("mean_tokens_per_s"):
        parts.append(f"{summary['mean_tokens_per_s']:,.0f} tok/s")
    if summary.get("peak_memory_bytes"):
        parts.append(f"peak mem {summary['peak_memory_bytes'] / GiB:.2f} GiB")
    return ", ".join(parts)


def open_progress_bar(total: int | None, initial: int):
    """A tqdm bar on stderr, or ``None`` when stderr is not a terminal (see the module doc)."""
    if not _isatty(sys.stderr):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="it", file=sys.stderr, dynamic_ncols=True)


def print_line(line: str, bar) -> None:
    """``line`` on stdout, flushed, above the bar when there is one."""
    if bar is not None:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()
    else:
        print(line, flush=True)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:
        return False
