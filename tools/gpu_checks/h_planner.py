"""Section h, harpe-plan's memory model against one GPU step: each plan is built and stepped in a world of one
process (planning/measure.py), and its weights, gradients, optimizer state, saved activations and the step's
torch.cuda.max_memory_allocated are set against what the planner predicts."""
from __future__ import annotations

import contextlib
import datetime
import traceback
from typing import Any, Dict, List, Optional

from .common import CPU_LABEL, Env, Section, SectionTimeout, free_memory, gib, jsonable, now

#: The row fields of section h: (key in numbers["plans"], column of the markdown table), one to one.
COLUMNS = (("plan", "plan"), ("seq", "seq"), ("backend", "spec"), ("rope", "RoPE"), ("layout", "layout"),
           ("weights", "weights"), ("grads", "grads"), ("optimizer", "optimizer"),
           ("activations", "activations"), ("peak", "peak allocated"), ("result", "result"), ("seconds", "s"))
#: measured / planned must lie within 1 +- tolerance (model state is exact by construction; activations and
#: the step's peak are modelled).
TOLERANCE = {"weights": 0.01, "grads": 0.01, "optimizer": 0.01, "activations": 0.10, "peak": 0.10}
TOLERANCE_TEXT = "measured / planned: model state within 1%, activations and peak within 10%"


def model_shape(z: Dict[str, Any]):
    from megatron_harpe.planning.spec import PRESETS, ModelShape

    if z["model"] == "tiny":
        return PRESETS["tiny"]
    # Llama-2-7B's width (hidden 4096, FFN 11008, 32 heads x 128, MHA, vocab 32000), fewer layers
    return ModelShape(z["layers"], 4096, 11008, 32, 32, 128, 32000, position="harpe",
                      name=f"llama2-7b-width-{z['layers']}-layers")


def plans_for(env: Env, te: bool) -> List[Dict[str, Any]]:
    """The plans of section h, cheapest and most informative first: the shorter sequence before the longer;
    at each, the plain layout, the unfused RoPE (its cos/sin terms and angle table), full recompute (the
    recompute working set), selective core_attn; Transformer Engine's spec (the modelled path) right after
    the plain local plan when TE imports, and more TE plans after both lengths; the distributed optimizer
    last (at DP 1 it only pads the buffers, which CPU runs check byte for byte)."""
    from megatron_harpe.planning.spec import Layout, Plan, Workload

    z = env.sizes["h"]
    model = model_shape(z)
    plain, dist_opt = Layout(), Layout(dist_opt=True)
    full = Layout(recompute="full", recompute_method="uniform", recompute_num_layers=1)
    sel = Layout(recompute="selective", recompute_modules=("core_attn",))
    # CPU: measure.py builds CPU models with megatron-core's unfused apply, so only unfused plans match
    k0 = "fused" if env.cuda else "unfused"
    order = []
    for seq in z["seqs"]:
        order.append((seq, "local", k0, plain))
        if te:
            order.append((seq, "te", "fused", plain))
        if env.cuda:
            order.append((seq, "local", "unfused", plain))
        order += [(seq, "local", k0, full), (seq, "local", k0, sel)]
    if te:
        s1 = z["seqs"][0]
        order += [(s1, "te", "fused", full), (s1, "te", "fused", sel), (s1, "te", "unfused", plain)]
    order += [(seq, "local", k0, dist_opt) for seq in z["seqs"]]
    plans = []
    for i, (seq, backend, kernel, layout) in enumerate(order):
        workload = Workload(seq_length=seq, micro_batch=1, global_batch=1, precision="bf16", backend=backend,
                            device="gpu" if env.cuda else "cpu", rope_kernel=kernel)
        flags = layout.describe().replace("TP1 CP1 PP1 DP1", "").strip() or "plain"
        plans.append(dict(id=f"h{i + 1}", plan=Plan(model, layout, workload), seq=seq, backend=backend,
                          rope=kernel, layout=flags))
    return plans


