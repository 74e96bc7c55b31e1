"""Check 4: a few training steps of the twin in the run's FP8 recipe against the same steps in bf16.

GPU only: FP8 GEMMs are Transformer Engine's on Hopper or newer; on any other machine the check says it cannot
run and why. Both runs start from the layout run's saved weights, read the same batches and take `STEPS` optimizer
steps; the losses must agree per step within `RTOL` relative. FP8 with per-tensor scales keeps the loss of a
healthy model within a fraction of a percent of bf16 over the first steps; a recipe that is broken (scales not
updated, a GEMM whose output is garbage, an attention in FP8 that its backend cannot do) is off by far more or is
not finite. What it does not show: FP8's effect late in training (the amax history matters over thousands of
steps); run a short real training in both and compare curves for that.
"""
from __future__ import annotations

import copy
import gc
import math
import time
from pathlib import Path
from typing import List, Optional

import torch

from megatron_harpe.preflight.result import FAIL, NOT_RUN, PASS, CheckResult
from megatron_harpe.preflight.twin import Twin

NAME = "FP8 vs bf16"
STEPS = 3
RTOL = 2e-2


def _losses(twin: Twin, fp8: Optional[str], weights: str, batches) -> List[float]:
    from megatron.core import parallel_state as ps

    from megatron_harpe.models.checkpoint import load_model
    from megatron_harpe.training.trainer import Trainer

    cfg = copy.deepcopy(twin.cfg)
    cfg.fp8.format = fp8
    trainer = Trainer(cfg)
    try:
        trainer._build(twin.model_cfg)
        trainer.eod_id = twin.eod_id
        load_model(trainer.chunks, None, weights)
        stage = trainer.stages[0]
        out = []
        for step in range(STEPS):
            trainer.iteration = step
            loss, _, _ = trainer.train_step(stage, batches)
            out.append(loss)
        return out
    finally:
        trainer.chunks = trainer.optimizer = trainer.scheduler = None
        del trainer
        gc.collect()
        torch.cuda.empty_cache()
        ps.destroy_model_parallel()


def fp8_check(twin: Twin, machine, weights: Optional[str], batches_for_rank) -> CheckResult:
    """Collective. `batches_for_rank()`: this DP rank's micro-batches (the layout run's)."""
    started = time.perf_counter()
    fmt = twin.full.fp8.format
    if fmt is None:
        return CheckResult(NAME, NOT_RUN, "fp8.format is not set: the run trains in bf16")
    if not (machine.cuda and machine.te):
        return CheckResult(NAME, NOT_RUN, f"fp8.format={fmt} needs Transformer Engine on a GPU (Hopper or newer); "
                                          f"this machine has {'a GPU without TE' if machine.cuda else 'no GPU'}: "
                                          f"run harpe-preflight on the job's nodes")
    if weights is None:
        return CheckResult(NAME, FAIL, "the layout run saved no weights to start both runs from")
    batches = batches_for_rank()
    bf16 = _losses(twin, None, weights, batches)
    fp8 = _losses(twin, fmt, weights, batches)
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(fp8, bf16)]
    worst = max(rel) if all(math.isfinite(x) for x in fp8) else math.inf
    details = {"bf16": bf16, "fp8": fp8, "rel": rel, "recipe": twin.full.fp8.recipe}
    tolerance = f"{RTOL:.0e} relative per step over {STEPS} steps"
    line = ", ".join(f"{a:.4f}/{b:.4f}" for a, b in zip(fp8, bf16))
    status = PASS if worst <= RTOL else FAIL
    return CheckResult(NAME, status, f"{fmt} ({twin.full.fp8.recipe}) vs bf16 losses per step: {line} (worst "
                                     f"{worst:.2g} relative)", tolerance, details, time.perf_counter() - started)
