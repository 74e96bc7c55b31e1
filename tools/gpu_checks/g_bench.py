"""Section g, the fused-RoPE benchmark (tools/bench_rope.py's bench_shape): the kernel's bandwidth against a
copy and against one-base RoPE, and its memory."""
from __future__ import annotations

import importlib.util

from .common import CPU_LABEL, REPO, Env, Section, free_memory, log, ms


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_rope", REPO / "tools" / "bench_rope.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(sec: Section, env: Env) -> None:
    import torch

    bench = _load_bench()
    z = env.sizes["g"]
    if z["shapes"] == "gpu":
        shapes = [("llama2-7b MHA 32x128", 32, 32, 128), ("GQA 32q/8kv x128", 32, 8, 128)]
    else:
        shapes = [("small-GQA 4q/2kv x64", 4, 2, 64)]  # bench_rope's CPU GQA shape (the interpreter is slow)
    te_apply = bench._te_apply() if env.cuda else None
    if env.cuda and te_apply is None:
        sec.note("Transformer Engine not importable: the te-one-base path is skipped")
    rows, table = [], []
    for seq in z["seqs"]:
        for name, hq, hk, d in shapes:
            sec.need(3 if env.cuda else 2, f"bench {name} at seq {seq}")
            row = bench.bench_shape(name, hq, hk, d, seq, torch.bfloat16, z["repeat"], te_apply, env.device)
            bench.print_row(row, env.cpu)
            rows.append(row)
            sec.check(f"bench numerics: fused == unfused ({name}, seq {seq})", row["fused_matches_unfused"],
                      value={"max_abs_diff": row["fused_vs_unfused_max_abs"]},
                      tolerance="2 ulps of the largest output (bench_rope's own check)")
            p = row["paths"]
            for path, e in p.items():
                table.append([seq, name, path, ms(e["fwd"]["median_s"]), f"{e['fwd']['gbps']:.0f}",
                              f"{e['fwd']['pct_of_copy']:.1f}%", ms(e["fwd_bwd"]["median_s"]),
                              f"{e['fwd_bwd']['gbps']:.0f}", f"{e['fwd_bwd']['pct_of_copy']:.1f}%",
                              bench._fmt_bytes(e["extra_bytes"])])
            table.append([seq, name, "copy (d2d)", ms(row["copy"]["median_s"]), f"{row['copy']['gbps']:.0f}",
                          "100%", "", "", "", ""])
            rf = p["fused-harpe"]["fwd"]["median_s"] / p["fused-one-base"]["fwd"]["median_s"]
            rfb = p["fused-harpe"]["fwd_bwd"]["median_s"] / p["fused-one-base"]["fwd_bwd"]["median_s"]
            sec.number(f"ratio_fused_harpe_to_one_base_{seq}_{hq}x{hk}", {"fwd": rf, "fwd_bwd": rfb})
            table.append([seq, name, "ratio fused-harpe / fused-one-base", f"{rf:.3f}", "", "", f"{rfb:.3f}",
                          "", "", ""])
            if env.cuda:
                pct = p["fused-harpe"]["fwd"]["pct_of_copy"]
                sec.target(f"fused-harpe fwd >= 85% of copy bandwidth ({name}, seq {seq})", pct >= 85, pct, ">= 85%")
                sec.target(f"fused-harpe / fused-one-base fwd ({name}, seq {seq})", rf <= 1.05, rf, "<= 1.05")
            free_memory(env)
    summary = bench.summary(rows, env.cpu)
    log(summary)
    sec.number("bench_summary", summary)
    sec.number("bench_rows", rows)
    sec.table(f"bench_rope: bf16, median of {z['repeat']} ({'CUDA events' if env.cuda else 'perf_counter'})"
              + (f" [{CPU_LABEL}]" if env.cpu else ""),
              ["seq", "shape", "path", "fwd ms", "fwd GB/s", "fwd % copy", "fwd+bwd ms", "fwd+bwd GB/s",
               "fwd+bwd % copy", "extra memory"], table,
              note="GB/s counts the bytes the rotation must move (q, k read and written once; x2 fwd+bwd); extra "
                   "memory = max_memory_allocated beyond inputs/outputs (unfused: table + cos/sin)")
    if env.cpu:
        sec.skip("bandwidth targets", "CPU mode: no performance numbers")

