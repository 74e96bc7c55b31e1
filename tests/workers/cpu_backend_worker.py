"""Worker for tests/test_cpu_backend.py: megatron-core's real multi-rank paths on the CPU backend.

Run by tests/launch.py under torchrun on 2 gloo ranks. One launch runs every scenario
(start-up dominates), re-initialising megatron's model parallelism between them, and
writes the results to OUT/rank{RANK}.json. Any exception fails the launch (torchrun then
stops the other rank), so a broken adaptation shows up with its traceback.

Scenarios:
  sp_mappings   TP=2: backward through megatron's sequence-parallel gather/reduce-scatter
  gpt_tp2       TP=2: GPTModel (local spec, dropout on) + DDP + AdamW + clip_grad, 3 training
                steps, then a dist_checkpointing save/load round trip
  gpt_pp2_1f1b  PP=2: the same through megatron's 1F1B pipeline schedule (4 microbatches)
  gpt_dp2       DP=2: distributed optimizer with overlapped grad reduction
"""
from __future__ import annotations

import argparse
import json
from datetime import timedelta
from pathlib import Path

from megatron_harpe.backends import distributed_backend, setup_backend

BACKEND = setup_backend()  # before megatron.core is imported

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state, tensor_parallel  # noqa: E402

VOCAB, SEQ, MICRO_BATCH = 64, 16, 2


def sp_mappings(rank: int, out_dir: str) -> dict:
    """Gradients through gather_from_sequence_parallel_region / reduce_scatter_to_sequence_parallel_region.

    Their backward passes are a reduce-scatter / all-gather that allocate with
    ``device=torch.cuda.current_device()`` inside autograd.
    """
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    group = parallel_state.get_tensor_model_parallel_group()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()

    # gather: y = [x_0; x_1]; loss_r = sum(y * w_r) with w_r = (r+1) * base
    # => dL/dx_r = sum_q (q+1) * base[slice r] = 3 * base[slice r]  (reduce-scatter of grads)
    base = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    x = torch.full((2, 3), float(tp_rank + 1), requires_grad=True)
    y = tensor_parallel.gather_from_sequence_parallel_region(x, group=group)
    (y * base * (tp_rank + 1)).sum().backward()
    expected_x_grad = 3 * base[2 * tp_rank: 2 * tp_rank + 2]

    # reduce-scatter: z_r = a_0[slice r] + a_1[slice r]; loss_r = sum(z_r) * (r+1)
    # => dL/da = [1; 2] (all-gather of grads), the same on both ranks
    a = torch.ones(4, 3, requires_grad=True)
    z = tensor_parallel.reduce_scatter_to_sequence_parallel_region(a, group=group)
    torch.autograd.backward((z * (tp_rank + 1)).sum())
    expected_a_grad = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)])

    return {
        "gather_forward_ok": torch.equal(y, torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)])),
        "gather_grad_ok": torch.equal(x.grad, expected_x_grad),
        "reduce_scatter_forward_ok": torch.equal(z, torch.full((2, 3), 2.0)),
        "reduce_scatter_grad_ok": torch.equal(a.grad, expected_a_grad),
    }


def _gpt(tp: int = 1, pp: int = 1, seed: int = 1234, **config_kwargs):
    """A tiny GPTModel for this rank's stage, wrapped in megatron DDP, plus its optimizer."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    ddp_kwargs = config_kwargs.pop("ddp", {})
    opt_kwargs = config_kwargs.pop("optimizer", {})
    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32, hidden_dropout=0.1, attention_dropout=0.1,
        normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, **config_kwargs)
    model = GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage())
    model = DistributedDataParallel(config, DistributedDataParallelConfig(**ddp_kwargs), model)
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=3e-3, weight_decay=0.01, clip_grad=1.0, **opt_kwargs), [model])
    return model, optimizer


def _batches(seed: int, count: int):
    """Deterministic next-token batches of a repeating pattern (easy to fit)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        start = torch.randint(0, VOCAB, (MICRO_BATCH, 1), generator=gen)
        tokens = (start + torch.arange(SEQ + 1)) % VOCAB
        yield {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}


