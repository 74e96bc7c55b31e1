"""Measure what the planner predicts, on the tensors of a real model: the validation.

For a :class:`~megatron_harpe.planning.spec.Plan` this builds the model the way harpe-train does
(the project's provider, TransformerConfig builder and fusion choices; megatron-core DDP with
``grad_reduce_in_fp32``; megatron-core's optimizer, distributed or not: the same calls as
training/trainer.py), runs one training step (the plan's micro-batches), and counts

* weights: the distinct storages of the parameters (the DDP buffer with the distributed optimizer);
* gradients: the DDP gradient buffers;
* optimizer state: every tensor the inner torch optimizer holds (fp32 master weights, Adam moments,
  step counters) that is not a weight or gradient buffer;
* activations: every tensor autograd saves during the forward pass (``saved_tensors_hooks``),
  dedup'd by storage, minus parameters and minus the rotary module's cached angle table (a
  persistent buffer the planner reports apart; under full recompute the checkpoint saves it too).

Layouts with more than one rank run under torchrun with gloo (:func:`run_scenarios`), each rank
measuring its own share; this file is also the worker script. A plan with device "gpu" (one GPU,
:func:`measure_in_process`) runs two steps and also reports ``torch.cuda.max_memory_allocated`` over
the second, for tools/gpu_check.py.

This module imports torch and megatron-core; the planner itself (everything else in planning/)
does not.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from megatron_harpe.planning.memory import microbatch_activations, model_state, num_microbatches, stage_memory
from megatron_harpe.planning.spec import Plan, plan_from_dict, plan_to_dict

REPO_ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- plans <-> configs
def plan_to_model_config(plan: Plan):
    """The ModelConfig of `plan` (a HARPE model gets distinct made-up bases: the values change no byte)."""
    from megatron_harpe.config.model import ModelConfig

    m, w = plan.model, plan.workload
    if m.position == "harpe":
        position = {"kind": "harpe", "bases": [1.0e4 * (1 + 7 * i) for i in range(m.num_query_groups)]}
    elif m.position == "pi":
        position = {"kind": "pi", "interpolation_factor": 4.0}
    elif m.position == "yarn":
        position = {"kind": "yarn", "yarn_factor": 4.0, "yarn_original_max_position_embeddings": 64}
    else:
        position = {"kind": "rope"}
    position["kernel"] = "unfused" if w.rope_kernel == "unfused" else "fused"
    return ModelConfig(num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
                       num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
                       kv_channels=m.head_dim, vocab_size=m.vocab_size, max_position_embeddings=w.seq_length,
                       tie_embeddings=m.tie_embeddings, hidden_dropout=w.hidden_dropout, position=position)


# ----------------------------------------------------------------------------- measuring one rank
def _storage(t) -> tuple:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _inner_optimizers(optimizer) -> list:
    chained = getattr(optimizer, "chained_optimizers", None)
    return list(chained) if chained is not None else [optimizer]


def _build(plan: Plan):
    """Model chunks wrapped in megatron-core DDP, and megatron-core's optimizer, built the way
    training/trainer.py builds them (same TransformerConfig builder, fusion choices, DDP config and
    optimizer config). device cpu: every fusion off, the local spec; device gpu: the CUDA fusions, the
    Transformer Engine spec when the plan's backend is te (TE must import), the plan's RoPE kernel."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_harpe import compat
    from megatron_harpe.models.provider import build_model
    from megatron_harpe.models.transformer_config import (apex_wgrad_fusion_available, build_transformer_config,
                                                          fusion_settings)

    p, w = plan.layout, plan.workload
    cuda, te = _device_and_spec(plan)
    kernel = w.rope_kernel if cuda else "unfused"
    model_cfg = plan_to_model_config(plan)
    dtype = torch.bfloat16 if w.precision == "bf16" else torch.float32
    tcfg = build_transformer_config(
        model_cfg, tensor_parallel=p.tp, pipeline_parallel=p.pp, virtual_pipeline_parallel=p.vpp,
        context_parallel=p.cp, sequence_parallel=p.sp, params_dtype=dtype, use_cpu_initialization=not cuda,
        fusions=fusion_settings(model_cfg, cuda=cuda, te=te, kernel=kernel,
                                apex_wgrad=cuda and apex_wgrad_fusion_available()),
        calculate_per_token_loss=True,
        recompute_granularity=p.recompute, recompute_method=p.recompute_method,
        recompute_num_layers=p.recompute_num_layers, recompute_modules=list(p.recompute_modules) or None,
        cp_comm_type=p.cp_comm if p.cp > 1 else None, batch_p2p_comm=compat.batch_p2p_comm(p.vpp))
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather, use_distributed_optimizer=p.dist_opt)
    chunks = []
    for vp in range(p.vpp or 1):
        vp_stage = vp if p.vpp else None
        model = build_model(model_cfg, tcfg,
                            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                            vp_stage=vp_stage, use_te=te, rope_kernel=kernel)
        if cuda:
            model.cuda(torch.cuda.current_device())
        chunks.append(DistributedDataParallel(tcfg, ddp_config, model, disable_bucketing=vp > 0))
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-4, min_lr=0.0, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
                        adam_eps=1e-8, clip_grad=1.0, bf16=dtype == torch.bfloat16, params_dtype=dtype,
                        use_distributed_optimizer=p.dist_opt),
        chunks)
    tcfg.finalize_model_grads_func = finalize_model_grads
    tcfg.grad_scale_func = optimizer.scale_loss
    if p.overlap_grad_reduce:
        no_sync = [c.no_sync for c in chunks]
        tcfg.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        grad_sync = [c.start_grad_sync for c in chunks]
        tcfg.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    if p.overlap_param_gather and p.dist_opt:
        param_sync = [c.start_param_sync for c in chunks]
        tcfg.param_sync_func = param_sync[0] if len(param_sync) == 1 else param_sync
    return chunks, optimizer


