#!/usr/bin/env python
"""Benchmark the fused HARPE RoPE beside the unfused per-head table path, in ONE run.

    python tools/bench_rope.py --seq 4096,32768,131072 --dtype bf16 --repeat 20 --json out.json

Paths, side by side for every shape (these machines are noisy: compare within one run only):
  fused-harpe     apply_harpe_rotary_qk: one Triton launch for q and k, one base per K/V group
  unfused-harpe   HarpeRotaryEmbedding angle table [s, 1, heads, rot] + megatron-core's
                  _apply_rotary_pos_emb_bshd for q and for k (cos/sin of the table formed each call,
                  as the model does every step; the table itself is cached by the module after the
                  first step - its build time is reported separately as `table-build`)
  fused-one-base  the same kernel with every group on one base (the cost of HARPE vs plain RoPE)
  te-one-base     Transformer Engine's fused RoPE (one base, [s, 1, 1, d] table) when it imports
  fused-harpe-thd the fused kernel on the same tokens packed as --thd-docs documents ([t, h, d]
                  views; each token finds its document by a binary search over cu_seqlens)
  unfused-thd     HarpeRotaryEmbedding table + megatron-core's _apply_rotary_pos_emb_thd
  copy            torch copy of a tensor of q's + k's size: the bandwidth ceiling, same run

Shapes: Llama-2-7B attention (32 heads x 128, MHA) and a GQA variant (32 query / 8 K/V heads),
batch 1. For each path: median / min / max time of --repeat runs (CUDA events), achieved GB/s
counting the bytes the rotation itself must move (q and k read once, written once), % of the copy
bandwidth, and the extra memory the path allocates beyond its inputs and outputs
(torch.cuda.max_memory_allocated delta). Forward and forward+backward are timed separately.

Without CUDA the script runs a reduced size (seq <= 512, 4 heads x 64) through Triton's
interpreter: a correctness smoke of the fused path against the unfused one and timings labelled
"CPU (interpreter): not a performance measurement"; memory is the bytes of the tables built.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CUDA = torch.cuda.is_available()
if not CUDA:  # must precede the kernel's definition (megatron-core imports triton on its own)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from megatron.core.models.common.embeddings.rope_utils import (  # noqa: E402
    _apply_rotary_pos_emb_bshd,
    _apply_rotary_pos_emb_thd,
)
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding  # noqa: E402

from megatron_harpe.rope.fused_kernel import apply_harpe_rotary_qk, fused_rope_available  # noqa: E402
from megatron_harpe.rope.harpe_rotary import HarpeRotaryEmbedding  # noqa: E402

CPU_LABEL = "CPU (interpreter): not a performance measurement"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# HARPE paper, Table 2 (bases in millions, sorted); GQA takes every 4th
TABLE2 = [x * 1e6 for x in (1.00, 1.15, 1.30, 1.45, 2.17, 2.20, 2.23, 2.47, 2.50, 2.65, 2.68, 2.71, 2.74, 2.80,
                            2.83, 2.92, 3.01, 3.04, 3.10, 3.13, 3.16, 3.22, 3.43, 3.46, 3.61, 3.88, 4.09, 4.15,
                            4.39, 4.45, 4.51, 4.54)]


def _te_apply():
    """TE's fused RoPE function, wherever this TE release keeps it (None when TE is absent)."""
    for module, name in (("transformer_engine.pytorch.attention.rope", "apply_rotary_pos_emb"),
                         ("transformer_engine.pytorch.attention", "apply_rotary_pos_emb"),
                         ("transformer_engine.pytorch.dot_product_attention.rope", "apply_rotary_pos_emb")):
        try:
            mod = __import__(module, fromlist=[name])
            return getattr(mod, name)
        except Exception:  # noqa: BLE001 - absent or broken TE: skip that path
            continue
    return None


