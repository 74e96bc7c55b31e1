"""The planner's validation, side by side in one run (tools/bench_plan.py; a subset in the tests).

(a) measured vs planned bytes of weights, gradients, optimizer state and saved activations, on CPU,
    for a tiny and a medium model and layouts with TP, SP, CP, PP (+ virtual stages), DP with the
    distributed optimizer, full and selective recompute (measure.py does the measuring);
(b) the planner beside Megatron-LM's own theoretical-memory formula (reference.py) on the paper's
    Llama-2-7B 128k configs.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from megatron_harpe.planning.hardware import GIB
from megatron_harpe.planning.memory import plan_memory
from megatron_harpe.planning.reference import megatron_lm_estimate
from megatron_harpe.planning.spec import Layout, ModelShape, Plan, Workload

TINY = ModelShape(2, 64, 176, 4, 2, 16, 256, position="harpe", name="tiny")  # GQA: 4 query heads, 2 K/V groups
MEDIUM = ModelShape(4, 512, 1408, 8, 4, 64, 8192, position="harpe", name="medium")
MEDIUM_ROPE = replace(MEDIUM, position="rope", name="medium-rope")
COMPONENTS = ("weights", "grads", "optimizer", "activations")

FULL = dict(recompute="full", recompute_method="uniform", recompute_num_layers=1)


def _workload(model: ModelShape, precision: str, dp: int = 1, vpp: Optional[int] = None) -> Workload:
    seq, micro = (128, 2) if model.hidden_size <= 64 else (2048, 1)
    micro_batches = 2 if vpp else 1  # the interleaved schedule needs a multiple of PP micro-batches
    return Workload(seq_length=seq, micro_batch=micro, global_batch=micro * dp * micro_batches, precision=precision,
                    backend="local", device="cpu", rope_kernel="unfused")


def _plans(model: ModelShape, precision: str, layouts: Iterable[Layout]) -> List[Plan]:
    return [Plan(model, layout, _workload(model, precision, layout.dp, layout.vpp)) for layout in layouts]


def single_rank_layouts() -> List[Layout]:
    return [Layout(), Layout(dist_opt=True), Layout(**FULL),
            Layout(recompute="selective", recompute_modules=("core_attn",)),
            Layout(recompute="selective", recompute_modules=("mlp",)),
            Layout(recompute="selective", recompute_modules=("core_attn", "mlp"))]


def two_rank_layouts(layers: int) -> List[Layout]:
    out = [Layout(tp=2), Layout(tp=2, sp=True), Layout(cp=2), Layout(cp=2, recompute="selective"),
           Layout(dp=2, dist_opt=True, overlap_grad_reduce=True, overlap_param_gather=True), Layout(pp=2),
           Layout(tp=2, sp=True, recompute="full", recompute_method="block", recompute_num_layers=1)]
    if layers % 4 == 0:
        out.append(Layout(pp=2, vpp=2))
    return out


def four_rank_layouts() -> List[Layout]:
    return [Layout(tp=2, cp=2, sp=True, dist_opt=True), Layout(cp=2, dp=2, dist_opt=True),
            Layout(tp=2, pp=2, sp=True), Layout(cp=4, **FULL)]


def scenarios(full: bool = True) -> Dict[int, List[Plan]]:
    """Plans by the number of processes they need. full=False: the tiny model only (the tests)."""
    models = [TINY, MEDIUM, MEDIUM_ROPE] if full else [TINY]
    out: Dict[int, List[Plan]] = {1: [], 2: [], 4: []}
    for model in models:
        for precision in ("fp32", "bf16"):
            out[1] += _plans(model, precision, single_rank_layouts())
        out[2] += _plans(model, "bf16", two_rank_layouts(model.num_layers))
        if model is not MEDIUM_ROPE:
            out[4] += _plans(model, "bf16", four_rank_layouts())
    if not full:
        out[4] = []
    return out


def measure_all(plans_by_nproc: Dict[int, List[Plan]], work_dir: str | Path,
                nprocs: Sequence[int] = (1, 2, 4)) -> List[dict]:
    """Measure every plan (one launch per process count); one row per plan, rank and component."""
    from megatron_harpe.planning.measure import measure_in_process, run_scenarios

    rows = []
    for nproc in nprocs:
        plans = plans_by_nproc.get(nproc) or []
        if not plans:
            continue
        if nproc == 1:
            results = [[r] for r in measure_in_process(plans)]
        else:
            results = run_scenarios(plans, nproc, Path(work_dir) / f"nproc{nproc}")
        for plan, ranks in zip(plans, results):
            for r in ranks:
                for component in COMPONENTS:
                    measured, planned = r["measured"][component], r["planned"][component]
                    rows.append({"model": plan.model.name, "precision": plan.workload.precision,
                                 "layout": plan.layout.describe(), "gpus": plan.layout.gpus, "rank": r["rank"],
                                 "component": component, "measured": measured, "planned": planned,
                                 "error": (planned - measured) / measured if measured else 0.0})
    return rows


def measurement_table(rows: List[dict]) -> str:
    """Markdown: one line per plan (the worst rank of each component)."""
    plans: Dict[tuple, Dict[str, dict]] = {}
    for row in rows:
        key = (row["model"], row["precision"], row["layout"])
        worst = plans.setdefault(key, {}).get(row["component"])
        if worst is None or abs(row["error"]) > abs(worst["error"]):
            plans[key][row["component"]] = row
    out = ["| model | dtype | layout | weights B | grads B | optimizer B | activations B (measured / planned) | "
           "worst error |", "|---|---|---|---|---|---|---|---|"]
    for (model, precision, layout), comps in plans.items():
        cells = []
        for c in COMPONENTS[:3]:
            r = comps[c]
            cells.append(f"{r['measured']:,}" + ("" if r["measured"] == r["planned"] else f" / {r['planned']:,.0f}"))
        act = comps["activations"]
        cells.append(f"{act['measured']:,} / {act['planned']:,.0f}")
        worst = max(abs(r["error"]) for r in comps.values())
        out.append(f"| {model} | {precision} | {layout} | " + " | ".join(cells) + f" | {worst:.2%} |")
    return "\n".join(out)


def reference_rows(config_paths: Sequence[str], gpus: Sequence[int]) -> List[dict]:
    """(b): for each paper config and GPU count, the planner beside Megatron-LM's formula."""
    from megatron_harpe.config.loader import load_config
    from megatron_harpe.planning.spec import plan_from_config

    rows = []
    for path in config_paths:
        for n in gpus:
            plan = plan_from_config(load_config(path), gpus=n)
            stage = plan_memory(plan)[0]
            ours_state = stage.sum("model state")
            ours_act = sum(i.bytes for i in stage.items if i.group == "activations")
            as_is = megatron_lm_estimate(plan)
            per_cp = megatron_lm_estimate(plan, plan.workload.seq_length // plan.layout.cp)
            sp_branch = megatron_lm_estimate(replace(plan, layout=replace(plan.layout, recompute="selective",
                                                                           recompute_modules=("core_attn",))),
                                             plan.workload.seq_length // plan.layout.cp)
            rows.append({"config": Path(path).stem, "gpus": n, "layout": plan.layout.describe(),
                         "ours_state_gib": ours_state / GIB, "ours_activations_gib": ours_act / GIB,
                         "ours_allocated_gib": stage.allocated / GIB,
                         "mlm_state_gib": as_is.weight_and_optimizer / GIB, "mlm_activations_gib": as_is.activations / GIB,
                         "mlm_branch": as_is.branch, "mlm_padded_vocab": as_is.padded_vocab,
                         "mlm_activations_s_over_cp_gib": per_cp.activations / GIB,
                         "mlm_sp_branch_s_over_cp_gib": sp_branch.activations / GIB})
    return rows


def reference_table(rows: List[dict]) -> str:
    out = ["| config | GPUs | layout | ours: model state | Megatron-LM: weights+optimizer | ours: activations | "
           "Megatron-LM: activations (as printed) | ... with s/CP | ... SP branch, s/CP |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['config']} | {r['gpus']} | {r['layout']} | {r['ours_state_gib']:.2f} | {r['mlm_state_gib']:.2f} | "
                   f"{r['ours_activations_gib']:.2f} | {r['mlm_activations_gib']:.2f} | "
                   f"{r['mlm_activations_s_over_cp_gib']:.2f} | {r['mlm_sp_branch_s_over_cp_gib']:.2f} |")
    return "\n".join(out)
