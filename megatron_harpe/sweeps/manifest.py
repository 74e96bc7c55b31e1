"""`<out>/<name>/sweep.json`: what a sweep is made of, for the report and for reruns.

Written by `harpe-sweep` in both modes (Slurm submission and --local), next to jobs.tsv (kept for scripts
and for sweeps made before the manifest existed; the report falls back to it). It lists every point with
the axes it stands for (method, sequence length, layout, seed), its parallel sizes, its config and run
directory (absolute: the report may run from another directory than the submission), its log and its
status:

| status | set by | meaning |
|---|---|---|
| `pending` | --local | not run yet by this sweep (or config changed since it finished) |
| `running` | --local | being trained/evaluated now (or the sweep was killed hard while it was) |
| `done` | --local | trained (and evaluated, with --eval); `<run_dir>/.sweep_done` holds the details |
| `failed` | --local | a step exited non-zero: `exit_code`, `step` and `log` say which and where |
| `interrupted` | --local | Ctrl-C / SIGTERM stopped it; the rerun resumes from its checkpoint |
| `submitted` / `dry-run` | Slurm | a job id was returned / nothing was submitted; the run dir tells the rest |

The file is rewritten whole, atomically, after every change, so a reader never sees half of it.
"""
from __future__ import annotations

import csv
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from megatron_harpe.files import atomic_write_text
from megatron_harpe.sweeps.errors import SweepError

MANIFEST = "sweep.json"
JOBS_TSV = "jobs.tsv"
FORMAT = 1
#: statuses a rerun keeps from the previous manifest until the point runs again (so an earlier failure
#: stays visible when --stop-on-failure ends a rerun before that point)
KEPT_STATUSES = ("failed", "interrupted")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _abs(path) -> str | None:
    return os.path.abspath(path) if path else None


def point_entry(p, sweep_dir: Path, args, mode: str) -> dict[str, Any]:
    log = None
    if mode == "local":
        log = sweep_dir / "logs" / f"{p.name}.log"
    elif p.job_id:
        log = sweep_dir / "logs" / f"{args.name}-{p.name}-{p.job_id}.out"  # sbatch --output=%x-%j.out
    status = "local" if mode == "local" else ("submitted" if p.job_id else "dry-run")
    return {"name": p.name, "group": p.group or p.name, "method": p.method, "config_src": _abs(p.config_src),
            "seq_length": p.seq_length, "trained_seq_length": p.trained_seq_length, "layout": p.layout.name,
            "nodes": p.layout.nodes, "world_size": p.world_size, "parallel": dict(p.parallel), "seed": p.seed,
            "total_iterations": p.total_iterations, "config": _abs(p.config_path), "config_sha": p.config_sha,
            "run_dir": _abs(p.run_dir), "ckpt_dir": _abs(p.ckpt_dir), "log": _abs(log), "job_id": p.job_id or None,
            "overrides": list(p.overrides), "status": "pending" if status == "local" else status}


def build(args, points, sweep_dir: Path, argv: list[str], *, mode: str, evals=(), eval_args=(),
          export_args=()) -> dict[str, Any]:
    """The manifest of this invocation; statuses of a previous --local manifest are carried over."""
    previous = {}
    if mode == "local":
        try:
            old = json.loads((sweep_dir / MANIFEST).read_text())
            previous = {e["name"]: e for e in old.get("points", []) if isinstance(e, dict) and "name" in e}
        except (OSError, ValueError, AttributeError):
            previous = {}
    entries = []
    for p in points:
        entry = point_entry(p, sweep_dir, args, mode)
        old = previous.get(p.name)
        if old and old.get("status") in KEPT_STATUSES and old.get("config_sha") == p.config_sha:
            for key in ("status", "exit_code", "step", "message"):
                if key in old:
                    entry[key] = old[key]
        entries.append(entry)
    return {"format": FORMAT, "name": args.name, "mode": mode, "dry_run": bool(args.dry_run), "created": _now(),
            "updated": _now(), "command": ["harpe-sweep", *argv], "cwd": os.getcwd(),
            "grid_file": _abs(args.grid) if getattr(args, "grid", None) else None,
            "sweep_dir": _abs(sweep_dir), "runs_root": _abs(os.path.join(args.runs_root, args.name)),
            "axes": {"methods": {m.split("=", 1)[0] if "=" in m else m: m for m in args.method},
                     "seq_lengths": list(args.seq_length), "layouts": list(args.layout), "seeds": list(args.seed),
                     "set": list(args.set)},
            "eval": [e.to_json() for e in evals], "eval_args": list(eval_args), "export_args": list(export_args),
            "points": entries}


