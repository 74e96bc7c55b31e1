"""harpe-sweep: an experiment grid (method x length x layout x seed) on Slurm or on this machine, and its report.

    harpe-sweep --name ext128k \\
        --method harpe=examples/llama2_7b_harpe_128k.yaml --method abf_single=examples/llama2_7b_abf_single_128k.yaml \\
        --seq-length 65536 --seq-length 131072 \\
        --layout tp8cp4:nodes=4,tp=8,cp=4 --layout tp8cp2:nodes=2,tp=8,cp=2 \\
        --set training.tokens=1000000000 --sbatch-arg=--time=12:00:00 --chain afterany

    harpe-sweep --local --name tiny --method examples/tiny/harpe.yaml --method examples/tiny/abf_single.yaml \\
        --seed 1 --seed 2 --set training.iterations=50 --set training.eval_interval=10
    harpe-sweep --grid examples/study/cpu.yaml     # the same axes and flags from a YAML file (grid_file.py)
    harpe-sweep report sweeps/tiny            # -> sweeps/tiny/report/report.md + PNG plots

For every point of the grid it writes the resolved config (`<out>/<name>/configs/<point>.yaml`, run_dir
`<runs-root>/<name>/<point>`), `<out>/<name>/jobs.tsv` (a table of the points, also printed) and
`<out>/<name>/sweep.json` (the manifest the report reads: points, run dirs, axes, status). On Slurm each point is
`sbatch slurm/train.sbatch <config>` with the layout's `--nodes` (jobs that run out of time requeue themselves
and resume, see docs/slurm.md); `--dry-run` writes the configs and prints the commands only. With `--local` the
points run here one after another (harpe-train, under torchrun when a point has more than one rank), each
logged to `<out>/<name>/logs/<point>.log`; a rerun skips finished points and resumes interrupted ones from their
checkpoints (docs/sweeps.md).

Axes:
  --method NAME=CONFIG  (or just CONFIG; NAME is then the file's stem; or a bare method name harpe | abf_single
                        | abf_multi | pi | yarn for examples/llama2_7b_<name>_128k.yaml)
  --seq-length L        sets data.seq_length, raises model.max_position_embeddings to L if lower, and scales the
                        extension factor of PI (interpolation_factor) and YaRN (yarn_factor) with L / the config's
                        own seq_length, so "extend 4k to L" stays what the method does (--no-scale-factors keeps
                        them). A config with `stages` (multi-stage ABF) has its lengths in the stages: it is
                        refused with a seq-length axis.
  --layout NAME:k=v,... keys: nodes, tp, pp, cp, dp, vpp, sp (true/false), dp_opt (distributed optimizer), or any
                        dotted config key (data.micro_batch_size=1, ...). On Slurm the world size is nodes x
                        --tasks-per-node (a dp given must agree); with --local it is tp x pp x cp x dp ranks.
  --seed S              sets training.seed; point names get -seedS (the report gives mean and spread over seeds)
Every point is validated as harpe-train validates it before anything is submitted or run; `--no-validate` skips
that (e.g. where the data is not visible from the login node).
Chaining (Slurm): --chain afterok (each job starts after the previous one succeeded; a failure cancels the rest)
or afterany (one after the other whatever happens); default none (all at once).
Exit codes: 0 done, 1 a point failed (--local) or sbatch failed, 2 bad input, 130 interrupted (--local: rerun the
same command to continue).
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_harpe.cli import run_command
from megatron_harpe.sweeps.errors import SweepError

PROG = "harpe-sweep"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SCRIPT = REPO_ROOT / "slurm" / "train.sbatch"
LAYOUT_ALIASES = {"tp": "parallel.tensor", "pp": "parallel.pipeline", "cp": "parallel.context",
                  "vpp": "parallel.virtual_pipeline", "sp": "parallel.sequence_parallel",
                  "dp_opt": "parallel.distributed_optimizer"}
METHOD_EXAMPLE = "examples/llama2_7b_{}_128k.yaml"
EVAL_COMMANDS = ("ppl", "passkey", "niah", "needle")  # harpe-eval's evaluations (not `report`)
#: set by the sweep for every harpe-eval call (the point's export and its eval/<command> directory)
EVAL_OWN_OPTIONS = ("--model", "--output", "--name", "--export-dir")


@dataclass
class Layout:
    name: str
    nodes: int = 1
    overrides: list[str] = field(default_factory=list)
    dp: int | None = None  # data-parallel size, when the layout states it (the world size of a local point)


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
    seed: int | None = None
    group: str = ""  # the name without the seed suffix: the points the report averages over
    parallel: dict = field(default_factory=dict)  # tp, pp, cp, dp of the resolved config
    total_iterations: int = 0
    trained_seq_length: int = 0  # the (last stage's) sequence length the point trains at
    ckpt_dir: str = ""
    config_sha: str = ""  # sha256 of the resolved config: a finished point whose config changed runs again
    tokenizer: str | None = None  # data.tokenizer_model: what the export ships and harpe-eval reads


@dataclass
class EvalStep:
    """One `harpe-eval COMMAND ARGS...` after training (--eval); --model/--output are the sweep's."""
    command: str
    args: list[str]

    def to_json(self) -> dict:
        return {"command": self.command, "args": self.args}


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
        if key in ("nodes", "dp"):
            if not value.isdigit() or int(value) < 1:
                raise SweepError(f"--layout {text!r}: {key} must be a positive integer, got {value!r}")
            setattr(layout, key, int(value))
        else:
            layout.overrides.append(f"{LAYOUT_ALIASES.get(key, key)}={value}")
    return layout


