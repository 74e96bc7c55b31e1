"""Worker for tests/test_compat.py: each workaround of megatron_harpe/compat.py on the real code path,
once with the workaround active and once switched off (HARPE_COMPAT_DISABLE=name, read by
compat.active at call time, so one process runs both variants one after the other).

Under torchrun (gloo, 2 ranks): compat_worker.py --out DIR --scenarios a,b,c
  cp_batch             compat.batch_on_this_cp_rank at TP=2/CP=1 and at CP=2: which token positions a rank keeps
  adamw_plain          torch AdamW, DP=2, megatron-core's plain optimizer: train 2 steps, save_checkpoint, 2 more
                       steps; then per variant a fresh model+optimizer, load_checkpoint, the same 2 steps
  adamw_distributed    the same with the distributed optimizer (optimizer state sharded over DP=2), and
                       megatron-core's default optimizer sharding instead of compat's checkpoint metadata
  interleaved_pp       PP=2 with 2 virtual stages (4 layers, 4 micro-batches, 3 optimizer steps), batched p2p
                       as compat.batch_p2p_comm says and forced on, against the PP=1 run of the same weights/data
One process, no torchrun: compat_worker.py --out DIR --writer-signals
  the checkpoint writer's helper process (started by compat.start_checkpoint_writer_shielded, else by
  megatron-core's first torch_dist save) is sent SIGTERM; then a second save is attempted.

Heavy imports happen inside main(): the writer's helper is a spawned process that re-imports this
module as __mp_main__, and should not pay for megatron-core.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import traceback

SEQ, VOCAB = 32, 128
DISABLE = "HARPE_COMPAT_DISABLE"


def model_config(num_layers: int = 2):
    from megatron_harpe.config.model import ModelConfig, PositionEmbeddingConfig

    return ModelConfig(num_layers=num_layers, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                       num_query_groups=2, vocab_size=VOCAB, max_position_embeddings=SEQ,
                       position=PositionEmbeddingConfig(kind="harpe", bases=[10000.0, 1_000_000.0]))


def set_layout(tp=1, pp=1, vpp=None, cp=1):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp)
    model_parallel_cuda_manual_seed(1234)


def disable(*names: str) -> None:
    """Switch workarounds off for what follows in this process (compat.active reads the variable per call)."""
    os.environ[DISABLE] = ",".join(names)


def failure(err: BaseException) -> dict:
    frames = traceback.extract_tb(err.__traceback__)
    return {"type": type(err).__name__, "message": str(err)[:300],
            "where": [f"{os.path.basename(f.filename)}:{f.name}" for f in frames[-4:]]}


# --------------------------------------------------------------------------- cp-batch-group
def cp_batch() -> dict:
    """Token positions this rank keeps after compat.batch_on_this_cp_rank (tokens are their own positions)."""
    import torch

    from megatron_harpe import compat

    def kept() -> list:
        positions = torch.arange(SEQ).repeat(2, 1)
        batch = {"tokens": positions.clone(), "labels": positions.clone(), "position_ids": positions.clone(),
                 "loss_mask": torch.ones(2, SEQ)}
        out = compat.batch_on_this_cp_rank(batch)
        assert torch.equal(out["tokens"], out["labels"]) and torch.equal(out["tokens"], out["position_ids"])
        return out["tokens"][0].tolist()

    from megatron.core import parallel_state as ps

    result = {}
    for name, layout in (("tp2_cp1", dict(tp=2)), ("cp2", dict(cp=2))):
        set_layout(**layout)
        result[name] = {"cp_rank": ps.get_context_parallel_rank(), "cp_size": ps.get_context_parallel_world_size()}
        for variant, names in (("active", ()), ("disabled", ("cp-batch-group",))):
            disable(*names)
            result[name][variant] = kept()
        disable()
    return result


# --------------------------------------------------------------------------- torch AdamW checkpoints
class Training:
    """A tiny model at DP=2 with megatron-core's DDP and optimizer (torch AdamW: no apex/TE here),
    stepped through megatron-core's schedule as the trainer does."""

    def __init__(self, distributed: bool, seed: int):
        import torch
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        from megatron_harpe.models.provider import build_model
        from megatron_harpe.models.transformer_config import build_transformer_config

        set_layout()
        torch.manual_seed(seed)
        self.cfg = model_config()
        self.tcfg = build_transformer_config(self.cfg)
        model = build_model(self.cfg, self.tcfg)
        self.ddp = DistributedDataParallel(
            self.tcfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed),
            model)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, clip_grad=1.0, params_dtype=torch.float32,
                            use_distributed_optimizer=distributed), [self.ddp])
        self.tcfg.finalize_model_grads_func = finalize_model_grads
        self.tcfg.grad_scale_func = self.optimizer.scale_loss

    def step(self, iteration: int) -> float:
        """One optimizer step on this DP rank's micro-batches of `iteration`; returns this rank's mean loss."""
        import torch
        import torch.distributed as dist
        from megatron.core.pipeline_parallel import get_forward_backward_func

        gen = torch.Generator().manual_seed(100 + 10 * iteration + dist.get_rank())
        tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=gen)
        batches = iter([(tokens[i:i + 1, :-1], tokens[i:i + 1, 1:]) for i in range(2)])
        losses = []

        def loss_func(output):
            losses.append(output.detach().mean())
            return output.mean(), {}

        def forward_step(data_iterator, module):
            tok, lab = next(data_iterator)
            return module(tok, None, None, labels=lab), loss_func

        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=batches, model=[self.ddp],
                                    num_microbatches=2, seq_length=SEQ, micro_batch_size=1, forward_only=False)
        self.optimizer.step()
        return torch.stack(losses).mean().item()

    def params(self):
        return [p.detach().clone() for p in self.ddp.module.parameters()]


