"""The single-process reference of the layout-parity check (run as its own process, on the CPU, in fp32).

    python -m megatron_harpe.preflight.reference SPEC.pt OUT.json

One process, one rank, no parallelism: megatron-core's model at TP = PP = CP = DP = 1, on the CPU in fp32
whatever the run's device and precision, loaded with the weights the layout run saved. It computes, per pass
(positions from 0, and shifted far), the loss on the same token windows with its own labels and loss mask -
derived from the windows (the next token; no loss on an EOD input with eod_mask_loss) - one forward per document
with document masking (positions from 0 in each, attention inside it: what packing must equal), the cross
entropy in float64 - and the gradient of the mean loss. Then it loads each pass's saved layout gradients into the
same model and compares them parameter by parameter.

Its own process because a reference at TP=1 on rank 0 of a 32-rank launch would need megatron-core's parallel
state for a world of one while the others wait, and every rank holding a full copy would not fit a CPU.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Dict, List

from megatron_harpe.backends import setup_backend


def _grads_by_name(model) -> Dict[str, Any]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def run(spec_path: str) -> Dict[str, Any]:
    setup_backend(force_cpu=True)
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_harpe.models.checkpoint import load_model
    from megatron_harpe.models.provider import build_model
    from megatron_harpe.models.transformer_config import build_transformer_config, fusion_settings
    from megatron_harpe.preflight.positions import shift_positions
    from megatron_harpe.training.init_check import FirstBatch

    spec = torch.load(spec_path, weights_only=False)
    model_cfg = spec["model_cfg"]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    ps.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)
    tcfg = build_transformer_config(model_cfg, params_dtype=torch.float32, use_cpu_initialization=True,
                                    fusions=fusion_settings(model_cfg, cuda=False, te=False, kernel="unfused"),
                                    calculate_per_token_loss=True)
    model = build_model(model_cfg, tcfg, pre_process=True, post_process=True, use_te=False, rope_kernel="unfused")
    model.eval()  # no dropout: the layout's pass runs the training forward of a model that has none, or the same
    load_model([model], None, spec["weights"])
    batch = FirstBatch(spec["windows"].long(), spec["eod_id"], spec["document_mask"], spec["eod_mask_loss"])
    mask = batch.loss_mask()
    out: Dict[str, Any] = {"passes": []}
    for entry in spec["passes"]:  # one pass at a time: a CPU holds the twin about three times, not five
        load_model([model], None, spec["weights"])
        shift_positions([model], entry["shift"])
        model.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        for row, start, end in batch.segments():
            ids = batch.windows[row, start:end][None]
            targets = batch.windows[row, start + 1:end + 1]
            positions = torch.arange(end - start)[None]
            logits = model(ids, positions, None)[0]  # [n, vocab]
            losses = torch.nn.functional.cross_entropy(logits.double(), targets, reduction="none")
            total = total + (losses * mask[row, start:end]).sum()
        tokens = int(mask.sum().item())
        (total / tokens).backward()
        grads = _grads_by_name(model)
        model.zero_grad(set_to_none=True)
        shift_positions([model], 0)
        load_model([model], None, entry["grads"])  # the layout's gradients, where the weights were
        layout = dict(model.named_parameters())
        worst_name, worst, diff2, norm2 = None, 0.0, 0.0, 0.0
        for name, ref in grads.items():
            got = layout[name].detach().double()
            ref = ref.double()
            d2, n2 = float((got - ref).pow(2).sum()), float(ref.pow(2).sum())
            diff2, norm2 = diff2 + d2, norm2 + n2
            rel = math.sqrt(d2) / max(math.sqrt(n2), 1e-30)
            if rel > worst or worst_name is None:
                worst_name, worst = name, rel
        missing = sorted(set(layout) - set(grads))
        del grads, layout
        out["passes"].append({"shift": entry["shift"], "reference_loss": float(total.item()) / tokens,
                              "reference_tokens": tokens,
                              "grad_rel_error": math.sqrt(diff2) / max(math.sqrt(norm2), 1e-30),
                              "worst_param": worst_name, "worst_param_rel_error": worst,
                              "params_without_grad": missing})
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return out


def main(argv: List[str] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec, out = argv
    result = run(spec)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