def parse_eval(text: str) -> EvalStep:
    """`--eval "passkey --lengths 1k,2k"`: a harpe-eval command line without --model/--output."""
    try:
        words = shlex.split(text)
    except ValueError as err:
        raise SweepError(f"--eval {text!r}: {err}") from None
    if not words or words[0] not in EVAL_COMMANDS:
        raise SweepError(f"--eval {text!r}: starts with one of {', '.join(EVAL_COMMANDS)} (a harpe-eval command), "
                         f"e.g. --eval 'passkey --lengths 1k,2k'")
    _check_eval_args(words[1:], f"--eval {text!r}")
    return EvalStep(words[0], words[1:])


def _check_eval_args(words: list[str], where: str) -> None:
    own = [w for w in words if w.split("=", 1)[0] in EVAL_OWN_OPTIONS]
    if own:
        raise SweepError(f"{where}: {own[0].split('=', 1)[0]} is set by the sweep (the point's export "
                         f"<run_dir>/hf and <run_dir>/eval/<command>); leave it out")


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


def point_name(method: str, seq: int | None, layout: Layout, n_layouts: int, seed: int | None = None) -> str:
    parts = [method]
    if seq is not None:
        parts.append(f"s{seq // 1024}k" if seq % 1024 == 0 else f"s{seq}")
    if n_layouts > 1 or layout.name != "default":
        parts.append(layout.name)
    if seed is not None:
        parts.append(f"seed{seed}")
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
    seeds = list(getattr(args, "seed", None) or [])
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"--seed values repeat: {seeds}")
    seqs = args.seq_length or [None]
    points = []
    for (method, path), seq, layout, seed in itertools.product(methods, seqs, layouts, seeds or [None]):
        raw = yaml.safe_load(Path(path).read_text()) or {}
        overrides = list(args.set)
        if seq is not None:
            overrides += seq_length_overrides(raw, seq, method, not args.no_scale_factors)
        overrides += layout.overrides
        if seed is not None:
            overrides.append(f"training.seed={seed}")
        name = point_name(method, seq, layout, len(layouts), seed)
        points.append(Point(name, method, path, seq, layout, overrides, seed=seed,
                            group=point_name(method, seq, layout, len(layouts))))
    return points


