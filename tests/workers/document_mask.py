"""Worker: document masking (data.document_mask) on 2 gloo ranks, every scenario in one launch.

Model scenarios (a tiny Llama-style HARPE model with GQA, fp64 so equalities are tight; the same
weights on every rank):
- reference: every document of a hand-made micro-batch (2 samples, EODs inside) run ALONE as its
  own [1, len] sequence: per-token losses, their masked sum, parameter gradients of that sum;
- cp1: the micro-batch packed by megatron_harpe.training.packing (what the trainer feeds the model)
  at CP=1 must give the same per-token losses, sum and gradients;
- unmasked: the same micro-batch as today's [b, s] input (no packing): equal to the reference on
  each sample's first document, different after it (documents do attend to each other there);
- no_eod: a micro-batch without EODs, packed, equals the plain [b, s] forward (THD path == BSHD path);
- cp2: the micro-batch packed for CP=2 (each document padded to a multiple of 4, this rank holds
  chunks r and 3-r of every document): per-token losses at this rank's rows equal the reference,
  padding rows carry loss_mask 0, and the CP-summed loss and gradients equal the reference.

Trainer scenario (--blend given): harpe-train's Trainer with data.document_mask=true on real
indexed data (sentencepiece EODs), from the same initial weights, at DP=2, CP=2 and PP=2: the same
losses (the per-token normalisation counts real tokens only, whatever the padding).

Usage (under torchrun, 2 ranks): document_mask.py --out DIR [--blend PREFIX --tokenizer MODEL --runs DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import time

if __name__ == "__main__":
    # only in the launched process: the trainer's checkpoint writer starts a "spawn" helper that
    # re-imports this file, and it must not pay for importing megatron-core (seconds) again
    from megatron_harpe.backends import setup_backend

    setup_backend()

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_harpe.config.model import ModelConfig, PositionEmbeddingConfig
    from megatron_harpe.models.provider import build_model
    from megatron_harpe.models.transformer_config import build_transformer_config
    from megatron_harpe.training.packing import pack_micro_batch, packed_seq_params, rank_rows

    DTYPE = torch.float64

SEQ, VOCAB, EOD = 32, 128, 127
# EOD positions per sample: documents of 5, 13, 14 tokens and of 10, 1, 20, 1 tokens (the last
# sample ends with an EOD, the second document is the EOD alone)
EODS = [[4, 17], [9, 10, 30, 31]]


def model_config() -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                       num_query_groups=2, vocab_size=VOCAB, max_position_embeddings=SEQ,
                       position=PositionEmbeddingConfig(kind="harpe", bases=[10000.0, 1_000_000.0]))


def set_layout(cp=1):
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(context_parallel_size=cp)
    model_parallel_cuda_manual_seed(1234)


def make_model(cp, state=None):
    cfg = model_config()
    model = build_model(cfg, build_transformer_config(cfg, context_parallel=cp, params_dtype=DTYPE))
    if state is None:
        for p in model.parameters():  # identical weights on every rank
            dist.broadcast(p.data, src=0)
    else:
        for name, p in model.named_parameters():
            p.data.copy_(state[name])
    return model


def make_batch(eods=EODS):
    gen = torch.Generator().manual_seed(7)
    text = torch.randint(0, EOD, (len(eods), SEQ + 1), generator=gen)
    for row, positions in enumerate(eods):
        text[row, positions] = EOD
    tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()
    loss_mask = torch.ones(tokens.shape, dtype=torch.float32)
    loss_mask[tokens == EOD] = 0.0  # as data.eod_mask_loss: the mask must travel with the tokens
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": torch.arange(SEQ).repeat(2, 1)}


def documents(eods=EODS):
    """(row, start, end) of every document: each ends after an EOD or at the sample end."""
    docs = []
    for row, positions in enumerate(eods):
        start = 0
        for end in sorted(set([p + 1 for p in positions] + [SEQ])):
            docs.append((row, start, end))
            start = end
    return docs


def grads_of(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def reference(model, batch):
    """Every document alone: per-token losses in flat-stream order, masked sum, gradients."""
    model.zero_grad(set_to_none=True)
    losses, total = [], 0.0
    for row, start, end in documents():
        out = model(batch["tokens"][row:row + 1, start:end], None, None, labels=batch["labels"][row:row + 1, start:end])
        total = total + (out[0] * batch["loss_mask"][row, start:end].to(DTYPE)).sum()
        losses.append(out[0].detach())
    total.backward()
    return {"losses": torch.cat(losses), "sum": total.item(), "grads": grads_of(model)}


def packed_forward(model, batch, cp, cp_rank):
    model.zero_grad(set_to_none=True)
    packed, layout = pack_micro_batch(batch, EOD, cp_size=cp, cp_rank=cp_rank)
    out = model(packed["tokens"], packed["position_ids"], None, labels=packed["labels"],
                packed_seq_params=packed_seq_params(layout))
    total = (out[0] * packed["loss_mask"][0].to(DTYPE)).sum()
    total.backward()
    return out[0].detach(), total.item(), packed, layout


def model_scenarios():
    results = {}
    set_layout()
    model = make_model(1)
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    batch = make_batch()
    ref = reference(model, batch)
    flat_mask = batch["loss_mask"].reshape(-1)

    losses, total, packed, layout = packed_forward(model, batch, 1, 0)
    results["cp1"] = {"loss_max_diff": (losses - ref["losses"]).abs().max().item(), "sum": total, "ref_sum": ref["sum"],
                      "grad_max_diff": max_diff(grads_of(model), ref["grads"]),
                      "grad_scale": max(g.abs().max().item() for g in ref["grads"].values()),
                      "tokens_counted": packed["loss_mask"].sum().item(), "real_tokens": flat_mask.sum().item(),
                      "cu_seqlens": layout.cu_seqlens.tolist(), "documents": len(documents())}

    # masking off: today's [b, s] input, every token sees the documents before it in its sample
    with torch.no_grad():
        plain = model(batch["tokens"], None, None, labels=batch["labels"]).reshape(-1)
    first_doc = torch.zeros(2 * SEQ, dtype=torch.bool)
    for row, start, end in documents():
        if start == 0:
            first_doc[row * SEQ:end + row * SEQ] = True
    later = (plain - ref["losses"]).abs()[~first_doc]
    results["unmasked"] = {"first_document_max_diff": (plain - ref["losses"]).abs()[first_doc].max().item(),
                           "later_documents_mean_diff": later.mean().item(),
                           "later_documents_min_diff": later.min().item()}

    # no EOD: packed (one document per sample) == the plain [b, s] forward, losses and gradients
    clean = make_batch(eods=[[], []])
    model.zero_grad(set_to_none=True)
    plain = model(clean["tokens"], None, None, labels=clean["labels"])
    (plain * clean["loss_mask"].to(DTYPE)).sum().backward()
    plain_grads = grads_of(model)
    losses, _, _, layout = packed_forward(model, clean, 1, 0)
    results["no_eod"] = {"loss_max_diff": (losses - plain.detach().reshape(-1)).abs().max().item(),
                         "grad_max_diff": max_diff(grads_of(model), plain_grads),
                         "cu_seqlens": layout.cu_seqlens.tolist()}

    # CP=2: each rank holds chunks r and 3-r of every (padded) document
    set_layout(cp=2)
    cp_group, cp_rank = ps.get_context_parallel_group(), ps.get_context_parallel_rank()
    model = make_model(2, state)
    losses, total, packed, layout = packed_forward(model, batch, 2, cp_rank)
    source, _ = rank_rows(layout, 2, cp_rank)
    real = source >= 0
    sums = torch.tensor([total, packed["loss_mask"].sum().item()], dtype=torch.float64)
    dist.all_reduce(sums, group=cp_group)
    grads = grads_of(model)
    for g in grads.values():
        dist.all_reduce(g, group=cp_group)
    results["cp2"] = {"loss_max_diff": (losses[real] - ref["losses"][source[real]]).abs().max().item(),
                      "padding_rows": int((~real).sum()),
                      "padding_loss_mask_max": packed["loss_mask"][0][~real].max().item(),
                      "local_rows": int(real.numel()), "sum": sums[0].item(), "ref_sum": ref["sum"],
                      "tokens_counted": sums[1].item(), "real_tokens": flat_mask.sum().item(),
                      "grad_max_diff": max_diff(grads, ref["grads"]),
                      "cu_seqlens_padded": layout.cu_seqlens_padded.tolist()}
    ps.destroy_model_parallel()
    return results


def train_scenarios(args):
    """harpe-train's Trainer in this process (the process group is up), three layouts, same start."""
    from megatron_harpe.config.loader import load_config
    from megatron_harpe.config.validate import validate_config
    from megatron_harpe.training.trainer import run

    common = ["data.kind=indexed", f"data.blend=[{args.blend}]", f"data.tokenizer_model={args.tokenizer}",
              "data.split=100,0,0", "data.seq_length=64", "data.micro_batch_size=2", "data.global_batch_size=4",
              "model.vocab_size=1024", "model.max_position_embeddings=64", "logging.tensorboard=false",
              "training.iterations=2", "data.eod_mask_loss=true"]
    runs = {
        # the start: one iteration without masking, its checkpoint is every other run's init_from
        "seed": ["training.iterations=1"],
        "dp2": ["data.document_mask=true"],
        "cp2": ["data.document_mask=true", "parallel.context=2"],
        "pp2": ["data.document_mask=true", "parallel.pipeline=2"],
        "dp2_unmasked": [],
    }
    out = {}
    for name, overrides in runs.items():
        extra = [] if name == "seed" else [f"training.init_from={args.runs}/seed/checkpoints"]
        cfg = load_config("examples/tiny/harpe.yaml", [f"run_dir={args.runs}/{name}", *common, *overrides, *extra])
        validate_config(cfg, dist.get_world_size())
        started = time.perf_counter()
        result = run(cfg)
        out[name] = {"exit_code": result.exit_code, "losses": {str(k): v for k, v in result.losses.items()},
                     "seconds": time.perf_counter() - started}
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--blend")
    parser.add_argument("--tokenizer")
    parser.add_argument("--runs")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    results = model_scenarios()
    results["model_seconds"] = time.perf_counter() - started
    if args.blend:
        results["train"] = train_scenarios(args)
    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