def _device_and_spec(plan: Plan) -> tuple:
    """(cuda, te) for the plan's device and backend, refused when this machine cannot run them."""
    import torch

    from megatron_harpe.models.spec import transformer_engine_available

    cuda = plan.workload.device == "gpu"
    if cuda and not torch.cuda.is_available():
        raise ValueError("a plan for device gpu needs CUDA; plan with device cpu here")
    te = plan.workload.backend == "te"
    if te and not (cuda and transformer_engine_available()):
        raise ValueError("backend te needs Transformer Engine on a GPU; use backend local")
    return cuda, te


def _loss(loss_mask, output_tensor):
    import torch

    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    loss_sum = (losses * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach().double(), num_tokens.double()])}


def measure_rank(plan: Plan) -> Dict[str, Any]:
    """Build `plan` on the current process group (its world must equal the plan's GPU count), run one
    step on one micro-batch, and return this rank's measured bytes beside the planner's."""
    import functools

    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_harpe import compat
    from megatron_harpe.models.unwrap import unwrap_model

    p, w = plan.layout, plan.workload
    if torch.distributed.get_world_size() != p.gpus:
        raise ValueError(f"{p.describe()} needs a world of {p.gpus} processes, this one has "
                         f"{torch.distributed.get_world_size()}")
    ps.initialize_model_parallel(tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
                                 virtual_pipeline_model_parallel_size=p.vpp, context_parallel_size=p.cp)
    try:
        torch.manual_seed(1234 + 100 * ps.get_pipeline_model_parallel_rank())
        model_parallel_cuda_manual_seed(1234)
        chunks, optimizer = _build(plan)
        models = [unwrap_model(c) for c in chunks]

        weights: Dict[int, int] = {}
        for model in models:
            for param in model.parameters():
                ptr, n = _storage(param)
                weights[ptr] = n
        grads: Dict[int, int] = {}
        for chunk in chunks:
            for buffer in list(chunk.buffers) + list(getattr(chunk, "expert_parallel_buffers", [])):
                ptr, n = _storage(buffer.grad_data)
                grads[ptr] = n
        owned = set(weights) | set(grads)

        rotary: set = set()

        def remember_rotary(_module, _inputs, output):
            for t in output if isinstance(output, (tuple, list)) else (output,):
                if isinstance(t, torch.Tensor):
                    rotary.add(_storage(t)[0])

        hooks = [m.rotary_pos_emb.register_forward_hook(remember_rotary)
                 for m in models if getattr(m, "rotary_pos_emb", None) is not None]
        calls: List[tuple] = []  # (chunk, {storage: bytes}) per forward call: one micro-batch through one chunk

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            if p.cp > 1:
                batch = compat.batch_on_this_cp_rank(dict(batch))
            saved: Dict[int, int] = {}

            def pack(t):
                ptr, n = _storage(t)
                saved[ptr] = max(n, saved.get(ptr, 0))
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            calls.append((chunks.index(model), saved))
            return output, functools.partial(_loss, batch["loss_mask"])

        gen = torch.Generator().manual_seed(1234 + ps.get_data_parallel_rank())
        S, b = w.seq_length, w.micro_batch
        m = num_microbatches(p, w)
        cuda = w.device == "gpu"
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        batches = []
        for _ in range(m):
            tokens = torch.randint(0, plan.model.vocab_size, (b, S), generator=gen)
            batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, dims=1), "loss_mask": torch.ones(b, S),
                     "position_ids": torch.arange(S).expand(b, S).contiguous()}
            batches.append({k: v.to(device) for k, v in batch.items()})
        # On a GPU two steps: the optimizer state exists from the first on, as at the peak of any later step,
        # and the second is the one measured (torch.cuda.max_memory_allocated over it).
        peak_allocated = None
        for step in range(2 if cuda else 1):
            calls.clear()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            iterators = [iter(batches) for _ in chunks]
            for chunk in chunks:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iterators if len(iterators) > 1 else iterators[0],
                model=chunks, num_microbatches=m, seq_length=S // p.cp, micro_batch_size=b, forward_only=False)
            optimizer.step()
            if cuda:
                torch.cuda.synchronize()
                peak_allocated = torch.cuda.max_memory_allocated()
        for hook in hooks:
            hook.remove()

        per_call = [(chunk, sum(n for ptr, n in saved.items() if ptr not in owned and ptr not in rotary))
                    for chunk, saved in calls]
        rotary_saved = max((sum(n for ptr, n in saved.items() if ptr in rotary) for _, saved in calls), default=0)
        pp_rank = ps.get_pipeline_model_parallel_rank()
        planned_calls = [microbatch_activations(plan, pp_rank, chunk, ps.get_context_parallel_rank())
                         for chunk, _ in per_call]
        master = moments = steps = 0
        seen = set(owned)
        for opt in _inner_optimizers(optimizer):
            inner = opt.optimizer
            for group in inner.param_groups:
                for param in group["params"]:
                    ptr, n = _storage(param)
                    if ptr not in seen:
                        seen.add(ptr)
                        master += n
            for state in inner.state.values():
                for key, value in state.items():
                    if not isinstance(value, torch.Tensor):
                        continue
                    ptr, n = _storage(value)
                    if ptr in seen:
                        continue
                    seen.add(ptr)
                    if key == "step":
                        steps += n
                    else:
                        moments += n
        dp_cp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
        loss = None
        if outputs:
            total = outputs[0]["lm loss"]
            loss = float(total[0] / total[1])
        measured = {"weights": sum(weights.values()), "grads": sum(grads.values()),
                    "optimizer": master + moments + steps, "master": master, "moments": moments,
                    "steps": steps, "activations": max(n for _, n in per_call),
                    "activations_per_call": [n for _, n in per_call], "rotary_table_saved": rotary_saved,
                    "peak_allocated": peak_allocated}
        planned = planned_bytes(plan, pp_rank, dp_cp_rank)
        planned["activations"] = max(planned_calls)
        planned["activations_per_call"] = planned_calls
        planned["peak_allocated"] = stage_memory(plan, pp_rank).allocated
        return {"rank": torch.distributed.get_rank(), "pp_rank": pp_rank, "dp_cp_rank": dp_cp_rank,
                "tp_rank": ps.get_tensor_model_parallel_rank(), "cp_rank": ps.get_context_parallel_rank(),
                "chunks": [c for c, _ in per_call], "loss": loss, "measured": measured, "planned": planned}
    finally:
        ps.destroy_model_parallel()


