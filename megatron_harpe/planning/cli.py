"""harpe-plan: memory per GPU and predicted step time of a training layout; --search over layouts.

    harpe-plan examples/llama2_7b_harpe_128k.yaml --gpus 32 --gpu h100
    harpe-plan examples/llama2_7b_harpe_128k.yaml parallel.context=8 --gpus 64      # dotted overrides
    harpe-plan --model llama2-7b --seq-length 131072 --gpus 32 --gpu h100 --tp 8 --cp 4 --sp --distributed-optimizer
    harpe-plan --model llama2-7b --seq-length 131072 --gpus 8 --gpu h200 --search --json

A config gives the model, layout and batch (the longest stage of a staged run); flags give them
without one. Nothing is built and nothing touches a GPU: the answer is arithmetic (see
docs/planning.md for the model, its assumptions and how it was checked). Exit codes follow
megatron_harpe/cli.py: bad input (a config, a flag, a layout that cannot run the model) exits 2 with
one message.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from megatron_harpe.cli import InputError, run_command
from megatron_harpe.planning.hardware import GPUS, Assumptions, gpu_named
from megatron_harpe.planning.report import plan_json, plan_text, search_json, search_text
from megatron_harpe.planning.search import evaluate, search
from megatron_harpe.planning.spec import (PRESETS, Layout, LayoutError, Plan, Workload, plan_from_config,
                                          resolve_rope_kernel)

PROG = "harpe-plan"

#: flags that describe a layout; with a config the layout comes from it (use dotted overrides)
LAYOUT_FLAGS = ("tp", "pp", "cp", "vpp", "sp", "distributed_optimizer", "recompute", "recompute_method",
                "recompute_num_layers", "recompute_modules", "cp_comm")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one message, exit 2 (argparse's own code), through run_command's contract
        raise InputError(f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Models: " + ", ".join(PRESETS) + ". GPUs: " + ", ".join(GPUS) + ".")
    p.add_argument("inputs", nargs="*", metavar="CONFIG [key=value ...]",
                   help="a harpe-train YAML config and dotted overrides (as harpe-train takes them)")
    p.add_argument("--config", help="the config, as harpe-train names it (same as the first positional argument)")
    g = p.add_argument_group("what to plan without a config")
    g.add_argument("--model", choices=sorted(PRESETS), help="a model shape")
    g.add_argument("--seq-length", type=int, help="training sequence length")
    g.add_argument("--position", choices=("harpe", "rope", "pi", "yarn"), default="harpe")
    g.add_argument("--kernel", choices=("auto", "fused", "unfused"), default="auto",
                   help="how RoPE is applied (auto: HARPE's Triton kernel / TE's fused RoPE on GPUs)")
    g.add_argument("--micro-batch", type=int, default=None)
    g.add_argument("--global-batch", type=int, default=None,
                   help="sequences per step (default: the config's, else ~4M tokens)")
    g.add_argument("--precision", choices=("bf16", "fp32"), default=None)
    g.add_argument("--fp8", choices=("hybrid", "e4m3"), default=None, help="FP8 linears through Transformer Engine")
    g.add_argument("--fp8-attention", action="store_true", help="FP8 dot-product attention too")
    lay = p.add_argument_group("layout without a config (with one: parallel.* / training.* overrides)")
    lay.add_argument("--tp", type=int)
    lay.add_argument("--pp", type=int)
    lay.add_argument("--cp", type=int)
    lay.add_argument("--vpp", type=int)
    lay.add_argument("--sp", action="store_true", default=None, help="sequence parallelism (TP > 1)")
    lay.add_argument("--distributed-optimizer", action="store_true", default=None)
    lay.add_argument("--recompute", choices=("none", "selective", "full"))
    lay.add_argument("--recompute-method", choices=("uniform", "block"))
    lay.add_argument("--recompute-num-layers", type=int)
    lay.add_argument("--recompute-modules", nargs="+", choices=("core_attn", "mlp", "layernorm"))
    lay.add_argument("--cp-comm", choices=("p2p", "all_gather", "a2a", "a2a+p2p"))
    m = p.add_argument_group("machine")
    m.add_argument("--gpus", type=int, help="GPUs of the run (default: one model replica, DP 1)")
    m.add_argument("--gpu", default="h100", help="h100 (80GB), h200 (141GB), a100 (80GB); default h100")
    m.add_argument("--gpu-memory", type=float, metavar="GIB", help="another memory size per GPU, in GiB")
    m.add_argument("--backend", choices=("te", "local"), default="te",
                   help="te: Transformer Engine spec (GPU clusters); local: megatron-core linears + SDPA "
                        "(GPUs without TE)")
    a = p.add_argument_group("assumptions (printed with every answer)")
    d = Assumptions()
    a.add_argument("--efficiency", type=float, default=d.efficiency,
                   help=f"fraction of the dense peak the kernels reach (default {d.efficiency})")
    a.add_argument("--link-efficiency", type=float, default=d.link_efficiency,
                   help=f"fraction of link bandwidth a collective reaches (default {d.link_efficiency})")
    a.add_argument("--fragmentation", type=float, default=d.fragmentation,
                   help=f"allocator fragmentation, fraction of activations+transients (default {d.fragmentation})")
    a.add_argument("--reserve-gib", type=float, default=d.reserve_gib,
                   help=f"CUDA context, NCCL, workspaces (default {d.reserve_gib} GiB)")
    o = p.add_argument_group("output")
    o.add_argument("--search", action="store_true", help="every layout for --gpus, ranked by throughput")
    o.add_argument("--top", type=int, default=10, help="layouts shown by --search (default 10)")
    o.add_argument("--show-rejected", action="store_true", help="list every rejected layout with its reason")
    o.add_argument("--json", action="store_true", help="JSON on stdout instead of the table")
    o.add_argument("--verbose", action="store_true", help="do not silence known upstream warnings")
    o.add_argument("--debug", action="store_true", help="tracebacks for bad input")
    return p


def _positive(name: str, value: Optional[int]) -> None:
    if value is not None and value < 1:
        raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _plan_from_flags(args) -> Plan:
    if args.model is None or args.seq_length is None:
        raise InputError("give a config file, or --model and --seq-length (e.g. --model llama2-7b --seq-length "
                         "131072)")
    model = PRESETS[args.model]
    model = model.__class__(**{**model.__dict__, "position": args.position})
    tp, pp, cp, vpp = args.tp or 1, args.pp or 1, args.cp or 1, args.vpp
    replica = tp * pp * cp
    gpus = args.gpus or replica
    if gpus % replica:
        raise InputError(f"--gpus {gpus} is not a multiple of TP x PP x CP = {tp} x {pp} x {cp}")
    micro = args.micro_batch or 1
    global_batch = args.global_batch or max(1, (4 * 1024 * 1024) // args.seq_length) * micro
    recompute = None if args.recompute in (None, "none") else args.recompute
    layout = Layout(tp=tp, pp=pp, cp=cp, dp=gpus // replica, vpp=vpp, sp=bool(args.sp),
                    dist_opt=bool(args.distributed_optimizer), recompute=recompute,
                    recompute_method=args.recompute_method or ("uniform" if recompute == "full" else None),
                    recompute_num_layers=args.recompute_num_layers or (1 if recompute == "full" else None),
                    recompute_modules=tuple(args.recompute_modules or ()), cp_comm=args.cp_comm or "p2p",
                    overlap_grad_reduce=True, overlap_param_gather=bool(args.distributed_optimizer))
    workload = Workload(seq_length=args.seq_length, micro_batch=micro, global_batch=global_batch,
                        precision=args.precision or "bf16", fp8=args.fp8,
                        fp8_dot_product_attention=bool(args.fp8 and args.fp8_attention), backend=args.backend,
                        rope_kernel=resolve_rope_kernel(args.position, args.kernel, args.backend, "gpu"))
    return Plan(model, layout, workload)


def _plan_from_config(args) -> Plan:
    from dataclasses import replace

    from megatron_harpe.config.loader import load_config

    path, overrides = args.inputs[0], args.inputs[1:]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise InputError(f"{bad[0]!r} is not a dotted override (key=value); give one config file, then overrides")
    given = [f"--{f.replace('_', '-')}" for f in LAYOUT_FLAGS if getattr(args, f) is not None]
    given += [f"--{f.replace('_', '-')}" for f in ("model", "seq_length") if getattr(args, f) is not None]
    if given:
        raise InputError(f"{', '.join(given)} describe(s) what the config already says; with a config use "
                         f"overrides such as parallel.tensor=4 data.seq_length=65536 training.recompute_granularity="
                         f"selective")
    cfg = load_config(path, overrides)
    if args.micro_batch is not None:
        cfg.data.micro_batch_size = args.micro_batch
    if args.global_batch is not None:
        cfg.data.global_batch_size = args.global_batch
    if args.precision is not None:
        cfg.training.precision = args.precision
    if args.fp8 is not None:
        cfg.fp8.format = args.fp8
        cfg.fp8.dot_product_attention = bool(args.fp8_attention)
    # --search replaces the config's layout, so its GPU count need not fit that layout
    plan = plan_from_config(cfg, gpus=None if args.search else args.gpus, backend=args.backend, device="gpu")
    name = Path(path).stem
    return replace(plan, model=replace(plan.model, name=name))


def _run(args) -> int:
    if args.config is not None:
        args.inputs = [args.config, *args.inputs]
    for name in ("gpus", "seq_length", "micro_batch", "global_batch", "tp", "pp", "cp", "vpp",
                 "recompute_num_layers", "top"):
        _positive(name, getattr(args, name))
    try:
        gpu = gpu_named(args.gpu, args.gpu_memory)
        assumptions = Assumptions(args.efficiency, args.link_efficiency, args.fragmentation, args.reserve_gib).check()
    except ValueError as err:
        raise InputError(str(err)) from None
    if args.fp8 and not gpu.fp8_tflops:
        raise InputError(f"--fp8: {gpu.name} has no FP8 tensor cores; drop --fp8 or choose h100/h200")
    try:
        plan = _plan_from_config(args) if args.inputs else _plan_from_flags(args)
    except InputError:
        raise
    except ValueError as err:  # a layout or a config section (stages, position settings) that cannot be
        raise InputError(str(err)) from None
    if args.fp8 is None and plan.workload.fp8 and not gpu.fp8_tflops:
        raise InputError(f"the config sets fp8.format={plan.workload.fp8}, but {gpu.name} has no FP8; unset it "
                         f"(fp8.format=null) or choose h100/h200")
    if args.search:
        gpus = args.gpus or plan.layout.gpus
        result = search(plan, gpus, gpu, assumptions)
        if args.json:
            print(json.dumps(search_json(result, gpus, gpu, assumptions, top=args.top), indent=1))
        else:
            print(search_text(result, plan, gpus, gpu, assumptions, args.top, args.show_rejected))
        return 0
    try:
        ev = evaluate(plan, gpu, assumptions)
    except LayoutError as err:
        raise InputError(f"layout {plan.layout.describe()}: {err}") from None
    if args.json:
        print(json.dumps(plan_json(ev, gpu, assumptions), indent=1))
    else:
        title = f"{PROG}: {plan.model.name or 'model'} on {plan.layout.gpus} x {gpu.name}"
        print(plan_text(ev, gpu, assumptions, title))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        build_parser().print_help()
        return 0

    def body() -> int:
        try:
            return _run(build_parser().parse_intermixed_args(argv))
        except BrokenPipeError:  # `harpe-plan ... | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0

    return run_command(PROG, body, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