@contextlib.contextmanager
def world_of_one(sec: Section, env: Env):
    """A torch.distributed world of one process for measure.py: NCCL on a GPU (probed with one all-reduce),
    gloo if NCCL fails or on CPU; an existing world of one is used as it is. Yields the backend's name."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError(f"a process group of {dist.get_world_size()} ranks exists; section h needs one")
        yield str(dist.get_backend())
        return
    backend = None
    if env.cuda:
        try:
            dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=datetime.timedelta(seconds=120))
            probe = torch.ones(1, device=env.device)
            dist.all_reduce(probe)
            torch.cuda.synchronize()
            backend = "nccl"
        except SectionTimeout:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            raise
        except Exception as err:  # noqa: BLE001 - gloo instead
            first = str(err).splitlines()[0][:200] if str(err) else ""
            sec.note(f"NCCL world of one failed ({type(err).__name__}: {first}); gloo instead (collectives on CUDA "
                     "tensors that gloo lacks will fail their plan)")
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
    if backend is None:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        backend = "gloo"
    try:
        yield backend
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def measure(plan) -> Dict[str, Any]:
    """One plan built and stepped in this process (planning/measure.py; on a GPU two steps, the second's
    torch.cuda.max_memory_allocated as measured["peak_allocated"])."""
    from megatron_harpe.planning.measure import measure_in_process

    return measure_in_process([plan])[0]


def estimate_seconds(plan, done: List[tuple], env: Env) -> float:
    """Seconds plan is expected to take: the fastest plan so far at the same sequence length (the first plan
    also pays one-off costs: importing megatron-core when the section runs alone, torch.compile of the fused
    SwiGLU / bias-dropout-add on a GPU), else the fastest at the last length scaled by (seq ratio)^1.5
    (+10 s on a GPU for torch.compile at a new shape), else a first-plan guess."""
    seq = plan.workload.seq_length
    same = [t for s, t in done if s == seq]
    if same:
        est = min(same)
    elif done:
        s0 = done[-1][0]
        est = min(t for s, t in done if s == s0) * (seq / s0) ** 1.5 + (10.0 if env.cuda else 0.0)
    else:
        est = 30.0 if env.cuda else 8.0
    if plan.layout.recompute == "full":
        est *= 1.3
    return est + 2.0


def _bytes(measured: Optional[float], planned: Optional[float]) -> str:
    ref = planned or measured or 0
    unit, div = next(((u, d) for u, d in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)) if ref >= d),
                     ("B", 1))
    show = lambda n: "-" if n is None else f"{n / div:.4g}"  # noqa: E731
    return f"{show(measured)} / {show(planned)} {unit}"


def _cell(comp: Optional[Dict[str, Any]], cpu: bool) -> str:
    if not comp:
        return "-"
    text = _bytes(comp["measured"], comp["planned"])
    if comp["ratio"] is None:
        return text + (" (CPU mode: not measured)" if cpu else "")
    return f"{text} = {comp['ratio']:.3f}" + ("" if comp["within"] else " (outside)")


def _publish(sec: Section, rows: List[Dict[str, Any]], env: Env) -> None:
    """(Re)write section h's rows and its table, so a section stopped half way still reports what ran."""
    sec.record["numbers"]["plans"] = jsonable(rows)
    table_rows = []
    for r in rows:
        cells = []
        for key, _ in COLUMNS:
            v = r[key]
            if key in TOLERANCE:
                cells.append(_cell(v, env.cpu))
            elif key == "seconds":
                cells.append("-" if v is None else f"{v:.1f}")
            else:
                cells.append(v)
        table_rows.append(cells)
    title = ("measured / planned per plan (one process, micro-batch 1, bf16)"
             + (f" [{CPU_LABEL}]" if env.cpu else ""))
    table = {"title": title, "columns": [label for _, label in COLUMNS], "rows": jsonable(table_rows),
             "note": "each cell: measured / planned = ratio, (outside) when beyond the tolerance (weights, grads, "
                     "optimizer 1%; activations, peak 10%). activations: bytes autograd saves in one micro-batch's "
                     "forward (planning/measure.py); peak: torch.cuda.max_memory_allocated over the second step "
                     "minus what was allocated before the plan was built, against harpe-plan's 'allocated at the "
                     "peak'; s: build + steps + measuring"}
    tables = sec.record["tables"]
    for i, t in enumerate(tables):
        if t["title"] == title:
            tables[i] = table
            break
    else:
        tables.append(table)


