"""Check 5, memory: harpe-plan's verdict on the full run, and harpe-plan held against the twin's real tensors.

full_run_memory  the planner's prediction for the user's run, exactly as `harpe-plan CONFIG --gpus N --gpu G` makes
                 it (planning.spec.plan_from_config + planning.search.evaluate): pass when the peak pipeline stage
                 fits, fail with the planner's own reason when it does not or when the config cannot be planned.
                 Arithmetic only: no torch, no GPU. details["predicted"] holds the numbers other checks read.
twin_memory      the planner's prediction for the reduced twin, per rank, against what the twin's model holds when
                 it is built and stepped the way harpe-train builds it (planning/measure.py: weights, gradient
                 buffers, optimizer state, every tensor autograd saves), in the current torch.distributed world;
                 on a GPU also torch.cuda.max_memory_allocated against the planner's total. Every rank calls it,
                 every rank gets the same CheckResult.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from megatron_harpe.planning.hardware import GIB, GPU, GPUS, Assumptions, gpu_named
from megatron_harpe.planning.report import describe_assumptions, plan_json, plan_text, verdict_text
from megatron_harpe.planning.search import evaluate
from megatron_harpe.planning.spec import LayoutError, Plan, check_plan, plan_from_config, plan_to_dict
from megatron_harpe.preflight.result import FAIL, NOT_RUN, PASS, CheckResult

NAME = "memory (full run)"
TWIN_NAME = "memory (twin)"
DEFAULT_GPU = "h100"  # harpe-plan's --gpu default

#: The twin's tolerances, from what the planner was shown to achieve (docs/planning.md, "Validation" (a)):
#: weights, gradients and optimizer state follow megatron-core's own buffer and sharding rules and matched built
#: models byte for byte (456 of 456 values, every layout), as did the activations of the local spec on CPU (its
#: terms were read off autograd). 0.1% leaves room for a few bytes of bookkeeping (an optimizer's step counters
#: per parameter group), never for a misplaced buffer or a forgotten activation.
EXACT_TOLERANCE = 0.001
#: The activations of the Transformer Engine spec, and of the local spec's GPU fusions, are modelled and not yet
#: measured (docs/planning.md (c)): the validation's stated goal, 10%.
MODELLED_TOLERANCE = 0.10
COMPONENTS = ("weights", "grads", "optimizer", "activations")

PREDICTED_KEYS = ("gpu", "gpus", "layout", "fits", "peak_gib", "allocated_gib", "capacity_gib", "headroom_gib",
                  "step_seconds", "tokens_per_second", "tokens_per_second_per_gpu", "tflops_per_device", "mfu")


# ----------------------------------------------------------------------------- the full run
def resolve_gpu(name: Optional[str], memory_gib: Optional[float] = None) -> GPU:
    """harpe-plan's GPU for `name` (h100, h200, a100: --gpu; None = h100), its memory replaced by `memory_gib`
    (--gpu-memory). A device name as torch reports it ("NVIDIA H100 80GB HBM3") is matched by the planner's key in
    it. ValueError for a GPU the planner does not know."""
    name = name or DEFAULT_GPU
    try:
        return gpu_named(name, memory_gib)
    except ValueError:
        squeezed = re.sub(r"[^a-z0-9]", "", name.lower())
        for key in GPUS:
            if key in squeezed:
                return gpu_named(key, memory_gib)
        raise


def _empty_predicted(**known) -> Dict[str, Any]:
    out = {key: None for key in PREDICTED_KEYS}
    out.update(known)
    return out


def _predicted(ev, gpu: GPU) -> Dict[str, Any]:
    peak = ev.peak
    t = ev.time
    gpus = ev.plan.layout.gpus
    return _empty_predicted(
        gpu=gpu.name, gpus=gpus, layout=ev.plan.layout.describe(), fits=ev.fits, peak_gib=peak.total / GIB,
        allocated_gib=peak.allocated / GIB, capacity_gib=gpu.memory_gib, headroom_gib=ev.headroom / GIB,
        step_seconds=t.step_s if t else None,
        tokens_per_second=t.tokens_per_s_per_gpu * gpus if t else None,  # the whole job, as harpe-train logs it
        tokens_per_second_per_gpu=t.tokens_per_s_per_gpu if t else None,
        tflops_per_device=t.model_tflops_per_gpu if t else None, mfu=t.mfu if t else None)


def _search_hint(config_path: Optional[str], gpus: int, gpu_key: str) -> str:
    return f"harpe-plan {config_path or 'CONFIG'} --gpus {gpus} --gpu {gpu_key} --search for a layout that fits"


def full_run_memory(cfg, gpu_name: Optional[str] = None, gpu_memory_gib: Optional[float] = None, *,
                    gpus: Optional[int] = None, backend: str = "te", config_path: Optional[str] = None,
                    assumptions: Assumptions = Assumptions()) -> CheckResult:
    """harpe-plan's verdict on the user's full run.

    cfg: the run's Config (config/loader.load_config, overrides applied). gpu_name / gpu_memory_gib: harpe-plan's
    --gpu / --gpu-memory (None: h100 with its 79.6 GiB; a torch device name is accepted). gpus: the run's GPU count
    (--gpus; None: one model replica, DP 1, as harpe-plan without --gpus). backend: te (harpe-plan's default: the
    Transformer Engine spec) or local. config_path only names the config in the text."""
    started = time.perf_counter()
    tolerance = ("fits: the peak pipeline stage's total with allowances within the GPU's memory (harpe-plan's "
                 "verdict; model state exact, activations and transients modelled: docs/planning.md)")

    def result(status: str, summary: str, **details) -> CheckResult:
        details.setdefault("predicted", _empty_predicted())
        return CheckResult(NAME, status, summary, tolerance, details, time.perf_counter() - started)

    try:
        gpu = resolve_gpu(gpu_name, gpu_memory_gib)
        assumptions.check()
    except ValueError as err:
        return result(NOT_RUN, f"harpe-plan has no figures for this GPU: {err}", gpu=gpu_name)
    tolerance += f"; {describe_assumptions(gpu, assumptions)}"
    gpu_key = next((k for k, g in GPUS.items() if gpu.name.startswith(g.name)), DEFAULT_GPU)
    try:
        plan = plan_from_config(cfg, gpus=gpus, backend=backend, device="gpu")
    except ValueError as err:  # LayoutError (GPU count vs layout), a stage schedule or position the planner refuses
        return result(FAIL, f"harpe-plan cannot plan this config: {err}", reason=str(err), gpu=gpu.name)
    name = Path(config_path).stem if config_path else Path(str(cfg.run_dir)).name
    plan = dataclasses.replace(plan, model=dataclasses.replace(plan.model, name=name))
    n = plan.layout.gpus
    if plan.workload.fp8 and not gpu.fp8_tflops:  # harpe-plan's own refusal, in its words
        reason = (f"the config sets fp8.format={plan.workload.fp8}, but {gpu.name} has no FP8; unset it "
                  f"(fp8.format=null) or choose h100/h200")
        return result(FAIL, f"harpe-plan cannot plan this config: {reason}", reason=reason, gpu=gpu.name,
                      plan=plan_to_dict(plan), predicted=_empty_predicted(gpu=gpu.name, gpus=n,
                                                                          layout=plan.layout.describe()))
    try:
        ev = evaluate(plan, gpu, assumptions)
    except LayoutError as err:
        reason = f"layout {plan.layout.describe()}: {err}"
        return result(FAIL, f"harpe-plan cannot plan this config: {reason}", reason=reason, gpu=gpu.name,
                      plan=plan_to_dict(plan), predicted=_empty_predicted(gpu=gpu.name, gpus=n,
                                                                          layout=plan.layout.describe()))
    predicted = _predicted(ev, gpu)
    where = f"{plan.layout.describe()} on {n} x {gpu.name}"
    stage = "" if plan.layout.pp == 1 else f" (pipeline stage {ev.peak.pp_rank})"
    details = dict(predicted=predicted, reason=ev.reason, notes=list(plan.notes),
                   harpe_plan=plan_json(ev, gpu, assumptions),
                   report=plan_text(ev, gpu, assumptions, f"harpe-plan: {name or 'model'} on {n} x {gpu.name}"))
    if ev.fits:
        t = ev.time
        summary = (f"{where}: peak {ev.peak.total / GIB:.1f} of {gpu.memory_gib:g} GiB{stage}, {verdict_text(ev)}; "
                   f"predicted {t.step_s:.1f} s/step, {t.tokens_per_s_per_gpu:,.0f} tokens/s per GPU, MFU {t.mfu:.1%}")
        return result(PASS, summary, **details)
    summary = f"{where}: {verdict_text(ev)}{stage}; {_search_hint(config_path, n, gpu_key)}"
    return result(FAIL, summary, hint=_search_hint(config_path, n, gpu_key), **details)


# ----------------------------------------------------------------------------- the twin
def _twin_device() -> tuple:
    """(device, backend) the twin runs on here, as harpe-train would build it: a GPU with the Transformer Engine
    spec when TE imports (models/spec.py's rule), else the local spec; the CPU backend: cpu, local."""
    from megatron_harpe.backends import setup_backend

    if setup_backend() == "cuda":
        from megatron_harpe.models.spec import transformer_engine_available

        return "gpu", "te" if transformer_engine_available() else "local"
    return "cpu", "local"


@contextlib.contextmanager
def _caller_state_set_aside():
    """Let measure.measure_rank initialise (and destroy) megatron-core's parallel state and seed the RNGs, then give
    the caller back exactly what it had: the same process-group objects in parallel_state (set aside, not destroyed:
    destroy_model_parallel would destroy the caller's gloo groups, so those are hidden from it first), the torch and
    CUDA generators and megatron's RNG tracker."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    saved_ps = None
    if ps.model_parallel_is_initialized():
        saved_ps = {k: v for k, v in vars(ps).items() if re.fullmatch(r"_[A-Z][A-Z0-9_]*", k)}
        for key in saved_ps:
            if "GLOO" in key:
                setattr(ps, key, None)
        ps.destroy_model_parallel()
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    tracker_globals = (mrandom._CUDA_RNG_STATE_TRACKER, mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED)
    tracker = tracker_globals[0]
    tracker_fields = None
    if tracker is not None:
        tracker_fields = {k: (dict(v) if isinstance(v, dict) else set(v) if isinstance(v, set) else v)
                          for k, v in vars(tracker).items()}
    try:
        yield
    finally:
        if ps.model_parallel_is_initialized():  # measure_rank destroys its own; only an error can leave it
            ps.destroy_model_parallel()
        if saved_ps is not None:
            for key, value in saved_ps.items():
                setattr(ps, key, value)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        mrandom._CUDA_RNG_STATE_TRACKER, mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = tracker_globals
        if tracker is not None:
            vars(tracker).clear()
            vars(tracker).update(tracker_fields)


def _measure_this_rank(plan: Plan) -> Dict[str, Any]:
    """measure.measure_rank on this rank (one-process world of its own when there is none), with what the
    caller's own tensors hold on the GPU beforehand (subtracted from the measured peak)."""
    import gc

    import torch
    import torch.distributed as dist

    from megatron_harpe.planning.measure import measure_in_process, measure_rank

    cuda = plan.workload.device == "gpu"
    with _caller_state_set_aside():
        baseline = 0
        if cuda:
            gc.collect()
            torch.cuda.synchronize()
            baseline = torch.cuda.memory_allocated()
        out = measure_rank(plan) if dist.is_available() and dist.is_initialized() else measure_in_process([plan])[0]
    out["baseline_allocated"] = baseline
    return out


def _relative(planned: float, measured: float) -> float:
    if measured == 0:
        return 0.0 if planned == 0 else 1.0
    return (planned - measured) / measured


def _compare(plan: Plan, ranks: List[Dict[str, Any]]) -> tuple:
    """(rows per rank, worst row, failed rows): per rank and component, measured vs planned with its tolerance."""
    from megatron_harpe.planning.memory import stage_memory

    exact_activations = plan.workload.backend == "local" and plan.workload.device == "cpu"
    out, worst, failed = [], None, []
    for r in ranks:
        row = {k: r.get(k) for k in ("rank", "pp_rank", "tp_rank", "cp_rank", "dp_cp_rank")}
        comps = {}
        for c in COMPONENTS:
            measured, planned = r["measured"][c], r["planned"][c]
            tol = EXACT_TOLERANCE if c != "activations" or exact_activations else MODELLED_TOLERANCE
            err = _relative(planned, measured)
            entry = {"measured": measured, "planned": planned, "error": err, "tolerance": tol}
            comps[c] = entry
            item = dict(entry, component=c, rank=r["rank"])
            if worst is None or abs(err) / tol > abs(worst["error"]) / worst["tolerance"]:
                worst = item
            if abs(err) > tol:
                failed.append(item)
        row["components"] = comps
        row["activations_per_call"] = {"measured": r["measured"].get("activations_per_call"),
                                       "planned": r["planned"].get("activations_per_call")}
        peak = r["measured"].get("peak_allocated")
        if peak is not None:  # a GPU: the measured step's torch.cuda.max_memory_allocated, the caller's part removed
            stage = stage_memory(plan, r["pp_rank"])
            peak -= r.get("baseline_allocated") or 0
            gpu = {"measured": peak, "planned_allocated": stage.allocated, "planned_total": stage.total,
                   "error_vs_allocated": _relative(stage.allocated, peak), "fits_planned_total": peak <= stage.total}
            row["max_memory_allocated"] = gpu
            if not gpu["fits_planned_total"]:
                failed.append({"component": "max_memory_allocated", "rank": r["rank"], "measured": peak,
                               "planned": stage.total, "error": _relative(stage.total, peak), "tolerance": 0.0})
        out.append(row)
    return out, worst, failed


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2 ** 20:,.2f} MiB"


