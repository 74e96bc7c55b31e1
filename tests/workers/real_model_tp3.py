"""Worker (3 gloo ranks): the real model (SmolLM2-135M, tests/test_real_model.py) converted, loaded at TP=3.

TP=3 is the layout that splits this model's 9 query heads / 3 K/V groups one group per rank (and its
49,152-row tied embedding 16,384 rows per rank). Both checkpoints are loaded with the trainer's own
`init_from` loader (training/checkpointing.load_weights_only), as harpe-train does.

- rope: the conversion with the checkpoint's own RoPE (base 1e5); its logits against Hugging Face's, then it is
  saved from this layout (the export of that save must give back the HF tensors bit for bit); then at PP=3
  (10 layers a stage, the tied output layer on the last stage), its logits through the pipeline schedule;
- harpe: the conversion with HARPE, every group's base 1e5; its logits against Hugging Face's, and the base
  each rank holds.

Usage (under torchrun): real_model_tp3.py --out DIR --rope CKPT --harpe CKPT --ref REF.pt
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

from tests.workers.convert_parallel import load, pipeline_logits, save_from_layout, set_layout  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--rope", required=True)
    parser.add_argument("--harpe", required=True)
    parser.add_argument("--ref", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ref = torch.load(args.ref)
    tokens, ref_logits = ref["tokens"], ref["logits"]
    verdict = {}

    cfg, model = load(args.rope, tp=3, pp=1)
    verdict["rope_qkv_rows"] = model.decoder.layers[0].self_attention.linear_qkv.weight.shape[0]
    verdict["rope_embedding_rows"] = model.embedding.word_embeddings.weight.shape[0]
    with torch.no_grad():
        verdict["rope_max_diff"] = (model(tokens, None, None) - ref_logits).abs().max().item()
    save_from_layout(model, cfg, args.rope, os.path.join(args.out, "rope_tp3"))
    del model

    # tied embeddings across pipeline stages: the first stage holds the embedding, the last one the output layer
    # that megatron-core ties to it (loaded from the same checkpoint tensor)
    cfg, model = load(args.rope, tp=1, pp=3)
    verdict["pp3_local_layers"] = len(model.decoder.layers)
    logits = pipeline_logits(model, tokens, tokens.shape[1])
    if ps.is_pipeline_last_stage():
        verdict["pp3_max_diff"] = (logits - ref_logits).abs().max().item()
    del model

    cfg, model = load(args.harpe, tp=3, pp=1)
    verdict["harpe_local_bases"] = list(model.rotary_pos_emb.local_bases)
    with torch.no_grad():
        verdict["harpe_max_diff"] = (model(tokens, None, None) - ref_logits).abs().max().item()

    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(verdict, f)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
