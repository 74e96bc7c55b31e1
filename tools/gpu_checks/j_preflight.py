"""Section j, harpe-preflight on the paper's config twin: `python -m megatron_harpe.preflight.cli` on
examples/llama2_7b_harpe_128k.yaml with mock data and no initial checkpoint, the layout reduced to the
GPUs at hand (one GPU: TP = CP = 1, one process; 2+ GPUs: TP = min(8, GPUs) with sequence parallelism under
torchrun, on NCCL), the full run's memory planned for its 32 GPUs; then once more with FP8 (hybrid) where
the GPU is sm89+ and Transformer Engine imports. Each preflight check becomes a check here ("not run" ones
notes), with its tolerance; the exit code, the reports' paths and the wall time are recorded.

CPU mode skips the section: tests/test_preflight.py runs harpe-preflight on CPU (gloo) already."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

from .common import REPO, Env, Section, log, now

#: the paper's run (SIZES[mode]["j"]: the config, its GPUs, the largest TP) made to run anywhere: mock data, no
#: tokenizer file, no converted checkpoint, CP = 1
OVERRIDES = ["training.init_from=null", "data.kind=mock", "data.tokenizer_model=null", "parallel.context=1"]
PAPER_HEADS = 32  # Llama-2-7B's attention heads (and K/V groups): TP must divide them
CPU_REASON = "CPU mode: covered by tests/test_preflight.py on CPU (gloo)"
#: torch.distributed's launch variables a child must not inherit (it is a launch of its own)
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
               "MASTER_PORT", "TORCHELASTIC_RUN_ID", "HARPE_PREFLIGHT_RANKS")
_ECHO = ("harpe-preflight", "  PASS", "  FAIL", "  ----", "Traceback", "Error", "error:")
TAIL_CHARS = 3000
MARGIN_S = 3.0  # the child is stopped this long before the section's cap (the hard stop is 5 s past it)


def tensor_parallel(gpus: int, max_tensor: int = 8) -> int:
    """The launch's ranks (= TP): min(max_tensor, GPUs), lowered to a divisor of the model's 32 heads (3 GPUs: 2)."""
    tp = max(1, min(max_tensor, gpus))
    while PAPER_HEADS % tp:
        tp -= 1
    return tp


def layout_overrides(tp: int) -> List[str]:
    """OVERRIDES and the layout: TP = tp with sequence parallelism as in the config (off at TP 1, where
    megatron-core refuses it); CP = 1, so DP = 1."""
    return [*OVERRIDES, f"parallel.tensor={tp}", f"parallel.sequence_parallel={'true' if tp > 1 else 'false'}"]


def preflight_command(z: Dict[str, Any], run_dir: Path, tp: int, extra: List[str], port: Optional[int] = None,
                      module: str = "megatron_harpe.preflight.cli") -> List[str]:
    """The command: one process for TP = 1, else torchrun with `tp` processes."""
    args = ["-m", module, "--config", z["config"], *layout_overrides(tp), *extra, f"run_dir={run_dir}",
            "--gpus", str(z["full_run_gpus"])]
    if tp == 1:
        return [sys.executable, *args]
    from megatron_harpe.parallel.launch import find_free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={tp}",
            "--master-addr=127.0.0.1", f"--master-port={port or find_free_port('127.0.0.1')}", *args]


def child_env(env: Env) -> Dict[str, str]:
    penv = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    penv["PYTHONPATH"] = str(REPO) + (os.pathsep + penv["PYTHONPATH"] if penv.get("PYTHONPATH") else "")
    penv["PYTHONUNBUFFERED"] = "1"
    if env.cuda:
        penv.pop("TRITON_INTERPRET", None)
    return penv


def launch(sec: Section, env: Env, name: str, cmd: List[str], log_path: Path) -> Dict[str, Any]:
    """Run `cmd` in its own process group, its output in `log_path` (progress lines echoed), stopped
    MARGIN_S before the section's cap. Returns exit code (None: stopped for time), wall time, output tail."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = now()
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)

        def pump():
            for line in proc.stdout:
                fh.write(line)
                if line.startswith(_ECHO) or any(m in line for m in _ECHO[4:]):
                    log(f"[j]   | {name}: {line.rstrip()[:200]}")

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        rc: Optional[int] = None
        try:
            rc = proc.wait(timeout=max(sec.remaining() - MARGIN_S, 1.0))
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # a timeout, or the section's alarm (SectionTimeout) while waiting: end the whole launch
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            reader.join(timeout=10)
    wall = now() - started
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return {"exit_code": rc, "wall_s": round(wall, 1), "tail": text[-TAIL_CHARS:]}


def _add_error(sec: Section, text: str) -> None:
    sec.record["error"] = (sec.record["error"] + "\n" if sec.record["error"] else "") + text


