"""Evaluate one plan, or every layout of a GPU count, ranked by predicted throughput.

A layout is rejected with the reason it cannot run: a divisibility megatron-core or this project
needs (heads, K/V groups, FFN or vocabulary by TP; layers by PP; sequence by 2 x CP; the global batch
by micro-batch x DP), TP beyond one node, or memory ("out of memory by X GiB").
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import List, Optional

from megatron_harpe.planning.hardware import GIB, GPU, Assumptions
from megatron_harpe.planning.memory import StageMemory, fits, peak_stage, plan_memory
from megatron_harpe.planning.spec import Layout, LayoutError, Plan, check_plan, plan_to_dict
from megatron_harpe.planning.throughput import StepTime, step_time

RECOMPUTE_CHOICES = ((None, None, None, ()), ("selective", None, None, ("core_attn",)), ("full", "uniform", 1, ()))


@dataclass
class Evaluation:
    plan: Plan
    stages: List[StageMemory]
    time: Optional[StepTime]
    fits: bool
    headroom: float  # bytes; negative = short by that much
    reason: str = ""  # why rejected ("" = fits)

    @property
    def peak(self) -> StageMemory:
        return peak_stage(self.stages)

    def to_dict(self) -> dict:
        return {"layout": self.plan.layout.describe(), "plan": plan_to_dict(self.plan), "fits": self.fits,
                "reason": self.reason, "headroom_gib": self.headroom / GIB,
                "peak_gib": self.peak.total / GIB, "allocated_gib": self.peak.allocated / GIB,
                "stages": [s.to_dict() for s in self.stages], "time": self.time.to_dict() if self.time else None}


def evaluate(plan: Plan, gpu: GPU, assumptions: Assumptions = Assumptions()) -> Evaluation:
    """Memory and time of one plan; raises LayoutError when the layout cannot run the model at all."""
    check_plan(plan)
    if plan.layout.tp > gpu.gpus_per_node:
        raise LayoutError(f"TP {plan.layout.tp} spans more than one node ({gpu.gpus_per_node} GPUs): tensor "
                          f"parallelism needs NVLink")
    stages = plan_memory(plan, assumptions)
    ok, headroom = fits(stages, gpu)
    reason = "" if ok else (f"out of memory by {-headroom / GIB:.1f} GiB (needs {peak_stage(stages).total / GIB:.1f} "
                            f"of {gpu.memory_gib:g} GiB)")
    return Evaluation(plan, stages, step_time(plan, gpu, assumptions), ok, headroom, reason)


def _powers_of_two(limit: int) -> List[int]:
    out, k = [], 1
    while k <= limit:
        out.append(k)
        k *= 2
    return out


def candidate_layouts(plan: Plan, gpus: int, gpus_per_node: int) -> List[Layout]:
    """Every layout searched for `gpus` GPUs: TP in 1, 2, 4, 8 (within a node), CP and PP powers of two,
    DP the rest; SP on whenever TP > 1; distributed optimizer off/on; recompute none, selective
    (core_attn) or full (uniform, 1 layer). Gradient reduction is overlapped (and the weight gather
    with the distributed optimizer), as in the examples."""
    base = plan.layout
    out = []
    tps = [t for t in (1, 2, 4, 8) if t <= max(gpus_per_node, 1)]
    for tp, cp, pp in itertools.product(tps, _powers_of_two(gpus), _powers_of_two(gpus)):
        if gpus % (tp * cp * pp):
            continue
        dp = gpus // (tp * cp * pp)
        for dist_opt, (rc, method, n, modules) in itertools.product((False, True), RECOMPUTE_CHOICES):
            out.append(Layout(tp=tp, pp=pp, cp=cp, dp=dp, vpp=None, sp=tp > 1, dist_opt=dist_opt, recompute=rc,
                              recompute_method=method, recompute_num_layers=n, recompute_modules=modules,
                              cp_comm=base.cp_comm, overlap_grad_reduce=True, overlap_param_gather=dist_opt))
    return out


@dataclass
class SearchResult:
    fitting: List[Evaluation]  # best first
    rejected: List[Evaluation]  # with .reason; divisibility rejections have no memory/time
    searched: int


def search(plan: Plan, gpus: int, gpu: GPU, assumptions: Assumptions = Assumptions()) -> SearchResult:
    fitting, rejected = [], []
    layouts = candidate_layouts(plan, gpus, gpu.gpus_per_node)
    for layout in layouts:
        candidate = replace(plan, layout=layout)
        try:
            ev = evaluate(candidate, gpu, assumptions)
        except LayoutError as err:
            rejected.append(Evaluation(candidate, [], None, False, 0.0, str(err)))
            continue
        (fitting if ev.fits else rejected).append(ev)
    fitting.sort(key=lambda e: (-e.time.tokens_per_s_per_gpu, e.peak.total))
    rejected.sort(key=lambda e: (e.time is None, -(e.headroom if e.time else 0)))
    return SearchResult(fitting, rejected, len(layouts))
