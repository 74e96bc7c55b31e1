"""harpe-sweep: submit an experiment grid (method x sequence length x parallel layout) to Slurm.

    harpe-sweep --name ext128k \\
        --method harpe=examples/llama2_7b_harpe_128k.yaml --method abf_single=examples/llama2_7b_abf_single_128k.yaml \\
        --seq-length 65536 --seq-length 131072 \\
        --layout tp8cp4:nodes=4,tp=8,cp=4 --layout tp8cp2:nodes=2,tp=8,cp=2 \\
        --set training.tokens=1000000000 --sbatch-arg=--time=12:00:00 --chain afterany

For every point of the grid it writes the resolved config (`<out>/<name>/configs/<point>.yaml`, run_dir
`<runs-root>/<name>/<point>`), submits `slurm/train.sbatch <config>` with the layout's `--nodes` (jobs that
run out of time requeue themselves and resume, see docs/slurm.md), and prints a table of job ids (also
written to `<out>/<name>/jobs.tsv`). `--dry-run` writes the configs and prints the sbatch commands only.

Axes:
  --method NAME=CONFIG  (or just CONFIG; NAME is then the file's stem; or a bare method name harpe | abf_single
                        | abf_multi | pi | yarn for examples/llama2_7b_<name>_128k.yaml)
  --seq-length L        sets data.seq_length, raises model.max_position_embeddings to L if lower, and scales the
                        extension factor of PI (interpolation_factor) and YaRN (yarn_factor) with L / the config's
                        own seq_length, so "extend 4k to L" stays what the method does (--no-scale-factors keeps
                        them). A config with `stages` (multi-stage ABF) has its lengths in the stages: it is
                        refused with a seq-length axis.
  --layout NAME:k=v,... keys: nodes, tp, pp, cp, vpp, sp (true/false), dp_opt (distributed optimizer), or any
                        dotted config key (data.micro_batch_size=1, ...)
Every point is validated as harpe-train validates it (world size = nodes x --tasks-per-node) before anything is
submitted; `--no-validate` skips that (e.g. where the data is not visible from the login node).
Chaining: --chain afterok (each job starts after the previous one succeeded; a failure cancels the rest) or
afterany (one after the other whatever happens); default none (all at once).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_harpe.cli import InputError

PROG = "harpe-sweep"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SCRIPT = REPO_ROOT / "slurm" / "train.sbatch"
LAYOUT_ALIASES = {"tp": "parallel.tensor", "pp": "parallel.pipeline", "cp": "parallel.context",
                  "vpp": "parallel.virtual_pipeline", "sp": "parallel.sequence_parallel",
                  "dp_opt": "parallel.distributed_optimizer"}
METHOD_EXAMPLE = "examples/llama2_7b_{}_128k.yaml"


class SweepError(InputError):
    pass


@dataclass
class Layout:
    name: str
    nodes: int = 1
    overrides: list[str] = field(default_factory=list)


@dataclass
class Point:
    name: str
    method: str
    config_src: str
    seq_length: int | None
    layout: Layout
    overrides: list[str]
    config_path: Path | None = None
    run_dir: str = ""
    world_size: int = 0
    command: list[str] = field(default_factory=list)
    job_id: str = ""


# ------------------------------------------------------------------------------------------ parsing
def parse_method(text: str) -> tuple[str, str]:
    if "=" in text:
        name, path = text.split("=", 1)
    elif not text.endswith((".yaml", ".yml")) and not os.path.exists(text):
        name, path = text, METHOD_EXAMPLE.format(text)
        if not os.path.exists(path) and (REPO_ROOT / path).exists():
            path = str(REPO_ROOT / path)
    else:
        name, path = Path(text).stem, text
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise SweepError(f"--method {text!r}: the name {name!r} must be letters, digits, _ . + -")
    if not os.path.isfile(path):
        raise SweepError(f"--method {text!r}: config {path} does not exist")
    return name, path


def parse_layout(text: str) -> Layout:
    name, sep, body = text.partition(":")
    if not sep or not name or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise SweepError(f"--layout {text!r}: expected NAME:key=value,... e.g. tp8cp4:nodes=4,tp=8,cp=4")
    layout = Layout(name)
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise SweepError(f"--layout {text!r}: {item!r} is not key=value")
        if key == "nodes":
            if not value.isdigit() or int(value) < 1:
                raise SweepError(f"--layout {text!r}: nodes must be a positive integer, got {value!r}")
            layout.nodes = int(value)
        else:
            layout.overrides.append(f"{LAYOUT_ALIASES.get(key, key)}={value}")
    return layout


def _apply(data: dict, overrides: list[str]) -> dict:
    """harpe-train's override rule on the raw YAML (megatron_harpe.config.loader.apply_overrides)."""
    from megatron_harpe.config.loader import apply_overrides

    return apply_overrides(data, overrides)


