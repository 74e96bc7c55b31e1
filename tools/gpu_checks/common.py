"""What every section shares: the run's plan (titles, sizes and time caps per mode), the Section that
records a section's results and keeps its deadline, the Env that describes the machine, and the timing and
memory helpers."""
from __future__ import annotations

import gc
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]

CPU_LABEL = "CPU mode: correctness only, no performance numbers"
# The run order: j (harpe-preflight) right after f, so that it runs before the benchmark and planner sections g
# and h, which the budget cuts first. Sections are looked up by key everywhere; only this string orders them.
SECTION_ORDER = "abcdefjghi"
TITLES = {
    "a": "environment",
    "b": "HARPE rotary on the device (table + megatron-core apply, fused kernel) vs float64",
    "c": "context-parallel slicing: megatron-core's get_pos_emb_on_this_cp_rank vs the rotary module",
    "d": "SDPA core attention: flash backend, causal and lower-right (CP chunk), time and memory",
    "e": "one Llama-2-7B-shaped layer, fwd+bwd: one-base RoPE vs HARPE table vs HARPE fused",
    "f": "harpe-train on one device: distributed optimizer + overlaps, SIGTERM, exact resume, tokens/s, MFU",
    "g": "fused-RoPE benchmark (tools/bench_rope.py)",
    "h": "planner vs one GPU step: harpe-plan's memory model against a built model's bytes and peak",
    "i": "two-rank layouts vs one rank: TP=2 + SP, CP=2 per cp_comm_type, packed documents, FP8 attention",
    "j": "harpe-preflight on the paper's config twin",
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
    "i": "the parallel layouts a multi-GPU run uses (TP with sequence parallelism; CP with each communication "
         "type Transformer Engine allows here; packed documents under CP; FP8 attention) compute the one-rank "
         "model's loss and gradients on the same batch and weights, on the device's own collectives",
    "j": "harpe-preflight, the check a run makes before it starts, passes on the device for the paper's 7B / 128k "
         "config (its twin reduced to the GPUs at hand): environment, the full run's memory plan, layout parity, "
         "rotary angles at far positions, accounting, the twin's memory, and FP8 against bf16 where the GPU and "
         "Transformer Engine allow",
}

# Section j: harpe-preflight on this config (its own reduced twin: 2 layers, a short sequence), the layout cut to
# the GPUs at hand (TP = min(max_tensor, GPUs), CP 1), the full run's memory planned for full_run_gpus.
PREFLIGHT = dict(config="examples/llama2_7b_harpe_128k.yaml", full_run_gpus=32, max_tensor=8)

# Sizes per mode. gpu: the real check (~5-8.5 min on an H200); quick: a smoke run; cpu: tiny, correctness only.
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
        "i": dict(layers=2, hidden=512, heads=4, groups=2, ffn=1408, vocab=512, seq=512, batch=2,
                  eods=[[69, 200], [129, 130, 401, 511]]),
        "j": PREFLIGHT,
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
        "i": dict(layers=2, hidden=512, heads=4, groups=2, ffn=1408, vocab=512, seq=512, batch=2,
                  eods=[[69, 200], [129, 130, 401, 511]]),
        "j": PREFLIGHT,
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
        "i": dict(layers=2, hidden=64, heads=4, groups=2, ffn=128, vocab=128, seq=32, batch=2,
                  eods=[[4, 17], [9, 10, 30, 31]]),
        "j": {},  # skipped: tests/test_preflight.py runs harpe-preflight on CPU
    },
}
# Time caps per section (seconds) and the whole run's budget (520 s on a GPU: under the lent device's 600 s
# command limit); the estimates of what each section needs on an H200 are in docs/gpu_check.md. A section
# runs under min(its cap, the budget left); one that cannot start is recorded as skipped (budget spent). The
# caps of a-f and j (harpe-preflight, run right after f; not yet measured on a GPU) add up to 510 s, so g and
# h run in what the sections before them leave unused (they are the ones the budget cuts). Section i runs
# only with 2+ GPUs (on one GPU it skips at once): there the default budget grows by its cap
# (cli.default_budget), on the lent one-GPU device it stays 520 s.
CAPS = {
    "gpu": dict(a=15, b=45, c=25, d=60, e=85, f=130, g=60, h=90, i=120, j=150),
    "quick": dict(a=15, b=40, c=25, d=40, e=60, f=100, g=40, h=60, i=120, j=150),
    "cpu": dict(a=20, b=40, c=30, d=30, e=60, f=120, g=60, h=40, i=60, j=10),
}
BUDGET = {"gpu": 520.0, "quick": 390.0, "cpu": 300.0}


