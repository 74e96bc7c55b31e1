"""Backend selection: CUDA when present, otherwise the CPU backend (``backends/cpu.py``).

Every entry point calls :func:`setup_backend` first, BEFORE importing ``megatron.core``::

    from megatron_harpe.backends import setup_backend, distributed_backend
    setup_backend()                      # "cuda" on a GPU machine, "cpu" elsewhere
    torch.distributed.init_process_group(distributed_backend())

With CUDA (and CPU not forced) nothing is changed. Without it, the CPU backend adapts
torch so that megatron-core's unchanged training path (GPTModel, pipeline schedules, RNG
tracker, DDP, optimizer, clip_grads, dist_checkpointing) runs on CPU with gloo; see
``megatron_harpe/backends/cpu.py`` for the list of adaptations and why each is needed.

``force_cpu``: True forces the CPU backend even where CUDA exists; False or None picks
automatically, except that the environment variable ``HARPE_BACKEND=cpu`` also forces CPU
when ``force_cpu`` is None (so a launcher can force it for every rank).
"""
from __future__ import annotations

import os

_BACKEND: str | None = None


def setup_backend(force_cpu: bool | None = None) -> str:
    """Choose and enable the backend; return "cuda" or "cpu". Idempotent.

    Later calls return the first choice; one that forces CPU after CUDA was chosen raises
    RuntimeError (megatron may already have been imported and used on the GPU).
    """
    global _BACKEND
    import torch

    if force_cpu is None:
        force_cpu = os.environ.get("HARPE_BACKEND", "").strip().lower() == "cpu"
    if _BACKEND is not None:
        if force_cpu and _BACKEND != "cpu":
            raise RuntimeError(f"backend already set up as {_BACKEND!r} in this process; cannot switch to "
                               "'cpu'. Call setup_backend(force_cpu=True) once, before importing megatron.core.")
        if _BACKEND == "cpu":
            from megatron_harpe.backends import cpu

            cpu.enable()  # no-op, except installing the device mode in a new calling thread
        return _BACKEND
    wanted = "cpu" if force_cpu or not torch.cuda.is_available() else "cuda"
    if wanted == "cpu":
        from megatron_harpe.backends import cpu

        cpu.enable()
    _BACKEND = wanted
    return _BACKEND


def backend_name() -> str | None:
    """"cuda" or "cpu" once :func:`setup_backend` has run, else None."""
    return _BACKEND


def is_cpu_backend() -> bool:
    """True when the CPU backend is enabled in this process."""
    return _BACKEND == "cpu"


def distributed_backend() -> str:
    """The torch.distributed backend to initialise: "nccl" with CUDA, "gloo" on the CPU backend.

    Calls :func:`setup_backend` (automatic choice) if it has not run yet.
    """
    return "gloo" if (_BACKEND or setup_backend()) == "cpu" else "nccl"


__all__ = ["setup_backend", "backend_name", "is_cpu_backend", "distributed_backend"]
