"""`harpe-sweep --local`: the grid's points trained (and evaluated) on this machine, one after another.

Why one after another: a point uses the whole machine (its ranks are the GPUs, or the cores on CPU); running
two at once would measure neither. Why resumable: a grid of long runs outlives terminals and patience, so
the sweep must be safe to stop and to start again with the same command:

- a point is **done** when `<run_dir>/.sweep_done` exists and records the point's current config (sha256 of the
  resolved YAML) and evaluation list; done points are skipped without starting anything;
- training is skipped when `<run_dir>/.sweep_trained` records the current config (e.g. a rerun that adds
  --eval), otherwise harpe-train runs and itself resumes from `<checkpoint dir>/latest`: an interrupted point
  continues from its last checkpoint; the run directory is never deleted;
- with --eval: `harpe-convert megatron-to-hf --load <run_dir> --out <run_dir>/hf` (skipped while
  `.sweep_exported` names the current checkpoint), then `harpe-eval COMMAND ... --output
  <run_dir>/eval/COMMAND`, which continues its own results.jsonl;
- Ctrl-C (or SIGTERM) asks the running step to stop: harpe-train gets SIGTERM, saves a checkpoint at the
  end of its current iteration and exits 75; harpe-eval/harpe-convert get SIGINT. A second Ctrl-C kills
  the step. The sweep then exits 130 and says that a rerun continues. Steps run in their own session, so a
  terminal's Ctrl-C reaches only the sweep, which decides how each step is stopped.

Every step's output is appended to `<out>/<name>/logs/<point>.log`; sweep.json is rewritten (atomically)
after every state change; the markers are JSON written atomically (megatron_harpe/files.py).
"""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from megatron_harpe.sweeps import manifest, runs
from megatron_harpe.sweeps.errors import SweepError

PROG = "harpe-sweep"
EXIT_POINT_FAILED = 1
EXIT_INTERRUPTED = 130
LOCK = ".lock"
LOG_TAIL_LINES = 8


