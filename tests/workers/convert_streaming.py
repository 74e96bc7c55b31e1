"""Worker (4 gloo ranks): a streamed hf-to-megatron checkpoint loaded into parallel layouts and saved from them.

Each layout loads the checkpoint with the trainer's own `init_from` loader
(training/checkpointing.load_weights_only) and saves its weights with the trainer's checkpoint
writer (models/checkpoint.save_model), so the pytest side can export each saved layout with the
streaming reader and compare every tensor with the Hugging Face source, bit for bit:
tp2_pp2 (TP=2 x PP=2), tp2 (TP=2, DP=2), pp2 (PP=2, DP=2).

Usage (under torchrun): convert_streaming.py --out DIR --ckpt CKPT
"""
from __future__ import annotations

import argparse
import json
import os

from megatron_harpe.backends import setup_backend

setup_backend()

import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402

from tests.workers.convert_parallel import load, save_from_layout  # noqa: E402

LAYOUTS = {"tp2_pp2": (2, 2), "tp2": (2, 1), "pp2": (1, 2)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    verdict = {}
    for name, (tp, pp) in LAYOUTS.items():
        cfg, model = load(args.ckpt, tp, pp)
        verdict[name] = {"local_layers": len(model.decoder.layers),
                         "qkv_rows": model.decoder.layers[0].self_attention.linear_qkv.weight.shape[0]}
        save_from_layout(model, cfg, args.ckpt, os.path.join(args.out, name))
    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(verdict, f)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
