"""`harpe-sweep --grid FILE.yaml`: a whole experiment grid in one reviewable file instead of a long command line.

The file's keys mirror the command-line flags, so a grid file is exactly a command line that can be committed,
diffed and rerun:

    name: study-cpu
    methods: {harpe: cpu/harpe.yaml, pi: cpu/pi.yaml}     # NAME: CONFIG, relative to this file's directory
    seq_lengths: [256]
    layouts: {tp2: {tp: 2}}                                # or ["tp2:tp=2"]
    seeds: [1, 2, 3]
    set: {training.iterations: 100, training.probe.lengths: [256, 512]}   # or ["training.iterations=100"]
    local: true

It is translated into the flags' values (`merge`) before anything else runs, so a grid file and the equivalent
flags give the same points and byte-identical configs. Rules for the command line on top of a file (also in
docs/sweeps.md): repeatable flags add to the file's lists (`--seq-length`, `--seed`, `--set` after the file's
overrides, so they win, `--sbatch-arg`), except that a `--method`, `--layout` or `--eval` with a name the file
already has replaces the file's entry; single-valued flags given on the command line replace the file's value;
switches (`--local`, `--stop-on-failure`, `--no-validate`, `--no-scale-factors`) are on when either turns them on.
Anything wrong in the file (unknown key, wrong type, a method config that does not exist) is a SweepError
(exit 2) naming the file and the key, before any config is written.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import yaml

from megatron_harpe.sweeps.errors import SweepError

#: key -> (argparse dest, kind); kinds are checked in _value
KEYS: dict[str, tuple[str, str]] = {
    "name": ("name", "str"),
    "methods": ("method", "methods"),
    "seq_lengths": ("seq_length", "ints"),
    "layouts": ("layout", "layouts"),
    "seeds": ("seed", "ints"),
    "set": ("set", "overrides"),
    "nodes": ("nodes", "int"),
    "tasks_per_node": ("tasks_per_node", "int"),
    "sbatch_args": ("sbatch_arg", "strs"),
    "chain": ("chain", "chain"),
    "out_dir": ("out_dir", "str"),
    "runs_root": ("runs_root", "str"),
    "script": ("script", "path"),
    "no_scale_factors": ("no_scale_factors", "bool"),
    "no_validate": ("no_validate", "bool"),
    "local": ("local", "bool"),
    "stop_on_failure": ("stop_on_failure", "bool"),
    "eval": ("eval", "strs"),
    "eval_args": ("eval_args", "str"),
    "export_args": ("export_args", "str"),
}
#: single-valued flags: None in the parser means "not given", so the file's value can stand; then these defaults
DEFAULTS = {"nodes": 1, "tasks_per_node": 8, "chain": "none", "out_dir": "sweeps", "runs_root": "runs",
            "eval_args": "", "export_args": ""}
CHAINS = ("none", "afterok", "afterany")


def load(path: str) -> dict[str, Any]:
    """The grid file as {argparse dest: value}, every key and type checked; paths resolved against its directory."""
    where = f"--grid {path}"
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise SweepError(f"{where}: cannot read it ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise SweepError(f"{where}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise SweepError(f"{where}: expected a mapping of keys (name, methods, seeds, set, ...), got "
                         f"{type(data).__name__}")
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise SweepError(f"{where}: {unknown[0]}: unknown key; known keys: {', '.join(KEYS)}")
    base = os.path.dirname(path)
    return {KEYS[key][0]: _value(KEYS[key][1], value, f"{where}: {key}", base) for key, value in data.items()}


def _scalar_text(value: Any) -> str:
    """A value as harpe-train's override parser (YAML) reads it back: JSON is YAML, and quotes keep strings strings."""
    return value if isinstance(value, str) else json.dumps(value)