def _train(model, optimizer, steps: int, num_microbatches: int, data_seed: int) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    position_ids = torch.arange(SEQ).unsqueeze(0).expand(MICRO_BATCH, -1)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        loss = model(batch["tokens"], position_ids, None, labels=batch["labels"])

        def loss_func(output):
            loss_sum = output.float().sum()
            num_tokens = torch.tensor(output.numel(), dtype=torch.int)
            return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}

        return loss, loss_func

    forward_backward = get_forward_backward_func()
    losses, grad_norms, stage_grad_norms = [], [], []
    for step in range(steps):
        data = _batches(data_seed + step, num_microbatches)
        model.zero_grad_buffer()
        optimizer.zero_grad()
        out = forward_backward(forward_step_func=forward_step, data_iterator=data, model=[model],
                               num_microbatches=num_microbatches, seq_length=SEQ, micro_batch_size=MICRO_BATCH,
                               forward_only=False)
        stage_grad_norms.append(float(sum(p.main_grad.norm() ** 2 for p in model.parameters()) ** 0.5))
        ok, grad_norm, _ = optimizer.step()
        grad_norms.append(float(grad_norm) if grad_norm is not None else None)
        if out:  # last pipeline stage
            summed = torch.stack([d["lm loss"] for d in out]).sum(0)
            losses.append(float(summed[0] / summed[1]))
    digest = float(sum(p.detach().double().sum() for p in model.parameters()))
    # parameters every TP rank holds whole (norms): they must stay identical across TP ranks,
    # which needs the same default-RNG dropout masks there (megatron's RNG tracker)
    replicated = float(sum(p.detach().double().sum() for p in model.parameters()
                           if not getattr(p, "tensor_model_parallel", False)))
    return {"losses": losses, "grad_norms": grad_norms, "stage_grad_norms": stage_grad_norms,
            "param_digest": digest, "replicated_param_digest": replicated}


def gpt_tp2(rank: int, out_dir: str) -> dict:
    """Train 3 steps, then save and reload the model with megatron's dist_checkpointing."""
    from megatron.core import dist_checkpointing

    model, optimizer = _gpt(tp=2)
    result = _train(model, optimizer, steps=3, num_microbatches=2, data_seed=7)
    ckpt = Path(out_dir, "gpt_tp2_checkpoint")
    ckpt.mkdir(parents=True, exist_ok=True)
    inner = model.module
    dist_checkpointing.save(inner.sharded_state_dict(), str(ckpt))
    saved = {k: v.detach().clone() for k, v in inner.state_dict().items() if torch.is_tensor(v)}
    with torch.no_grad():
        for p in inner.parameters():
            p.zero_()
    inner.load_state_dict(dist_checkpointing.load(inner.sharded_state_dict(), str(ckpt)))
    result["checkpoint_roundtrip_ok"] = all(torch.equal(saved[k], v) for k, v in inner.state_dict().items()
                                            if k in saved)
    return result


def gpt_pp2_1f1b(rank: int, out_dir: str) -> dict:
    model, optimizer = _gpt(pp=2)
    result = _train(model, optimizer, steps=3, num_microbatches=4, data_seed=7)
    result["stage"] = parallel_state.get_pipeline_model_parallel_rank()
    return result


def gpt_dp2(rank: int, out_dir: str) -> dict:
    model, optimizer = _gpt(ddp={"use_distributed_optimizer": True, "overlap_grad_reduce": True,
                                  "bucket_size": 2000},
                            optimizer={"use_distributed_optimizer": True})
    # each DP rank sees different data
    return _train(model, optimizer, steps=3, num_microbatches=2, data_seed=100 * (rank + 1))


SCENARIOS = {"sp_mappings": sp_mappings, "gpt_tp2": gpt_tp2, "gpt_pp2_1f1b": gpt_pp2_1f1b, "gpt_dp2": gpt_dp2}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    args = parser.parse_args()
    dist.init_process_group(distributed_backend(), timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    results: dict = {"backend": BACKEND}
    names = [n for n in args.only.split(",") if n] or list(SCENARIOS)
    for name in names:
        results[name] = SCENARIOS[name](rank, args.out)
        parallel_state.destroy_model_parallel()
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
