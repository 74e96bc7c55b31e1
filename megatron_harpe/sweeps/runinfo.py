"""`python -m megatron_harpe.sweeps.runinfo --config X.yaml [dotted.key=value ...]`: where a run lives.

Prints shell assignments for slurm/train.sbatch (``eval "$(python -m megatron_harpe.sweeps.runinfo ...)"``)::

    RUN_DIR=/abs/runs/llama2_7b_harpe_128k
    CKPT_DIR=/abs/runs/llama2_7b_harpe_128k/checkpoints
    LATEST=iter_0000400            # the checkpoint a resume starts from ('' for a fresh start)

It loads the config with harpe-train's own loader (same override rules, same errors for unknown keys),
which imports neither torch nor megatron-core, so it costs ~0.2 s in a batch script. What needs the
world size or the data files is checked by harpe-train itself on every rank (a bad config exits 2,
which the batch script never requeues). Relative paths are relative to the current directory, as for
harpe-train (a batch job starts in the directory it was submitted from).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from megatron_harpe.cli import InputError


LATEST_FILE = "latest"  # megatron_harpe.training.checkpointing.LATEST


class RunInfoError(InputError):
    pass


def run_info(config: str | None, overrides: list[str]) -> dict:
    """RUN_DIR, CKPT_DIR and LATEST of the run harpe-train would start with this config."""
    from megatron_harpe.config.loader import ConfigError, load_config

    try:
        cfg = load_config(config, overrides)
    except ConfigError as err:
        raise RunInfoError(f"{err} (relative paths are relative to {os.getcwd()})") from None
    run_dir = os.path.abspath(cfg.run_dir)
    ckpt_dir = os.path.abspath(cfg.checkpoint.dir or os.path.join(cfg.run_dir, "checkpoints"))
    latest = ""
    try:
        latest = Path(ckpt_dir, LATEST_FILE).read_text().strip()
    except OSError:
        pass
    return {"RUN_DIR": run_dir, "CKPT_DIR": ckpt_dir, "LATEST": latest}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_harpe.sweeps.runinfo", description=__doc__.split("\n")[0])
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