def _value(kind: str, value: Any, where: str, base: str) -> Any:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise SweepError(f"{where}: expected {what}, got {type(value).__name__} {value!r}")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if kind == "str":
        need(isinstance(value, str) and value != "", "a non-empty string")
        return value
    if kind == "path":
        need(isinstance(value, str) and value != "", "a path")
        return os.path.normpath(os.path.join(base, value))
    if kind == "int":
        need(is_int(value) and value >= 1, "a positive integer")
        return value
    if kind == "bool":
        need(isinstance(value, bool), "true or false")
        return value
    if kind == "chain":
        need(value in CHAINS, f"one of {', '.join(CHAINS)}")
        return value
    if kind == "ints":
        need(isinstance(value, list) and all(is_int(v) for v in value), "a list of integers, e.g. [1, 2, 3]")
        return list(value)
    if kind == "strs":
        need(isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of strings")
        return list(value)
    if kind == "methods":
        need(isinstance(value, dict) and value, "a mapping NAME: CONFIG.yaml (relative to the grid file)")
        out = []
        for name, config in value.items():
            if not isinstance(config, str):
                raise SweepError(f"{where}.{name}: expected a config path, got {type(config).__name__} {config!r}")
            resolved = os.path.normpath(os.path.join(base, config))
            if not os.path.isfile(resolved):
                raise SweepError(f"{where}.{name}: config {config} does not exist (looked for {resolved}; paths are "
                                 f"relative to the grid file's directory)")
            out.append(f"{name}={resolved}")
        return out
    if kind == "layouts":
        if isinstance(value, list):
            need(all(isinstance(v, str) for v in value), "a mapping NAME: {tp: .., cp: ..} or a list of "
                 "'NAME:k=v,...' strings")
            return list(value)
        need(isinstance(value, dict) and value, "a mapping NAME: {tp: .., cp: ..} or a list of 'NAME:k=v,...'")
        out = []
        for name, keys in value.items():
            if not isinstance(keys, dict) or any(isinstance(v, (dict, list)) or "," in str(v) for v in keys.values()):
                raise SweepError(f"{where}.{name}: expected a mapping of single values, e.g. {{nodes: 4, tp: 8, "
                                 f"cp: 4}}, got {keys!r}")
            out.append(f"{name}:" + ",".join(f"{k}={_scalar_text(v)}" for k, v in keys.items()))
        return out
    if kind == "overrides":
        if isinstance(value, list):
            need(all(isinstance(v, str) and "=" in v for v in value), "a list of 'dotted.key=value' strings")
            return list(value)
        need(isinstance(value, dict), "a mapping dotted.key: value or a list of 'dotted.key=value' strings")
        return [f"{k}={_scalar_text(v)}" for k, v in value.items()]
    raise AssertionError(kind)  # pragma: no cover - KEYS names only the kinds above


def _named(entries: list[str], name_of: Callable[[str], str], cli: list[str]) -> list[str]:
    """The file's entries with those the command line names again replaced by the command line's, then the new."""
    given = {name_of(e): e for e in cli}
    kept = [given.pop(name_of(e), e) for e in entries]
    return kept + [e for e in cli if name_of(e) in given]


def merge(args, grid: dict[str, Any], method_name: Callable[[str], str]) -> None:
    """Put the grid file's values under the command line's (rules in the module docstring), in place.
    ``method_name``: the name of a --method entry (sweep.py's rule: NAME=CONFIG, or the config file's stem)."""

    for dest, value in grid.items():
        cli = getattr(args, dest)
        if dest == "method":
            setattr(args, dest, _named(value, method_name, cli or []))
        elif dest == "layout":
            setattr(args, dest, _named(value, lambda t: t.partition(":")[0], cli))
        elif dest == "eval":
            setattr(args, dest, _named(value, lambda t: (t.split() or [""])[0], cli))
        elif isinstance(value, list):
            setattr(args, dest, value + cli)
        elif isinstance(value, bool):
            setattr(args, dest, value or cli)
        elif cli is None:
            setattr(args, dest, value)


def fill_defaults(args) -> None:
    """After the merge: what neither the file nor the command line gave; --name and a method are required."""
    for dest, default in DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    if not args.name:
        raise SweepError("the sweep needs a name: --name NAME (or `name:` in the --grid file)")
    if not args.method:
        raise SweepError("the sweep needs at least one method: --method NAME=CONFIG (or `methods:` in the --grid file)")