# ----------------------------------------------------------------------------- timing
def _time_cuda(fn, repeat, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def _time_cpu(fn, repeat, warmup=0):  # nothing to warm up: the interpreter compiles nothing
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _stats(times):
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def _extra_memory_cuda(fn):
    """Bytes allocated by fn beyond what it returns (its temporaries, and any cache it fills)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    kept = sum(t.numel() * t.element_size() for t in _tensors(out))
    del out
    return max(0, peak - base - kept)


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


# ----------------------------------------------------------------------------- the paths
class _OneRankGroup:
    """megatron-core's thd apply only asks its CP group for size() and rank()."""

    def size(self):
        return 1

    def rank(self):
        return 0


def _paths(q, k, hq, hk, d, seq, te_apply, thd_docs):
    """name -> (forward fn returning (q_out, k_out), memory fn building everything from scratch, thd?)."""
    bases = TABLE2[::len(TABLE2) // hk][:hk]

    def make_module():
        return HarpeRotaryEmbedding(kv_channels=d, rotary_percent=1.0, bases=bases, num_attention_heads=hq,
                                    num_query_groups=hk)

    module, module_thd = make_module(), make_module()
    inv = module.inv_freq.to(q.device)
    inv_one = inv[:1].expand(hk, -1).contiguous()
    # packed: thd_docs documents of (nearly) equal length, q/k as [t, h, d] views of the same data
    lengths = [seq // thd_docs] * thd_docs
    lengths[-1] += seq - sum(lengths)
    cu = torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(thd_docs)], dtype=torch.int32, device=q.device)
    q3, k3 = q[:, 0], k[:, 0]
    one_rank = _OneRankGroup()

    def unfused_fwd():
        # the group table is cached after the first call, as in training; each layer's attention then
        # expands it to the query heads (HarpeSelfAttention), which this path pays per call
        qa, ka = module.query_and_key_angles(module(seq))
        return _apply_rotary_pos_emb_bshd(q, qa), _apply_rotary_pos_emb_bshd(k, ka)

    def unfused_fresh():  # table built from scratch: what the memory column counts
        module._cache_key = module._cache_value = None
        return unfused_fwd()

    def table_build():
        module._cache_key = module._cache_value = None
        return module(seq)

    def unfused_thd_fwd():
        qa, ka = module_thd.query_and_key_angles(module_thd(max(lengths), packed_seq=True))
        return (_apply_rotary_pos_emb_thd(q3, cu, qa, cp_group=one_rank),
                _apply_rotary_pos_emb_thd(k3, cu, ka, cp_group=one_rank))

    def unfused_thd_fresh():
        module_thd._cache_key = module_thd._cache_value = None
        return unfused_thd_fwd()

    paths = {
        "fused-harpe": (lambda: apply_harpe_rotary_qk(q, k, inv), None, False),
        "unfused-harpe": (unfused_fwd, unfused_fresh, False),
        "fused-one-base": (lambda: apply_harpe_rotary_qk(q, k, inv_one), None, False),
        "fused-harpe-thd": (lambda: apply_harpe_rotary_qk(q3, k3, inv, cu_seqlens=cu), None, True),
        "unfused-thd": (unfused_thd_fwd, unfused_thd_fresh, True),
    }
    if te_apply is not None:
        rope = RotaryEmbedding(kv_channels=d, rotary_percent=1.0, rotary_base=bases[0],
                               use_cpu_initialization=True)
        freqs = rope(seq).to(q.device)  # [s, 1, 1, d] fp32, built once (cached by the model too)
        paths["te-one-base"] = (
            lambda: (te_apply(q, freqs, tensor_format="sbhd", fused=True),
                     te_apply(k, freqs, tensor_format="sbhd", fused=True)), None, False)
    return paths, table_build, module_thd


def _fwd_bwd(fwd, q, k, grads):
    def run():
        outs = fwd()
        return torch.autograd.grad(outs, (q, k), grads)
    return run


def bench_shape(name, hq, hk, d, seq, dtype, repeat, te_apply, device, thd_docs=16):
    torch.manual_seed(0)
    q = torch.randn(seq, 1, hq, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(seq, 1, hk, d, device=device, dtype=dtype, requires_grad=True)
    grads = (torch.randn_like(q), torch.randn_like(k))
    moved = 2 * (q.numel() + k.numel()) * q.element_size()  # read q, k once; write them once
    thd_docs = max(1, min(thd_docs, seq // 2))
    paths, table_build, module_thd = _paths(q, k, hq, hk, d, seq, te_apply, thd_docs)
    grads_thd = (grads[0][:, 0], grads[1][:, 0])
    timer = _time_cuda if device.type == "cuda" else _time_cpu
    row = {"shape": name, "seq": seq, "q_heads": hq, "kv_heads": hk, "head_dim": d, "bytes_moved": moved,
           "thd_docs": thd_docs, "paths": {}}

    src = torch.empty(q.numel() + k.numel(), device=device, dtype=dtype)
    dst = torch.empty_like(src)
    copy_t = _stats(timer(lambda: dst.copy_(src), repeat))
    row["copy"] = dict(copy_t, gbps=moved / copy_t["median_s"] / 1e9)

    with torch.no_grad():
        pairs = [(paths["fused-harpe"][0](), paths["unfused-harpe"][0]()),
                 (paths["fused-harpe-thd"][0](), paths["unfused-thd"][0]())]
    diff = max((a.float() - b.float()).abs().max().item() for got, ref in pairs for a, b in zip(got, ref))
    scale = max(t.abs().max().item() for _, ref in pairs for t in ref)
    # bf16/fp16: the two round differently (see fused_kernel's docstring): allow two ulps of the largest output
    ulp = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -22}[dtype]
    row["fused_vs_unfused_max_abs"] = diff
    row["fused_matches_unfused"] = diff <= 2 * ulp * scale

    for pname, (fwd, fresh, thd) in paths.items():
        entry = {}
        with torch.no_grad():
            entry["fwd"] = _stats(timer(fwd, repeat))
        entry["fwd_bwd"] = _stats(timer(_fwd_bwd(fwd, q, k, grads_thd if thd else grads), repeat))
        entry["fwd"]["gbps"] = moved / entry["fwd"]["median_s"] / 1e9
        entry["fwd_bwd"]["gbps"] = 2 * moved / entry["fwd_bwd"]["median_s"] / 1e9
        entry["fwd"]["pct_of_copy"] = 100 * entry["fwd"]["gbps"] / row["copy"]["gbps"]
        entry["fwd_bwd"]["pct_of_copy"] = 100 * entry["fwd_bwd"]["gbps"] / row["copy"]["gbps"]
        if device.type == "cuda":
            with torch.no_grad():
                entry["extra_bytes"] = _extra_memory_cuda(fresh or fwd)
        else:
            entry["extra_bytes"] = None
        row["paths"][pname] = entry

    table = table_build()
    tables = _tensors(table)
    table_bytes = sum(t.numel() * t.element_size() for t in tables)
    # cos and sin of the query table, in the input dtype, formed by every apply call
    cos_sin_bytes = 2 * tables[0].numel() * q.element_size() + (
        2 * tables[1].numel() * q.element_size() if len(tables) > 1 else 0)
    row["unfused_table_bytes"] = table_bytes
    row["unfused_cos_sin_bytes_per_call"] = cos_sin_bytes
    with torch.no_grad():
        row["table_build"] = _stats(timer(table_build, max(2, repeat // 4)))
    if device.type != "cuda":
        row["paths"]["unfused-harpe"]["extra_bytes"] = table_bytes + cos_sin_bytes
        for pname in ("fused-harpe", "fused-one-base", "fused-harpe-thd"):
            row["paths"][pname]["extra_bytes"] = 0
        thd_tables = _tensors(module_thd._cache_value)  # [max doc length, 1, heads, d], then gathered per token
        row["paths"]["unfused-thd"]["extra_bytes"] = sum(t.numel() * t.element_size() for t in thd_tables) + \
            sum(2 * t.numel() // t.shape[0] * seq * q.element_size() for t in thd_tables)
    return row


# ----------------------------------------------------------------------------- report
def _fmt_bytes(n):
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def print_row(row, cpu):
    label = f"  [{CPU_LABEL}]" if cpu else ""
    print(f"\n{row['shape']}  seq={row['seq']}  q_heads={row['q_heads']} kv_heads={row['kv_heads']} "
          f"d={row['head_dim']}  moved={_fmt_bytes(row['bytes_moved'])}{label}")
    c = row["copy"]
    print(f"  {'copy (d2d)' if not cpu else 'copy'}: {c['median_s'] * 1e3:9.3f} ms  {c['gbps']:8.1f} GB/s{label}")
    print(f"  {'path':<15} {'fwd ms (min..max)':>26} {'GB/s':>8} {'%copy':>6} | "
          f"{'fwd+bwd ms (min..max)':>26} {'GB/s':>8} {'%copy':>6} | extra memory")
    for name, e in row["paths"].items():
        f, b = e["fwd"], e["fwd_bwd"]
        print(f"  {name:<15} {f['median_s'] * 1e3:9.3f} ({f['min_s'] * 1e3:7.3f}..{f['max_s'] * 1e3:7.3f}) "
              f"{f['gbps']:8.1f} {f['pct_of_copy']:5.1f}% | "
              f"{b['median_s'] * 1e3:9.3f} ({b['min_s'] * 1e3:7.3f}..{b['max_s'] * 1e3:7.3f}) "
              f"{b['gbps']:8.1f} {b['pct_of_copy']:5.1f}% | {_fmt_bytes(e['extra_bytes'])}{label}")
    tb = row["table_build"]
    print(f"  table-build (unfused, once per length; cached): {tb['median_s'] * 1e3:.3f} ms, "
          f"table {_fmt_bytes(row['unfused_table_bytes'])} + cos/sin per call "
          f"{_fmt_bytes(row['unfused_cos_sin_bytes_per_call'])}{label}")
    print(f"  fused vs unfused: max abs diff {row['fused_vs_unfused_max_abs']:.3g} "
          f"({'ok' if row['fused_matches_unfused'] else 'MISMATCH'})")


def summary(rows, cpu):
    ok = all(r["fused_matches_unfused"] for r in rows)
    if cpu:
        worst = max(r["fused_vs_unfused_max_abs"] for r in rows)
        tbytes = max(r["unfused_table_bytes"] for r in rows)
        return (f"SUMMARY [{CPU_LABEL}]: fused {'matches' if ok else 'DOES NOT match'} unfused on {len(rows)} "
                f"shape(s) (max abs diff {worst:.3g}); unfused builds tables of up to {_fmt_bytes(tbytes)}, fused none")
    big = max(rows, key=lambda r: (r["seq"], r["q_heads"] == r["kv_heads"]))
    p = big["paths"]
    f, one, un = p["fused-harpe"]["fwd"], p["fused-one-base"]["fwd"], p["unfused-harpe"]["fwd"]
    te = p.get("te-one-base")
    te_txt = (f", TE one-base takes {te['fwd']['median_s'] / f['median_s']:.2f}x our time" if te
              else ", TE absent")
    worst_pct = min(r["paths"]["fused-harpe"]["fwd"]["pct_of_copy"] for r in rows)
    return (f"SUMMARY: {big['shape']} seq {big['seq']}: fused per-head fwd {f['median_s'] * 1e3:.3f} ms = "
            f"{f['pct_of_copy']:.0f}% of copy bandwidth (worst shape {worst_pct:.0f}%), "
            f"{f['median_s'] / one['median_s']:.3f}x one-base, unfused {un['median_s'] / f['median_s']:.1f}x slower"
            f"{te_txt}; numerics {'ok' if ok else 'MISMATCH'}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", default="4096,32768,131072", help="comma-separated sequence lengths")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--thd-docs", type=int, default=16, help="documents per packed (thd) sequence")
    args = ap.parse_args(argv)
    seqs = [int(s) for s in args.seq.split(",") if s]
    dtype = DTYPES[args.dtype]
    if not fused_rope_available():
        print("the fused kernel cannot run here (triton missing, or no CUDA without TRITON_INTERPRET=1)")
        return 1
    cpu = not CUDA
    te_apply = _te_apply()
    if cpu:
        device = torch.device("cpu")
        seqs = sorted({min(s, 512) for s in seqs})
        shapes = [("small-MHA 4x64", 4, 4, 64), ("small-GQA 4q/2kv x64", 4, 2, 64)]
        repeat = min(args.repeat, 3)  # the interpreter takes ~0.1-1 s per fused call
        print(f"no CUDA: reduced sizes through Triton's interpreter, repeat {repeat} - {CPU_LABEL}")
        te_apply = None
    else:
        device = torch.device("cuda")
        shapes = [("llama2-7b MHA 32x128", 32, 32, 128), ("GQA 32q/8kv x128", 32, 8, 128)]
        repeat = args.repeat
        print(f"device: {torch.cuda.get_device_name()}  dtype: {args.dtype}  repeat: {repeat}")
    if te_apply is None and not cpu:
        print("note: transformer_engine not importable: the te-one-base path is skipped")
    rows = []
    for seq in seqs:
        for name, hq, hk, d in shapes:
            row = bench_shape(name, hq, hk, d, seq, dtype, repeat, te_apply, device, args.thd_docs)
            print_row(row, cpu)
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    line = summary(rows, cpu)
    print("\n" + line)
    if args.json:
        report = {"mode": "cpu-interpreter" if cpu else "cuda",
                  "device": "cpu" if cpu else torch.cuda.get_device_name(), "dtype": args.dtype,
                  "repeat": repeat, "te_available": te_apply is not None, "rows": rows, "summary": line}
        if cpu:
            report["label"] = CPU_LABEL
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if all(r["fused_matches_unfused"] for r in rows) else 2


if __name__ == "__main__":
    sys.exit(main())
