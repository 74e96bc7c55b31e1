"""`python -m megatron_harpe.slurm.runinfo --config X.yaml [dotted.key=value ...]`: where a run lives.

Prints shell assignments for slurm/train.sbatch (``eval "$(python -m megatron_harpe.slurm.runinfo ...)"``)::

    RUN_DIR=/abs/runs/llama2_7b_harpe_128k
    CKPT_DIR=/abs/runs/llama2_7b_harpe_128k/checkpoints
    LATEST=iter_0000400            # the checkpoint a resume starts from ('' for a fresh start)

It reads only the YAML and the overrides of ``run_dir`` and ``checkpoint.dir``, with harpe-train's rules
(values parsed as YAML, later overrides win), and imports neither torch nor megatron-core, so it costs
~0.1 s in a batch script. Everything else in the config is checked by harpe-train itself on every rank
(a bad config exits 2, which the batch script never requeues). Relative paths are relative to the
current directory, as for harpe-train (a batch job starts in the directory it was submitted from).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import yaml

DEFAULT_RUN_DIR = "runs/default"  # megatron_harpe.config.schema.Config.run_dir (a test keeps them equal)
LATEST_FILE = "latest"  # megatron_harpe.training.checkpointing.LATEST


class RunInfoError(ValueError):
    pass


def _override(data: dict, dotted: str, overrides: list[str]):
    """The value `dotted` ends up with after harpe-train applies `overrides` to `data`."""
    node = data
    found, value = True, None
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            found = False
            break
        node = node[part]
    if found:
        value = node
    for item in overrides:
        if "=" not in item:
            raise RunInfoError(f"override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        if key.strip() == dotted:
            value = yaml.safe_load(raw) if raw.strip() else None
        elif dotted.startswith(key.strip() + "."):  # a whole section replaced: checkpoint={dir: x}
            sub = yaml.safe_load(raw) if raw.strip() else None
            for part in dotted[len(key.strip()) + 1:].split("."):
                sub = sub.get(part) if isinstance(sub, dict) else None
            value = sub
    return value


def run_info(config: str | None, overrides: list[str]) -> dict:
    data: dict = {}
    if config:
        path = Path(config)
        if not path.is_file():
            raise RunInfoError(f"config file {config} does not exist (relative paths are relative to "
                               f"{os.getcwd()}); see examples/ for configs")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RunInfoError(f"config file {config} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise RunInfoError(f"config file {config} must hold a mapping at the top level")
    run_dir = _override(data, "run_dir", overrides) or DEFAULT_RUN_DIR
    ckpt_dir = _override(data, "checkpoint.dir", overrides) or os.path.join(str(run_dir), "checkpoints")
    run_dir, ckpt_dir = os.path.abspath(str(run_dir)), os.path.abspath(str(ckpt_dir))
    latest = ""
    try:
        latest = Path(ckpt_dir, LATEST_FILE).read_text().strip()
    except OSError:
        pass
    return {"RUN_DIR": run_dir, "CKPT_DIR": ckpt_dir, "LATEST": latest}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_harpe.slurm.runinfo", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        info = run_info(args.config, args.overrides)
    except RunInfoError as err:
        print(f"runinfo: error: {err}", file=sys.stderr)
        return 2
    for key, value in info.items():
        print(f"{key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