def _gather(obj) -> List[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, obj)
    return everyone


def twin_memory(twin_cfg, world_size: int) -> CheckResult:
    """harpe-plan's per-rank prediction for the twin against the twin's real model, on every rank of the current
    torch.distributed world (collective: every rank calls it; every rank returns the same CheckResult).

    twin_cfg: the twin's Config (its layout, fewer layers, a shorter sequence); world_size: the twin's GPU count,
    which must be the world's size (with no process group, 1: a one-process world is made and removed).
    megatron-core's parallel state may be initialised by the caller or not: it is set aside, the twin's layout is
    initialised and destroyed, and the caller's groups are put back (the same objects); so are the torch, CUDA and
    megatron RNG states. megatron_harpe.backends.setup_backend picks the device (a GPU: torch.cuda.set_device
    first; the twin then runs two steps and torch.cuda.max_memory_allocated is compared too)."""
    started = time.perf_counter()
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
    device, backend = _twin_device()
    exact = f"weights, gradients, optimizer state{' and activations' if backend == 'local' and device == 'cpu' else ''}"
    tolerance = (f"per rank, |planned - measured| / measured <= {EXACT_TOLERANCE:.1%} for {exact} (the planner matched "
                 f"built models byte for byte: docs/planning.md, Validation (a))")
    if not (backend == "local" and device == "cpu"):
        tolerance += (f", <= {MODELLED_TOLERANCE:.0%} for activations (the {backend} spec's on a GPU are modelled, not "
                      f"yet measured: the validation's goal); torch.cuda.max_memory_allocated within the planner's "
                      f"total with allowances")

    def result(status: str, summary: str, seconds: float = 0.0, **details) -> CheckResult:
        # before the gather (nothing measured, nothing collective) 0 s: every rank must return the same result
        return CheckResult(TWIN_NAME, status, summary, tolerance, details, seconds)

    if world_size != (world or 1):
        return result(NOT_RUN, f"the twin has {world_size} rank(s) but this is " +
                      (f"a world of {world}" if world else "no torch.distributed world") +
                      ": call twin_memory from every rank of the twin's launch")
    try:
        plan = plan_from_config(twin_cfg, gpus=world_size, backend=backend, device=device)
        check_plan(plan)
    except ValueError as err:  # the same on every rank: nothing collective has run
        return result(FAIL, f"harpe-plan cannot plan the twin: {err}", reason=str(err))
    where = f"twin {plan.layout.describe()} on {world_size} rank(s), {device}, {backend} spec"

    try:
        mine: Dict[str, Any] = _measure_this_rank(plan)
    except Exception as err:  # noqa: BLE001 - reported by every rank, then the verdict
        mine = {"rank": dist.get_rank() if world else 0, "error": f"{type(err).__name__}: {err}"}
    mine["seconds"] = time.perf_counter() - started
    ranks = _gather(mine)
    seconds = max(r["seconds"] for r in ranks)
    details: Dict[str, Any] = {"plan": plan_to_dict(plan), "device": device, "backend": backend,
                               "tolerances": {"exact": EXACT_TOLERANCE, "modelled": MODELLED_TOLERANCE}}
    errors = [r for r in ranks if "error" in r]
    if errors:
        details["errors"] = {r["rank"]: r["error"] for r in errors}
        return result(FAIL, f"{where}: measuring the twin failed on rank {errors[0]['rank']}: {errors[0]['error']}",
                      seconds, **details)
    rows, worst, failed = _compare(plan, ranks)
    details.update(ranks=rows, worst=worst, failed=failed)
    losses = [r.get("loss") for r in ranks if r.get("loss") is not None]
    details["loss"] = losses[0] if losses else None

    def describe(item: dict) -> str:
        return (f"{item['component']} on rank {item['rank']}: planned {_mib(item['planned'])}, measured "
                f"{_mib(item['measured'])}")

    if failed:
        bad = max(failed, key=lambda i: abs(i["error"]) / i["tolerance"] if i["tolerance"] else float("inf"))
        more = f" (+{len(failed) - 1} more)" if len(failed) > 1 else ""
        if bad["component"] == "max_memory_allocated":
            text = (f"torch.cuda.max_memory_allocated on rank {bad['rank']} is {_mib(bad['measured'])}, above the "
                    f"planner's total {_mib(bad['planned'])}")
        else:
            text = f"error {bad['error']:+.2%} beyond {bad['tolerance']:.1%}: {describe(bad)}"
        return result(FAIL, f"{where}: the planner is off, {text}{more}", seconds, **details)
    return result(PASS, f"{where}: planner vs built model, worst error {worst['error']:+.2%} ({describe(worst)}), "
                        f"within {worst['tolerance']:.1%}", seconds, **details)