def record_run(sec: Section, env: Env, label: str, run_dir: Path, result: Dict[str, Any], command: List[str],
               copy_to: Path) -> Dict[str, Any]:
    """The launch's result and its preflight.json as checks (pass / fail; "not run" as notes), a table of
    the report (preflight.md's rows) and the run's row for the runs table. Returns that row."""
    rc, wall = result["exit_code"], result["wall_s"]
    js, md = run_dir / "preflight.json", run_dir / "preflight.md"
    row = {"run": label, "launch": None, "exit_code": rc, "wall_s": wall, "verdict": None,
           "preflight_json": None, "preflight_md": None}
    if rc is None:
        sec.check(f"{label}: harpe-preflight finishes within the section's cap", False,
                  value=f"stopped after {wall:.0f} s", detail="output tail in the section's error block")
        _add_error(sec, f"{label}: harpe-preflight stopped after {wall:.0f} s (the section's cap); "
                        f"the end of its output:\n{result['tail']}")
        return row
    if not js.exists():
        sec.check(f"{label}: harpe-preflight wrote preflight.json", False, value=f"exit code {rc}, no {js}",
                  detail="output tail in the section's error block")
        _add_error(sec, f"{label}: harpe-preflight exited {rc} after {wall:.0f} s without writing {js}; "
                        f"the end of its output:\n{result['tail']}")
        return row
    report = json.loads(js.read_text())
    copy_to.mkdir(parents=True, exist_ok=True)  # the reports where gpu_check's own go (the twin's files stay)
    row["preflight_json"] = str(shutil.copy2(js, copy_to / js.name))
    if md.exists():
        row["preflight_md"] = str(shutil.copy2(md, copy_to / md.name))
    row["verdict"], row["launch"] = report.get("verdict"), report.get("launch")
    sec.check(f"{label}: harpe-preflight exit code", rc == 0, value=rc,
              tolerance="0 (5: a check failed, 2: bad input)", detail=str(report.get("verdict", "")))
    rows = []
    for c in report.get("checks", []):
        name, status = str(c.get("name")), str(c.get("status"))
        summary, tolerance = str(c.get("summary", "")), str(c.get("tolerance") or "")
        seconds = c.get("seconds")
        rows.append([name, status.upper(), summary, tolerance or "-",
                     f"{seconds:.1f} s" if isinstance(seconds, (int, float)) else "-"])
        if status == "not run":
            sec.note(f"{label}: {name}: not run: {summary}")
        else:  # pass, fail (anything else is not a pass either)
            sec.check(f"{label}: {name}", status == "pass", value=summary, tolerance=tolerance,
                      detail="" if status in ("pass", "fail") else f"status {status!r}")
    header = {k: v for k, v in report.items() if k not in ("checks", "passed")}
    sec.table(f"{label}: preflight.md", ["check", "result", "what was measured", "tolerance", "time"], rows,
              note="; ".join(f"{k}: {v}" for k, v in header.items()))
    results = sec.record["numbers"].setdefault("results", {})  # the full answers (not printed in the markdown)
    results[label] = {"command": " ".join(command), "exit_code": rc, "wall_s": wall, "preflight_json": report,
                      "preflight_md": md.read_text() if md.exists() else None}
    return row


def run(sec: Section, env: Env) -> None:
    if env.cpu:
        sec.skip("the whole section", CPU_REASON)
        return
    import torch

    z = env.sizes["j"]
    gpus = torch.cuda.device_count()
    tp = tensor_parallel(gpus, z["max_tensor"])
    cc = tuple(torch.cuda.get_device_capability())
    try:
        from megatron_harpe.models.spec import transformer_engine_available

        te = transformer_engine_available()
    except Exception:  # noqa: BLE001 - judged as "no TE"
        te = False
    sec.number("layout", dict(gpus_visible=gpus, ranks=tp, tensor=tp, context=1, sequence_parallel=tp > 1,
                              compute_capability=list(cc), transformer_engine=te, full_run_gpus=z["full_run_gpus"]))
    sec.log(f"{gpus} GPU(s): {'one process' if tp == 1 else f'torchrun, {tp} ranks'}, TP {tp}, CP 1; "
            f"compute capability {cc[0]}.{cc[1]}, Transformer Engine {'imports' if te else 'absent'}")
    runs = [("preflight", "bf16", [])]
    if cc >= (8, 9) and te:
        runs.append(("preflight_fp8", "fp8 hybrid", ["fp8.format=hybrid"]))
    else:
        sec.skip("the FP8 run (fp8.format=hybrid)", "needs compute capability >= 8.9 and Transformer Engine: "
                 f"{cc[0]}.{cc[1]}, TE {'imports' if te else 'absent'}")
    root = env.work / "j_preflight"
    table = []
    try:
        for i, (name, label, extra) in enumerate(runs):
            if i:  # the FP8 run only where about one more preflight's time is left
                need = max(30.0, table[0]["wall_s"])
                if table[0]["exit_code"] is None or sec.remaining() - MARGIN_S < need:
                    sec.skip(f"the {label} run", f"time: needs ~{need:.0f} s, {max(sec.remaining(), 0):.0f} s "
                             f"left of the section's {sec.record['cap_s']:.0f} s cap")
                    break
            run_dir = root / name
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.rmtree(env.out / name, ignore_errors=True)  # an earlier run's copies of the reports
            cmd = preflight_command(z, run_dir, tp, extra)
            sec.log(f"  {label}: {' '.join(cmd[1:])}")
            result = launch(sec, env, label, cmd, root / f"{name}.log")
            sec.log(f"  {label}: exit code {result['exit_code']}, {result['wall_s']:.1f} s wall "
                    f"(log {root / name}.log)")
            table.append(record_run(sec, env, label, run_dir, result, cmd, env.out / name))
    finally:
        if table:
            sec.number("runs", table)
            sec.table("harpe-preflight runs", ["run", "launch", "exit code", "wall s", "verdict", "preflight.json",
                                               "preflight.md"],
                      [[r["run"], r["launch"] or "-", "stopped (time)" if r["exit_code"] is None else r["exit_code"],
                        r["wall_s"], r["verdict"] or "-", r["preflight_json"] or "-", r["preflight_md"] or "-"]
                       for r in table],
                      note=f"{z['config']} with {' '.join(layout_overrides(tp))}, --gpus {z['full_run_gpus']}; "
                           f"run directories and logs under {root}")
        if not env.keep_checkpoints:  # what a stopped preflight left of the twin
            for work in root.glob("*/preflight_work"):
                shutil.rmtree(work, ignore_errors=True)