@contextlib.contextmanager
def sweep_lock(sweep_dir: Path):
    """One --local sweep per sweep directory at a time (an flock: released when the process dies)."""
    import fcntl

    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / LOCK
    fh = open(path, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise SweepError(f"{sweep_dir} is being run by another harpe-sweep --local ({holder}); wait for it, or "
                         f"stop it (Ctrl-C) and rerun") from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        yield
    finally:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


class _Stopper:
    """SIGINT/SIGTERM while the sweep runs: the first stops the running step gracefully, a second kills it."""

    def __init__(self):
        self.requests = 0
        self.proc: subprocess.Popen | None = None
        self.graceful = signal.SIGTERM
        self.what = ""
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.requests += 1
        proc = self.proc
        if proc is None or proc.poll() is not None:
            print(f"\n{PROG}: stopping after this step ({signal.Signals(signum).name})", file=sys.stderr, flush=True)
            return
        sig = self.graceful if self.requests == 1 else signal.SIGKILL
        if self.requests == 1:
            print(f"\n{PROG}: stopping: {self.what} (Ctrl-C again to kill it)", file=sys.stderr, flush=True)
        else:
            print(f"\n{PROG}: killing {self.what}", file=sys.stderr, flush=True)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    @property
    def stopped(self) -> bool:
        return self.requests > 0


def _child_env() -> dict[str, str]:
    """The steps import this checkout of megatron_harpe (the sweep's own), with unbuffered output for the log."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def train_command(config: str, world_size: int) -> list[str]:
    """harpe-train for one point: directly for one rank, under torchrun (one node, a free port) for more.
    harpe-train picks the CPU backend (gloo) by itself on a machine without GPUs."""
    if world_size <= 1:
        return [sys.executable, "-m", "megatron_harpe.train", "--config", config]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc-per-node={world_size}", "-m", "megatron_harpe.train", "--config", config]


def export_command(run_dir: str, hf_dir: str, export_args: list[str], overwrite: bool) -> list[str]:
    return [sys.executable, "-m", "megatron_harpe.convert.cli", "megatron-to-hf", "--load", run_dir, "--out", hf_dir,
            "--no-progress", *(["--overwrite"] if overwrite else []), *export_args]


def eval_command(step, hf_dir: str, out_dir: str, name: str, eval_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "megatron_harpe.evaluation.cli", step.command, *step.args, *eval_args,
            "--model", hf_dir, "--output", out_dir, "--name", name, "--no-progress"]


def _fmt_s(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(f"      | {line}" for line in text[-lines:])


class LocalSweep:
    def __init__(self, args, points, sweep_dir: Path, argv: list[str], evals, eval_args, export_args):
        self.args, self.points, self.sweep_dir = args, points, sweep_dir
        self.evals, self.eval_args, self.export_args = list(evals), list(eval_args), list(export_args)
        self.eval_spec = {"eval": [e.to_json() for e in self.evals], "eval_args": self.eval_args,
                          "export_args": self.export_args}
        self.data = manifest.build(args, points, sweep_dir, argv, mode="local", evals=self.evals,
                                   eval_args=self.eval_args, export_args=self.export_args)
        self.entries = {e["name"]: e for e in self.data["points"]}
        self.logs = sweep_dir / "logs"
        self.stopper: _Stopper | None = None
        self.env = _child_env()

    # -------------------------------------------------------------------------------- bookkeeping
    def save(self) -> None:
        manifest.write(self.sweep_dir, self.data)

    def _set(self, p, **fields) -> None:
        entry = self.entries[p.name]
        for key in ("exit_code", "step", "message"):
            entry.pop(key, None)
        entry.update(fields)
        self.save()

    def _done_marker(self, p) -> dict | None:
        marker = runs.read_marker(Path(p.run_dir) / runs.DONE_MARKER)
        if (marker and marker.get("exit_code") == 0 and marker.get("config_sha") == p.config_sha
                and marker.get("eval_spec") == self.eval_spec):
            return marker
        return None

    def _trained(self, p) -> dict | None:
        marker = runs.read_marker(Path(p.run_dir) / runs.TRAINED_MARKER)
        return marker if marker and marker.get("config_sha") == p.config_sha else None

    # -------------------------------------------------------------------------------- steps
    def _step(self, p, cmd: list[str], what: str, graceful=signal.SIGTERM) -> tuple[int, float]:
        """Run one step with its output appended to the point's log; (exit code, seconds)."""
        log = self.logs / f"{p.name}.log"
        started = time.perf_counter()
        if self.stopper.stopped:  # asked to stop between steps: start nothing more
            return EXIT_INTERRUPTED, 0.0
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {PROG} {self.args.name} {p.name}: {what}\n"
                     f"===== {shlex.join(cmd)}\n")
            fh.flush()
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, start_new_session=True)
            self.stopper.proc, self.stopper.graceful, self.stopper.what = proc, graceful, f"{p.name} {what}"
            if self.stopper.stopped:  # the request came while the step was starting: pass it on
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, graceful)
            try:
                rc = proc.wait()
            finally:
                self.stopper.proc = None
            fh.write(f"===== exit {rc} after {time.perf_counter() - started:.1f} s\n")
        return rc, time.perf_counter() - started

    def _fail(self, p, step: str, rc: int, seconds: float) -> str:
        log = self.logs / f"{p.name}.log"
        if self.stopper.stopped:
            latest = runs.latest_iteration(p.ckpt_dir)
            where = f"checkpoint at iteration {latest}" if latest is not None else "no checkpoint yet"
            print(f"interrupted after {_fmt_s(seconds)} (exit {rc}; {where})", flush=True)
            self._set(p, status="interrupted", exit_code=rc, step=step,
                      message=f"interrupted during {step}; {where}")
            return "interrupted"
        print(f"FAILED (exit {rc}) after {_fmt_s(seconds)}; log: {log}", flush=True)
        tail = _log_tail(log)
        if tail:
            print(tail, flush=True)
        self._set(p, status="failed", exit_code=rc, step=step, message=f"{step} exited {rc}; see {log}")
        return "failed"

    def run_point(self, index: int, p) -> str:
        """Train (and evaluate) one point; returns done | skipped | failed | interrupted."""
        prefix = f"[{index + 1}/{len(self.points)}] {p.name}:"
        marker = self._done_marker(p)
        if marker:
            loss = marker.get("loss")
            extra = f", loss {loss[0]:.4g} -> {loss[1]:.4g}" if loss else ""
            print(f"{prefix} done before ({marker.get('finished', '?')}{extra}), skipped", flush=True)
            self._set(p, status="done")
            return "skipped"
        old = runs.read_marker(Path(p.run_dir) / runs.DONE_MARKER)
        if old and old.get("config_sha") != p.config_sha:
            print(f"{prefix} its config changed since it finished: training again (harpe-train resumes from its "
                  f"checkpoint if the schedule is unchanged)", flush=True)
        started = time.time()
        self._set(p, status="running")
        train_s = 0.0
        trained = self._trained(p)
        if trained:
            print(f"{prefix} trained before ({trained.get('finished', '?')}), training skipped", flush=True)
            train_s = float(trained.get("seconds", 0.0))
        else:
            latest = runs.latest_iteration(p.ckpt_dir)
            ranks = f"{p.world_size} rank{'s' if p.world_size != 1 else ''}"
            resume = (f", resuming from iteration {latest} of {p.total_iterations}" if latest is not None else "")
            print(f"{prefix} training ({ranks}{resume}) ... ", end="", flush=True)
            rc, train_s = self._step(p, train_command(str(p.config_path), p.world_size), "training")
            if rc != 0:
                return self._fail(p, "training", rc, train_s)
            loss = runs.loss_range(runs.read_jsonl(Path(p.run_dir) / runs.METRICS))
            loss_text = f", loss {loss[0]:.4g} -> {loss[1]:.4g}" if loss else ""
            print(f"done in {_fmt_s(train_s)}{loss_text}", flush=True)
            runs.write_marker(Path(p.run_dir) / runs.TRAINED_MARKER,
                              {"config_sha": p.config_sha, "seconds": round(train_s, 3), "resumed_from": latest,
                               "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "checkpoint": runs.latest_name(p.ckpt_dir)})
        eval_s, results = 0.0, {}
        if self.evals and self.stopper.stopped:  # training finished as the stop came: evaluate on the rerun
            self._set(p, status="interrupted", message="stopped before its evaluation")
            return "interrupted"
        if self.evals:
            outcome, eval_s, results = self._evaluate(p, " " * (len(prefix) - 1))
            if outcome != "done":
                return outcome
        loss = runs.loss_range(runs.read_jsonl(Path(p.run_dir) / runs.METRICS))
        runs.write_marker(Path(p.run_dir) / runs.DONE_MARKER, {
            "exit_code": 0, "point": p.name, "config_sha": p.config_sha, "eval_spec": self.eval_spec,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "train_seconds": round(train_s, 3),
            "eval_seconds": round(eval_s, 3), "iterations": p.total_iterations, "loss": list(loss) if loss else None,
            "checkpoint": runs.latest_name(p.ckpt_dir), "eval": results})
        self._set(p, status="done", train_seconds=round(train_s, 3), eval_seconds=round(eval_s, 3))
        return "done"

    def _evaluate(self, p, indent: str) -> tuple[str, float, dict]:
        run_dir = Path(p.run_dir)
        hf = run_dir / "hf"
        total = 0.0
        checkpoint = runs.latest_name(p.ckpt_dir)
        exported = runs.read_marker(run_dir / runs.EXPORTED_MARKER)
        if not (exported and exported.get("checkpoint") == checkpoint and (hf / "config.json").is_file()):
            print(f"{indent} export -> {hf} ... ", end="", flush=True)
            cmd = export_command(str(run_dir), str(hf), self.export_args, overwrite=hf.exists())
            rc, seconds = self._step(p, cmd, "export", graceful=signal.SIGINT)
            total += seconds
            if rc != 0:
                return self._fail(p, "export", rc, seconds), total, {}
            runs.write_marker(run_dir / runs.EXPORTED_MARKER, {"checkpoint": checkpoint, "seconds": round(seconds, 3)})
            print(f"done in {_fmt_s(seconds)}", flush=True)
        results = {}
        for step in self.evals:
            out = run_dir / "eval" / step.command
            print(f"{indent} eval {step.command} -> {out} ... ", end="", flush=True)
            rc, seconds = self._step(p, eval_command(step, str(hf), str(out), p.name, self.eval_args),
                                     f"eval {step.command}", graceful=signal.SIGINT)
            total += seconds
            if rc != 0:
                return self._fail(p, f"eval {step.command}", rc, seconds), total, results
            headline = ""
            summary = runs.read_marker(out / "summary.json")
            if summary and isinstance(summary.get("average"), (int, float)):
                label = "mean perplexity" if summary.get("kind") == "ppl" else "average"
                headline = f", {label} {summary['average']:.4g}"
                results[step.command] = summary["average"]
            print(f"done in {_fmt_s(seconds)}{headline}", flush=True)
            if self.stopper.stopped and step is not self.evals[-1]:
                self._set(p, status="interrupted", message=f"stopped after eval {step.command}")
                return "interrupted", total, results
        return "done", total, results

    # -------------------------------------------------------------------------------- the sweep
    def dry_run(self) -> int:
        for p in self.points:
            print(f"# {p.name}: {p.world_size} rank(s), run dir {p.run_dir}")
            print(shlex.join(train_command(str(p.config_path), p.world_size)))
            hf = str(Path(p.run_dir) / "hf")
            if self.evals:
                print(shlex.join(export_command(p.run_dir, hf, self.export_args, overwrite=False)))
            for step in self.evals:
                print(shlex.join(eval_command(step, hf, str(Path(p.run_dir) / "eval" / step.command), p.name,
                                              self.eval_args)))
        self.save()
        print(f"{PROG}: {len(self.points)} point(s), none run (dry run); configs, jobs.tsv and sweep.json in "
              f"{self.sweep_dir}")
        return 0

    def run(self) -> int:
        self.logs.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        counts = {"done": 0, "skipped": 0, "failed": 0, "interrupted": 0}
        failed: list[Any] = []
        self.save()
        print(f"{PROG}: {len(self.points)} point(s) on this machine, one after another; logs: {self.logs}/<point>.log",
              flush=True)
        stopped_early = False
        with _Stopper() as self.stopper:
            for i, p in enumerate(self.points):
                if self.stopper.stopped:
                    break
                outcome = self.run_point(i, p)
                counts[outcome] += 1
                if outcome == "failed":
                    failed.append(p)
                    if self.args.stop_on_failure:
                        stopped_early = True
                        break
                if outcome == "interrupted":
                    break
        not_run = len(self.points) - sum(counts.values())
        parts = [f"{counts['done']} run", f"{counts['skipped']} done before", f"{counts['failed']} failed"]
        if counts["interrupted"]:
            parts.append("1 interrupted")
        if not_run:
            parts.append(f"{not_run} not run")
        print(f"{PROG}: {len(self.points)} point(s) in {_fmt_s(time.perf_counter() - started)}: {', '.join(parts)}; "
              f"manifest {self.sweep_dir / manifest.MANIFEST}; report: harpe-sweep report {self.sweep_dir}", flush=True)
        if failed:
            print(f"{PROG}: failed point(s):", file=sys.stderr)
            for p in failed:
                e = self.entries[p.name]
                print(f"  {p.name}: {e.get('step')} exited {e.get('exit_code')}; log {self.logs / (p.name + '.log')}",
                      file=sys.stderr)
        if self.stopper.stopped or counts["interrupted"]:
            print(f"{PROG}: interrupted; rerun the same command to continue (finished points are skipped, the "
                  f"interrupted one resumes from its checkpoint)", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        if stopped_early:
            print(f"{PROG}: stopped at the first failure (--stop-on-failure); fix it and rerun the same command",
                  file=sys.stderr)
        return EXIT_POINT_FAILED if failed else 0


def run_sweep(args, points, sweep_dir: Path, argv: list[str], *, evals=(), eval_args=(), export_args=()) -> int:
    sweep = LocalSweep(args, points, sweep_dir, argv, evals, eval_args, export_args)
    manifest.write_jobs_tsv(points, sweep_dir)
    return sweep.dry_run() if args.dry_run else sweep.run()


__all__ = ["run_sweep", "sweep_lock", "train_command", "export_command", "eval_command", "LocalSweep"]
