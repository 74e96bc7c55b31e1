"""Named ranges in a torch.profiler trace ("harpe/rotary", "harpe/core_attention", ...).

Why a helper and not torch.profiler.record_function directly: record_function costs ~7 us per
call even when no profiler runs (measured on torch 2.13, CPU), and the model opens a range in
every layer of every micro-batch. `profile_range` asks first whether a profiler is recording
(~0.5 us) and opens the range only then, so a run that does not profile pays next to nothing.
The names are the trace's vocabulary: docs/training.md ("Profiling") lists them, and
training/profiling.py starts and stops the profiler that records them.

No torch.compile or TorchScript path of this package runs through a range (record_function is
graph-safe in torch.compile anyway; the guard is a plain Python call).
"""
from __future__ import annotations

import contextlib
import functools

import torch


def profile_range(name: str):
    """A context manager that names the code it wraps in the trace while a profiler records."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


def profiled(name: str):
    """Decorator: the function's calls appear as range `name` in the trace (decided per call, so a
    profiler started later still sees them). functools.wraps keeps the signature that megatron-core
    inspects on some forwards."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not torch.autograd._profiler_enabled():
                return fn(*args, **kwargs)
            with torch.profiler.record_function(name):
                return fn(*args, **kwargs)
        return wrapper
    return decorate


__all__ = ["profile_range", "profiled"]
