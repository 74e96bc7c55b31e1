"""Section f, harpe-train on one device: a ~100M HARPE model with the production parallel options, run
straight through, and again stopped by SIGTERM (checkpoint, exit code 75) and resumed, which must give the
same loss trace; the trainer's throughput and MFU."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

from .common import CPU_LABEL, REPO, Env, Section, gib, group_bases, log, now


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
        self.started = now()
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
        wall = now() - self.started
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


def run(sec: Section, env: Env) -> None:
    z = env.sizes["f"]
    N, k = z["iterations"], z["signal_at"]
    bases = group_bases(z["groups"], env.cpu)
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
                f"peak memory {gib(peak)}{label}")
        sec.table("throughput (uninterrupted run, metrics.jsonl)" + (f" [{CPU_LABEL}]" if env.cpu else ""),
                  ["tokens/s (median)", "MFU (median)", "s/iteration (median)", "peak memory", "wall s (straight / "
                   "interrupted / resumed)"],
                  [[f"{thr['tokens_per_s_median'] or 0:,.0f}",
                    "-" if thr["mfu_median"] is None else f"{100 * thr['mfu_median']:.1f}%",
                    f"{thr['seconds_per_iteration_median'] or 0:.3f}", gib(peak),
                    f"{straight['wall_s']:.0f} / {first['wall_s']:.0f} / {second['wall_s']:.0f}"]],
                  note="MFU against the trainer's default peak (989 TFLOP/s dense bf16, H100/H200 SXM); wall time "
                       "includes start-up, model build and checkpoint writes")
    finally:
        for launch in launches:
            launch.kill()
        if not env.keep_checkpoints:
            for ckpt in root.glob("*/checkpoints"):
                shutil.rmtree(ckpt, ignore_errors=True)

