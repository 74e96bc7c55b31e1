"""Worker (4 gloo ranks): converted checkpoints loaded into parallel layouts, compared with Hugging Face.

Every layout loads the converted checkpoint with the trainer's own `init_from` loader
(training/checkpointing.load_weights_only), so what is tested is what harpe-train does.

- tp2_pp2: TP=2 x PP=2 — logits through megatron-core's pipeline schedule equal the HF model's;
  the model is then saved from this layout (export must round-trip it bit for bit).
- tp2: TP=2 (x DP=2) — logits equal the HF model's.
- harpe_tp2: the HARPE conversion at TP=2 — logits and a greedy continuation are written for the
  comparison with the exported HF model; the model is saved from this layout.

Usage (under torchrun): convert_parallel.py --out DIR --llama CKPT --harpe CKPT --ref REF.pt
"""
from __future__ import annotations

import argparse
import json
import os

from megatron_harpe.backends import setup_backend

setup_backend()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402

from megatron_harpe.convert.megatron_io import CONVERSION_KEY, MODEL_KEY, open_checkpoint  # noqa: E402
from megatron_harpe.models.checkpoint import read_common_state, save_model  # noqa: E402
from megatron_harpe.models.transformer_config import build_transformer_config  # noqa: E402
from megatron_harpe.models.provider import build_model  # noqa: E402
from megatron_harpe.training.checkpointing import load_weights_only  # noqa: E402

GREEDY_STEPS = 8


def set_layout(tp=1, pp=1):
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(1234)


def load(ckpt: str, tp: int, pp: int):
    """This rank's stage of the converted model at TP=tp, PP=pp, loaded like training.init_from does."""
    set_layout(tp, pp)
    cfg = open_checkpoint(ckpt).model_cfg
    # no random initialisation: load_weights_only overwrites every parameter (it is strict), and a 135M model's
    # init costs seconds per rank
    tcfg = build_transformer_config(cfg, tensor_parallel=tp, pipeline_parallel=pp, perform_initialization=False)
    model = build_model(cfg, tcfg, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                        parallel_output=False).eval()
    load_weights_only(ckpt, [model])
    return cfg, model


def compare(logits, ref_logits) -> dict:
    vocab = ref_logits.shape[-1]  # the HF vocabulary; rows beyond it are megatron padding
    return {"max_diff": (logits[..., :vocab] - ref_logits).abs().max().item(),
            "padded_logits_zero": bool((logits[..., vocab:] == 0).all())}


def pipeline_logits(model, tokens, seq):
    seen = []

    def forward_step(data_iterator, module):
        batch = next(data_iterator)
        output = module(batch, None, None)

        def loss_func(out):
            seen.append(out.detach())
            return out.float().sum() * 0.0, {}

        return output, loss_func

    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([tokens]), model=[model],
                                    num_microbatches=1, seq_length=seq, micro_batch_size=tokens.shape[0],
                                    forward_only=True)
    return seen[0] if seen else None


def save_from_layout(model, cfg, source_ckpt: str, directory: str):
    common = read_common_state(source_ckpt)
    save_model([model], cfg, directory, extra_common={k: common[k] for k in (MODEL_KEY, CONVERSION_KEY) if k in common})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--llama", required=True)
    parser.add_argument("--harpe", required=True)
    parser.add_argument("--ref", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ref = torch.load(args.ref)
    tokens, ref_logits = ref["tokens"], ref["logits"]
    verdict = {}

    cfg, model = load(args.llama, tp=2, pp=2)
    logits = pipeline_logits(model, tokens, tokens.shape[1])
    if ps.is_pipeline_last_stage():
        verdict["tp2_pp2"] = compare(logits, ref_logits)
    verdict["tp2_pp2_local_layers"] = len(model.decoder.layers)
    verdict["tp2_pp2_qkv_rows"] = model.decoder.layers[0].self_attention.linear_qkv.weight.shape[0]
    save_from_layout(model, cfg, args.llama, os.path.join(args.out, "llama_tp2_pp2"))

    cfg, model = load(args.llama, tp=2, pp=1)
    with torch.no_grad():
        verdict["tp2"] = compare(model(tokens, None, None), ref_logits)

    cfg, model = load(args.harpe, tp=2, pp=1)
    verdict["harpe_local_bases"] = list(model.rotary_pos_emb.local_bases)
    with torch.no_grad():
        harpe_logits = model(tokens, None, None)
        ids = tokens[:1, :6]
        for _ in range(GREEDY_STEPS):
            step = model(ids, None, None)[0, -1, :ref_logits.shape[-1]]
            ids = torch.cat([ids, step.argmax().view(1, 1)], dim=1)
    gqa_logits = ref["gqa_logits"]  # the same weights with one base (the HF source): HARPE must differ
    verdict["harpe_vs_llama_max_diff"] = (harpe_logits[..., :gqa_logits.shape[-1]] - gqa_logits).abs().max().item()
    if rank == 0:
        torch.save({"logits": harpe_logits, "prompt": tokens[:1, :6], "greedy": ids},
                   os.path.join(args.out, "harpe_tp2.pt"))
    save_from_layout(model, cfg, args.harpe, os.path.join(args.out, "harpe_tp2"))

    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(verdict, f)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