def planned_bytes(plan: Plan, pp_rank: int, dp_cp_rank: Optional[int]) -> Dict[str, float]:
    """The planner's model state for what :func:`measure_rank` counts (this rank's optimizer shard)."""
    st = model_state(plan.model, plan.layout, plan.workload, pp_rank, dp_cp_rank)
    return {"weights": st.weights, "grads": st.grads, "optimizer": st.optimizer, "master": st.master,
            "moments": st.moments, "steps": st.steps}


# ----------------------------------------------------------------------------- running scenarios
@contextlib.contextmanager
def _one_process_world():
    """A world of one process (gloo on CPU, nccl on a GPU); megatron-core's parallel state is set up
    per plan by measure_rank."""
    from megatron_harpe.backends import setup_backend

    backend = setup_backend()
    import torch
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        if backend == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group("nccl" if backend == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
        created = True
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


def measure_in_process(plans: List[Plan]) -> List[Dict[str, Any]]:
    """Measure one-GPU plans in this process (on a GPU: plans with device gpu; "peak_allocated" is then
    torch.cuda.max_memory_allocated over the measured step, beside the planner's "allocated at the peak")."""
    for plan in plans:
        if plan.layout.gpus != 1:
            raise ValueError(f"{plan.layout.describe()} needs {plan.layout.gpus} processes; use run_scenarios")
    with _one_process_world():
        return [measure_rank(plan) for plan in plans]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_scenarios(plans: List[Plan], nproc: int, out_dir: str | os.PathLike,
                    timeout: int = 900) -> Callable[[], List[List[dict]]]:
    """Launch the measurement of plans of `nproc` GPUs each under torchrun (gloo, CPU), ONE launch for
    all of them, and return at once; calling the result waits and returns, per plan, every rank's
    result (so a caller can measure one-rank plans in its own process meanwhile)."""
    for plan in plans:
        if plan.layout.gpus != nproc:
            raise ValueError(f"{plan.layout.describe()} has {plan.layout.gpus} GPUs, not {nproc}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plans.json").write_text(json.dumps([plan_to_dict(p) for p in plans]))
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "HARPE_BACKEND": "cpu",
                "PYTHONPATH": str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(Path(__file__).resolve()),
           "--out", str(out)]
    log = open(out / "workers.log", "w+")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)

    def wait() -> List[List[dict]]:
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = "timeout"
        log.seek(0)
        output = log.read()
        log.close()
        if code != 0:
            raise RuntimeError(f"measurement workers failed (exit {code}): {' '.join(cmd)}\n{output[-12000:]}")
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
        return [[ranks[r][i] for r in range(nproc)] for i in range(len(plans))]

    return wait


def run_scenarios(plans: List[Plan], nproc: int, out_dir: str | os.PathLike, timeout: int = 900) -> List[List[dict]]:
    """Measure plans of `nproc` GPUs each under torchrun (gloo, CPU) in ONE launch; returns, per plan,
    every rank's result."""
    return start_scenarios(plans, nproc, out_dir, timeout)()


def _worker(argv: List[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from megatron_harpe.backends import setup_backend

    setup_backend()
    import torch.distributed as dist

    from megatron_harpe.cli import silence_known_warnings

    silence_known_warnings()
    dist.init_process_group("gloo")
    plans = [plan_from_dict(d) for d in json.loads((Path(args.out) / "plans.json").read_text())]
    results = [measure_rank(plan) for plan in plans]
    rank = dist.get_rank()
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
