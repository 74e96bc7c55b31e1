"""Worker (gloo ranks): the step-0 check (training/init_check.py) on the real model, several scenarios per launch.

Each scenario is a list of dotted overrides of the base config; its InitCheckResult (the same on every rank) goes
into rank{r}.json under the scenario's name. `--random-weights DIR` first saves a randomly initialised model of the
checkpoint's shape there (TP = world size), for the scenarios that point training.init_from at it.

Usage (under torchrun): init_check.py --out DIR --config BASE.yaml --hf HF_DIR --scenarios JSON
                        [--random-weights DIR --like CKPT]
"""
from __future__ import annotations

import argparse
import json
import os
import time

from megatron_harpe.backends import setup_backend

setup_backend()

import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402

from megatron_harpe.config.loader import load_config  # noqa: E402
from megatron_harpe.convert.hf_reference import HFReference  # noqa: E402
from megatron_harpe.convert.megatron_io import open_checkpoint  # noqa: E402
from megatron_harpe.models.provider import build_model  # noqa: E402
from megatron_harpe.models.transformer_config import build_transformer_config  # noqa: E402
from megatron_harpe.training.init_check import check_init  # noqa: E402
from tests.workers.convert_parallel import save_from_layout, set_layout  # noqa: E402


def save_random_weights(like: str, directory: str) -> None:
    """A model of `like`'s shape, initialised as a fresh run would be, saved as a weights-only checkpoint."""
    tp = dist.get_world_size()
    set_layout(tp, 1)
    cfg = open_checkpoint(like).model_cfg
    model = build_model(cfg, build_transformer_config(cfg, tensor_parallel=tp))
    save_from_layout(model, cfg, like, directory)
    ps.destroy_model_parallel()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--hf", required=True)
    parser.add_argument("--scenarios", required=True, help='{"name": ["key=value", ...], ...}')
    parser.add_argument("--random-weights", default=None)
    parser.add_argument("--like", default=None)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    verdicts = {}
    if args.random_weights:
        save_random_weights(args.like, args.random_weights)
    reference = HFReference(args.hf, show_progress=False)
    for name, overrides in json.loads(args.scenarios).items():
        started = time.perf_counter()
        result = check_init(load_config(args.config, overrides), reference)
        verdicts[name] = {"passed": result.passed, "exit_code": result.exit_code,
                          "megatron_loss": result.megatron_loss, "reference_loss": result.reference_loss,
                          "rel_diff": result.rel_diff, "tokens": result.tokens,
                          "reference_tokens": result.reference_tokens, "documents": result.documents,
                          "failure": result.failure, "report": result.report(), "rtol": result.rtol,
                          "seconds": time.perf_counter() - started}
    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(verdicts, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
