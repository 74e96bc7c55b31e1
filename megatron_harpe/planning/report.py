"""harpe-plan's output: a plain-text report (stdout) and the same content as JSON (--json)."""
from __future__ import annotations

import dataclasses
from typing import List, Optional

from megatron_harpe.planning.hardware import GIB, GPU, Assumptions
from megatron_harpe.planning.search import Evaluation, SearchResult
from megatron_harpe.planning.spec import Plan

MODELLED = ("Modelled, not measured: activations on the te path, transients, allowances, all times. "
            "Exact (byte-for-byte against a built model): weights, gradients, optimizer state, and activations "
            "on the local path (docs/planning.md).")


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:8.2f}"


def describe_workload(plan: Plan) -> List[str]:
    m, w = plan.model, plan.workload
    if w.rope_kernel == "unfused":
        kernel = "unfused (angle table; cos/sin kept per layer)"
    elif m.position == "harpe":
        kernel = "HARPE's fused Triton kernel (no angle table)"
    else:
        kernel = "Transformer Engine's fused RoPE (one [s, 1, 1, r] table)"
    lines = [f"model     {m.name or 'model'}: {m.num_layers} layers, hidden {m.hidden_size}, FFN {m.ffn_hidden_size}, "
             f"{m.num_attention_heads} heads / {m.num_query_groups} K/V groups x {m.head_dim}, vocab {m.vocab_size}; "
             f"{m.parameters / 1e9:.2f}B parameters",
             f"position  {m.position}, RoPE applied by {kernel}",
             f"workload  sequence {w.seq_length:,}, micro-batch {w.micro_batch}, global batch {w.global_batch} "
             f"({w.global_batch * w.seq_length / 1e6:.2f}M tokens/step), {w.precision}"
             + (f" + FP8 {w.fp8}" + (" (attention too)" if w.fp8_dot_product_attention else "") if w.fp8 else "")
             + f", {'Transformer Engine' if w.backend == 'te' else 'local (megatron-core linears + SDPA)'} spec on "
               f"{w.device.upper()}"]
    return lines


def describe_assumptions(gpu: GPU, a: Assumptions) -> str:
    return (f"assumptions: compute at {a.efficiency:.0%} of peak ({gpu.bf16_tflops:g} TFLOP/s bf16"
            + (f", {gpu.fp8_tflops:g} FP8" if gpu.fp8_tflops else "") + f"); links at {a.link_efficiency:.0%} of "
            f"NVLink {gpu.nvlink_gb_s:g} GB/s / network {gpu.network_gb_s:g} GB/s per GPU; fragmentation "
            f"{a.fragmentation:.0%} of activations+transients; reserve {a.reserve_gib:g} GiB")


def verdict_text(ev: Evaluation) -> str:
    """The verdict of one plan, as the report prints it: how much is spare, or why it does not fit."""
    return f"fits, {ev.headroom / GIB:.1f} GiB to spare" if ev.fits else ev.reason


def plan_text(ev: Evaluation, gpu: GPU, a: Assumptions, title: str) -> str:
    plan = ev.plan
    out = [title, *describe_workload(plan), f"layout    {plan.layout.describe()}  ({plan.layout.gpus} GPUs of "
           f"{gpu.name}, {gpu.memory_gib:g} GiB)"]
    out += [f"note      {n}" for n in plan.notes]
    for stage in ev.stages:
        label = "" if plan.layout.pp == 1 else f" - pipeline stage {stage.pp_rank}"
        out += ["", f"{'memory per GPU' + label:<42s}{'GiB':>8s}   how"]
        for item in stage.items:
            mark = "=" if item.exact else "~"
            out.append(f"  {mark} {item.name:<38s}{_gib(item.bytes)}   {item.how}")
        out.append(f"    {'allocated at the peak':<38s}{_gib(stage.allocated)}   what torch.cuda.max_memory_allocated "
                   f"should show")
        out.append(f"    {'total with allowances':<38s}{_gib(stage.total)}   of {gpu.memory_gib:g} GiB")
    out += ["", f"verdict   {verdict_text(ev)}"]
    t = ev.time
    out += ["", f"{'time per step (modelled)':<36s}{'s':>9s}"]
    for name, seconds in t.parts_s.items():
        if seconds:
            out.append(f"  {name:<34s}{seconds:9.3f}")
    out.append(f"  {'step':<34s}{t.step_s:9.3f}")
    out.append(f"  tokens/s per GPU {t.tokens_per_s_per_gpu:,.0f}   model TFLOP/s per GPU {t.model_tflops_per_gpu:.0f}"
               f"   MFU {t.mfu:.1%}")
    out += [f"  {k}: {v}" for k, v in t.notes.items()]
    out += ["", describe_assumptions(gpu, a), "legend: = exact (checked against built models), ~ modelled", MODELLED]
    return "\n".join(out)


def search_text(result: SearchResult, plan: Plan, gpus: int, gpu: GPU, a: Assumptions, top: int,
                show_rejected: bool) -> str:
    out = [f"harpe-plan --search: {gpus} x {gpu.name} ({gpu.memory_gib:g} GiB), {result.searched} layouts, "
           f"{len(result.fitting)} fit", *describe_workload(plan), ""]
    if result.fitting:
        out.append(f"{'#':>3}  {'layout':<40s}{'peak GiB':>9}{'spare':>8}{'step s':>9}{'tok/s/GPU':>11}{'MFU':>7}")
        for i, ev in enumerate(result.fitting[:top], 1):
            out.append(f"{i:>3}  {ev.plan.layout.describe():<40s}{ev.peak.total / GIB:9.1f}{ev.headroom / GIB:8.1f}"
                       f"{ev.time.step_s:9.2f}{ev.time.tokens_per_s_per_gpu:11,.0f}{ev.time.mfu:7.1%}")
        if len(result.fitting) > top:
            out.append(f"     ... {len(result.fitting) - top} more fit (--top N to show them)")
    else:
        out.append("no layout fits: see the rejections below (a larger GPU, more GPUs, or a shorter sequence)")
    out += ["", f"rejected: {len(result.rejected)}"]
    shown = result.rejected if show_rejected else result.rejected[:top]
    for ev in shown:
        out.append(f"  {ev.plan.layout.describe():<40s}{ev.reason}")
    if not show_rejected and len(result.rejected) > len(shown):
        kinds = {}
        for ev in result.rejected[len(shown):]:
            key = "out of memory" if ev.reason.startswith("out of memory") else ev.reason.split(" (")[0][:70]
            kinds[key] = kinds.get(key, 0) + 1
        out.append(f"  ... {len(result.rejected) - len(shown)} more (--show-rejected lists all): " +
                   "; ".join(f"{n} x {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])))
    out += ["", describe_assumptions(gpu, a), MODELLED]
    return "\n".join(out)


def plan_json(ev: Evaluation, gpu: GPU, a: Assumptions) -> dict:
    return {"gpu": dataclasses.asdict(gpu), "assumptions": dataclasses.asdict(a), "modelled": MODELLED,
            **ev.to_dict()}


def search_json(result: SearchResult, gpus: int, gpu: GPU, a: Assumptions, top: Optional[int] = None) -> dict:
    return {"gpus": gpus, "gpu": dataclasses.asdict(gpu), "assumptions": dataclasses.asdict(a),
            "modelled": MODELLED, "searched": result.searched,
            "fitting": [ev.to_dict() for ev in result.fitting[:top]],
            "rejected": [{"layout": ev.plan.layout.describe(), "reason": ev.reason,
                          "peak_gib": ev.peak.total / GIB if ev.stages else None} for ev in result.rejected]}
