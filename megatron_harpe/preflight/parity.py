"""Check 1: the loss and gradients of the user's layout equal a single-process reference's, on the same batch
and the same weights, at positions from 0 and near the run's last position.

What it catches: anything that makes a parallel layout compute another function than the model - a CP rank's
tokens rotated by another rank's positions, chunks in the wrong order, documents of a packed batch reusing the
first one's positions (Megatron-LM PR #5243), a loss or gradient reduced over the wrong group or scaled by the
CP or TP size (transformers PR #48167, 360-LLaMA-Factory #72), attention gradients whose error grows with the
ring (ring-flash-attention #42: the forward looks right, so gradients are compared, not only the loss).

Tolerances, relative, against the fp32 CPU reference (reference.py):
- an fp32 run: loss 2e-5 (the step-0 check's bound, init_check.FP32_RTOL: only the order of fp32 sums differs),
  gradients 1e-4 as the norm of the difference over the norm of the reference gradient, per parameter;
- a bf16 run: loss 2e-3, gradients 0.15 per parameter. bf16 keeps 8 bits; two implementations round
  differently through every layer and the backward: measured with the CPU's bf16 on the tiny twin, loss 2.4e-4
  and gradients 0.053 (worst parameter) clean, against 5e-3 and 1.3-1.4 with a CP chunk-order fault or a swapped
  base (docs/preflight.md). Not yet measured with a GPU's bf16 kernels.
In fp32 a wrong position, group or scale is wrong by orders of magnitude more (tests/test_preflight.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from megatron_harpe.preflight.layout_run import LayoutRun
from megatron_harpe.preflight.result import FAIL, PASS, CheckResult
from megatron_harpe.preflight.twin import Twin
from megatron_harpe.training.init_check import FP32_RTOL

NAME = "layout parity"
GRAD_RTOL = {"fp32": 1e-4, "bf16": 0.15}
LOSS_RTOL = {"fp32": FP32_RTOL, "bf16": 2e-3}
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                    "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
                    "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS")


def _precision(twin: Twin) -> str:
    from megatron_harpe.training.trainer import _params_dtype

    return "bf16" if _params_dtype(twin.cfg) == torch.bfloat16 else "fp32"


def run_reference(twin: Twin, run: LayoutRun, windows: torch.Tensor, workdir: Path, timeout: int = 1800
                  ) -> Dict[str, Any]:
    """Rank 0: the reference process on the layout run's files; its JSON result (or {"error": text})."""
    spec = workdir / "reference_spec.pt"
    out = workdir / "reference.json"
    torch.save({"model_cfg": twin.model_cfg, "windows": windows, "eod_id": twin.eod_id,
                "document_mask": twin.cfg.data.document_mask, "eod_mask_loss": twin.cfg.data.eod_mask_loss,
                "weights": run.weights, "passes": [{"shift": p.shift, "grads": p.grads} for p in run.passes]}, spec)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith("PMI_")
           and not k.startswith("OMPI_")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the reference is the CPU's, in fp32, whatever the run's device
    env["HARPE_BACKEND"] = "cpu"
    proc = subprocess.run([sys.executable, "-m", "megatron_harpe.preflight.reference", str(spec), str(out)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        return {"error": f"the reference process exited {proc.returncode}: " + " | ".join(tail)}
    return json.loads(out.read_text())


def parity_check(twin: Twin, run: LayoutRun, reference: Optional[Dict[str, Any]], seconds: float = 0.0
                 ) -> CheckResult:
    precision = _precision(twin)
    loss_rtol = LOSS_RTOL[precision]
    grad_rtol = GRAD_RTOL[precision]
    tolerance = (f"{precision} run vs fp32 reference: loss {loss_rtol:.0e} relative, gradients {grad_rtol:.0e} "
                 f"(|g - g_ref| / |g_ref| per parameter)")
    if reference is None or "error" in reference:
        why = (reference or {}).get("error", "no reference result")
        return CheckResult(NAME, FAIL, f"the reference could not be computed: {why}", tolerance, {}, seconds)
    faults, lines, details = [], [], {"passes": []}
    by_shift = {p["shift"]: p for p in reference["passes"]}
    for p in run.passes:
        ref = by_shift[p.shift]
        rel = abs(p.loss - ref["reference_loss"]) / max(abs(ref["reference_loss"]), 1e-12)
        where = "positions from 0" if p.shift == 0 else f"positions {p.shift:,}..{p.shift + twin.seq_length - 1:,}"
        entry = {"shift": p.shift, "loss": p.loss, "reference_loss": ref["reference_loss"], "loss_rel_error": rel,
                 "tokens": p.tokens, "reference_tokens": ref["reference_tokens"],
                 "grad_rel_error": ref["grad_rel_error"], "worst_param": ref["worst_param"],
                 "worst_param_rel_error": ref["worst_param_rel_error"], "layout_seconds": p.seconds}
        details["passes"].append(entry)
        if p.tokens != ref["reference_tokens"]:
            faults.append(f"{where}: the layout counts {p.tokens:,} tokens in the loss, the reference "
                          f"{ref['reference_tokens']:,} (loss mask, labels or packing padding)")
        if not rel <= loss_rtol:
            faults.append(f"{where}: loss {p.loss:.7g} vs reference {ref['reference_loss']:.7g} "
                          f"({rel:.2g} relative)")
        if not ref["worst_param_rel_error"] <= grad_rtol:
            faults.append(f"{where}: gradient of {ref['worst_param']} off by {ref['worst_param_rel_error']:.2g} "
                          f"relative")
        lines.append(f"{where}: loss {rel:.1g}, gradients {ref['worst_param_rel_error']:.1g}")
    if run.far_note:
        lines.append(run.far_note)
        details["far_note"] = run.far_note
    status = FAIL if faults else PASS
    summary = "; ".join(faults) if faults else "relative errors: " + "; ".join(lines)
    return CheckResult(NAME, status, summary, tolerance, details, seconds)


def share(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def layout_parity(twin: Twin, run: LayoutRun, windows: torch.Tensor, workdir: Path) -> CheckResult:
    """Collective: rank 0 runs the reference, every rank gets the verdict."""
    started = time.perf_counter()
    rank = dist.get_rank() if dist.is_initialized() else 0
    reference = None
    if rank == 0:
        try:
            reference = run_reference(twin, run, windows, workdir)
        except Exception as err:  # noqa: BLE001 - every rank must get a verdict, or they wait in the broadcast
            reference = {"error": f"{type(err).__name__}: {err}"}
    reference = share(reference)
    return parity_check(twin, run, reference, time.perf_counter() - started)