def _get(data: dict, dotted: str):
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def seq_length_overrides(raw: dict, seq: int, method: str, scale_factors: bool) -> list[str]:
    """Overrides that move a (single-stage) config to sequence length `seq`."""
    if raw.get("stages"):
        raise SweepError(f"method {method}: its config has `stages` (their seq_length values set the lengths), so a "
                         "--seq-length axis is ambiguous; sweep it without --seq-length, or give one config per length")
    old_seq = _get(raw, "data.seq_length") or 256  # megatron_harpe.config.schema.DataConfig.seq_length
    out = [f"data.seq_length={seq}"]
    max_pos = _get(raw, "model.max_position_embeddings") or 4096
    if max_pos < seq:
        out.append(f"model.max_position_embeddings={seq}")
    kind = _get(raw, "model.position.kind") or "rope"
    if scale_factors and seq != old_seq:
        for key in {"pi": ["interpolation_factor"], "yarn": ["yarn_factor"]}.get(kind, []):
            factor = _get(raw, f"model.position.{key}")
            if factor:
                out.append(f"model.position.{key}={float(factor) * seq / old_seq:g}")
    return out


def point_name(method: str, seq: int | None, layout: Layout, n_layouts: int) -> str:
    parts = [method]
    if seq is not None:
        parts.append(f"s{seq // 1024}k" if seq % 1024 == 0 else f"s{seq}")
    if n_layouts > 1 or layout.name != "default":
        parts.append(layout.name)
    return "-".join(parts)


# ------------------------------------------------------------------------------------------ the grid
def build_points(args) -> list[Point]:
    methods = [parse_method(m) for m in args.method]
    names = [m[0] for m in methods]
    if len(set(names)) != len(names):
        raise SweepError(f"method names repeat: {names}; name them: --method NAME=CONFIG")
    layouts = [parse_layout(t) for t in args.layout] or [Layout("default", args.nodes)]
    if len({lay.name for lay in layouts}) != len(layouts):
        raise SweepError("layout names repeat")
    seqs = args.seq_length or [None]
    points = []
    for (method, path), seq, layout in itertools.product(methods, seqs, layouts):
        raw = yaml.safe_load(Path(path).read_text()) or {}
        overrides = list(args.set)
        if seq is not None:
            overrides += seq_length_overrides(raw, seq, method, not args.no_scale_factors)
        overrides += layout.overrides
        name = point_name(method, seq, layout, len(layouts))
        points.append(Point(name, method, path, seq, layout, overrides))
    return points


def write_configs(points: list[Point], sweep_dir: Path, runs_root: str, sweep: str, validate: bool,
                  tasks_per_node: int) -> None:
    from megatron_harpe.config.loader import ConfigError, dump_config, from_dict
    from megatron_harpe.config.schema import Config

    (sweep_dir / "configs").mkdir(parents=True, exist_ok=True)
    for p in points:
        raw = yaml.safe_load(Path(p.config_src).read_text()) or {}
        p.run_dir = os.path.join(runs_root, sweep, p.name)
        try:
            cfg = from_dict(Config, _apply(raw, p.overrides + [f"run_dir={p.run_dir}"]))
        except (ConfigError, ValueError) as err:
            raise SweepError(f"point {p.name}: {err}") from None
        p.world_size = p.layout.nodes * tasks_per_node
        if validate:
            from megatron_harpe.config.validate import validate_config

            try:
                validate_config(cfg, p.world_size)
            except (ConfigError, ValueError, FileNotFoundError) as err:
                raise SweepError(f"point {p.name} (world size {p.world_size} = {p.layout.nodes} node(s) x "
                                 f"{tasks_per_node}): {err}") from None
        p.config_path = sweep_dir / "configs" / f"{p.name}.yaml"
        header = (f"# harpe-sweep {sweep}: point {p.name} = {p.config_src} + "
                  f"{' '.join(p.overrides) or '(no overrides)'}\n# nodes {p.layout.nodes}, world size {p.world_size}\n")
        p.config_path.write_text(header + dump_config(cfg))


