"""Peak memory of this process, for the metrics lines and the run summary."""
from __future__ import annotations

import resource
import sys

__all__ = ["device_peak_memory_bytes"]


def device_peak_memory_bytes() -> int:
    """Peak memory of this process in bytes.

    On a GPU process (CUDA available and already initialised by this process): the caching allocator's
    ``torch.cuda.max_memory_allocated()`` for the current device. Otherwise (CPU runs) the process's peak
    resident set size from ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which Linux reports in KiB
    (macOS in bytes). The CUDA check never initialises CUDA itself, so calling this on a CPU rank of a
    machine with GPUs does not create a context.
    """
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return int(torch.cuda.max_memory_allocated())
    except Exception:  # pragma: no cover - a broken CUDA install must not break logging
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