def write(sweep_dir: Path, data: dict[str, Any]) -> Path:
    data["updated"] = _now()
    return atomic_write_text(Path(sweep_dir) / MANIFEST, json.dumps(data, indent=1) + "\n")


JOBS_COLUMNS = ["point", "method", "seq_length", "layout", "nodes", "world_size", "job_id", "config", "run_dir"]


def write_jobs_tsv(points, sweep_dir: Path) -> Path:
    """jobs.tsv: one row per point (the columns harpe-sweep has always written; scripts read it)."""
    from megatron_harpe.files import atomic_write_by

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(JOBS_COLUMNS)
            for p in points:
                w.writerow([p.name, p.method, p.seq_length or "", p.layout.name, p.layout.nodes, p.world_size,
                            p.job_id, p.config_path, p.run_dir])

    return atomic_write_by(Path(sweep_dir) / JOBS_TSV, write)


def _from_jobs_tsv(sweep_dir: Path) -> dict[str, Any]:
    """A sweep submitted before sweep.json existed: its jobs.tsv (paths relative to where it was submitted,
    taken here as the current directory)."""
    points = []
    with open(sweep_dir / JOBS_TSV, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            name = row.get("point") or ""
            m = re.fullmatch(r"(.*)-seed(\d+)", name)
            parallel, total, trained_seq = {}, None, None
            cfg = row.get("config") or ""
            if cfg and os.path.isfile(cfg):
                parallel, total, trained_seq = _config_facts(cfg, int(row.get("world_size") or 1))
            run_dir = row.get("run_dir") or ""
            points.append({"name": name, "group": m.group(1) if m else name, "method": row.get("method") or name,
                           "seq_length": int(row["seq_length"]) if (row.get("seq_length") or "").isdigit() else None,
                           "trained_seq_length": trained_seq, "layout": row.get("layout") or "default",
                           "nodes": int(row.get("nodes") or 1), "world_size": int(row.get("world_size") or 0),
                           "parallel": parallel, "seed": int(m.group(2)) if m else None, "total_iterations": total,
                           "config": _abs(cfg), "run_dir": _abs(run_dir),
                           "ckpt_dir": _abs(os.path.join(run_dir, "checkpoints")) if run_dir else None,
                           "job_id": row.get("job_id") or None,
                           "log": None, "status": "submitted" if row.get("job_id") else "dry-run"})
    return {"format": 0, "name": sweep_dir.name, "mode": "slurm", "sweep_dir": _abs(sweep_dir), "points": points,
            "source": str(sweep_dir / JOBS_TSV)}


def _config_facts(path: str, world: int) -> tuple[dict, int | None, int | None]:
    """(parallel sizes, total iterations, trained sequence length) of a point config, or what is readable."""
    from megatron_harpe.config.loader import load_config
    from megatron_harpe.config.stages import build_schedule

    try:
        cfg = load_config(path)
        stages = build_schedule(cfg)
    except (ValueError, OSError):
        return {}, None, None
    par = cfg.parallel
    mp = par.tensor * par.pipeline * par.context
    return ({"tp": par.tensor, "pp": par.pipeline, "cp": par.context, "dp": max(world // mp, 1)},
            stages[-1].end_iteration, stages[-1].seq_length)


def load(sweep_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a sweep directory (sweep.json, else jobs.tsv); SweepError (exit 2) naming the input."""
    d = Path(sweep_dir)
    if not d.is_dir():
        raise SweepError(f"{sweep_dir}: not a directory; give a sweep's directory, <out-dir>/<name> "
                         f"(e.g. sweeps/ext128k), which holds sweep.json")
    if (d / MANIFEST).is_file():
        try:
            data = json.loads((d / MANIFEST).read_text())
        except ValueError as err:
            raise SweepError(f"{d / MANIFEST} is not valid JSON ({err}); rerun the harpe-sweep command that made it "
                             f"(--dry-run rewrites it without running anything)") from None
        if not isinstance(data, dict) or not isinstance(data.get("points"), list):
            raise SweepError(f"{d / MANIFEST} has no list of points: not a harpe-sweep manifest")
    elif (d / JOBS_TSV).is_file():
        data = _from_jobs_tsv(d)
    else:
        raise SweepError(f"{sweep_dir}: no {MANIFEST} or {JOBS_TSV}; not a harpe-sweep directory (give "
                         f"<out-dir>/<name>, e.g. sweeps/ext128k)")
    if not data["points"]:
        source = MANIFEST if (d / MANIFEST).is_file() else JOBS_TSV
        raise SweepError(f"{sweep_dir}: the sweep lists no points ({source})")
    return data


__all__ = ["MANIFEST", "JOBS_TSV", "JOBS_COLUMNS", "build", "write", "write_jobs_tsv", "load", "point_entry"]