# ============================================================================ recording a section
class SectionTimeout(Exception):
    """A section ran past its cap; the rest of it is skipped."""


def now() -> float:
    return time.monotonic()


def log(msg: str) -> None:
    print(msg, flush=True)


class Section:
    def __init__(self, key: str, cap_s: float):
        self.key = key
        self.started = now()
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
        self.record["checks"].append({"name": name, "kind": "check", "result": result, "value": jsonable(value),
                                      "tolerance": tolerance, "detail": detail})
        self.log(f"  {result.upper():4s} {name}: {short(value)}" + (f"  (tolerance {tolerance})" if tolerance else "")
                 + (f"  {detail}" if detail and not ok else ""))
        return ok

    def target(self, name: str, met: bool, value: Any, goal: str, detail: str = "") -> None:
        self.record["checks"].append({"name": name, "kind": "target", "result": "met" if met else "missed",
                                      "value": jsonable(value), "tolerance": goal, "detail": detail})
        self.log(f"  {'MET ' if met else 'MISS'} target {name}: {short(value)} (goal {goal})")

    def number(self, key: str, value: Any) -> None:
        self.record["numbers"][key] = jsonable(value)

    def table(self, title: str, columns: List[str], rows: List[List[Any]], note: str = "") -> None:
        self.record["tables"].append({"title": title, "columns": columns, "rows": jsonable(rows), "note": note})

    def note(self, text: str) -> None:
        self.record["notes"].append(text)
        self.log(f"  note: {text}")

    def skip(self, part: str, reason: str) -> None:
        self.record["skipped"].append({"part": part, "reason": reason})
        self.log(f"  skipped: {part}: {reason}")

    # --- time
    def remaining(self) -> float:
        return self.deadline - now()

    def need(self, seconds: float, part: str) -> None:
        """Raise SectionTimeout unless about `seconds` are left for `part`."""
        left = self.remaining()
        if left < seconds:
            raise SectionTimeout(f"{part}: needs ~{seconds:.0f} s, {max(left, 0):.0f} s left of the section's "
                                 f"{self.record['cap_s']:.0f} s cap")


def short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {short(v)}" for k, v in value.items())
    return str(value)


def jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    try:
        import torch
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return jsonable(value.item())
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
def sync(env: Env) -> None:
    import torch

    if env.cuda:
        torch.cuda.synchronize()


def time_calls(env: Env, fn: Callable[[], Any], repeat: int, warmup: int) -> List[float]:
    """Seconds per call: CUDA events on the GPU, perf_counter on CPU."""
    import torch

    for _ in range(warmup):
        fn()
    sync(env)
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


def peak_extra(env: Env, fn: Callable[[], Any]) -> Optional[int]:
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


def gib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2 ** 30:.2f} GiB"


def ms(s: Optional[float]) -> str:
    return "-" if s is None else f"{s * 1e3:.3f}"


def free_memory(env: Env) -> None:
    """Collect garbage; on the GPU also hand the allocator's cached blocks back."""
    import torch

    gc.collect()
    if env.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def group_bases(n: int, cpu: bool) -> List[float]:
    """n bases, one per K/V group: the paper's Table 2 (every (32/n)-th) on the GPU; on CPU, where
    sequences are short, a spread from 1e4 to 5e6 so that every group's angles move visibly."""
    if cpu or 32 % n:
        return [float(round(1e4 * (500.0 ** (i / max(n - 1, 1))))) for i in range(n)]
    from megatron_harpe.rope.bases import PAPER_LLAMA2_7B_BASES

    return list(PAPER_LLAMA2_7B_BASES[:: 32 // n][:n])