def run(sec: Section, env: Env) -> None:
    import torch

    from megatron_harpe.planning.memory import stage_memory
    from megatron_harpe.planning.spec import check_plan

    z = env.sizes["h"]
    te = False
    if env.cuda:
        from megatron_harpe.models.spec import transformer_engine_available

        te = transformer_engine_available()
        if not te:
            sec.note("Transformer Engine not importable: only the local spec is measured (backend te plans need TE)")
    else:
        sec.skip("fused-RoPE plans", "CPU mode: measure.py builds CPU models with megatron-core's unfused apply; "
                 "the fused kernel's plans run on a GPU")
        sec.skip("peak allocated (torch.cuda.max_memory_allocated)", "CPU mode: no CUDA caching allocator")
        sec.skip("Transformer Engine spec plans", "CPU mode: Transformer Engine needs a GPU")
    plans = plans_for(env, te)
    model = plans[0]["plan"].model
    sec.number("model", dict(name=model.name, layers=model.num_layers, hidden=model.hidden_size,
                             ffn=model.ffn_hidden_size, heads=model.num_attention_heads,
                             groups=model.num_query_groups, head_dim=model.head_dim, vocab=model.vocab_size,
                             parameters=model.parameters, seqs=list(z["seqs"]), micro_batch=1, precision="bf16"))
    sec.log(f"model {model.name}: {model.num_layers} layers, hidden {model.hidden_size}, {model.parameters / 1e6:.1f}M "
            f"parameters; {len(plans)} plans at seq {', '.join(str(s) for s in z['seqs'])}; "
            f"{sec.remaining():.0f} s for them")
    rows: List[Dict[str, Any]] = []
    results: Dict[str, Any] = {}
    sec.record["numbers"]["results"] = results
    done: List[tuple] = []
    measured_count = 0

    def empty_row(item, result: str, seconds: Optional[float] = None) -> Dict[str, Any]:
        row = {key: None for key, _ in COLUMNS}
        row.update(plan=item["id"], seq=item["seq"], backend=item["backend"], rope=item["rope"],
                   layout=item["layout"], result=result, seconds=seconds)
        return row

    def label(item) -> str:
        return f"{item['id']} seq {item['seq']} {item['backend']} {item['rope']} RoPE {item['layout']}"

    free_failed: List[str] = []

    def free() -> None:
        """After each plan on a GPU: its model and optimizer (reference cycles: gc) and the allocator's cache.
        On CPU nothing is held on a device and a full gc costs ~0.3 s a plan: skipped. A failure (a broken
        CUDA context) is noted once; the next plan then fails on its own."""
        if not env.cuda:
            return
        try:
            free_memory(env)
        except SectionTimeout:
            raise
        except Exception as err:  # noqa: BLE001
            if not free_failed:
                sec.note(f"freeing GPU memory between plans failed: {type(err).__name__}: {err}"[:400])
            free_failed.append(str(err))

    def baseline() -> Optional[int]:
        """What is allocated before a plan is built (its peak is taken relative to it); peak stats reset."""
        if not env.cuda:
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return int(torch.cuda.memory_allocated())

    free()  # what earlier sections left in the allocator's cache

    with world_of_one(sec, env) as backend:
        sec.number("world", {"backend": backend, "size": 1})
        sec.log(f"world of one process, {backend}")
        index = 0
        try:
            for index, item in enumerate(plans):
                plan = item["plan"]
                est = estimate_seconds(plan, done, env)
                left = sec.remaining()
                if left < est:
                    reason = f"time: needs ~{est:.0f} s, {max(left, 0):.0f} s left of the section's cap"
                    sec.skip(f"plan {label(item)}", reason)
                    rows.append(empty_row(item, "skipped (time)"))
                    _publish(sec, rows, env)
                    continue
                sec.log(f"  {label(item)} (~{est:.0f} s) ...")
                base = None
                started = now()
                error = None
                try:
                    check_plan(plan)
                    base = baseline()
                    r = measure(plan)
                except SectionTimeout:
                    raise
                except Exception as err:  # noqa: BLE001 - recorded; the next plan runs
                    error = (f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}",
                             traceback.format_exc())
                    r = None
                seconds = now() - started
                done.append((item["seq"], seconds))
                if error is not None:
                    rows.append(empty_row(item, f"error: {error[0]}", seconds))
                    sec.record["error"] = ((sec.record["error"] or "") + f"plan {label(item)} raised:\n"
                                           + error[1][-3000:] + "\n")
                    sec.check(f"{label(item)}: builds, steps and is measured", False, value=error[0],
                              detail="traceback at the end of the section")
                    _publish(sec, rows, env)
                    free()
                    continue
                measured_count += 1
                meas, plnd = r["measured"], r["planned"]
                peak = None
                if meas.get("peak_allocated") is not None:
                    peak = int(meas["peak_allocated"]) - (base or 0)
                row = empty_row(item, "pass", seconds)
                ratios, outside = {}, []
                for comp, tol in TOLERANCE.items():
                    m = peak if comp == "peak" else meas.get(comp)
                    p = plnd.get("peak_allocated" if comp == "peak" else comp)
                    ratio = None
                    if m is not None and p is not None:
                        ratio = (m / p) if p else (1.0 if m == 0 else float("inf"))
                    within = None if ratio is None else abs(ratio - 1.0) <= tol
                    row[comp] = {"measured": m, "planned": p, "ratio": ratio, "within": within}
                    if ratio is not None:
                        ratios[comp] = ratio
                    if within is False:
                        outside.append(f"{comp} {ratio:.3f}")
                if outside:
                    row["result"] = "fail: " + ", ".join(outside)
                rows.append(row)
                extra = {}
                if env.cuda:
                    extra = {"allocated_before_plan": base,
                             "planned_total_with_allowances": stage_memory(plan, 0).total}
                    with contextlib.suppress(Exception):
                        extra["max_memory_reserved"] = int(torch.cuda.max_memory_reserved())
                results[item["id"]] = jsonable({"label": label(item), "measured": meas, "planned": plnd,
                                                 "loss": r.get("loss"), "seconds": seconds, **extra})
                sec.check(f"{label(item)}: planned vs measured", not outside, value=ratios, tolerance=TOLERANCE_TEXT,
                          detail=("outside: " + ", ".join(outside)) if outside else "")
                del r, meas, plnd
                _publish(sec, rows, env)
                free()
        except SectionTimeout as err:
            # the hard stop fired inside a plan: it and the plans after it are recorded as not run
            for item in plans[index:]:
                if any(row["plan"] == item["id"] for row in rows):
                    continue
                rows.append(empty_row(item, ("timeout" if item is plans[index] else "skipped")
                                      + " (the section's cap)"))
            _publish(sec, rows, env)
            raise SectionTimeout(f"during plan {plans[index]['id']}: {err}") from None
    _publish(sec, rows, env)
    sec.check("at least one plan measured", measured_count > 0, value=f"{measured_count} of {len(plans)} plans")
    if env.cuda:
        bases = {k: v.get("allocated_before_plan") for k, v in results.items()}
        sec.number("allocated_before_plan_bytes", bases)
        known = [b for b in bases.values() if b is not None]
        if known and max(known) - min(known) > 2 ** 30:
            sec.note(f"memory allocated between plans grew from {gib(min(known))} to {gib(max(known))}: something "
                     "outlived its plan (each plan's peak is taken relative to its own start)")