#: megatron-core's default distributed-optimizer sharding, which compat.OPTIMIZER_CHECKPOINT_METADATA replaces
DEFAULT_SHARDING = {"distrib_optim_sharding_type": "fully_sharded_model_space"}


@contextlib.contextmanager
def checkpoint_metadata(metadata):
    """Save/load through training/checkpointing.py with other optimizer-checkpoint metadata than compat's
    (None: compat's own)."""
    from megatron_harpe import compat

    if metadata is None:
        yield
        return
    chosen, compat.OPTIMIZER_CHECKPOINT_METADATA = compat.OPTIMIZER_CHECKPOINT_METADATA, metadata
    try:
        yield
    finally:
        compat.OPTIMIZER_CHECKPOINT_METADATA = chosen


def adamw_resume(out_dir: str, distributed: bool) -> dict:
    """Exact resume through training/checkpointing.py, per compat variant.

    The uninterrupted run: steps 1-2, save, steps 3-4. Each variant: a fresh model and optimizer (other
    initial weights), load_checkpoint, steps 3-4; its losses and final weights against the uninterrupted
    run's, or the exception that stopped it. With the distributed optimizer also megatron-core's default
    sharding ("default-sharding": saved at step 2 too, then loaded the same way).
    """
    import torch

    from megatron_harpe.training.checkpointing import load_checkpoint, save_checkpoint

    kind = "distributed" if distributed else "plain"
    straight = Training(distributed, seed=1)
    for it in (1, 2):
        straight.step(it)

    def save(directory):
        return save_checkpoint(os.path.join(out_dir, directory), 2, chunks=[straight.ddp],
                               optimizer=straight.optimizer, scheduler=None, model_cfg=straight.cfg, common={},
                               keep_last=0, config_yaml="")

    paths = {"compat": save(f"ckpt_{kind}")}
    result = {}
    if distributed:
        try:
            with checkpoint_metadata(DEFAULT_SHARDING):
                paths["default"] = save(f"ckpt_{kind}_default_sharding")
        except Exception as err:
            result["default-sharding"] = {"error": failure(err), "when": "save"}
    result["uninterrupted"] = [straight.step(it) for it in (3, 4)]
    final = straight.params()

    # (variant, workarounds switched off, checkpoint)
    variants = [("active", (), "compat"), ("torch-adamw-fresh-step", ("torch-adamw-fresh-step",), "compat"),
                ("torch-adamw-shared-step", ("torch-adamw-shared-step",), "compat")]
    if distributed:
        variants.append(("reshardable-optimizer-step", ("reshardable-optimizer-step",), "compat"))
        if "default" in paths:
            variants.append(("default-sharding", (), "default"))
    for variant, names, checkpoint in variants:
        resumed = Training(distributed, seed=2)
        disable(*names)
        try:
            with checkpoint_metadata(DEFAULT_SHARDING if checkpoint == "default" else None):
                load_checkpoint(paths[checkpoint], chunks=[resumed.ddp], optimizer=resumed.optimizer,
                                scheduler=None, model_cfg=resumed.cfg)
        except Exception as err:  # the symptom of a missing workaround: recorded, asserted by the test
            result[variant] = {"error": failure(err), "when": "load"}
            continue
        finally:
            disable()
        inner = getattr(resumed.optimizer, "optimizer", None)
        steps = [st["step"] for st in inner.state.values() if "step" in st] if inner is not None else []
        losses = [resumed.step(it) for it in (3, 4)]
        params = resumed.params()
        result[variant] = {
            "losses": losses,
            "param_max_diff": max((a - b).abs().max().item() for a, b in zip(params, final)),
            "params_bit_identical": all(torch.equal(a, b) for a, b in zip(params, final)),
            "distinct_step_tensors_after_load": len({id(s) for s in steps}),
            "num_param_states": len(steps),
        }
    return result