def sbatch_command(p: Point, args, sweep_dir: Path, previous: str | None) -> list[str]:
    cmd = ["sbatch", "--parsable", f"--job-name={args.name}-{p.name}", f"--nodes={p.layout.nodes}",
           f"--ntasks-per-node={args.tasks_per_node}", f"--output={sweep_dir / 'logs'}/%x-%j.out"]
    if previous and args.chain != "none":
        cmd.append(f"--dependency={args.chain}:{previous}")
        if args.chain == "afterok":
            cmd.append("--kill-on-invalid-dep=yes")
    cmd += list(args.sbatch_arg)
    cmd += [str(args.script), str(p.config_path)]
    return cmd


def print_table(points: list[Point], out=sys.stdout) -> None:
    rows = [("point", "method", "seq", "layout", "nodes", "world", "job", "config")]
    for p in points:
        rows.append((p.name, p.method, str(p.seq_length or "-"), p.layout.name, str(p.layout.nodes),
                     str(p.world_size), p.job_id or "-", str(p.config_path)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip(), file=out)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--name", required=True, help="the sweep's name (job names, directories)")
    p.add_argument("--method", action="append", required=True, help="NAME=CONFIG.yaml (repeat)")
    p.add_argument("--seq-length", action="append", type=int, default=[], help="a sequence length (repeat)")
    p.add_argument("--layout", action="append", default=[], help="NAME:nodes=N,tp=..,cp=..,pp=.. (repeat)")
    p.add_argument("--nodes", type=int, default=1, help="nodes when no --layout is given")
    p.add_argument("--tasks-per-node", type=int, default=8, help="ranks per node = GPUs per node (default 8)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every point")
    p.add_argument("--sbatch-arg", action="append", default=[], help="extra sbatch option, e.g. --sbatch-arg=--time=4:00:00")
    p.add_argument("--chain", choices=["none", "afterok", "afterany"], default="none")
    p.add_argument("--out-dir", default="sweeps", help="configs, logs and jobs.tsv go to OUT_DIR/NAME (default sweeps)")
    p.add_argument("--runs-root", default="runs", help="run directories: RUNS_ROOT/NAME/POINT (default runs)")
    p.add_argument("--script", default=str(DEFAULT_SCRIPT), help="the batch script (default slurm/train.sbatch)")
    p.add_argument("--no-scale-factors", action="store_true", help="keep PI/YaRN factors at every --seq-length")
    p.add_argument("--no-validate", action="store_true", help="skip harpe-train's config checks per point")
    p.add_argument("--dry-run", action="store_true", help="write the configs, print the commands, submit nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", args.name):
        print(f"{PROG}: error: --name {args.name!r} must be letters, digits, _ . + -", file=sys.stderr)
        return 2
    sweep_dir = Path(args.out_dir) / args.name
    try:
        if not os.path.isfile(args.script):
            raise SweepError(f"batch script {args.script} does not exist (--script)")
        points = build_points(args)
        write_configs(points, sweep_dir, args.runs_root, args.name, not args.no_validate, args.tasks_per_node)
    except SweepError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    (sweep_dir / "logs").mkdir(parents=True, exist_ok=True)
    previous = None
    for p in points:
        p.command = sbatch_command(p, args, sweep_dir, previous)
        if args.dry_run:
            print(shlex.join(p.command))
            continue
        proc = subprocess.run(p.command, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{PROG}: error: sbatch failed for {p.name} (exit {proc.returncode}): "
                  f"{proc.stderr.strip() or proc.stdout.strip()}\n  {shlex.join(p.command)}", file=sys.stderr)
            print_table(points, out=sys.stderr)
            return 1
        p.job_id = proc.stdout.strip().split(";")[0]
        previous = p.job_id
    with open(sweep_dir / "jobs.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["point", "method", "seq_length", "layout", "nodes", "world_size", "job_id", "config", "run_dir"])
        for p in points:
            w.writerow([p.name, p.method, p.seq_length or "", p.layout.name, p.layout.nodes, p.world_size,
                        p.job_id, p.config_path, p.run_dir])
    print_table(points)
    submitted = sum(1 for p in points if p.job_id)
    print(f"{PROG}: {len(points)} point(s), {submitted} submitted"
          f"{' (dry run)' if args.dry_run else ''}{f', chained {args.chain}' if args.chain != 'none' else ''}; "
          f"configs and jobs.tsv in {sweep_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
