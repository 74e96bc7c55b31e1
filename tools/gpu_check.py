#!/usr/bin/env python
"""One script that proves the GPU path the moment a GPU is lent (docs/gpu_check.md).

    PYTHONUNBUFFERED=1 python tools/gpu_check.py --out gpu_check_out           # a GPU: ~5-7.5 minutes
    python tools/gpu_check.py --cpu --out /tmp/gc                              # CPU: correctness only, < 60 s

Sections (each runs on its own: a failing one is recorded with its traceback and the next one runs;
each has a time cap, and the part of a section left when its cap is reached is skipped and recorded):
  a  environment: GPU, memory, compute capability, driver/CUDA, torch, triton, megatron-core, TE,
     whether SDPA's flash backend runs bf16 causal attention at head dim 128
  b  HARPE rotary on the device: HarpeRotaryEmbedding tables + megatron-core's
     _apply_rotary_pos_emb_bshd, and the fused Triton kernel, against float64 references (fp32, bf16,
     forward and gradients); equal bases give megatron-core's RotaryEmbedding table bit for bit
  c  CP slicing: megatron-core's get_pos_emb_on_this_cp_rank on the full HARPE table == the rotary
     module's own per-rank table, cp 2/4/8, every rank; the fused kernel's CP positions agree
  d  SDPA core attention (parallel/core_attention.py) at 32k and 128k tokens, causal and the
     lower-right CP-chunk case, flash backend forced: time, peak memory; correctness vs the math backend
  e  one Llama-2-7B-shaped layer (project spec), fwd+bwd at 32k: one-base RoPE, HARPE table, HARPE fused
  f  harpe-train on one GPU: ~100M HARPE model, distributed optimizer + overlaps, 30 iterations; the same
     run stopped by SIGTERM after 15 and resumed must give the same loss trace; tokens/s and MFU
  g  the fused-RoPE benchmark (tools/bench_rope.py) at 32k and 128k tokens
  h  harpe-plan's memory model vs one GPU step: a Llama-2-7B-width model cut to 4 layers, seq 16k and 32k,
     plain / distributed optimizer / full / selective recompute, fused and unfused HARPE RoPE
     (planning/measure.py in a world of one): weights, gradients, optimizer state, saved activations and
     torch.cuda.max_memory_allocated over the second step, each measured / planned

Writes <out>/gpu_check.json and <out>/gpu_check.md (rewritten after every section, so a run killed
half way still leaves a report), prints progress as it goes and ends with a one-line summary.
Exit code: 0 every section that ran passed, 1 a check failed (or a section errored / hit its cap /
was skipped for want of budget), 2 bad arguments. Performance goals are reported as targets (met /
missed); they never fail the run. One check can end as a warning instead of a failure: on a GPU, a
resumed loss trace that is not bit-identical while the two runs already differ BEFORE the signal (the
device's kernels are not deterministic, so bit-identity cannot be shown); both differences are reported.

CPU mode (`--cpu`, or no CUDA): the same code paths at tiny sizes, Triton's interpreter for the fused
kernel, gloo; labelled "CPU mode: correctness only, no performance numbers".
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CPU_LABEL = "CPU mode: correctness only, no performance numbers"
SECTION_ORDER = "abcdefgh"
TITLES = {
    "a": "environment",
    "b": "HARPE rotary on the device (table + megatron-core apply, fused kernel) vs float64",
    "c": "context-parallel slicing: megatron-core's get_pos_emb_on_this_cp_rank vs the rotary module",
    "d": "SDPA core attention: flash backend, causal and lower-right (CP chunk), time and memory",
    "e": "one Llama-2-7B-shaped layer, fwd+bwd: one-base RoPE vs HARPE table vs HARPE fused",
    "f": "harpe-train on one device: distributed optimizer + overlaps, SIGTERM, exact resume, tokens/s, MFU",
    "g": "fused-RoPE benchmark (tools/bench_rope.py)",
    "h": "planner vs one GPU step: harpe-plan's memory model against a built model's bytes and peak",
}
PROVES = {
    "a": "what the machine is, and whether the fast attention backend exists for the shapes the model uses",
    "b": "the per-group rotation is right on the device in both apply paths, forward and backward, to the "
         "precision the dtype allows; with one base it is megatron-core's RoPE exactly",
    "c": "a CP rank's HARPE angles are exactly megatron-core's slice of the full table (chunks r and 2cp-1-r), "
         "and the fused kernel computes the same positions",
    "d": "the SDPA attention used without Transformer Engine runs the flash kernel at long context in both "
         "mask shapes it issues, is correct, and what it costs",
    "e": "what HARPE costs in a real layer step against one-base RoPE (issue goal: fused within 1%)",
    "f": "the trainer runs on the device with the production parallel options, stops on a signal with a "
         "checkpoint and resumes to the same loss trace; its throughput",
    "g": "the fused kernel's bandwidth against a copy and against one-base RoPE, and its memory",
    "h": "harpe-plan's memory per GPU (model state exact, activations and the step's peak modelled) is what a "
         "built model holds on the device: measured / planned for each part, per layout and RoPE kernel",
}

# Sizes per mode. gpu: the real check (~5-7.5 min on an H200); quick: a smoke run; cpu: tiny, correctness only.
SIZES = {
    "gpu": {
        "b": dict(seq=8192, hq=32, hk=8, d=128),
        "c": dict(seq=8192, hq=32, hk=8, d=128, cps=(2, 4, 8)),
        "d": dict(seqs=(32768, 131072), heads=32, groups=(32, 8), d=128, correctness_seq=2048, repeat=3, warmup=1),
        "e": dict(seq=32768, hidden=4096, heads=32, groups=32, ffn=11008, rounds=8, warmup=2),
        "f": dict(layers=8, hidden=768, ffn=2048, heads=12, groups=4, vocab=32000, seq=8192, global_batch=4,
                  iterations=30, signal_at=15, lr=3e-4),
        "g": dict(seqs=(32768, 131072), repeat=10, shapes="gpu"),
        "h": dict(model="llama2-7b-width", layers=4, seqs=(16384, 32768)),
    },
    "quick": {
        "b": dict(seq=2048, hq=32, hk=8, d=128),
        "c": dict(seq=2048, hq=32, hk=8, d=128, cps=(2, 4, 8)),
        "d": dict(seqs=(8192, 16384), heads=32, groups=(32, 8), d=128, correctness_seq=1024, repeat=2, warmup=1),
        "e": dict(seq=4096, hidden=4096, heads=32, groups=32, ffn=11008, rounds=4, warmup=1),
        "f": dict(layers=4, hidden=768, ffn=2048, heads=12, groups=4, vocab=32000, seq=2048, global_batch=4,
                  iterations=10, signal_at=5, lr=3e-4),
        "g": dict(seqs=(4096, 16384), repeat=5, shapes="gpu"),
        "h": dict(model="llama2-7b-width", layers=2, seqs=(4096, 8192)),
    },
    "cpu": {
        "b": dict(seq=256, hq=4, hk=2, d=32),
        "c": dict(seq=256, hq=4, hk=2, d=32, cps=(2, 4, 8)),
        "d": dict(seqs=(256,), heads=4, groups=(4, 2), d=32, correctness_seq=128, repeat=1, warmup=0),
        "e": dict(seq=128, hidden=128, heads=4, groups=4, ffn=352, rounds=1, warmup=0),
        "f": dict(layers=2, hidden=64, ffn=176, heads=4, groups=2, vocab=256, seq=128, global_batch=4,
                  iterations=6, signal_at=3, lr=3e-3),
        "g": dict(seqs=(64,), repeat=1, shapes="cpu"),
        "h": dict(model="tiny", layers=2, seqs=(64, 128)),
    },
}
# Time caps per section (seconds) and the whole run's budget. GPU caps add up to 510 s inside the 520 s
# budget (under the lent device's 600 s command limit); the estimates of what each section needs on an
# H200 are in docs/gpu_check.md.
CAPS = {
    "gpu": dict(a=15, b=45, c=25, d=60, e=85, f=130, g=60, h=90),
    "quick": dict(a=15, b=40, c=25, d=40, e=60, f=100, g=40, h=60),
    "cpu": dict(a=20, b=40, c=30, d=30, e=60, f=120, g=60, h=40),
}
BUDGET = {"gpu": 520.0, "quick": 390.0, "cpu": 300.0}
ALARM_GRACE_S = 5.0  # past its cap a section is interrupted by SIGALRM (it also checks its deadline itself)

# Tolerances (relative to |z| = sqrt(x1^2 + x2^2), the magnitude of the rotated pair, which the rotation
# preserves; a pair's components are <= |z| and so are their rounding errors' scale).
TOL_FP32 = 1e-5              # fp32 rotation of the same fp32 angle: a few fp32 ulps
HALF_ULP_BF16 = 2.0 ** -8    # half a bf16 ulp of a value v is <= 2^-8 |v|
TOL_BF16_FUSED = 1.01        # in half-ulps: one rounding of an fp32 result (+1% for the fp32 arithmetic)
TOL_BF16_UNFUSED = 4.0       # in half-ulps: megatron-core rounds cos/sin, each product and the sum to bf16
ANGLE_BOUND = 2.0 ** -22     # x seq: the fp32 angle p * inv_freq is within ~1.23 * p * 2^-24 rad of exact


# ============================================================================ report plumbing
class SectionTimeout(Exception):
    """A section ran past its cap; the rest of it is skipped."""


def _now() -> float:
    return time.monotonic()


def log(msg: str) -> None:
    print(msg, flush=True)


class Section:
    def __init__(self, key: str, cap_s: float):
        self.key = key
        self.started = _now()
        self.deadline = self.started + cap_s
        self.record: Dict[str, Any] = {
            "key": key, "title": TITLES[key], "proves": PROVES[key], "status": "running", "cap_s": round(cap_s, 1),
            "duration_s": None, "checks": [], "numbers": {}, "tables": [], "notes": [], "skipped": [], "error": None}

    # --- recording
    def log(self, msg: str) -> None:
        log(f"[{self.key}] {msg}")

    def check(self, name: str, ok: bool, value: Any = "", tolerance: str = "", detail: str = "",
              warn: bool = False) -> bool:
        result = "pass" if ok else ("warn" if warn else "fail")
        self.record["checks"].append({"name": name, "kind": "check", "result": result, "value": _jsonable(value),
                                      "tolerance": tolerance, "detail": detail})
        self.log(f"  {result.upper():4s} {name}: {_short(value)}" + (f"  (tolerance {tolerance})" if tolerance else "")
                 + (f"  {detail}" if detail and not ok else ""))
        return ok

    def target(self, name: str, met: bool, value: Any, goal: str, detail: str = "") -> None:
        self.record["checks"].append({"name": name, "kind": "target", "result": "met" if met else "missed",
                                      "value": _jsonable(value), "tolerance": goal, "detail": detail})
        self.log(f"  {'MET ' if met else 'MISS'} target {name}: {_short(value)} (goal {goal})")

    def number(self, key: str, value: Any) -> None:
        self.record["numbers"][key] = _jsonable(value)

    def table(self, title: str, columns: List[str], rows: List[List[Any]], note: str = "") -> None:
        self.record["tables"].append({"title": title, "columns": columns, "rows": _jsonable(rows), "note": note})

    def note(self, text: str) -> None:
        self.record["notes"].append(text)
        self.log(f"  note: {text}")

    def skip(self, part: str, reason: str) -> None:
        self.record["skipped"].append({"part": part, "reason": reason})
        self.log(f"  skipped: {part}: {reason}")

    # --- time
    def remaining(self) -> float:
        return self.deadline - _now()

    def need(self, seconds: float, part: str) -> None:
        """Raise SectionTimeout unless about `seconds` are left for `part`."""
        left = self.remaining()
        if left < seconds:
            raise SectionTimeout(f"{part}: needs ~{seconds:.0f} s, {max(left, 0):.0f} s left of the section's "
                                 f"{self.record['cap_s']:.0f} s cap")


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_short(v)}" for k, v in value.items())
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    try:
        import torch
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return _jsonable(value.item())
    except ImportError:  # pragma: no cover
        pass
    return str(value)


class Env:
    """What every section needs: mode, device, sizes, where to write."""

    def __init__(self, args, cuda: bool):
        import torch

        self.cuda = cuda
        self.cpu = not cuda
        self.mode = "cpu" if not cuda else ("quick" if args.quick else "gpu")
        self.sizes = SIZES[self.mode]
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.out = Path(args.out).resolve()
        self.work = Path(args.work).resolve() if args.work else self.out / "work"
        self.keep_checkpoints = args.keep_checkpoints
        self.te = False


# ============================================================================ shared helpers
def _sync(env: Env) -> None:
    import torch

    if env.cuda:
        torch.cuda.synchronize()


def _time_calls(env: Env, fn: Callable[[], Any], repeat: int, warmup: int) -> List[float]:
    """Seconds per call: CUDA events on the GPU, perf_counter on CPU."""
    import torch

    for _ in range(warmup):
        fn()
    _sync(env)
    times = []
    for _ in range(repeat):
        if env.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def _peak_extra(env: Env, fn: Callable[[], Any]) -> Optional[int]:
    """max_memory_allocated during fn beyond what was allocated before it (None on CPU)."""
    import torch

    if not env.cuda:
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def _gib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2 ** 30:.2f} GiB"


def _ms(s: Optional[float]) -> str:
    return "-" if s is None else f"{s * 1e3:.3f}"


def _free(env: Env) -> None:
    import torch

    gc.collect()
    if env.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _bases(n: int, cpu: bool) -> List[float]:
    """n bases, one per K/V group: the paper's Table 2 (every (32/n)-th) on the GPU; on CPU, where
    sequences are short, a spread from 1e4 to 5e6 so that every group's angles move visibly."""
    if cpu or 32 % n:
        return [float(round(1e4 * (500.0 ** (i / max(n - 1, 1))))) for i in range(n)]
    from megatron_harpe.rope.bases import PAPER_LLAMA2_7B_BASES

    return list(PAPER_LLAMA2_7B_BASES[:: 32 // n][:n])


# ---------------------------------------------------------------- float64 rotation references
def _angles64(positions, bases, inv_freq32, d: int, heads_per_group: int, exact: bool):
    """[s, 1, heads, d/2] float64 angles; query head h uses group h // heads_per_group.

    exact=False: the fp32 angle float32(p) * inv_freq (what both apply paths form), in float64;
    exact=True: p * base^(-2i/d) computed in float64 from the base."""
    import torch

    if exact:
        i = torch.arange(0, d, 2, dtype=torch.float64, device=positions.device) / d
        theta = torch.stack([float(b) ** (-i) for b in bases])  # [G, d/2]
        ang = positions.to(torch.float64)[:, None, None] * theta[None]
    else:
        ang = (positions.to(torch.float32)[:, None, None] * inv_freq32.to(positions.device)[None]).to(torch.float64)
    if heads_per_group > 1:
        ang = ang.repeat_interleave(heads_per_group, dim=1)
    return ang.unsqueeze(1)  # [s, 1, heads, d/2]


def _rotate64(x, ang, sign: float = 1.0):
    """Rotate pairs (i, i + d/2) of x [s, b, h, d] by sign * ang, in float64."""
    import torch

    x = x.detach().to(torch.float64)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    c, s = torch.cos(ang), sign * torch.sin(ang)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def _pair_mag(x):
    import torch

    x = x.detach().to(torch.float64)
    h = x.shape[-1] // 2
    m = torch.sqrt(x[..., :h] ** 2 + x[..., h:] ** 2)
    return torch.cat([m, m], dim=-1).clamp_min(1e-30)


def _rel_err(got, ref, mag) -> Dict[str, float]:
    err = (got.detach().to(ref.dtype) - ref).abs()
    return {"max_abs_err": err.max().item(), "max_err_over_pair_mag": (err / mag).max().item()}


# ============================================================================ a. environment
def section_a(sec: Section, env: Env) -> None:
    import torch

    v: Dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                         "torch_cuda": torch.version.cuda}
    for name, mod in (("triton", "triton"), ("numpy", "numpy")):
        try:
            v[name] = __import__(mod).__version__
        except Exception as err:  # noqa: BLE001
            v[name] = f"absent ({type(err).__name__})"
    try:
        from importlib.metadata import version

        v["megatron_core"] = version("megatron-core")
    except Exception:  # noqa: BLE001
        import megatron.core

        v["megatron_core"] = getattr(megatron.core, "__version__", "unknown")
    from megatron_harpe.models.spec import transformer_engine_available

    env.te = env.cuda and transformer_engine_available()
    if env.te:
        import transformer_engine

        v["transformer_engine"] = getattr(transformer_engine, "__version__", "present")
    else:
        v["transformer_engine"] = "absent" if env.cuda else "not used on CPU"
    v["cudnn"] = torch.backends.cudnn.version() if env.cuda else None
    sec.number("versions", v)
    sec.log("versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))

    from megatron_harpe import compat

    unverified = compat.unverified_workarounds()
    sec.check("megatron-core release is the one compat.py's workarounds were verified on", not unverified,
              value=v["megatron_core"], detail=f"unverified workarounds: {[w.name for w in unverified]}")
    from megatron_harpe.rope.fused_kernel import fused_rope_available

    sec.check("fused RoPE kernel can run here (triton + CUDA, or the interpreter)", fused_rope_available(),
              value=f"triton {v['triton']}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}")

    if not env.cuda:
        sec.number("gpu", None)
        sec.skip("GPU name, memory, compute capability, driver", "CPU mode: no CUDA device")
        sec.skip("SDPA flash backend probe (bf16, causal, head dim 128)", "CPU mode: flash is a CUDA backend")
        return
    props = torch.cuda.get_device_properties(env.device)
    gpu = {"name": props.name, "memory_bytes": int(props.total_memory),
           "memory": _gib(props.total_memory), "compute_capability": f"{props.major}.{props.minor}",
           "multiprocessors": props.multi_processor_count, "device_count": torch.cuda.device_count()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        gpu["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except Exception as err:  # noqa: BLE001
        gpu["driver"] = f"nvidia-smi failed: {type(err).__name__}"
    try:
        gpu["cuda_driver_api"] = torch._C._cuda_getDriverVersion()
    except Exception:  # noqa: BLE001
        pass
    sec.number("gpu", gpu)
    sec.log(f"GPU: {gpu}")
    sec.check("CUDA device present", True, value=f"{props.name}, {gpu['memory']}, sm_{props.major}{props.minor}")

    # Does SDPA's flash backend run the model's shape: bf16, causal, head dim 128 (MHA and GQA)?
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for label, hk in (("MHA 32 heads", 32), ("GQA 32q/8kv", 8)):
        q = torch.randn(1, 32, 1024, 128, device=env.device, dtype=torch.bfloat16)
        k = torch.randn(1, hk, 1024, 128, device=env.device, dtype=torch.bfloat16)
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=hk != 32)
            torch.cuda.synchronize()
            ok, why = True, "runs"
        except Exception as err:  # noqa: BLE001
            ok, why = False, f"refused: {str(err).splitlines()[0][:300]}"
        sec.number(f"sdpa_flash_{'mha' if hk == 32 else 'gqa'}", why)
        sec.target(f"SDPA flash backend for bf16 causal, head dim 128, {label}", ok, why, "available")


# ============================================================================ b. HARPE rotary vs float64
def section_b(sec: Section, env: Env) -> None:
    import torch
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_harpe.rope.fused_kernel import apply_harpe_rotary_qk
    from megatron_harpe.rope.harpe_rotary import HarpeRotaryEmbedding

    z = env.sizes["b"]
    S, hq, hk, d = z["seq"], z["hq"], z["hk"], z["d"]
    hpg = hq // hk
    bases = _bases(hk, env.cpu)
    sec.log(f"seq {S}, {hq} query / {hk} K/V heads x {d}, batch 1, bases {bases}")
    sec.number("shape", dict(seq=S, q_heads=hq, kv_heads=hk, head_dim=d, bases=bases))
    kw = dict(kv_channels=d, rotary_percent=1.0, bases=bases, num_attention_heads=hq, num_query_groups=hk)
    table_mod = HarpeRotaryEmbedding(**kw)
    fused_mod = HarpeRotaryEmbedding(**kw, fused=True)
    table = table_mod(S)
    inv = fused_mod(S)
    sec.check("table on the device, [s, 1, groups, d]", table.device.type == env.device.type
              and tuple(table.shape) == (S, 1, hk, d), value=f"{tuple(table.shape)} on {table.device}")
    sec.check("fused mode hands the kernel inv_freq [groups, d/2] on the device",
              inv.device.type == env.device.type and tuple(inv.shape) == (hk, d // 2),
              value=f"{tuple(inv.shape)} on {inv.device}")

    pos = torch.arange(S, device=env.device)
    inv32 = table_mod.inv_freq
    angles = {"fp32-angle": (_angles64(pos, bases, inv32, d, hpg, exact=False),
                             _angles64(pos, bases, inv32, d, 1, exact=False)),
              "exact-angle": (_angles64(pos, bases, inv32, d, hpg, exact=True),
                              _angles64(pos, bases, inv32, d, 1, exact=True))}
    angle_tol = S * ANGLE_BOUND
    rows = []
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        sec.need(3, f"{dtype_name} rotation checks")
        gen = torch.Generator(device=env.device).manual_seed(1)
        q = torch.randn(S, 1, hq, d, device=env.device, dtype=dtype, generator=gen)
        k = torch.randn(S, 1, hk, d, device=env.device, dtype=dtype, generator=gen)
        gq = torch.randn(S, 1, hq, d, device=env.device, dtype=dtype, generator=gen)
        gk = torch.randn(S, 1, hk, d, device=env.device, dtype=dtype, generator=gen)
        out, grads = {}, {}
        # unfused: the module's table (cached), each query head its group's angles, megatron-core's apply
        qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
        qa, ka = table_mod.query_and_key_angles(table_mod(S))
        out["unfused"] = (_apply_rotary_pos_emb_bshd(qr, qa), _apply_rotary_pos_emb_bshd(kr, ka))
        grads["unfused"] = torch.autograd.grad(out["unfused"], (qr, kr), (gq, gk))
        # fused: one Triton launch for q and k (and one for both gradients)
        qf, kf = q.clone().requires_grad_(), k.clone().requires_grad_()
        out["fused"] = apply_harpe_rotary_qk(qf, kf, fused_mod(S))
        grads["fused"] = torch.autograd.grad(out["fused"], (qf, kf), (gq, gk))
        _sync(env)
        mags = (_pair_mag(q), _pair_mag(k))
        gmags = (_pair_mag(gq), _pair_mag(gk))
        if dtype == torch.float32:
            tol = {"fused": TOL_FP32, "unfused": TOL_FP32}
            tol_text = {p: "1e-5 x |z| (fp32 rotation of the same fp32 angle)" for p in tol}
        else:
            tol = {"fused": TOL_BF16_FUSED * HALF_ULP_BF16, "unfused": TOL_BF16_UNFUSED * HALF_ULP_BF16}
            tol_text = {"fused": "half a bf16 ulp (2^-8 x |z|, +1%): one rounding of the fp32 result",
                        "unfused": "2 bf16 ulps (4 x 2^-8 x |z|): cos/sin, products and sum rounded to bf16"}
        for path in ("unfused", "fused"):
            for mode in ("fp32-angle", "exact-angle"):
                aq, ak = angles[mode]
                extra = angle_tol if mode == "exact-angle" else 0.0
                worst = {"max_abs_err": 0.0, "max_err_over_pair_mag": 0.0}
                for got, x, a, m in ((out[path][0], q, aq, mags[0]), (out[path][1], k, ak, mags[1])):
                    e = _rel_err(got, _rotate64(x, a), m)
                    worst = {key: max(worst[key], e[key]) for key in worst}
                limit = tol[path] + extra
                text = tol_text[path] + (f" + seq x 2^-22 = {extra:.2e} (the fp32 angle's rounding)" if extra else "")
                sec.check(f"{dtype_name} {path} forward vs float64 ({mode})", worst["max_err_over_pair_mag"] <= limit,
                          value=worst, tolerance=f"{limit:.3g} x |z|: {text}")
                rows.append([dtype_name, path, f"forward ({mode})", worst["max_abs_err"],
                             worst["max_err_over_pair_mag"], limit])
            # gradients: the backward is the rotation by the negative angle
            aq, ak = angles["fp32-angle"]
            worst = {"max_abs_err": 0.0, "max_err_over_pair_mag": 0.0}
            for got, g, a, m in ((grads[path][0], gq, aq, gmags[0]), (grads[path][1], gk, ak, gmags[1])):
                e = _rel_err(got, _rotate64(g, a, sign=-1.0), m)
                worst = {key: max(worst[key], e[key]) for key in worst}
            sec.check(f"{dtype_name} {path} gradients vs float64 (rotation by -angle)",
                      worst["max_err_over_pair_mag"] <= tol[path], value=worst,
                      tolerance=f"{tol[path]:.3g} x |grad pair|: {tol_text[path]}")
            rows.append([dtype_name, path, "gradients (fp32-angle)", worst["max_abs_err"],
                         worst["max_err_over_pair_mag"], tol[path]])
        both = tol["fused"] + tol["unfused"]
        for what, a_pair, b_pair, m_pair in (("forward", out["fused"], out["unfused"], mags),
                                             ("gradients", grads["fused"], grads["unfused"], gmags)):
            e = max(((x.double() - y.double()).abs() / m).max().item() for x, y, m in zip(a_pair, b_pair, m_pair))
            d_abs = max((x.double() - y.double()).abs().max().item() for x, y in zip(a_pair, b_pair))
            sec.check(f"{dtype_name} fused vs unfused {what}", e <= both,
                      value={"max_abs_diff": d_abs, "max_diff_over_pair_mag": e},
                      tolerance=f"{both:.3g} x |z| (the two paths' bounds added)")
            rows.append([dtype_name, "fused vs unfused", what, d_abs, e, both])
        del q, k, gq, gk, qr, kr, qf, kf, out, grads, mags, gmags
        _free(env)
    sec.table("errors (|z| = magnitude of the rotated pair)",
              ["dtype", "path", "what", "max abs err", "max err / |z|", "tolerance / |z|"], rows)

    # equal bases: HARPE's table is megatron-core's RotaryEmbedding table bit for bit, on the device
    for base in sorted({10000.0, bases[0], bases[-1]}):
        harpe = HarpeRotaryEmbedding(**{**kw, "bases": [base] * hk})(S)
        mega = RotaryEmbedding(kv_channels=d, rotary_percent=1.0, rotary_base=base, use_cpu_initialization=True)(S)
        same = harpe.device == mega.device and all(torch.equal(harpe[:, :, g:g + 1], mega) for g in range(hk))
        sec.check(f"all bases {base:g}: HARPE table == megatron-core RotaryEmbedding table (torch.equal)", same,
                  value=f"{tuple(harpe.shape)} vs {tuple(mega.shape)} on {harpe.device} / {mega.device}",
                  tolerance="bit-identical")


# ============================================================================ c. CP slicing
class _StandInGroup:
    """What megatron-core's get_pos_emb_on_this_cp_rank and the rotary module ask a CP group: size(), rank()."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def section_c(sec: Section, env: Env) -> None:
    import torch
    from megatron.core.models.common.embeddings.rope_utils import (_apply_rotary_pos_emb_bshd,
                                                                   get_pos_emb_on_this_cp_rank)

    from megatron_harpe.rope.fused_kernel import apply_harpe_rotary_qk
    from megatron_harpe.rope.harpe_rotary import HarpeRotaryEmbedding

    z = env.sizes["c"]
    S, hq, hk, d = z["seq"], z["hq"], z["hk"], z["d"]
    bases = _bases(hk, env.cpu)
    kw = dict(kv_channels=d, rotary_percent=1.0, bases=bases, num_attention_heads=hq, num_query_groups=hk)
    sec.note("megatron-core 0.16.1's get_pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group) asks the group only "
             "for size() and rank() (then index_selects chunks r and 2cp-1-r on the device), so a stand-in object "
             "answering those two stands for each rank of a CP group: no torch.distributed, one device"
             + (" (on CPU its pin_memory/.cuda() go through the project's CPU backend)" if env.cpu else ""))
    full = HarpeRotaryEmbedding(**kw)(S)  # [S, 1, hk, d], no CP
    fused_inv = HarpeRotaryEmbedding(**kw, fused=True)(S)
    gen = torch.Generator(device=env.device).manual_seed(2)
    rows = []
    for cp in z["cps"]:
        equal_all, worst = True, 0.0
        for r in range(cp):
            group = _StandInGroup(cp, r)
            theirs = get_pos_emb_on_this_cp_rank(full, 0, group)
            ours = HarpeRotaryEmbedding(**kw, cp_group=group)(S)
            equal = theirs.shape == ours.shape and torch.equal(theirs, ours)
            equal_all &= equal
            if not equal:
                sec.log(f"  cp {cp} rank {r}: tables differ (shapes {tuple(theirs.shape)} / {tuple(ours.shape)})")
            # the fused kernel with cp_size/cp_rank rotates this rank's rows with the same positions
            s_local = S // cp
            q = torch.randn(s_local, 1, hq, d, device=env.device, dtype=torch.float32, generator=gen)
            k = torch.randn(s_local, 1, hk, d, device=env.device, dtype=torch.float32, generator=gen)
            hpg = hq // hk
            ref_q = _apply_rotary_pos_emb_bshd(q, theirs.repeat_interleave(hpg, dim=2) if hpg > 1 else theirs)
            ref_k = _apply_rotary_pos_emb_bshd(k, theirs)
            fq, fk = apply_harpe_rotary_qk(q, k, fused_inv, cp_size=cp, cp_rank=r)
            e = max(((fq.double() - ref_q.double()).abs() / _pair_mag(q)).max().item(),
                    ((fk.double() - ref_k.double()).abs() / _pair_mag(k)).max().item())
            worst = max(worst, e)
        sec.check(f"cp {cp}: every rank's HARPE table == get_pos_emb_on_this_cp_rank(full table) (torch.equal)",
                  equal_all, value=f"{cp} ranks, local tables [{S // cp}, 1, {hk}, {d}]", tolerance="bit-identical")
        sec.check(f"cp {cp}: fused kernel (cp_size, cp_rank) == megatron-core apply on the sliced table, every rank",
                  worst <= 2 * TOL_FP32, value={"max_diff_over_pair_mag": worst},
                  tolerance=f"{2 * TOL_FP32:g} x |z| (fp32)")
        rows.append([cp, cp, equal_all, worst])
        sec.need(1, f"cp sizes after {cp}")
    sec.table("per CP size", ["cp", "ranks checked", "tables equal", "fused vs sliced-table max err / |z|"], rows)


# ============================================================================ d. SDPA core attention
def _attention_flops(n_q: int, n_k: int, heads: int, d: int) -> float:
    """Forward FLOPs of causal attention aligned bottom-right (2 matmuls x 2 flops x admitted (q, k) pairs)."""
    pairs = n_q * (n_k - n_q) + n_q * (n_q + 1) / 2
    return 4.0 * heads * d * pairs


def section_d(sec: Section, env: Env) -> None:
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_harpe.parallel.core_attention import SDPACoreAttention

    z = env.sizes["d"]
    H, d = z["heads"], z["d"]
    if env.cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash():
            return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    else:
        flash = None
        sec.skip("flash backend forced", "CPU mode: SDPA's flash backend is CUDA only; the CPU path (explicit "
                 "lower-right mask, CPU kernels) is what runs")

    def core_for(groups: int, mask: AttnMaskType):
        cfg = TransformerConfig(num_layers=1, hidden_size=H * d, num_attention_heads=H, num_query_groups=groups,
                                kv_channels=d, attention_dropout=0.0, hidden_dropout=0.0, bf16=True,
                                params_dtype=torch.bfloat16, use_cpu_initialization=True)
        return SDPACoreAttention(cfg, layer_number=1, attn_mask_type=mask, attention_type="self")

    cases = [("causal", AttnMaskType.causal, 1), ("lower-right", AttnMaskType.causal_bottom_right, 4)]
    sec.note("lower-right = one CP chunk's call: cp=2, rank 0's second chunk (global chunk 3 of 4) attends every "
             "key before it: q = S/4 rows, k/v = S rows, mask aligned bottom-right (the module passes "
             "causal_lower_right on CUDA; on CPU an explicit [q, k] mask)")

    def inputs(n_q, n_k, groups, requires_grad, seed):
        gen = torch.Generator(device=env.device).manual_seed(seed)
        mk = lambda n, h: torch.randn(n, 1, h, d, device=env.device, dtype=torch.bfloat16,  # noqa: E731
                                      generator=gen).requires_grad_(requires_grad)
        return mk(n_q, H), mk(n_k, groups), mk(n_k, groups)

    # ---- correctness vs the math backend, fp32 reference on the same bf16 inputs
    n = z["correctness_seq"]
    rows = []
    for groups in z["groups"]:
        for name, mask, div in cases:
            sec.need(2, "correctness")
            core = core_for(groups, mask)
            q, k, v = inputs(n // div, n, groups, True, 3)
            gout = torch.randn(n // div, 1, H * d, device=env.device, dtype=torch.bfloat16)
            backend = "default (CPU)"
            try:
                with (flash() if flash else contextlib.nullcontext()):
                    out = core(q, k, v, None, mask)
                    grads = torch.autograd.grad(out, (q, k, v), gout)
                if flash:
                    backend = "flash"
            except RuntimeError as err:
                sec.note(f"correctness {name} groups {groups}: flash refused ({str(err).splitlines()[0][:200]}); "
                         f"checked with the default backends")
                backend = "default (flash refused)"
                out = core(q, k, v, None, mask)
                grads = torch.autograd.grad(out, (q, k, v), gout)
            # reference: math backend, fp32, explicit lower-right mask, K/V expanded to the query heads
            q32, k32, v32 = (t.detach().float().permute(1, 2, 0, 3).requires_grad_() for t in (q, k, v))
            rep = H // groups
            ke, ve = k32.repeat_interleave(rep, dim=1), v32.repeat_interleave(rep, dim=1)
            allowed = torch.ones(q.size(0), n, dtype=torch.bool, device=env.device).tril(n - q.size(0))
            ctx = sdpa_kernel([SDPBackend.MATH]) if env.cuda else contextlib.nullcontext()
            with ctx:
                ref = F.scaled_dot_product_attention(q32, ke, ve, attn_mask=allowed, scale=1.0 / math.sqrt(d))
            ref_out = ref.permute(2, 0, 1, 3).reshape(q.size(0), 1, H * d)
            ref_grads = torch.autograd.grad(ref_out, (q32, k32, v32), gout.float())
            vmax = v.detach().abs().max().item()
            out_err = (out.float() - ref_out).abs().max().item()
            out_tol = 2.0 ** -7 * vmax
            sec.check(f"{name} GQA {H}/{groups} at {n} tokens ({backend}): output vs fp32 math", out_err <= out_tol,
                           value={"max_abs_err": out_err}, tolerance=f"2^-7 x max|v| = {out_tol:.3g} (bf16 P.V and "
                           f"output rounding: <= 2^-8 x max|v|)")
            g_errs = []
            for label, g, rg in zip("qkv", grads, ref_grads):
                rg = rg.permute(2, 0, 1, 3)
                e = (g.float() - rg).abs().max().item() / max(rg.abs().max().item(), 1e-30)
                g_errs.append(e)
            sec.check(f"{name} GQA {H}/{groups} at {n} tokens ({backend}): dq, dk, dv vs fp32 math",
                      max(g_errs) <= 2.0 ** -5, value={"max_err_over_max_ref": max(g_errs)},
                      tolerance="2^-5 x max|reference gradient| (bf16 inputs, bf16 gradients)")
            rows.append([name, f"{H}/{groups}", n // div, n, backend, out_err, out_tol, max(g_errs)])
            del q, k, v, out, grads, ref, ref_out, ref_grads, q32, k32, v32, ke, ve
    sec.table("correctness vs the math backend (fp32 reference, bf16 inputs)",
              ["mask", "heads q/kv", "q", "k", "backend", "out max abs err", "out tol", "grad max err / max ref"],
              rows)
    _free(env)

    # ---- time and memory at long context
    rows = []
    for S in z["seqs"]:
        for groups in z["groups"]:
            for name, mask, div in cases:
                # ~5 forward and 5 forward+backward calls; causal at 128k: ~0.3 s + ~1.1 s each on an H100/H200
                est = (8.0 * (S / 131072) ** 2 * (1.0 if name == "causal" else 0.45) if env.cuda else 0.0) + 1
                sec.need(est, f"timing {name} at {S} tokens, heads {H}/{groups}")
                n_q, n_k = S // div, S
                case = f"{name} at {S} tokens, heads {H}/{groups}"
                core = core_for(groups, mask)
                q, k, v = inputs(n_q, n_k, groups, True, 4)
                gout = torch.randn(n_q, 1, H * d, device=env.device, dtype=torch.bfloat16)
                # what to try, in order: the flash kernel forced (GPU, when SDPA would take it), then whatever
                # SDPA picks by itself (on a GPU without flash that may be the math kernel: O(S^2) memory)
                attempts = []
                if env.cuda:
                    usable, why = _flash_usable(q, k, v, H, groups, name)
                    if usable:
                        attempts.append(("flash", flash))
                    else:
                        sec.target(f"flash backend usable, {case}", False, why, "usable")
                    attempts.append(("default" if usable else "default (flash refused)", contextlib.nullcontext))
                else:
                    attempts.append(("default (CPU)", contextlib.nullcontext))
                result, failures = None, []
                for backend, ctx in attempts:

                    def fwd(ctx=ctx):
                        with torch.no_grad(), ctx():
                            return core(q, k, v, None, mask)

                    def fwd_bwd(ctx=ctx):
                        with ctx():
                            out = core(q, k, v, None, mask)
                        out.backward(gout)
                        q.grad = k.grad = v.grad = None

                    # a fallback on the GPU may be the math kernel (seconds, tens of GiB): time it once
                    rep, warm = (z["repeat"], z["warmup"]) if backend == "flash" or env.cpu else (1, 0)
                    try:
                        t_f = _time_calls(env, fwd, rep, warm)
                        t_fb = _time_calls(env, fwd_bwd, rep, warm)
                        result = (backend, t_f, t_fb, _peak_extra(env, fwd), _peak_extra(env, fwd_bwd))
                        break
                    except RuntimeError as err:  # refused kernel, out of memory: recorded, next attempt
                        msg = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
                        failures.append(f"{backend}: {msg}")
                        sec.log(f"  {case}: {backend} failed: {msg}")
                        q.grad = k.grad = v.grad = None
                        _free(env)
                        if backend == "flash":
                            sec.target(f"flash backend runs, {case}", False, msg, "runs")
                if env.cuda and result is not None and result[0] == "flash":
                    sec.target(f"flash backend runs, {case}", True, "runs", "runs")
                sec.check(f"SDPA core attention runs, {case}", result is not None,
                          value=result[0] if result else "; ".join(failures))
                if result is None:
                    rows.append([name, S, f"{H}/{groups}", n_q, n_k, "failed: " + "; ".join(failures)[:200]]
                                + ["-"] * 6)
                    del q, k, v, gout, core
                    _free(env)
                    continue
                backend, t_f, t_fb, m_f, m_fb = result
                flops = _attention_flops(n_q, n_k, H, d)
                mf, mfb = statistics.median(t_f), statistics.median(t_fb)
                row = dict(mask=name, seq=S, heads=f"{H}/{groups}", q=n_q, k=n_k, backend=backend,
                           fwd_ms=mf * 1e3, fwd_bwd_ms=mfb * 1e3, fwd_tflops=flops / mf / 1e12,
                           fwd_bwd_tflops=3.5 * flops / mfb / 1e12, fwd_peak_bytes=m_f, fwd_bwd_peak_bytes=m_fb,
                           failed_attempts=failures)
                sec.number(f"{name}_{S}_{H}x{groups}", row)
                sec.log(f"  {name:11s} S={S:6d} heads {H}/{groups}: fwd {mf * 1e3:9.3f} ms, fwd+bwd {mfb * 1e3:9.3f} ms, "
                        f"peak +{_gib(m_fb) if m_fb is not None else 'n/a'}  [{backend}]"
                        + (f"  [{CPU_LABEL}]" if env.cpu else ""))
                rows.append([name, S, f"{H}/{groups}", n_q, n_k, backend, _ms(mf), _ms(mfb),
                             f"{row['fwd_tflops']:.1f}", f"{row['fwd_bwd_tflops']:.1f}", _gib(m_f), _gib(m_fb)])
                del q, k, v, gout, core
                _free(env)
    sec.table(f"time (median of {z['repeat']}, {'CUDA events' if env.cuda else 'perf_counter'}; a fallback "
              f"backend once) and peak memory (max_memory_allocated delta)"
              + (f" [{CPU_LABEL}]" if env.cpu else ""),
              ["mask", "S", "heads q/kv", "q", "k", "backend", "fwd ms", "fwd+bwd ms", "fwd TFLOP/s",
               "fwd+bwd TFLOP/s", "fwd peak", "fwd+bwd peak"], rows,
              note="TFLOP/s: 4*heads*d*(admitted q,k pairs) forward, x3.5 forward+backward")


def _flash_usable(q, k, v, heads: int, groups: int, case: str):
    """(usable, reason): would SDPA's flash kernel take this call (the module expands K/V for lower-right)."""
    import torch
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    qb = q.detach().permute(1, 2, 0, 3)
    kb, vb = k.detach().permute(1, 2, 0, 3), v.detach().permute(1, 2, 0, 3)
    gqa = heads != groups
    if case == "lower-right" and gqa:
        kb = kb.repeat_interleave(heads // groups, dim=1)
        vb = vb.repeat_interleave(heads // groups, dim=1)
        gqa = False
    try:
        params = SDPAParams(qb, kb, vb, None, 0.0, case == "causal", gqa)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ok = bool(can_use_flash_attention(params, False))
    except Exception as err:  # noqa: BLE001
        return False, f"probe failed: {err}"
    del kb, vb
    torch.cuda.empty_cache()
    return ok, "ok" if ok else "can_use_flash_attention() is False"


# ============================================================================ e. one 7B layer
def section_e(sec: Section, env: Env) -> None:
    import torch
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_harpe.config.model import ModelConfig, PositionEmbeddingConfig
    from megatron_harpe.convert.megatron_io import single_process_world
    from megatron_harpe.models.spec import llama_block_spec, transformer_engine_available
    from megatron_harpe.models.transformer_config import build_transformer_config, fusion_settings, rope_kernel
    from megatron_harpe.rope.fused_kernel import fused_rope_available
    from megatron_harpe.rope.harpe_rotary import HarpeRotaryEmbedding

    z = env.sizes["e"]
    S, Hd, nh, ng, ffn = z["seq"], z["hidden"], z["heads"], z["groups"], z["ffn"]
    d = Hd // nh
    bases = _bases(ng, env.cpu)
    te = env.cuda and transformer_engine_available()
    sec.log(f"layer: hidden {Hd}, {nh} heads ({ng} K/V groups) x {d}, ffn {ffn}, seq {S}, batch 1, bf16, "
            f"spec {'Transformer Engine' if te else 'local (megatron-core linears + SDPA core attention)'}")
    common = dict(num_layers=1, hidden_size=Hd, ffn_hidden_size=ffn, num_attention_heads=nh, num_query_groups=ng,
                  vocab_size=32000, max_position_embeddings=S)
    mc_h = ModelConfig(**common, position=PositionEmbeddingConfig(kind="harpe", bases=bases))
    mc_r = ModelConfig(**common, position=PositionEmbeddingConfig(kind="rope", base=bases[0]))
    kernel_r = rope_kernel(mc_r, cuda=env.cuda, te=te, triton=fused_rope_available())
    sec.number("shape", dict(seq=S, hidden=Hd, heads=nh, groups=ng, ffn=ffn, head_dim=d, te=te,
                             one_base_apply=("TE fused RoPE" if kernel_r == "fused" else "megatron-core unfused")))

    def config(mc, kernel):
        fus = fusion_settings(mc, cuda=env.cuda, te=te, kernel=kernel)
        fus["gradient_accumulation_fusion"] = False  # no DDP main_grad buffers around a bare layer
        return build_transformer_config(mc, params_dtype=torch.bfloat16, use_cpu_initialization=not env.cuda,
                                        fusions=fus)

    with single_process_world():
        torch.manual_seed(5)
        block_r = TransformerBlock(config(mc_r, kernel_r), llama_block_spec(config(mc_r, kernel_r), use_te=te))
        block_h = TransformerBlock(config(mc_h, "unfused"), llama_block_spec(config(mc_h, "unfused"), use_te=te,
                                                                               harpe=True))
        if env.cuda:
            block_r.cuda()
            block_h.cuda()
        missing = block_h.load_state_dict(block_r.state_dict(), strict=False)
        shared = not missing.missing_keys and not missing.unexpected_keys
        sec.check("HARPE layer loads the one-base layer's weights (same parameters, attention class aside)", shared,
                  value=f"missing {missing.missing_keys}, unexpected {missing.unexpected_keys}")
        n_params = sum(p.numel() for p in block_h.parameters())
        sec.number("parameters", n_params)
        rot_r = RotaryEmbedding(kv_channels=d, rotary_percent=1.0, rotary_base=bases[0], use_cpu_initialization=True)
        kw = dict(kv_channels=d, rotary_percent=1.0, bases=bases, num_attention_heads=nh, num_query_groups=ng)
        rot_table, rot_fused = HarpeRotaryEmbedding(**kw), HarpeRotaryEmbedding(**kw, fused=True)
        rot_equal = HarpeRotaryEmbedding(**{**kw, "bases": [bases[0]] * ng})
        variants = {"one-base": (block_r, lambda: rot_r(S)), "harpe-table": (block_h, lambda: rot_table(S)),
                    "harpe-fused": (block_h, lambda: rot_fused(S))}
        gen = torch.Generator(device=env.device).manual_seed(6)
        x = torch.randn(S, 1, Hd, device=env.device, dtype=torch.bfloat16, generator=gen).requires_grad_()
        gout = torch.randn(S, 1, Hd, device=env.device, dtype=torch.bfloat16, generator=gen)

        def step(name):
            block, emb = variants[name]
            for p in block.parameters():
                p.grad = None
            x.grad = None
            out = block(hidden_states=x, attention_mask=None, rotary_pos_emb=emb())
            out.backward(gout)
            return out

        # ---- correctness: the three paths compute the same layer
        sec.need(5, "correctness steps")
        out_t = step("harpe-table").detach().clone()
        gx_t = x.grad.detach().clone()
        out_f = step("harpe-fused").detach().clone()
        gx_f = x.grad.detach().clone()
        rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
        r_out, r_g = rel(out_f, out_t), rel(gx_f, gx_t)
        sec.check("HARPE fused vs table layer: output", r_out <= 1e-2, value={"relative_l2": r_out},
                  tolerance="1e-2 relative L2 (bf16 layer; q/k differ by <= 1 bf16 ulp between the paths)")
        sec.check("HARPE fused vs table layer: input gradient", r_g <= 1e-2, value={"relative_l2": r_g},
                  tolerance="1e-2 relative L2")
        with torch.no_grad():
            o_eq = block_h(hidden_states=x, attention_mask=None, rotary_pos_emb=rot_equal(S))
            o_r = block_r(hidden_states=x, attention_mask=None, rotary_pos_emb=rot_r(S))
        if kernel_r == "unfused":
            sec.check("HARPE layer with all bases equal == one-base layer, forward (torch.equal)", torch.equal(o_eq, o_r),
                      value={"max_abs_diff": (o_eq.float() - o_r.float()).abs().max().item()}, tolerance="bit-identical")
        else:
            r = rel(o_eq, o_r)
            sec.check("HARPE layer with all bases equal vs one-base layer (TE fused RoPE), forward", r <= 1e-2,
                      value={"relative_l2": r}, tolerance="1e-2 relative L2 (TE rounds differently)")
        del out_t, gx_t, out_f, gx_f, o_eq, o_r
        _free(env)

        # ---- time: rounds interleave the variants so drift hits all alike
        names = list(variants)
        times = {n_: [] for n_ in names}
        last_round = 0.0
        for r in range(z["warmup"] + z["rounds"]):
            if r > z["warmup"] and sec.remaining() < 2 * last_round + 5:  # keep a round's time for the memory pass
                sec.note(f"timing stopped after {r - z['warmup']} of {z['rounds']} rounds: the section's cap is near")
                break
            t_round = _now()
            for name in names:
                tm = _time_calls(env, lambda: step(name), 1, 0)[0]
                if r >= z["warmup"]:
                    times[name].append(tm)
            last_round = _now() - t_round
        sec.need(last_round + 2, "the memory pass")
        peaks = {name: _peak_extra(env, lambda: step(name)) for name in names}
        base_mem = torch.cuda.memory_allocated() if env.cuda else None
        med = {name: statistics.median(v) for name, v in times.items()}
        rows = []
        for name in names:
            ratio = med[name] / med["one-base"]
            rows.append([name, _ms(med[name]), _ms(min(times[name])), _ms(max(times[name])), f"{ratio:.4f}",
                         _gib(peaks[name])])
            sec.number(f"{name}", dict(median_s=med[name], min_s=min(times[name]), max_s=max(times[name]),
                                       ratio_to_one_base=ratio, peak_extra_bytes=peaks[name]))
        sec.number("memory_allocated_between_steps_bytes", base_mem)
        sec.number("harpe_table_bytes", sum(t.numel() * t.element_size() for t in [rot_table(S)]))
        sec.table(f"fwd+bwd step, median of {len(times['one-base'])} interleaved rounds" + (f" [{CPU_LABEL}]" if env.cpu else ""),
                  ["variant", "median ms", "min ms", "max ms", "ratio to one-base", "peak extra memory"], rows,
                  note="peak extra memory: max_memory_allocated during one step beyond what was allocated before it "
                       "(weights, input); the HARPE table variant's cached angle table is allocated before the step")
        ratio_fused = med["harpe-fused"] / med["one-base"]
        ratio_table = med["harpe-table"] / med["one-base"]
        sec.log(f"  step: one-base {_ms(med['one-base'])} ms, HARPE table {_ms(med['harpe-table'])} ms "
                f"({ratio_table:.3f}x), HARPE fused {_ms(med['harpe-fused'])} ms ({ratio_fused:.3f}x)"
                + (f"  [{CPU_LABEL}]" if env.cpu else ""))
        if env.cuda:
            sec.target("HARPE fused step time / one-base", ratio_fused <= 1.01, ratio_fused, "<= 1.01 (issue goal)")
            sec.target("HARPE table step time / one-base", ratio_table <= 1.05, ratio_table, "<= 1.05")
        else:
            sec.skip("step-time targets", "CPU mode: no performance numbers")
        del x, gout, block_r, block_h, variants
    _free(env)


# ============================================================================ f. harpe-train
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_ECHO = ("iter ", "finished", "signal", "Traceback", "Error", "error:", "harpe-train:")


class _TrainLaunch:
    """One harpe-train launch under torchrun (one process) through tests/workers/train_worker.py, as
    tests/test_trainer.py launches it. Output goes to <run>.log; iteration lines and errors echo."""

    def __init__(self, sec: Section, env: Env, name: str, run_dir: Path, overrides: List[str],
                 signal_at: Optional[int] = None):
        self.sec, self.name = sec, name
        self.out_dir = run_dir.parent / f"out_{name}"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        worker = REPO / "tests" / "workers" / "train_worker.py"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=1",
               "--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(worker), "--out", str(self.out_dir)]
        if signal_at is not None:
            cmd += ["--send-signal-at", str(signal_at)]
        cmd += ["--", "--config", str(REPO / "examples" / "tiny" / "harpe.yaml"), f"run_dir={run_dir}", *overrides]
        penv = dict(os.environ)
        penv["PYTHONPATH"] = str(REPO) + (os.pathsep + penv["PYTHONPATH"] if penv.get("PYTHONPATH") else "")
        penv["PYTHONUNBUFFERED"] = "1"
        if env.cpu:
            penv.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
        else:
            penv.pop("TRITON_INTERPRET", None)
        self.log_path = run_dir.parent / f"{name}.log"
        sec.log(f"  launching {name}: torchrun --nproc-per-node 1 train_worker.py"
                + (f" --send-signal-at {signal_at}" if signal_at else "") + f" (log {self.log_path})")
        self.started = _now()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=penv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        with open(self.log_path, "w") as fh:
            for line in self.proc.stdout:
                fh.write(line)
                if line.startswith(_ECHO) or any(m in line for m in _ECHO[3:]):
                    log(f"[f]   | {self.name}: {line.rstrip()[:200]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the process group this launch started
            self.proc.wait()

    def wait(self) -> Dict[str, Any]:
        """The worker's rank0.json (exit code, losses) plus the wall time."""
        try:
            rc = self.proc.wait(timeout=max(self.sec.remaining(), 1))
        except BaseException:
            self.kill()
            raise
        finally:
            self.reader.join(timeout=10)
        wall = _now() - self.started
        if rc != 0:
            tail = self.log_path.read_text()[-3000:] if self.log_path.exists() else ""
            raise RuntimeError(f"{self.name}: torchrun exited {rc} after {wall:.0f} s\n{tail}")
        result = json.loads((self.out_dir / "rank0.json").read_text())
        result["wall_s"] = wall
        result["losses"] = {int(k): v for k, v in result["losses"].items()}
        self.sec.log(f"  {self.name}: exit code {result['exit_code']}, {len(result['losses'])} iterations, "
                     f"{wall:.1f} s wall")
        return result


def _metrics(run_dir: Path) -> List[Dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def section_f(sec: Section, env: Env) -> None:
    z = env.sizes["f"]
    N, k = z["iterations"], z["signal_at"]
    bases = _bases(z["groups"], env.cpu)
    overrides = [
        f"model.num_layers={z['layers']}", f"model.hidden_size={z['hidden']}", f"model.ffn_hidden_size={z['ffn']}",
        f"model.num_attention_heads={z['heads']}", f"model.num_query_groups={z['groups']}",
        f"model.vocab_size={z['vocab']}", f"model.max_position_embeddings={z['seq']}",
        "model.position.bases=[" + ",".join(repr(float(b)) for b in bases) + "]",
        f"data.seq_length={z['seq']}", "data.micro_batch_size=1", f"data.global_batch_size={z['global_batch']}",
        f"training.iterations={N}", "training.precision=bf16", f"optimizer.lr={z['lr']}",
        f"optimizer.min_lr={z['lr'] / 10:g}", "scheduler.warmup_iterations=2",
        "parallel.distributed_optimizer=true", "parallel.overlap_grad_reduce=true",
        "parallel.overlap_param_gather=true", "checkpoint.save_interval=0", "logging.interval=1",
        "logging.progress_bar=false", "logging.tensorboard=false",
    ]
    hd = z["hidden"] // z["heads"]
    params = (2 * z["vocab"] * z["hidden"] + z["layers"] * (
        z["hidden"] * (z["hidden"] + 2 * z["groups"] * hd) + z["hidden"] ** 2 + 3 * z["hidden"] * z["ffn"]))
    sec.number("model", dict(layers=z["layers"], hidden=z["hidden"], heads=z["heads"], groups=z["groups"],
                             ffn=z["ffn"], vocab=z["vocab"], seq=z["seq"], global_batch=z["global_batch"],
                             approx_parameters=params, bases=bases, iterations=N, signal_at=k))
    sec.log(f"model ~{params / 1e6:.2f}M parameters, seq {z['seq']}, {z['global_batch']} sequences/iteration, "
            f"{N} iterations; SIGTERM after {k}")
    sec.number("overrides", overrides)
    root = env.work / "f_train"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    launches: List[_TrainLaunch] = []
    try:
        # On the GPU one run at a time (its throughput is measured); on CPU the uninterrupted run and the
        # interrupted one run side by side (independent run directories) to keep CPU mode under a minute.
        straight_launch = _TrainLaunch(sec, env, "straight", root / "straight", overrides)
        launches.append(straight_launch)
        if env.cuda:
            straight = straight_launch.wait()
        first_launch = _TrainLaunch(sec, env, "interrupted", root / "resumed", overrides, signal_at=k)
        launches.append(first_launch)
        if env.cpu:
            straight = straight_launch.wait()
        sec.check("uninterrupted run finishes", straight["exit_code"] == 0 and sorted(straight["losses"]) ==
                  list(range(1, N + 1)), value=f"exit {straight['exit_code']}, iterations {len(straight['losses'])}")
        first = first_launch.wait()
        latest = (root / "resumed" / "checkpoints" / "latest")
        latest_text = latest.read_text().strip() if latest.exists() else None
        sec.check("SIGTERM after iteration %d: checkpoint and exit code 75 (requeue)" % k,
                  first["exit_code"] == 75 and sorted(first["losses"]) == list(range(1, k + 1))
                  and latest_text == f"iter_{k:07d}",
                  value=f"exit {first['exit_code']}, iterations {sorted(first['losses'])[-1:]}, latest {latest_text}",
                  detail=first.get("reason", ""))
        second_launch = _TrainLaunch(sec, env, "resumed", root / "resumed", overrides)
        launches.append(second_launch)
        second = second_launch.wait()
        sec.check("resumed run finishes the remaining iterations", second["exit_code"] == 0
                  and sorted(second["losses"]) == list(range(k + 1, N + 1)),
                  value=f"exit {second['exit_code']}, iterations {sorted(second['losses'])[:1]}..")
        # the loss traces
        combined = {**first["losses"], **second["losses"]}
        ref = straight["losses"]
        common = sorted(set(combined) & set(ref))
        diffs = {i: abs(combined[i] - ref[i]) for i in common}
        pre = max((diffs[i] for i in common if i <= k), default=0.0)
        post = max((diffs[i] for i in common if i > k), default=0.0)
        identical = combined == ref
        sec.number("loss_trace", {"straight": ref, "interrupted_then_resumed": combined})
        sec.number("trace_max_abs_diff", {"before_signal": pre, "after_resume": post})
        if identical:
            sec.check("resumed loss trace == uninterrupted trace (bit-identical)", True,
                      value=f"{len(common)} iterations identical", tolerance="exact")
        else:
            nondeterministic = env.cuda and pre > 0
            sec.check("resumed loss trace == uninterrupted trace (bit-identical)", False,
                      value={"max_abs_diff_after_resume": post, "max_abs_diff_before_signal": pre},
                      tolerance="exact", warn=nondeterministic,
                      detail=("NOT bit-identical; iterations 1..%d of the two runs (same code, no resume involved) "
                              "already differ by %.3g, so the device's kernels are not deterministic here and "
                              "bit-identity cannot be shown; judge the post-resume difference against that"
                              % (k, pre)) if nondeterministic else
                      "NOT bit-identical: the runs agree before the signal and differ after the resume")
        rows = [[i, f"{ref.get(i, float('nan')):.6f}", f"{combined.get(i, float('nan')):.6f}",
                 f"{diffs.get(i, float('nan')):.3g}"] for i in range(1, N + 1)]
        sec.table("loss per iteration", ["iteration", "uninterrupted", "interrupted + resumed", "abs diff"], rows)
        # throughput from the uninterrupted run's metrics.jsonl
        recs = [r for r in _metrics(root / "straight") if "loss" in r]
        resumed_recs = [r for r in _metrics(root / "resumed") if "loss" in r]
        sec.check("resumed run's metrics.jsonl lists every iteration once", sorted(r["iteration"] for r in resumed_recs)
                  == list(range(1, N + 1)), value=f"{len(resumed_recs)} records")
        steady = [r for r in recs if r["iteration"] > min(3, N // 2)]
        tps = [r["tokens_per_s"] for r in steady if r.get("tokens_per_s") is not None]
        mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
        spi = [r["seconds_per_iteration"] for r in steady if r.get("seconds_per_iteration") is not None]
        peak = max((r.get("peak_memory_bytes") or 0 for r in recs), default=None)
        thr = dict(tokens_per_s_median=statistics.median(tps) if tps else None,
                   mfu_median=statistics.median(mfu) if mfu else None,
                   seconds_per_iteration_median=statistics.median(spi) if spi else None,
                   peak_memory_bytes=peak, iterations_counted=len(steady),
                   wall_s={"straight": straight["wall_s"], "interrupted": first["wall_s"],
                           "resumed": second["wall_s"]})
        sec.number("throughput", thr)
        label = f"  [{CPU_LABEL}]" if env.cpu else ""
        sec.log(f"  throughput (iterations > {min(3, N // 2)}): {thr['tokens_per_s_median'] or 0:,.0f} tokens/s, "
                f"MFU {('%.1f%%' % (100 * thr['mfu_median'])) if thr['mfu_median'] is not None else 'n/a'} "
                f"(peak 989 TFLOP/s bf16), {thr['seconds_per_iteration_median'] or 0:.3f} s/iteration, "
                f"peak memory {_gib(peak)}{label}")
        sec.table("throughput (uninterrupted run, metrics.jsonl)" + (f" [{CPU_LABEL}]" if env.cpu else ""),
                  ["tokens/s (median)", "MFU (median)", "s/iteration (median)", "peak memory", "wall s (straight / "
                   "interrupted / resumed)"],
                  [[f"{thr['tokens_per_s_median'] or 0:,.0f}",
                    "-" if thr["mfu_median"] is None else f"{100 * thr['mfu_median']:.1f}%",
                    f"{thr['seconds_per_iteration_median'] or 0:.3f}", _gib(peak),
                    f"{straight['wall_s']:.0f} / {first['wall_s']:.0f} / {second['wall_s']:.0f}"]],
                  note="MFU against the trainer's default peak (989 TFLOP/s dense bf16, H100/H200 SXM); wall time "
                       "includes start-up, model build and checkpoint writes")
    finally:
        for launch in launches:
            launch.kill()
        if not env.keep_checkpoints:
            for ckpt in root.glob("*/checkpoints"):
                shutil.rmtree(ckpt, ignore_errors=True)


# ============================================================================ g. fused-RoPE benchmark
def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_rope", REPO / "tools" / "bench_rope.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def section_g(sec: Section, env: Env) -> None:
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
                table.append([seq, name, path, _ms(e["fwd"]["median_s"]), f"{e['fwd']['gbps']:.0f}",
                              f"{e['fwd']['pct_of_copy']:.1f}%", _ms(e["fwd_bwd"]["median_s"]),
                              f"{e['fwd_bwd']['gbps']:.0f}", f"{e['fwd_bwd']['pct_of_copy']:.1f}%",
                              bench._fmt_bytes(e["extra_bytes"])])
            table.append([seq, name, "copy (d2d)", _ms(row["copy"]["median_s"]), f"{row['copy']['gbps']:.0f}",
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
            _free(env)
    summary = bench.summary(rows, env.cpu)
    log(summary)
    sec.number("bench_summary", summary)
    sec.number("bench_rows", rows)
    sec.table(f"bench_rope: bf16, median of {z['repeat']} ({'CUDA events' if env.cuda else 'perf_counter'})" + (f" [{CPU_LABEL}]" if env.cpu else ""),
              ["seq", "shape", "path", "fwd ms", "fwd GB/s", "fwd % copy", "fwd+bwd ms", "fwd+bwd GB/s",
               "fwd+bwd % copy", "extra memory"], table,
              note="GB/s counts the bytes the rotation must move (q, k read and written once; x2 fwd+bwd); extra "
                   "memory = max_memory_allocated beyond inputs/outputs (unfused: table + cos/sin)")
    if env.cpu:
        sec.skip("bandwidth targets", "CPU mode: no performance numbers")


# ============================================================================ h. planner vs one GPU step
#: The row fields of section h: (key in numbers["plans"], column of the markdown table), one to one.
H_COLUMNS = (("plan", "plan"), ("seq", "seq"), ("backend", "spec"), ("rope", "RoPE"), ("layout", "layout"),
             ("weights", "weights"), ("grads", "grads"), ("optimizer", "optimizer"),
             ("activations", "activations"), ("peak", "peak allocated"), ("result", "result"), ("seconds", "s"))
#: measured / planned must lie within 1 +- tolerance (model state is exact by construction; activations and
#: the step's peak are modelled).
H_TOLERANCE = {"weights": 0.01, "grads": 0.01, "optimizer": 0.01, "activations": 0.10, "peak": 0.10}
H_TOLERANCE_TEXT = "measured / planned: model state within 1%, activations and peak within 10%"


def _h_model(z: Dict[str, Any]):
    from megatron_harpe.planning.spec import PRESETS, ModelShape

    if z["model"] == "tiny":
        return PRESETS["tiny"]
    # Llama-2-7B's width (hidden 4096, FFN 11008, 32 heads x 128, MHA, vocab 32000), fewer layers
    return ModelShape(z["layers"], 4096, 11008, 32, 32, 128, 32000, position="harpe",
                      name=f"llama2-7b-width-{z['layers']}-layers")


def _h_plans(env: Env, te: bool) -> List[Dict[str, Any]]:
    """The plans of section h, cheapest and most informative first: the shorter sequence before the longer;
    at each, the plain layout, the unfused RoPE (its cos/sin terms and angle table), full recompute (the
    recompute working set), selective core_attn; Transformer Engine's spec (the modelled path) right after
    the plain local plan when TE imports, and more TE plans after both lengths; the distributed optimizer
    last (at DP 1 it only pads the buffers, which CPU runs check byte for byte)."""
    from megatron_harpe.planning.spec import Layout, Plan, Workload

    z = env.sizes["h"]
    model = _h_model(z)
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
def _h_world(sec: Section, env: Env):
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


def _h_measure(plan) -> Dict[str, Any]:
    """One plan built and stepped in this process (planning/measure.py; on a GPU two steps, the second's
    torch.cuda.max_memory_allocated as measured["peak_allocated"])."""
    from megatron_harpe.planning.measure import measure_in_process

    return measure_in_process([plan])[0]


def _h_estimate(plan, done: List[tuple], env: Env) -> float:
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


def _h_bytes(measured: Optional[float], planned: Optional[float]) -> str:
    ref = planned or measured or 0
    unit, div = next(((u, d) for u, d in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)) if ref >= d),
                     ("B", 1))
    show = lambda n: "-" if n is None else f"{n / div:.4g}"  # noqa: E731
    return f"{show(measured)} / {show(planned)} {unit}"


def _h_cell(comp: Optional[Dict[str, Any]], cpu: bool) -> str:
    if not comp:
        return "-"
    text = _h_bytes(comp["measured"], comp["planned"])
    if comp["ratio"] is None:
        return text + (" (CPU mode: not measured)" if cpu else "")
    return f"{text} = {comp['ratio']:.3f}" + ("" if comp["within"] else " (outside)")


def _h_publish(sec: Section, rows: List[Dict[str, Any]], env: Env) -> None:
    """(Re)write section h's rows and its table, so a section stopped half way still reports what ran."""
    sec.record["numbers"]["plans"] = _jsonable(rows)
    table_rows = []
    for r in rows:
        cells = []
        for key, _ in H_COLUMNS:
            v = r[key]
            if key in H_TOLERANCE:
                cells.append(_h_cell(v, env.cpu))
            elif key == "seconds":
                cells.append("-" if v is None else f"{v:.1f}")
            else:
                cells.append(v)
        table_rows.append(cells)
    title = ("measured / planned per plan (one process, micro-batch 1, bf16)"
             + (f" [{CPU_LABEL}]" if env.cpu else ""))
    table = {"title": title, "columns": [label for _, label in H_COLUMNS], "rows": _jsonable(table_rows),
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


def section_h(sec: Section, env: Env) -> None:
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
    plans = _h_plans(env, te)
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
        row = {key: None for key, _ in H_COLUMNS}
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
            _free(env)
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

    with _h_world(sec, env) as backend:
        sec.number("world", {"backend": backend, "size": 1})
        sec.log(f"world of one process, {backend}")
        index = 0
        try:
            for index, item in enumerate(plans):
                plan = item["plan"]
                est = _h_estimate(plan, done, env)
                left = sec.remaining()
                if left < est:
                    reason = f"time: needs ~{est:.0f} s, {max(left, 0):.0f} s left of the section's cap"
                    sec.skip(f"plan {label(item)}", reason)
                    rows.append(empty_row(item, "skipped (time)"))
                    _h_publish(sec, rows, env)
                    continue
                sec.log(f"  {label(item)} (~{est:.0f} s) ...")
                base = None
                started = _now()
                error = None
                try:
                    check_plan(plan)
                    base = baseline()
                    r = _h_measure(plan)
                except SectionTimeout:
                    raise
                except Exception as err:  # noqa: BLE001 - recorded; the next plan runs
                    error = (f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}",
                             traceback.format_exc())
                    r = None
                seconds = _now() - started
                done.append((item["seq"], seconds))
                if error is not None:
                    rows.append(empty_row(item, f"error: {error[0]}", seconds))
                    sec.record["error"] = ((sec.record["error"] or "") + f"plan {label(item)} raised:\n"
                                           + error[1][-3000:] + "\n")
                    sec.check(f"{label(item)}: builds, steps and is measured", False, value=error[0],
                              detail="traceback at the end of the section")
                    _h_publish(sec, rows, env)
                    free()
                    continue
                measured_count += 1
                meas, plnd = r["measured"], r["planned"]
                peak = None
                if meas.get("peak_allocated") is not None:
                    peak = int(meas["peak_allocated"]) - (base or 0)
                row = empty_row(item, "pass", seconds)
                ratios, outside = {}, []
                for comp, tol in H_TOLERANCE.items():
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
                results[item["id"]] = _jsonable({"label": label(item), "measured": meas, "planned": plnd,
                                                 "loss": r.get("loss"), "seconds": seconds, **extra})
                sec.check(f"{label(item)}: planned vs measured", not outside, value=ratios, tolerance=H_TOLERANCE_TEXT,
                          detail=("outside: " + ", ".join(outside)) if outside else "")
                del r, meas, plnd
                _h_publish(sec, rows, env)
                free()
        except SectionTimeout as err:
            # the hard stop fired inside a plan: it and the plans after it are recorded as not run
            for item in plans[index:]:
                if any(row["plan"] == item["id"] for row in rows):
                    continue
                rows.append(empty_row(item, ("timeout" if item is plans[index] else "skipped")
                                      + " (the section's cap)"))
            _h_publish(sec, rows, env)
            raise SectionTimeout(f"during plan {plans[index]['id']}: {err}") from None
    _h_publish(sec, rows, env)
    sec.check("at least one plan measured", measured_count > 0, value=f"{measured_count} of {len(plans)} plans")
    if env.cuda:
        bases = {k: v.get("allocated_before_plan") for k, v in results.items()}
        sec.number("allocated_before_plan_bytes", bases)
        known = [b for b in bases.values() if b is not None]
        if known and max(known) - min(known) > 2 ** 30:
            sec.note(f"memory allocated between plans grew from {_gib(min(known))} to {_gib(max(known))}: something "
                     "outlived its plan (each plan's peak is taken relative to its own start)")


SECTION_FUNCS = {"a": section_a, "b": section_b, "c": section_c, "d": section_d, "e": section_e, "f": section_f,
                 "g": section_g, "h": section_h}


# ============================================================================ the report
def _fmt_cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Dict[str, Any]) -> str:
    L: List[str] = []
    gpu = report.get("gpu") or {}
    L.append(f"# gpu_check report: {gpu.get('name') or 'CPU'} - {report['date']}")
    L.append("")
    if report["mode"] == "cpu":
        L.append(f"**{CPU_LABEL}.** Tiny sizes, Triton's interpreter for the fused kernel, gloo; timings below "
                 "only show that the timing code runs.")
        L.append("")
    L.append(f"- summary: `{report.get('summary', '(running)')}`")
    L.append(f"- mode: {report['mode']}; command: `{report['command']}`; duration {report.get('duration_s', 0):.0f} s "
             f"of a {report['budget_s']:.0f} s budget")
    L.append(f"- host: {report['host']}; git commit: {report.get('git_commit') or 'unknown'}"
             + (f"; file as `{report['suggested_report_path']}`" if report.get("suggested_report_path") else ""))
    if gpu:
        L.append(f"- GPU: {gpu.get('name')}, {gpu.get('memory')}, compute capability {gpu.get('compute_capability')}, "
                 f"{gpu.get('multiprocessors')} SMs, driver {gpu.get('driver')}")
    versions = report.get("versions") or {}
    if versions:
        L.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    L.append("")
    L.append("| section | status | checks passed / failed / warned | targets met / missed | time (cap) |")
    L.append("|---|---|---|---|---|")
    for key, sec in report["sections"].items():
        checks = [c for c in sec["checks"] if c["kind"] == "check"]
        targets = [c for c in sec["checks"] if c["kind"] == "target"]
        cnt = lambda lst, r: sum(1 for c in lst if c["result"] == r)  # noqa: E731
        dur = sec.get("duration_s")
        L.append(f"| {key}. {sec['title']} | {sec['status']} | {cnt(checks, 'pass')} / {cnt(checks, 'fail')} / "
                 f"{cnt(checks, 'warn')} | {cnt(targets, 'met')} / {cnt(targets, 'missed')} | "
                 f"{'-' if dur is None else f'{dur:.1f} s'} ({sec['cap_s']:.0f} s) |")
    L.append("")
    for key, sec in report["sections"].items():
        L.append(f"## {key}. {sec['title']}")
        L.append("")
        L.append(f"Proves: {sec['proves']}.")
        L.append("")
        L.append(f"Status: **{sec['status']}**" + (f", {sec['duration_s']:.1f} s" if sec.get("duration_s") is not None
                                                     else "") + f" (cap {sec['cap_s']:.0f} s)")
        L.append("")
        if sec["checks"]:
            L.append("| check | result | value | tolerance / goal |")
            L.append("|---|---|---|---|")
            for c in sec["checks"]:
                name = c["name"] + (" (target)" if c["kind"] == "target" else "")
                val = _short(c["value"]) if not isinstance(c["value"], str) else c["value"]
                if c.get("detail") and c["result"] not in ("pass", "met"):
                    val += f" - {c['detail']}"
                L.append(f"| {_fmt_cell(name)} | {c['result'].upper()} | {_fmt_cell(val)} | {_fmt_cell(c['tolerance'])} |")
            L.append("")
        for t in sec["tables"]:
            L.append(f"**{t['title']}**")
            L.append("")
            L.append("| " + " | ".join(_fmt_cell(c) for c in t["columns"]) + " |")
            L.append("|" + "---|" * len(t["columns"]))
            for row in t["rows"]:
                L.append("| " + " | ".join(_fmt_cell(c) for c in row) + " |")
            if t.get("note"):
                L.append("")
                L.append(f"_{t['note']}_")
            L.append("")
        scalars = {k: v for k, v in sec["numbers"].items() if k not in ("bench_rows", "loss_trace", "plans",
                                                                         "results")}
        if scalars:
            L.append("<details><summary>numbers</summary>")
            L.append("")
            L.append("```json")
            L.append(json.dumps(scalars, indent=1)[:20000])
            L.append("```")
            L.append("</details>")
            L.append("")
        for n in sec["notes"]:
            L.append(f"- note: {n}")
        for s in sec["skipped"]:
            L.append(f"- skipped: {s['part']}: {s['reason']}")
        if sec["notes"] or sec["skipped"]:
            L.append("")
        if sec.get("error"):
            L.append("```")
            L.append(sec["error"].rstrip()[-6000:])
            L.append("```")
            L.append("")
    return "\n".join(L) + "\n"


def write_report(report: Dict[str, Any], out: Path) -> None:
    from megatron_harpe.files import atomic_write_text

    atomic_write_text(out / "gpu_check.json", json.dumps(report, indent=1, default=str) + "\n")
    atomic_write_text(out / "gpu_check.md", render_markdown(report))


def _git_commit() -> Optional[str]:
    """The checkout's commit; GPU_CHECK_COMMIT where the tree is a copy without .git (the lent device)."""
    if os.environ.get("GPU_CHECK_COMMIT"):
        return os.environ["GPU_CHECK_COMMIT"]
    try:
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10)
        return proc.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


# ============================================================================ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check_out", help="where gpu_check.json and gpu_check.md go")
    ap.add_argument("--work", default=None, help="run directories and logs of section f (default <out>/work); "
                    "on the lent device put it outside $OUT, which returns at most 8 files")
    ap.add_argument("--cpu", action="store_true", help="CPU mode even where CUDA exists (tiny sizes, correctness only)")
    ap.add_argument("--sections", default=",".join(SECTION_ORDER), help="comma-separated subset of a,b,c,d,e,f,g,h")
    ap.add_argument("--quick", action="store_true", help="smaller GPU sizes (a smoke run)")
    ap.add_argument("--budget", type=float, default=None, help="whole-run time budget in seconds (default: gpu 520, "
                    "quick 390, cpu 300); later sections are skipped when it runs out")
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
    t0 = _now()
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
    from megatron_harpe.backends import setup_backend

    setup_backend(force_cpu=not cuda)
    env = Env(args, cuda)
    env.out.mkdir(parents=True, exist_ok=True)
    env.work.mkdir(parents=True, exist_ok=True)
    budget = args.budget if args.budget is not None else BUDGET[env.mode]
    deadline = t0 + budget
    caps = CAPS[env.mode]
    report: Dict[str, Any] = {
        "tool": "tools/gpu_check.py", "mode": env.mode, "label": CPU_LABEL if env.cpu else None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(), "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None
                                                                                  else sys.argv[1:])),
        "git_commit": _git_commit(), "budget_s": budget, "caps_s": caps, "sizes": SIZES[env.mode],
        "gpu": None, "versions": None, "sections": {}, "summary": None, "exit_code": None}
    banner = f"gpu_check: mode {env.mode}" + (f" - {CPU_LABEL}" if env.cpu else "") + \
        f"; sections {','.join(args.sections)}; budget {budget:.0f} s; report in {env.out}"
    log(banner)
    if interpret_note:
        log(f"note: {interpret_note}")

    def on_alarm(signum, frame):
        raise SectionTimeout("the section's time cap was reached")

    for key in args.sections:
        left = deadline - _now()
        cap = min(caps[key], left)
        if left < 3:
            report["sections"][key] = {
                "key": key, "title": TITLES[key], "proves": PROVES[key], "cap_s": 0.0, "duration_s": 0.0,
                "status": f"skipped: the run's {budget:.0f} s budget is spent", "checks": [], "numbers": {},
                "tables": [], "notes": [], "skipped": [], "error": None}
            log(f"[{key}] skipped: the run's budget is spent")
            write_report(report, env.out)
            continue
        sec = Section(key, cap)
        report["sections"][key] = sec.record
        log(f"\n[{key}] === {TITLES[key]} (cap {cap:.0f} s) ===")
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
            _free(env)
        except Exception as err:  # noqa: BLE001 - a broken CUDA context shows in the next sections too
            sec.note(f"freeing memory after the section failed: {err}")
        sec.record["duration_s"] = round(_now() - sec.started, 2)
        if key == "a":
            report["gpu"] = sec.record["numbers"].get("gpu")
            report["versions"] = sec.record["numbers"].get("versions")
        n_pass = sum(1 for c in sec.record["checks"] if c["result"] == "pass")
        n_fail = sum(1 for c in sec.record["checks"] if c["result"] == "fail")
        log(f"[{key}] {sec.record['status'].upper()} in {sec.record['duration_s']:.1f} s "
            f"({n_pass} checks passed, {n_fail} failed)")
        write_report(report, env.out)

    sections = report["sections"]
    checks = [c for s in sections.values() for c in s["checks"]]
    n = lambda kind, res: sum(1 for c in checks if c["kind"] == kind and c["result"] == res)  # noqa: E731
    ok_sections = [k for k, s in sections.items() if s["status"] == "ok"]
    bad_sections = [f"{k}:{s['status'].split(':')[0]}" for k, s in sections.items() if s["status"] != "ok"]
    exit_code = 0 if len(ok_sections) == len(sections) else 1
    gpu = (report.get("gpu") or {}).get("name") if env.cuda else "CPU"
    report["duration_s"] = round(_now() - t0, 1)
    missed = [c["name"] for c in checks if c["kind"] == "target" and c["result"] == "missed"]
    report["summary"] = (
        f"gpu_check {'PASS' if exit_code == 0 else 'FAIL'}: {len(ok_sections)}/{len(sections)} sections ok"
        + (f" (not ok: {', '.join(bad_sections)})" if bad_sections else "")
        + f"; checks {n('check', 'pass')} passed, {n('check', 'fail')} failed, {n('check', 'warn')} warned; "
        f"targets {n('target', 'met')} met, {n('target', 'missed')} missed; {report['duration_s']:.0f} s; "
        f"{gpu}; mode {env.mode}" + (" (correctness only)" if env.cpu else ""))
    report["targets_missed"] = missed
    slug = "".join(c if c.isalnum() else "-" for c in (gpu or "cpu").lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    report["suggested_report_path"] = f"docs/gpu/{report['date'][:10]}-{slug}.md" if env.cuda else None
    report["exit_code"] = exit_code
    write_report(report, env.out)
    log("")
    log(f"report: {env.out / 'gpu_check.md'}"
        + (f" (commit it as {report['suggested_report_path']})" if env.cuda else ""))
    log(report["summary"])
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
