"""Peak memory of conversions, measured in a fresh process.

    result = probe(["hf-to-megatron", "megatron-to-hf"], hf_dir, work_dir)
    result.phases["hf-to-megatron"].above_baseline   # bytes the conversion added at its peak
    python -m megatron_harpe.convert.memory_probe SRC WORK imports|hf-to-megatron|megatron-to-hf ...

Why a process of its own: peak RSS only grows. The child imports what a conversion imports, sets
up the one-process world, notes its resident memory then (the baseline: what merely running the
converter costs) and runs each phase in turn; after each phase the kernel's high-water mark is
read (`VmHWM`: the first phase's includes the imports), and before every later one it is reset to
the current RSS (Linux `/proc/self/clear_refs`). Not getrusage's ru_maxrss: Linux carries it over from the forked parent through exec,
so a child of a large process (a pytest run holding a model) reports at least the parent's size.
Where the mark cannot be reset (not Linux), each phase needs its own child (`probe([...one...])`).

`hf-to-megatron` writes WORK/megatron from SRC (a HF directory); `megatron-to-hf` reads
WORK/megatron (or SRC when it is a megatron checkpoint and no hf-to-megatron phase ran) and writes
WORK/hf. The child prints one JSON line, its last. tools/bench_convert_memory.py prints the table;
tests/test_convert_streaming.py checks that the peak does not grow with the number of layers.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

PHASES = ("imports", "hf-to-megatron", "megatron-to-hf")
_MARK = "MEMORY_PROBE "


@dataclass
class Phase:
    peak: int  # bytes: the process's peak RSS during the phase
    baseline: int  # bytes: its RSS after the imports and the world's setup, before any phase
    seconds: float

    @property
    def above_baseline(self) -> int:
        return self.peak - self.baseline


@dataclass
class ProbeResult:
    baseline: int
    phases: Dict[str, Phase] = field(default_factory=dict)


def _status(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int:
    value = _status("VmRSS")
    return value if value is not None else peak_rss()


def peak_rss() -> int:
    value = _status("VmHWM")
    if value is not None:
        return value
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def reset_peak() -> bool:
    """Set the high-water mark to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def probe(phases: Sequence[str], source: str | Path, work: str | Path, *, max_shard_size: str = "5GB",
          env: Optional[dict] = None, cwd: Optional[str | Path] = None, timeout: float = 3600) -> ProbeResult:
    """Run `phases` (see PHASES) in order in one fresh Python process; the peak of each."""
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise ValueError(f"unknown phase(s) {unknown}; choose from {PHASES}")
    command = [sys.executable, "-m", "megatron_harpe.convert.memory_probe", str(source), str(work), *phases,
               "--max-shard-size", max_shard_size]
    child_env = dict(os.environ)
    child_env.setdefault("OMP_NUM_THREADS", "1")
    child_env.update(env or {})
    done = subprocess.run(command, capture_output=True, text=True, env=child_env, timeout=timeout,
                          cwd=str(cwd) if cwd else None)
    lines = [line for line in done.stdout.splitlines() if line.startswith(_MARK)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"memory probe {list(phases)} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-6000:]}")
    data = json.loads(lines[-1][len(_MARK):])
    return ProbeResult(baseline=data["baseline"], phases={k: Phase(**v) for k, v in data["phases"].items()})


def _child(source: str, work: str, phases: Sequence[str], max_shard_size: str) -> None:
    from megatron_harpe.backends import setup_backend

    setup_backend(force_cpu=True)
    from megatron_harpe.convert.hf_to_megatron import convert_hf_to_megatron
    from megatron_harpe.convert.megatron_io import single_process_world
    from megatron_harpe.convert.megatron_to_hf import convert_megatron_to_hf

    with single_process_world():  # what every conversion sets up first (created and removed again)
        pass
    work_dir = Path(work)
    megatron_dir = work_dir / "megatron"
    baseline = current_rss()
    results: Dict[str, dict] = {}
    for i, phase in enumerate(phases):
        if i and not reset_peak():  # (the first phase's peak includes the imports' own)
            raise RuntimeError("the peak RSS cannot be reset here (no /proc/self/clear_refs): probe one phase per "
                               "process")
        started = time.perf_counter()
        if phase == "hf-to-megatron":
            convert_hf_to_megatron(source, megatron_dir, overwrite=True, show_progress=False)
        elif phase == "megatron-to-hf":
            load = megatron_dir if "hf-to-megatron" in phases else source
            convert_megatron_to_hf(load, work_dir / "hf", max_shard_size=max_shard_size, overwrite=True,
                                   show_progress=False)
        results[phase] = {"peak": peak_rss(), "baseline": baseline, "seconds": time.perf_counter() - started}
    print(_MARK + json.dumps({"baseline": baseline, "phases": results}), flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m megatron_harpe.convert.memory_probe",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("source", help="HF directory (or a megatron checkpoint for megatron-to-hf alone)")
    parser.add_argument("work", help="directory for the outputs")
    parser.add_argument("phases", nargs="+", choices=PHASES)
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args(argv)
    _child(args.source, args.work, args.phases, args.max_shard_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
