"""Section i, two-rank layouts vs one rank: TP=2 with sequence parallelism, CP=2 with each cp_comm_type that
Transformer Engine allows here, packed documents (THD) at CP=2, FP8 attention at CP=2 where the GPU and TE
allow it; loss and every gradient against the single-process (TP = PP = CP = 1) model on the same batch and
weights. Needs 2+ GPUs (NCCL); in CPU mode it runs on 2 gloo ranks. The work is done by i_worker.py under
torchrun; which scenarios run is decided here, from config/combinations.py's rules for the installed TE and
this GPU (`plan_scenarios`, a pure function the test calls with stand-in platforms)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .common import REPO, Env, Section, SectionTimeout, log

COMM_TYPES = ("p2p", "all_gather", "a2a", "a2a+p2p")
# a2a+p2p in a world of 2: the levels must multiply to CP = 2, so one level is trivial. [1, 2] (a2a level 1,
# p2p level 2) is chosen: TE takes the hierarchical path (a list of two groups, THD refused as for any
# a2a+p2p), skips the a2a exchange of a size-1 group and runs the p2p ring over 2 ranks; the a2a exchange
# itself is what the a2a scenario shows. [2, 1] would leave TE's ring with one rank, a case no config uses.
A2A_P2P_SIZES = (1, 2)
WORKER = Path(__file__).resolve().with_name("i_worker.py")

# Tolerances. CPU mode computes in fp32 and is judged like tests/workers/parallel_equivalence.py: the layouts
# differ from one rank only in summation order (measured: <= 5e-7 per-token loss, <= 4e-8 gradients).
# On the GPU everything is bf16 (unit roundoff u = 2^-8 = 3.9e-3; GEMMs accumulate in fp32 and round once, so
# a layout differs from one rank where it rounds partial results: TP partial sums before their all-reduce or
# reduce-scatter, CP's per-chunk attention outputs before the softmax merge, bf16 gradients):
#   - each token's loss within 2^-4 absolute (a few bf16 ulps of logits of magnitude up to ~4, in the fp32
#     cross entropy), the token mean within 2e-3 (~u/2: those differences mostly cancel over 1024 tokens);
#   - every gradient tensor within 5e-2 relative L2. The worst tensor is a norm weight's gradient (a sum over
#     every token with heavy cancellation, which magnifies relative error).
# The section's GPU model run in bf16 on CPU (same sizes, gloo, the local spec) gave: gradients 0.7-1.1%
# relative L2, per-token 1.6e-2, mean 7e-5 for TP2+SP / CP2 / packed CP2; the swapped-bases control 21%
# relative L2 and 0.13-0.16 per token. So 5e-2 leaves ~5x over bf16 noise and sits ~4x under that control.
# FP8 attention (hybrid: E4M3 forward with 3 mantissa bits, one rounding 2^-4 relative; E5M2 gradients)
# against the bf16 reference: the mean loss within 2^-4 relative, gradients finite; their relative L2 is
# reported, not judged (FP8 GEMMs and attention move norm-weight gradients by tens of percent).
TOL_CPU = dict(loss=5e-6, token_loss=5e-6, grad_abs=5e-7)
TOL_GPU = dict(loss=2e-3, token_loss=2.0 ** -4, grad_rel_l2=5e-2)
TOL_FP8_LOSS_REL = 2.0 ** -4
FP8_CAPABILITY = (8, 9)


# ============================================================================ which scenarios
def plan_scenarios(platform, cuda: bool, model: Dict[str, Any], cpu_prefix: str = ""
                   ) -> Tuple[List[Dict[str, Any]], List[Tuple[str, str]]]:
    """(scenarios to run, [(scenario, reason skipped)]) for `platform` (config/combinations.Platform: te,
    te_version, capability), from combinations.py's rules. `model`: heads, groups, head_dim, hidden, ffn, seq,
    batch. `cpu_prefix` starts every skip reason ("CPU mode: " in CPU mode)."""
    from megatron_harpe.config.combinations import context_parallel_refusals, fp8_refusals

    te = bool(platform.te)
    heads, groups = model["heads"], model["groups"]
    run: List[Dict[str, Any]] = []
    skip: List[Tuple[str, str]] = []

    def scenario(name, label, tp=1, cp=1, sp=False, comm=None, packed=False, fp8=False):
        hier = list(A2A_P2P_SIZES) if comm == "a2a+p2p" else None
        return dict(name=name, label=label, tp=tp, cp=cp, sp=sp, comm=comm, hierarchical=hier, packed=packed,
                    fp8=fp8, control=False)

    def cp_refusals(comm, packed):
        return context_parallel_refusals(cp=2, cp_comm_type=comm, packed=packed, query_heads_per_tp=heads,
                                         groups_per_tp=groups,
                                         hierarchical_sizes=list(A2A_P2P_SIZES) if comm == "a2a+p2p" else None,
                                         platform=platform)

    def why(refusals):
        return "; ".join(r.message() for r in refusals)

    run.append(scenario("tp2_sp", "TP=2 + SP", tp=2, sp=True))
    if te:
        for comm in COMM_TYPES:
            hier = f" {list(A2A_P2P_SIZES)}" if comm == "a2a+p2p" else ""
            for packed in (False, True):
                prefix = "packed_" if packed else ""
                name = f"{prefix}cp2_{comm}"
                refused = cp_refusals(comm, packed)
                if refused:
                    skip.append((name, f"{cpu_prefix}refused by config/combinations.py for TE "
                                       f"{platform.te_version}: {why(refused)}"))
                else:
                    run.append(scenario(name, f"CP=2 {comm}{hier}" + (", packed (THD)" if packed else ""), cp=2,
                                        comm=comm, packed=packed))
    else:
        run.append(scenario("cp2", "CP=2 (local spec: SDPA, K/V all-gathered)", cp=2))
        run.append(scenario("packed_cp2", "CP=2, packed (THD), local spec", cp=2, packed=True))
        for comm in COMM_TYPES:
            skip.append((f"cp2_{comm}", f"{cpu_prefix}{comm}: TE absent (local spec), comm type unused: the local "
                                        f"spec's SDPA attention all-gathers K/V whatever cp_comm_type says "
                                        f"(ran once as cp2 and packed_cp2)"))
    # negative control: the same CP=2 layout with its K/V groups' bases swapped must be SEEN as different
    ctl_comm = next((sc["comm"] for sc in run if sc["cp"] == 2 and not sc["packed"]), None)
    run.append(dict(scenario("control_cp2_swapped_bases", "control: CP=2" + (f" {ctl_comm}" if ctl_comm else "")
                             + ", K/V groups' bases swapped (must differ)", cp=2, comm=ctl_comm), control=True))
    # FP8 attention: TE on a GPU with FP8 (Ada/Hopper or newer), BSHD (TE's FP8 attention takes no THD)
    fp8_names = [f"fp8_cp2_{comm}" for comm in COMM_TYPES]
    if not (cuda and te):
        what = "no GPU" if not cuda else "TE absent (local spec)"
        skip.append(("fp8_cp2", f"{cpu_prefix}FP8 attention needs Transformer Engine on a GPU with compute "
                                f"capability >= 8.9; {what}"))
    elif platform.capability is None or tuple(platform.capability) < FP8_CAPABILITY:
        skip.append(("fp8_cp2", f"FP8 attention needs compute capability >= 8.9; this GPU is "
                                f"{platform.capability}"))
    else:
        tokens = [("micro-batch per CP rank", model["seq"] * model["batch"] // 2)]
        hd, hidden, ffn = model["head_dim"], model["hidden"], model["ffn"]
        dims = [("attention QKV", (heads + 2 * groups) * hd, hidden), ("attention output", hidden, heads * hd),
                ("MLP fc1", 2 * ffn, hidden), ("MLP fc2", hidden, ffn)]
        for name, comm in zip(fp8_names, COMM_TYPES):
            refused = cp_refusals(comm, False) + fp8_refusals(
                fp8=True, dot_product_attention=True, recipe="delayed", packed=False, head_dim=hd, cp=2,
                cp_comm_type=comm, tokens_per_rank=tokens, linear_dims=dims, platform=platform)
            if refused:
                skip.append((name, f"refused by config/combinations.py (TE {platform.te_version}, "
                                   f"sm{platform.capability[0]}{platform.capability[1]}): {why(refused)}"))
            else:
                hier = f" {list(A2A_P2P_SIZES)}" if comm == "a2a+p2p" else ""
                run.append(scenario(name, f"CP=2 {comm}{hier}, FP8 attention (hybrid, delayed)", cp=2, comm=comm,
                                    fp8=True))
    return run, skip


# ============================================================================ the launches
class _Launch:
    """One torchrun launch of i_worker.py on 2 processes; its output goes to <work>/launch<n>.log and the
    worker's per-scenario lines echo."""

    def __init__(self, sec: Section, env: Env, root: Path, n: int, plan: Dict[str, Any]):
        from .f_train import _free_port

        self.sec = sec
        self.out = root / f"launch{n}"
        self.out.mkdir(parents=True, exist_ok=True)
        plan_path = self.out / "plan.json"
        plan_path.write_text(json.dumps(plan, indent=1) + "\n")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
               "--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(WORKER), "--plan", str(plan_path),
               "--out", str(self.out)]
        penv = dict(os.environ)
        penv["PYTHONPATH"] = str(REPO) + (os.pathsep + penv["PYTHONPATH"] if penv.get("PYTHONPATH") else "")
        penv["PYTHONUNBUFFERED"] = "1"
        if env.cpu:
            penv.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HARPE_BACKEND="cpu", TRITON_INTERPRET="1")
        else:
            penv.pop("TRITON_INTERPRET", None)
            penv.pop("HARPE_BACKEND", None)
        self.log_path = root / f"launch{n}.log"
        sec.log(f"  launch {n}: torchrun --nproc-per-node 2 i_worker.py, {len(plan['scenarios'])} scenario(s) "
                f"(log {self.log_path})")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=penv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        with open(self.log_path, "w") as fh:
            for line in self.proc.stdout:
                fh.write(line)
                if line.startswith("scenario ") and not line.rstrip().endswith(": start"):
                    log(f"[i]   | {line.rstrip()[:200]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the process group this launch started
            self.proc.wait()

    def wait(self) -> Tuple[Optional[int], List[Dict[str, Any]]]:
        """(exit code, or None when the section's cap came first; each rank's results as far as written)."""
        try:
            rc = self.proc.wait(timeout=max(self.sec.remaining(), 1))
        except subprocess.TimeoutExpired:
            self.kill()
            rc = None
        except BaseException:
            self.kill()
            raise
        finally:
            self.reader.join(timeout=10)
        ranks = []
        for r in range(2):
            path = self.out / f"rank{r}.json"
            ranks.append(json.loads(path.read_text()) if path.exists() else {"scenarios": {}})
        return rc, ranks

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text()[-chars:] if self.log_path.exists() else ""


def _merge(ranks: List[Dict[str, Any]], name: str) -> Optional[Dict[str, Any]]:
    """One scenario's result over both ranks: the worst difference of either rank's slice."""
    per = [r["scenarios"].get(name) for r in ranks]
    if any(p is None for p in per):
        if all(p is None for p in per):
            return None
        missing = [r for r, p in enumerate(per) if p is None]
        other = next(p for p in per if p is not None)
        return dict(status="error", error=f"rank {missing[0]} wrote no result (the other rank: {other['status']})"
                                          + (f"\n{other['error']}" if other.get("error") else ""))
    errors = [p for p in per if p["status"] == "error"]
    if errors:
        return dict(status="error", error=errors[0]["error"], seconds=max(p.get("seconds", 0) for p in per))
    if any(p["status"] != "ran" for p in per):
        return dict(status=per[0]["status"])
    out = dict(per[0])
    for key in ("loss_abs_diff", "token_loss_max_diff", "grad_max_abs_diff", "grad_max_rel_l2", "grad_scale",
                "seconds"):
        out[key] = max(p[key] for p in per)
    out["loss"] = [p["loss"] for p in per]  # reduced over the DP x CP group: equal on both ranks
    out["tokens_compared"] = sum(p["tokens_compared"] for p in per)
    out["grads_finite"] = all(p["grads_finite"] for p in per)
    out["params_checked"] = [p["params_checked"] for p in per]
    worst_abs = max(per, key=lambda p: p["grad_max_abs_diff"])
    worst_rel = max(per, key=lambda p: p["grad_max_rel_l2"])
    out["grad_worst_abs"], out["grad_worst_rel"] = worst_abs["grad_worst_abs"], worst_rel["grad_worst_rel"]
    if out["layout"].get("format") == "thd":
        out["layout"]["local_rows"] = [p["layout"]["local_rows"] for p in per]
        out["layout"]["padding_rows"] = [p["layout"]["padding_rows"] for p in per]
    out.pop("grad_rel_l2", None)
    return out


# ============================================================================ the section
def run(sec: Section, env: Env) -> None:
    import torch

    from megatron_harpe.config.combinations import Platform

    z = dict(env.sizes["i"])
    if env.cuda:
        n_gpus = torch.cuda.device_count()
        sec.number("gpus", n_gpus)
        if n_gpus < 2:
            sec.skip("the whole section", f"needs 2+ GPUs (this machine has {n_gpus}): the layouts run on 2 NCCL "
                                          f"ranks, one GPU each")
            return
        from megatron_harpe.training.runtime import detect_machine

        machine = detect_machine()
        platform = machine.platform()
        triton = machine.triton
    else:
        platform = Platform(te_version=None, capability=None, te=False)  # the local spec; TE is not used on CPU
        triton = False
    z["head_dim"] = z["hidden"] // z["heads"]
    z["bases"] = [float(round(1e4 * (100.0 ** (i / max(z["groups"] - 1, 1))))) for i in range(z["groups"])]
    prefix = "CPU mode: " if env.cpu else ""
    scenarios, skipped = plan_scenarios(platform, env.cuda, z, cpu_prefix=prefix)
    te = bool(platform.te)
    sec.number("platform", dict(te=te, te_version=platform.te_version, capability=platform.capability,
                                backend="gloo" if env.cpu else "nccl", ranks=2))
    sec.number("model", z)
    tol = TOL_CPU if env.cpu else TOL_GPU
    sec.number("tolerances", dict(tol, fp8_loss_relative=TOL_FP8_LOSS_REL))
    spec = f"Transformer Engine {platform.te_version}" if te else "local (SDPA)"
    sec.log(f"2 {'gloo' if env.cpu else 'NCCL'} ranks; spec {spec}; "
            f"{len(scenarios)} scenario(s) to run, {len(skipped)} skipped; model {z['layers']} layers, hidden "
            f"{z['hidden']}, {z['heads']} heads / {z['groups']} K/V groups x {z['head_dim']}, seq {z['seq']} x batch "
            f"{z['batch']}, {'fp32' if env.cpu else 'bf16'}")
    for name, reason in skipped:
        sec.skip(f"scenario {name}", reason)

    root = env.work / "i_multi_gpu"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    results: Dict[str, Dict[str, Any]] = {}
    todo = list(scenarios)
    launches = 0
    versions = None
    capped = None
    while todo:
        sec.need(20 if env.cuda else 10, f"a launch for scenarios {', '.join(s['name'] for s in todo)}")
        launches += 1
        plan = dict(model=z, scenarios=todo, cuda=env.cuda, te=te, triton=triton,
                    dtype="fp32" if env.cpu else "bf16", deadline_unix=time.time() + sec.remaining() - 5,
                    scenario_timeout_s=60 if env.cpu else 90)
        launch = _Launch(sec, env, root, launches, plan)
        try:
            rc, ranks = launch.wait()
        finally:
            launch.kill()
        versions = versions or ranks[0].get("versions")
        rest, failed_here = [], False
        for sc in todo:
            merged = _merge(ranks, sc["name"])
            if merged is None and rc is None:
                merged = dict(status="timeout (the section's cap)")
            elif merged is None and rc != 0 and not failed_here:
                # running when the launch ended without a result from either rank: a crash, or a hang ended
                # by the worker's watchdog
                merged = dict(status="error", error=f"the launch exited {rc} during this scenario; the end of its "
                                                    f"log:\n{launch.tail()}")
            elif merged is None:
                rest.append(sc)
                continue
            failed_here |= merged["status"] == "error"
            results[sc["name"]] = merged
        if rc is None:
            capped = f"launch {launches} was still running at the section's cap (killed)"
            break
        if rc == 0 or not rest:
            break
        sec.note(f"launch {launches} exited {rc} after a failing scenario; the {len(rest)} after it run in a new "
                 f"launch")
        todo = rest
    if versions:
        sec.number("versions", versions)
    _judge(sec, env, scenarios, results, skipped, tol)
    if capped:
        raise SectionTimeout(capped)


def _judge(sec: Section, env: Env, scenarios, results, skipped, tol) -> None:
    rows = []
    for sc in scenarios:
        name, label = sc["name"], sc["label"]
        res = results.get(name)
        if res is None or res["status"] != "ran":
            status = "not run" if res is None else res["status"]
            if status.startswith(("skipped", "timeout")):
                sec.skip(f"scenario {name}", "time: the section's cap left no room for it" if
                         status.startswith("skipped") else "time: running when the section's cap was reached")
            else:
                detail = (res or {}).get("error", "")
                sec.check(f"{name} ({label}): runs", False, value=status, detail=detail[-1500:])
                if detail:
                    sec.record["error"] = ((sec.record["error"] + "\n") if sec.record["error"] else "") + \
                        f"scenario {name}:\n{detail}"
            rows.append([name, label, status, "-", "-", "-", "-", "-", "-"])
            continue
        complete = len(set(res["params_checked"])) == 1 and res["params_checked"][0] == res["params_reference"]
        sec.check(f"{name} ({label}): every parameter's gradient compared", complete,
                  value=f"{res['params_checked']} per rank, reference {res['params_reference']}")
        if sc["control"]:
            metric, limit, what = ((res["grad_max_abs_diff"], tol["grad_abs"], "max abs") if env.cpu else
                                   (res["grad_max_rel_l2"], tol["grad_rel_l2"], "max relative L2"))
            ok_grad = sec.check(f"{name} ({label}): the gradient comparison sees the swapped bases", metric > limit,
                                value={"gradient_" + what.replace(" ", "_"): metric, "times_tolerance": metric / limit,
                                       "worst": res["grad_worst_abs" if env.cpu else "grad_worst_rel"],
                                       "loss_abs_diff": res["loss_abs_diff"]},
                                tolerance=f"must exceed the gradient tolerance {limit:g} ({what})",
                                detail="a HARPE rotation bug of this kind would pass the checks above unseen")
            ok_loss = True
            grad_cell = f"{metric:.3g} {what} = {metric / limit:.3g} x tolerance"
            tol_cell = f"must exceed {limit:g}"
        elif sc["fp8"]:
            rel = res["loss_abs_diff"] / abs(res["loss_ref"])
            ok_loss = sec.check(f"{name} ({label}): loss vs the bf16 one-rank reference", rel <= TOL_FP8_LOSS_REL,
                                value={"relative_diff": rel, "loss": res["loss"][0], "reference": res["loss_ref"]},
                                tolerance=f"{TOL_FP8_LOSS_REL:g} relative (one E4M3 rounding)")
            ok_grad = sec.check(f"{name} ({label}): gradients finite", res["grads_finite"],
                                value={"max_rel_l2_vs_bf16": res["grad_max_rel_l2"],
                                       "worst": res["grad_worst_rel"]},
                                tolerance="finite (relative L2 reported, not judged)")
            grad_cell = f"rel L2 {res['grad_max_rel_l2']:.3g} (not judged)"
            tol_cell = f"loss {TOL_FP8_LOSS_REL:g} rel; grads finite"
        elif env.cpu:
            ok_loss = sec.check(f"{name} ({label}): loss vs the one-rank reference",
                                res["loss_abs_diff"] <= tol["loss"] and res["token_loss_max_diff"] <= tol["token_loss"],
                                value={"abs_diff": res["loss_abs_diff"], "per_token_max_diff":
                                       res["token_loss_max_diff"], "loss": res["loss"][0],
                                       "reference": res["loss_ref"]},
                                tolerance=f"{tol['loss']:g} (mean), {tol['token_loss']:g} (each token), fp32")
            ok_grad = sec.check(f"{name} ({label}): every gradient vs the one-rank reference",
                                res["grad_max_abs_diff"] <= tol["grad_abs"] and res["grads_finite"],
                                value={"max_abs_diff": res["grad_max_abs_diff"], "worst": res["grad_worst_abs"],
                                       "grad_scale": res["grad_scale"]},
                                tolerance=f"{tol['grad_abs']:g} absolute, fp32")
            grad_cell = f"{res['grad_max_abs_diff']:.3g} abs ({res['grad_worst_abs']})"
            tol_cell = f"loss {tol['loss']:g}, token {tol['token_loss']:g}, grad {tol['grad_abs']:g}"
        else:
            ok_loss = sec.check(f"{name} ({label}): loss vs the one-rank reference",
                                res["loss_abs_diff"] <= tol["loss"] and res["token_loss_max_diff"] <= tol["token_loss"],
                                value={"abs_diff": res["loss_abs_diff"], "per_token_max_diff":
                                       res["token_loss_max_diff"], "loss": res["loss"][0],
                                       "reference": res["loss_ref"]},
                                tolerance=f"{tol['loss']:g} (mean), {tol['token_loss']:g} (each token), bf16")
            ok_grad = sec.check(f"{name} ({label}): every gradient vs the one-rank reference",
                                res["grad_max_rel_l2"] <= tol["grad_rel_l2"] and res["grads_finite"],
                                value={"max_rel_l2": res["grad_max_rel_l2"], "worst": res["grad_worst_rel"],
                                       "max_abs_diff": res["grad_max_abs_diff"]},
                                tolerance=f"{tol['grad_rel_l2']:g} relative L2 per tensor (bf16)")
            grad_cell = f"rel L2 {res['grad_max_rel_l2']:.3g} ({res['grad_worst_rel']})"
            tol_cell = f"loss {tol['loss']:g}, token {tol['token_loss']:g}, grad rel L2 {tol['grad_rel_l2']:g}"
        lay = res["layout"]
        fmt = lay["format"] + (f", {sum(lay['padding_rows'])} padding rows" if lay["format"] == "thd" else "")
        verdict = ("detected" if ok_grad else "NOT detected") if sc["control"] else \
            ("pass" if ok_loss and ok_grad else "FAIL")
        rows.append([name, label, verdict if complete else "FAIL (gradients missing)", fmt,
                     f"{res['loss_ref']:.6f}", f"{res['loss_abs_diff']:.3g}", f"{res['token_loss_max_diff']:.3g}",
                     grad_cell, tol_cell])
    for name, reason in skipped:
        rows.append([name, "-", "skipped: " + reason, "-", "-", "-", "-", "-", "-"])
    sec.number("scenarios", results)
    sec.number("skipped_scenarios", dict(skipped))
    sec.table("scenarios: two ranks vs one rank, same batch and weights",
              ["scenario", "layout", "result", "input", "reference loss", "|loss diff|", "max token loss diff",
               "gradients (worst)", "tolerance"], rows,
              note="every parameter's gradient (DDP's fp32 main_grad after finalize_model_grads) against this rank's "
                   "slice of the one-rank gradient; packed scenarios compare real tokens only (padding rows have "
                   "loss_mask 0)")