def write_configs(points: list[Point], sweep_dir: Path, runs_root: str, sweep: str, validate: bool,
                  tasks_per_node: int, local: bool = False) -> None:
    """Resolve, check and write every point's config (nothing is submitted or run before all pass)."""
    import hashlib

    from megatron_harpe.config.loader import ConfigError, dump_config, from_dict
    from megatron_harpe.config.schema import Config
    from megatron_harpe.config.stages import build_schedule

    (sweep_dir / "configs").mkdir(parents=True, exist_ok=True)
    for p in points:
        raw = yaml.safe_load(Path(p.config_src).read_text()) or {}
        p.run_dir = os.path.join(runs_root, sweep, p.name)
        try:
            cfg = from_dict(Config, _apply(raw, p.overrides + [f"run_dir={p.run_dir}"]))
            stages = build_schedule(cfg)
        except (ConfigError, ValueError) as err:
            raise SweepError(f"point {p.name}: {err}") from None
        par = cfg.parallel
        model_parallel = par.tensor * par.pipeline * par.context
        if local:
            if p.layout.nodes != 1:
                raise SweepError(f"point {p.name}: layout {p.layout.name} has nodes={p.layout.nodes}, but --local runs "
                                 f"on this machine; give local layouts tp/pp/cp/dp (world = tp x pp x cp x dp)")
            p.world_size = model_parallel * (p.layout.dp or 1)
            where = (f"point {p.name} (world size {p.world_size} = TP {par.tensor} x PP {par.pipeline} x "
                     f"CP {par.context} x DP {p.layout.dp or 1})")
        else:
            p.world_size = p.layout.nodes * tasks_per_node
            where = f"point {p.name} (world size {p.world_size} = {p.layout.nodes} node(s) x {tasks_per_node})"
            if p.layout.dp is not None and p.layout.dp * model_parallel != p.world_size:
                raise SweepError(f"{where}: layout {p.layout.name} says dp={p.layout.dp}, but TP x PP x CP = "
                                 f"{model_parallel} leaves DP {p.world_size / model_parallel:g}")
        if validate:
            from megatron_harpe.config.validate import validate_config

            try:
                validate_config(cfg, p.world_size)
            except (ConfigError, ValueError, FileNotFoundError) as err:
                raise SweepError(f"{where}: {err}") from None
        p.parallel = {"tp": par.tensor, "pp": par.pipeline, "cp": par.context,
                      "dp": max(p.world_size // model_parallel, 1)}
        p.total_iterations = stages[-1].end_iteration
        p.trained_seq_length = stages[-1].seq_length
        p.ckpt_dir = cfg.checkpoint.dir or os.path.join(p.run_dir, "checkpoints")
        p.tokenizer = cfg.data.tokenizer_model
        resolved = dump_config(cfg)
        p.config_sha = hashlib.sha256(resolved.encode()).hexdigest()
        p.config_path = sweep_dir / "configs" / f"{p.name}.yaml"
        world = (f"world size {p.world_size}" if local else
                 f"nodes {p.layout.nodes}, world size {p.world_size}")
        header = (f"# harpe-sweep {sweep}: point {p.name} = {p.config_src} + "
                  f"{' '.join(p.overrides) or '(no overrides)'}\n# {world}\n")
        p.config_path.write_text(header + resolved)


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
                                epilog=__doc__.split("\n\n", 1)[1] + "\nThe report: harpe-sweep report --help")
    p.add_argument("--grid", metavar="FILE.yaml", help="the grid in a file: keys mirror these flags (name, methods, "
                   "seq_lengths, layouts, seeds, set, local, ...); flags given too add to it or override it "
                   "(docs/sweeps.md, \"Grid files\")")
    p.add_argument("--name", help="the sweep's name (job names, directories); required, here or in --grid")
    p.add_argument("--method", action="append", default=[], help="NAME=CONFIG.yaml (repeat); at least one, here "
                   "or in --grid")
    p.add_argument("--seq-length", action="append", type=int, default=[], help="a sequence length (repeat)")
    p.add_argument("--layout", action="append", default=[], help="NAME:nodes=N,tp=..,cp=..,pp=..,dp=.. (repeat)")
    p.add_argument("--seed", action="append", type=int, default=[], help="training.seed of a point (repeat: one "
                   "point per seed, named -seedS)")
    p.add_argument("--nodes", type=int, help="nodes when no --layout is given (default 1)")
    p.add_argument("--tasks-per-node", type=int, help="ranks per node = GPUs per node (default 8)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every point")
    p.add_argument("--sbatch-arg", action="append", default=[], help="extra sbatch option, e.g. --sbatch-arg=--time=4:00:00")
    p.add_argument("--chain", choices=["none", "afterok", "afterany"], help="default none")
    p.add_argument("--out-dir", help="configs, logs, jobs.tsv and sweep.json go to OUT_DIR/NAME "
                   "(default sweeps)")
    p.add_argument("--runs-root", help="run directories: RUNS_ROOT/NAME/POINT (default runs)")
    p.add_argument("--script", help="the batch script (default slurm/train.sbatch)")
    p.add_argument("--no-scale-factors", action="store_true", help="keep PI/YaRN factors at every --seq-length")
    p.add_argument("--no-validate", action="store_true", help="skip harpe-train's config checks per point")
    p.add_argument("--dry-run", action="store_true", help="write the configs, print the commands, submit/run nothing")
    p.add_argument("--debug", action="store_true", help="tracebacks for bad-input errors too (HARPE_DEBUG=1)")
    loc = p.add_argument_group("running on this machine (--local)")
    loc.add_argument("--local", action="store_true", help="run the points here, one after another, instead of sbatch")
    loc.add_argument("--stop-on-failure", action="store_true", help="--local: stop at the first failed point "
                     "(default: go on with the others, exit 1 at the end)")
    loc.add_argument("--eval", action="append", default=[], metavar="'COMMAND ARGS'",
                     help="--local: after training, export to <run_dir>/hf and run `harpe-eval COMMAND ARGS` into "
                          "<run_dir>/eval/COMMAND (repeat; COMMAND: ppl, passkey, niah, needle)")
    loc.add_argument("--eval-args", metavar="'ARGS'", help="arguments for every --eval command, "
                     "e.g. '--tokenizer tok/tokenizer.model --tokenizer-type sentencepiece --device cpu'")
    loc.add_argument("--export-args", metavar="'ARGS'", help="extra harpe-convert megatron-to-hf "
                     "arguments, e.g. '--tokenizer tok/tokenizer.model'")
    return p


def _submit(args, points: list[Point], sweep_dir: Path, argv: list[str]) -> int:
    """Slurm: sbatch every point (or print the commands with --dry-run)."""
    from megatron_harpe.sweeps import manifest

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
            manifest.write(sweep_dir, manifest.build(args, points, sweep_dir, argv, mode="slurm"))
            return 1
        p.job_id = proc.stdout.strip().split(";")[0]
        previous = p.job_id
    manifest.write_jobs_tsv(points, sweep_dir)
    manifest.write(sweep_dir, manifest.build(args, points, sweep_dir, argv, mode="slurm"))
    print_table(points)
    submitted = sum(1 for p in points if p.job_id)
    print(f"{PROG}: {len(points)} point(s), {submitted} submitted"
          f"{' (dry run)' if args.dry_run else ''}{f', chained {args.chain}' if args.chain != 'none' else ''}; "
          f"configs, jobs.tsv and sweep.json in {sweep_dir}")
    return 0


def _grid(args, argv: list[str]) -> int:
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", args.name):
        raise SweepError(f"--name {args.name!r} must be letters, digits, _ . + -")
    sweep_dir = Path(args.out_dir) / args.name
    if args.local:
        if args.chain != "none" or args.sbatch_arg:
            raise SweepError("--chain and --sbatch-arg are for Slurm submission; --local runs the points one after "
                             "another anyway")
    else:
        if not os.path.isfile(args.script):
            raise SweepError(f"batch script {args.script} does not exist (--script)")
        if args.eval or args.eval_args or args.export_args or args.stop_on_failure:
            raise SweepError("--eval, --eval-args, --export-args and --stop-on-failure need --local; on Slurm, "
                             "evaluate after training with slurm/convert.sbatch and harpe-eval (docs/sweeps.md)")
    evals = [parse_eval(e) for e in args.eval]
    if args.eval_args and not evals:
        raise SweepError("--eval-args without --eval: name the evaluations, e.g. --eval 'passkey --lengths 1k,2k'")
    try:
        common_eval = shlex.split(args.eval_args)
        export_args = shlex.split(args.export_args)
    except ValueError as err:
        raise SweepError(f"--eval-args / --export-args: {err}") from None
    _check_eval_args(common_eval, "--eval-args")
    if len({e.command for e in evals}) != len(evals):
        raise SweepError(f"--eval names a command twice ({[e.command for e in evals]}): each writes "
                         f"<run_dir>/eval/<command>; put all its arguments in one --eval")
    points = build_points(args)
    if len({p.name for p in points}) != len(points):
        raise SweepError("two points have the same name; name the methods and layouts apart")
    if not args.local:
        write_configs(points, sweep_dir, args.runs_root, args.name, not args.no_validate, args.tasks_per_node)
        return _submit(args, points, sweep_dir, argv)
    from megatron_harpe.sweeps import local

    with local.sweep_lock(sweep_dir):  # configs are rewritten: not while another --local sweep trains from them
        write_configs(points, sweep_dir, args.runs_root, args.name, not args.no_validate, args.tasks_per_node,
                      local=True)
        if evals and not any(w.startswith("--tokenizer") for w in common_eval + export_args):
            untokenized = [p.name for p in points if not p.tokenizer]
            if untokenized:  # refused now rather than after hours of training: harpe-eval reads text
                raise SweepError(f"--eval: point(s) {', '.join(untokenized)} have no data.tokenizer_model (mock "
                                 f"data?), so their export has no tokenizer and harpe-eval cannot make prompts; give "
                                 f"one with --export-args='--tokenizer PATH' (shipped with the export) or "
                                 f"--eval-args='--tokenizer PATH --tokenizer-type sentencepiece'")
        return local.run_sweep(args, points, sweep_dir, argv, evals=evals, eval_args=common_eval,
                               export_args=export_args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:
        from megatron_harpe.sweeps import report

        return report.main(argv[1:])
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: _grid(_resolve_args(args), argv), argv=argv,
                       interrupted="rerun the same command to continue")


def _resolve_args(args):
    """The command line on top of the --grid file (megatron_harpe/sweeps/grid_file.py), defaults filled in."""
    from megatron_harpe.sweeps import grid_file

    if args.grid:
        grid_file.merge(args, grid_file.load(args.grid), method_name=lambda text: parse_method(text)[0])
    grid_file.fill_defaults(args)
    if args.script is None:
        args.script = str(DEFAULT_SCRIPT)
    return args


if __name__ == "__main__":
    sys.exit(main())