# --------------------------------------------------------------------------- interleaved-pipeline-batched-p2p
def pipeline_losses(full_state, *, pp: int, vpp, batch_p2p_comm: bool, steps: int = 3, microbatches: int = 4):
    """Per-step losses of `steps` optimizer steps (plain torch AdamW), one list per step on the last stage."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_harpe.models.provider import build_model
    from megatron_harpe.models.transformer_config import build_transformer_config
    from tests.sharding import load_full_state_dict

    set_layout(pp=pp, vpp=vpp)
    cfg = model_config(num_layers=4)
    tcfg = build_transformer_config(cfg, pipeline_parallel=pp, virtual_pipeline_parallel=vpp,
                                    batch_p2p_comm=batch_p2p_comm)
    chunks = []
    for vp in range(vpp or 1):
        vp_stage = vp if vpp else None
        model = build_model(cfg, tcfg, vp_stage=vp_stage,
                            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage))
        load_full_state_dict(model, full_state, 0, 1)
        chunks.append(DistributedDataParallel(tcfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model,
                                              disable_bucketing=vp > 0))
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0,
                                                       params_dtype=torch.float32), chunks)
    tcfg.finalize_model_grads_func = finalize_model_grads
    tcfg.grad_scale_func = optimizer.scale_loss
    history = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(500 + step)  # the same data on every rank and layout
        tokens = torch.randint(0, VOCAB, (microbatches, SEQ + 1), generator=gen)
        batches = [(tokens[i:i + 1, :-1], tokens[i:i + 1, 1:]) for i in range(microbatches)]
        seen = []

        def loss_func(output):
            seen.append(output.detach().mean().item())
            return output.mean(), {}

        def forward_step(data_iterator, module):
            tok, lab = next(data_iterator)
            return module(tok, None, None, labels=lab), loss_func

        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        iterators = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iterators,
                                    model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=microbatches,
                                    seq_length=SEQ, micro_batch_size=1, forward_only=False)
        optimizer.step()
        history.append(seen)
    return {"last_stage": ps.is_pipeline_last_stage(), "losses": history}


def interleaved_pp() -> dict:
    import torch
    import torch.distributed as dist

    from megatron_harpe import compat
    from megatron_harpe.models.provider import build_model
    from megatron_harpe.models.transformer_config import build_transformer_config

    set_layout()
    cfg = model_config(num_layers=4)
    model = build_model(cfg, build_transformer_config(cfg))
    for p in model.parameters():
        dist.broadcast(p.data, src=0)
    full_state = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = {"reference": pipeline_losses(full_state, pp=1, vpp=None, batch_p2p_comm=True)}
    for variant, names in (("active", ()), ("disabled", ("interleaved-pipeline-batched-p2p",))):
        disable(*names)
        flag = compat.batch_p2p_comm(2)
        disable()
        result[variant] = {"batch_p2p_comm": flag, **pipeline_losses(full_state, pp=2, vpp=2, batch_p2p_comm=flag)}
    return result


# --------------------------------------------------------------------------- checkpoint-writer-signals
def writer_signals(out_dir: str) -> dict:
    """One process, world size 1: start the writer helper as the trainer does, save, SIGTERM the helper,
    save again."""
    import signal
    import time

    import psutil
    import torch.distributed as dist

    from megatron_harpe.backends import setup_backend

    setup_backend()
    from megatron_harpe import compat
    from megatron_harpe.models.checkpoint import save_model
    from megatron_harpe.models.provider import build_model
    from megatron_harpe.models.transformer_config import build_transformer_config

    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=0,
                            world_size=1)
    set_layout()
    cfg = model_config(num_layers=1)
    model = build_model(cfg, build_transformer_config(cfg))
    me = psutil.Process()
    before = {c.pid for c in me.children(recursive=True)}
    compat.start_checkpoint_writer_shielded([signal.SIGTERM, signal.SIGUSR1])  # what the trainer does at start
    save_model([model], cfg, os.path.join(out_dir, "first"))  # starts the helper here if compat did not
    helpers = [c for c in me.children(recursive=True)  # neither its resource tracker nor its guardian
               if c.pid not in before and not any(word in " ".join(c.cmdline())
                                                  for word in ("resource_tracker", "checkpoint-writer guardian"))]
    result = {"helpers": len(helpers), "active": compat.active("checkpoint-writer-signals")}
    helper = helpers[0]
    helper.send_signal(signal.SIGTERM)
    try:
        result["helper_exit"] = helper.wait(timeout=2)
    except psutil.TimeoutExpired:
        result["helper_exit"] = None  # still running
    started = time.monotonic()
    try:
        save_model([model], cfg, os.path.join(out_dir, "second"))
        result["second_save"] = "ok"
    except Exception as err:
        result["second_save"] = failure(err)
    result["second_save_s"] = round(time.monotonic() - started, 2)
    dist.destroy_process_group()
    if helper.is_running():
        helper.kill()  # the shielded helper ignores SIGTERM; this process leaves without the manager's shutdown
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenarios", default="")
    parser.add_argument("--writer-signals", action="store_true")
    args = parser.parse_args()
    if args.writer_signals:
        result = writer_signals(args.out)
        with open(os.path.join(args.out, "writer.json"), "w") as f:
            json.dump(result, f, indent=1)
        os._exit(0)  # skip interpreter teardown: a killed helper makes the manager's finalizer wait

    from megatron_harpe.backends import setup_backend

    setup_backend()
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    dist.init_process_group("gloo")
    torch.use_deterministic_algorithms(True)
    results = {}
    for name in args.scenarios.split(","):
        if name == "cp_batch":
            results[name] = cp_batch()
        elif name == "adamw_plain":
            results[name] = adamw_resume(args.out, distributed=False)
        elif name == "adamw_distributed":
            results[name] = adamw_resume(args.out, distributed=True)
        elif name == "interleaved_pp":
            results[name] = interleaved_pp()
        else:
            raise ValueError(f"unknown scenario {name}")
    ps.destroy_model_parallel()
    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
