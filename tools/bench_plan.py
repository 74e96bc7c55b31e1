#!/usr/bin/env python
"""Validate harpe-plan, side by side in ONE run (docs/planning.md, "Validation"):

(a) on CPU: the planner's bytes of weights, gradients, optimizer state and saved activations against
    the tensors of built models (tiny and medium, fp32 and bf16; 1, 2 and 4 gloo ranks under torchrun:
    TP, SP, CP, PP and virtual stages, DP with the distributed optimizer, full and selective recompute);
(b) the planner beside Megatron-LM's theoretical-memory formula (core_v0.16.1) on the paper's
    Llama-2-7B 128k configs.

    python tools/bench_plan.py --out runs/bench_plan            # everything (~5-10 min on 2 cores)
    python tools/bench_plan.py --quick                          # the tiny model, 1 and 2 ranks

Writes <out>/bench_plan.json and <out>/bench_plan.md; prints the markdown.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_harpe.cli import setup_output  # noqa: E402
from megatron_harpe.planning import validation  # noqa: E402

PAPER_CONFIGS = ["examples/llama2_7b_harpe_128k.yaml", "examples/llama2_7b_harpe_128k_fp8.yaml",
                 "examples/llama2_7b_abf_single_128k.yaml"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="directory for bench_plan.json/.md (default: print only)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 and 2 ranks only")
    parser.add_argument("--nprocs", default="1,2,4", help="process counts to run (default 1,2,4)")
    parser.add_argument("--gpus", default="32,64", help="GPU counts for (b) (default 32,64)")
    parser.add_argument("--skip-measure", action="store_true", help="only (b)")
    parser.add_argument("--verbose", action="store_true", help="show upstream warnings")
    args = parser.parse_args(argv)
    setup_output(["--verbose"] if args.verbose else [])
    if not args.verbose:
        warnings.filterwarnings("ignore")  # megatron-core/torch deprecation notices while building models
    root = Path(__file__).resolve().parents[1]
    report = {}
    md = ["# harpe-plan validation", ""]
    if not args.skip_measure:
        nprocs = [int(x) for x in args.nprocs.split(",") if x]
        if args.quick:
            nprocs = [n for n in nprocs if n <= 2]
        plans = validation.scenarios(full=not args.quick)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="bench-plan-") as work:
            rows = validation.measure_all(plans, work, nprocs)
        seconds = time.perf_counter() - started
        worst = {c: max((abs(r["error"]) for r in rows if r["component"] == c), default=0.0)
                 for c in validation.COMPONENTS}
        exact = sum(1 for r in rows if r["measured"] == r["planned"])
        report["measured"] = {"rows": rows, "worst_error": worst, "seconds": seconds}
        md += ["## (a) planner vs built models (CPU, gloo)", "",
               f"{len({(r['model'], r['precision'], r['layout']) for r in rows})} plans, {len(rows)} rank x "
               f"component values, {exact} byte-exact; worst relative error: "
               + ", ".join(f"{c} {e:.2%}" for c, e in worst.items()) + f" ({seconds:.0f} s)", "",
               validation.measurement_table(rows), ""]
    ref = validation.reference_rows([str(root / c) for c in PAPER_CONFIGS],
                                    [int(x) for x in args.gpus.split(",") if x])
    report["megatron_lm"] = ref
    md += ["## (b) planner vs Megatron-LM's theoretical memory (GiB per GPU, first stage)", "",
           validation.reference_table(ref), "",
           f"Megatron-LM's branch for these configs: {ref[0]['mlm_branch']}; its padded vocabulary: "
           f"{ref[0]['mlm_padded_vocab']}.", ""]
    text = "\n".join(md)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_plan.json").write_text(json.dumps(report, indent=1))
        (out / "bench_plan.md").write_text(text + "\n")
        print(f"written: {out / 'bench_plan.md'}, {out / 'bench_plan.json'}")
    bad = [r for r in report.get("measured", {}).get("rows", []) if abs(r["error"]) > 0.10]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
