"""The command line: the arguments, then every section asked for in turn, each under its time cap and the
run's budget, the report rewritten after each; the exit code (0 every section that ran is ok, 1 not, 2 bad
arguments)."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
import warnings
from typing import Any, Dict

from . import (a_environment, b_rotary, c_context_parallel, d_attention, e_layer, f_train, g_bench, h_planner,
               i_multi_gpu, j_preflight, report as reporting)
from .common import BUDGET, CAPS, CPU_LABEL, SECTION_ORDER, TITLES, Env, Section, SectionTimeout, free_memory, log, now

SECTION_FUNCS = {"a": a_environment.run, "b": b_rotary.run, "c": c_context_parallel.run, "d": d_attention.run,
                 "e": e_layer.run, "f": f_train.run, "g": g_bench.run, "h": h_planner.run, "i": i_multi_gpu.run,
                 "j": j_preflight.run}
ALARM_GRACE_S = 5.0  # past its cap a section is interrupted by SIGALRM (it also checks its deadline itself)


def parse_args(argv=None):
    description = sys.modules[__package__].__doc__  # the package's docstring: the sections, outputs, exit codes
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check_out", help="where gpu_check.json and gpu_check.md go")
    ap.add_argument("--work", default=None, help="run directories and logs of section f (default <out>/work); "
                    "on the lent device put it outside $OUT, which returns at most 8 files")
    ap.add_argument("--cpu", action="store_true", help="CPU mode even where CUDA exists (tiny sizes, correctness only)")
    ap.add_argument("--sections", default=",".join(SECTION_ORDER), help="comma-separated subset of "
                    + ",".join(SECTION_ORDER))
    ap.add_argument("--quick", action="store_true", help="smaller GPU sizes (a smoke run)")
    ap.add_argument("--budget", type=float, default=None, help="whole-run time budget in seconds (default: gpu 520, "
                    "quick 390, cpu 300; with 2+ GPUs plus section i's cap); later sections are skipped when it "
                    "runs out")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep section f's checkpoints (default: deleted)")
    args = ap.parse_args(argv)
    keys = [s.strip().lower() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in keys if s not in SECTION_ORDER]
    if bad or not keys:
        ap.error(f"--sections: unknown section(s) {bad or args.sections!r}; choose from {','.join(SECTION_ORDER)}")
    args.sections = [s for s in SECTION_ORDER if s in keys]
    if args.budget is not None and args.budget <= 0:
        ap.error("--budget must be > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)  # exits 2 on bad arguments
    t0 = now()
    env, interpret_note = _setup(args)
    budget = args.budget if args.budget is not None else default_budget(env, args.sections)
    deadline = t0 + budget
    caps = CAPS[env.mode]
    report = reporting.new_report(env, budget, caps, argv)
    banner = f"gpu_check: mode {env.mode}" + (f" - {CPU_LABEL}" if env.cpu else "") + \
        f"; sections {','.join(args.sections)}; budget {budget:.0f} s; report in {env.out}"
    log(banner)
    if interpret_note:
        log(f"note: {interpret_note}")

    for key in args.sections:
        left = deadline - now()
        if left < 3:
            report["sections"][key] = reporting.skipped_section(key, budget)
            log(f"[{key}] skipped: the run's budget is spent")
        else:
            _run_section(key, min(caps[key], left), env, report)
        reporting.write_report(report, env.out)

    exit_code = reporting.finish(report, env, now() - t0)
    reporting.write_report(report, env.out)
    log("")
    log(f"report: {env.out / 'gpu_check.md'}"
        + (f" (commit it as {report['suggested_report_path']})" if env.cuda else ""))
    log(report["summary"])
    return exit_code


def default_budget(env: Env, sections) -> float:
    """BUDGET for the mode; with 2+ GPUs and section i asked for, plus i's cap (on one GPU i skips at once, so
    the lent one-GPU device keeps the 520 s that fits its 600 s command limit)."""
    budget = BUDGET[env.mode]
    if env.cuda and "i" in sections:
        import torch

        if torch.cuda.device_count() >= 2:
            budget += CAPS[env.mode]["i"]
    return budget


def _setup(args):
    """The process set up for the mode (CUDA or CPU, Triton compiled or interpreted, the project's backend,
    the known upstream warnings silenced) and the output folders made; returns (Env, a note or None)."""
    if args.cpu:  # before torch looks for a GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["HARPE_BACKEND"] = "cpu"
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    interpret_note = None
    if cuda:
        if os.environ.pop("TRITON_INTERPRET", None) == "1":
            interpret_note = "TRITON_INTERPRET=1 was set on a GPU machine: unset for this run"
        torch.cuda.set_device(0)
    else:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything decorates a Triton kernel
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine and Apex|Apex is not installed).*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")
    # and what the harpe-* commands silence (megatron_harpe/cli.py KNOWN_WARNINGS, KNOWN_LOG_MESSAGES: e.g.
    # megatron-core 0.19's "GPTModel IS DEPRECATED" for every model section h builds), unless HARPE_VERBOSE=1
    from megatron_harpe.cli import setup_output

    setup_output()
    from megatron_harpe.backends import setup_backend

    setup_backend(force_cpu=not cuda)
    env = Env(args, cuda)
    env.out.mkdir(parents=True, exist_ok=True)
    env.work.mkdir(parents=True, exist_ok=True)
    return env, interpret_note


def _run_section(key: str, cap: float, env: Env, report: Dict[str, Any]) -> None:
    """One section under its cap: SectionTimeout when it overruns (its own deadline checks, or SIGALRM
    ALARM_GRACE_S later), any other exception recorded with its traceback; never raises."""
    sec = Section(key, cap)
    report["sections"][key] = sec.record
    log(f"\n[{key}] === {TITLES[key]} (cap {cap:.0f} s) ===")

    def on_alarm(signum, frame):
        raise SectionTimeout("the section's time cap was reached")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, cap + ALARM_GRACE_S)  # the hard stop; sections also check their deadline
    try:
        SECTION_FUNCS[key](sec, env)
        failed = [c for c in sec.record["checks"] if c["kind"] == "check" and c["result"] == "fail"]
        sec.record["status"] = "fail" if failed else "ok"
    except SectionTimeout as err:
        sec.record["status"] = "timeout"
        sec.skip("the rest of the section", str(err))
    except Exception:  # noqa: BLE001 - recorded; the next section runs
        sec.record["status"] = "error"
        sec.record["error"] = (sec.record["error"] + "\n" if sec.record["error"] else "") + traceback.format_exc()
        log(sec.record["error"])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    try:
        free_memory(env)
    except Exception as err:  # noqa: BLE001 - a broken CUDA context shows in the next sections too
        sec.note(f"freeing memory after the section failed: {err}")
    sec.record["duration_s"] = round(now() - sec.started, 2)
    if key == "a":
        report["gpu"] = sec.record["numbers"].get("gpu")
        report["versions"] = sec.record["numbers"].get("versions")
    n_pass = sum(1 for c in sec.record["checks"] if c["result"] == "pass")
    n_fail = sum(1 for c in sec.record["checks"] if c["result"] == "fail")
    log(f"[{key}] {sec.record['status'].upper()} in {sec.record['duration_s']:.1f} s "
        f"({n_pass} checks passed, {n_fail} failed)")
