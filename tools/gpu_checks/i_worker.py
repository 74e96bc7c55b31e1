"""Section i's worker: two-rank layouts against one rank, on the same batch and weights.

Launched by section i (i_multi_gpu.py) under torchrun with 2 processes (NCCL on GPUs, gloo on the project's
CPU backend). It reads a plan (JSON: the model, the batch, the scenarios, a deadline), and for each scenario:

1. the single-process reference (TP = PP = CP = 1, built once per input format and kept): a model built from
   the project's spec, the same weights on both ranks (rank 0's, broadcast), one forward and backward of the
   token-mean loss on the full batch with plain autograd; per-token losses and every parameter's gradient;
2. the scenario's layout (TP=2 + sequence parallelism; CP=2 with a cp_comm_type; packed documents at CP=2;
   FP8 attention at CP=2): megatron-core's parallel state, the reference weights sharded into it
   (tests/sharding.py), one step's forward and backward through megatron-core's forward-backward schedule,
   DDP (fp32 gradient buffers) and finalize_model_grads, with the trainer's loss (per-token sum, token count;
   `calculate_per_token_loss`) and the trainer's input path (compat.batch_on_this_cp_rank for [b, s] batches,
   training/packing.py for packed documents);
3. this rank's per-token losses, the CP-reduced token-mean loss and every local gradient (main_grad) against
   the reference's slice.

Each rank writes <out>/rank<r>.json after every scenario (a launch killed half way leaves what it did). A
scenario that raises ends the launch (the other rank may be inside a collective, so going on is not safe):
the error is recorded and the process exits 1, torchrun stops the other rank, and the section launches the
remaining scenarios again. A scenario that hangs is ended by a watchdog (faulthandler, `--scenario-timeout`).
Rank 0 decides whether the next scenario fits before the deadline and tells rank 1 (both must agree).

Usage (under torchrun, 2 ranks): i_worker.py --plan PLAN.json --out DIR
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import math
import os
import sys
import time
import traceback
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    plan = json.loads(Path(args.plan).read_text())

    from megatron_harpe.backends import setup_backend

    setup_backend()  # HARPE_BACKEND=cpu in CPU mode; before megatron.core is imported
    import torch.distributed as dist

    from megatron_harpe.parallel.launch import init_distributed

    init_distributed(timeout_s=plan["scenario_timeout_s"] + 60)
    rank = dist.get_rank()
    out = Path(args.out)
    results = {"rank": rank, "scenarios": {}, "versions": _versions()}
    worker = _Worker(plan)
    longest = 0.0
    code = 0
    for sc in plan["scenarios"]:
        name = sc["name"]
        fits = [time.time() + 1.2 * longest + 2 < plan["deadline_unix"]]
        dist.broadcast_object_list(fits, src=0)  # rank 0 decides, both ranks follow
        if not fits[0]:
            results["scenarios"][name] = {"status": "skipped (time)"}
            _write(out, rank, results)
            continue
        _say(rank, f"scenario {name}: start")
        faulthandler.dump_traceback_later(plan["scenario_timeout_s"], exit=True)
        started = time.time()
        try:
            res = worker.run(sc)
            res["status"] = "ran"
        except Exception:  # noqa: BLE001 - recorded; this launch ends (see the module docstring)
            res = {"status": "error", "error": traceback.format_exc()}
            code = 1
        finally:
            faulthandler.cancel_dump_traceback_later()
        res["seconds"] = round(time.time() - started, 2)
        longest = max(longest, res["seconds"])
        results["scenarios"][name] = res
        _write(out, rank, results)
        _say(rank, f"scenario {name}: {res['status']} in {res['seconds']:.1f} s")
        if code:
            break
    if code == 0:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    return code


def _say(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


def _write(out: Path, rank: int, results) -> None:
    tmp = out / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    os.replace(tmp, out / f"rank{rank}.json")


def _versions():
    from megatron_harpe import compat

    import torch

    return {"torch": torch.__version__, "megatron_core": compat.installed_version()}


class _Worker:
    """The references (one per input format, built when first needed) and the scenarios."""

    def __init__(self, plan):
        import torch

        self.plan = plan
        self.m = plan["model"]
        self.cuda = plan["cuda"]
        self.te = plan["te"]
        self.dtype = torch.bfloat16 if plan["dtype"] == "bf16" else torch.float32
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.refs = {}
        self.state = None
        from megatron_harpe.config.model import ModelConfig, PositionEmbeddingConfig
        from megatron_harpe.models.transformer_config import rope_kernel

        m = self.m
        self.model_cfg = ModelConfig(
            num_layers=m["layers"], hidden_size=m["hidden"], ffn_hidden_size=m["ffn"],
            num_attention_heads=m["heads"], num_query_groups=m["groups"], vocab_size=m["vocab"],
            max_position_embeddings=2 * m["seq"], position=PositionEmbeddingConfig(kind="harpe", bases=m["bases"]))
        self.kernel = rope_kernel(self.model_cfg, cuda=self.cuda, te=self.te, triton=plan["triton"])

    # ------------------------------------------------------------------ building
    def set_layout(self, tp=1, cp=1, hierarchical=None):
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        ps.destroy_model_parallel()
        kw = dict(tensor_model_parallel_size=tp, context_parallel_size=cp)
        if hierarchical:
            kw["hierarchical_context_parallel_sizes"] = list(hierarchical)
        ps.initialize_model_parallel(**kw)
        model_parallel_cuda_manual_seed(1234)

    def build(self, tp=1, cp=1, sp=False, comm=None, hierarchical=None, fp8=False, control=False):
        from megatron_harpe.config.schema import Fp8Config
        from megatron_harpe.models.provider import build_model
        from megatron_harpe.models.transformer_config import (build_transformer_config, fp8_settings,
                                                              fusion_settings)

        fus = fusion_settings(self.model_cfg, cuda=self.cuda, te=self.te, kernel=self.kernel)
        fus["gradient_accumulation_fusion"] = False  # the reference has no DDP main_grad buffers
        extra = {}
        if cp > 1 and comm is not None:
            extra["cp_comm_type"] = comm
        if hierarchical:
            extra["hierarchical_context_parallel_sizes"] = list(hierarchical)
        if fp8:
            extra.update(fp8_settings(Fp8Config(format="hybrid", recipe="delayed", dot_product_attention=True)))
        tcfg = build_transformer_config(self.model_cfg, tensor_parallel=tp, context_parallel=cp,
                                        sequence_parallel=sp, params_dtype=self.dtype,
                                        use_cpu_initialization=not self.cuda, fusions=fus,
                                        calculate_per_token_loss=True, **extra)
        model = build_model(self.model_cfg, tcfg, use_te=self.te, rope_kernel=self.kernel)
        if control:  # the negative control: every K/V group rotates with another group's base
            model.set_bases(list(reversed(self.m["bases"])))
        if self.cuda:
            model.cuda(torch_current_device())
        return model, tcfg

    # ------------------------------------------------------------------ the batch
    def batch(self):
        """[b, s] tokens (EOD tokens where the plan puts them: packed documents), labels, loss mask, and
        each token's index in the flat [b*s] batch (sliced with the tokens, it says which reference token
        each local one is)."""
        import torch

        m = self.m
        gen = torch.Generator().manual_seed(7)
        eod = m["vocab"] - 1
        text = torch.randint(0, eod, (m["batch"], m["seq"] + 1), generator=gen)
        for row, ends in enumerate(m["eods"]):
            text[row, ends] = eod
        index = torch.arange(m["batch"] * m["seq"]).reshape(m["batch"], m["seq"])
        return {"tokens": text[:, :-1].contiguous(), "labels": text[:, 1:].contiguous(),
                "loss_mask": torch.ones(m["batch"], m["seq"]), "index": index}, eod

    # ------------------------------------------------------------------ references
    def reference(self, fmt: str):
        """The TP = PP = CP = 1 reference for input format 'bshd' ([b, s]) or 'thd' (packed documents)."""
        if fmt in self.refs:
            return self.refs[fmt]
        import torch
        import torch.distributed as dist

        from megatron_harpe.training.packing import pack_micro_batch, packed_seq_params

        self.set_layout()
        model, _ = self.build()
        if self.state is None:  # the same weights on both ranks and in every scenario
            for p in model.parameters():
                dist.broadcast(p.data, src=0)
            self.state = {n: p.detach().clone() for n, p in model.named_parameters()}
        else:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(self.state[n])
        batch, eod = self.batch()
        if fmt == "bshd":
            dev = {k: v.to(self.device) for k, v in batch.items()}
            losses = model(dev["tokens"], None, None, labels=dev["labels"])  # [b, s]
            mask = dev["loss_mask"]
        else:
            packed, layout = pack_micro_batch(batch, eod)  # CP=1: no padding, the flat batch in order
            dev = {k: v.to(self.device) for k, v in packed.items()}
            losses = model(dev["tokens"], dev["position_ids"], None, labels=dev["labels"],
                           packed_seq_params=packed_seq_params(layout, self.device))  # [1, b*s]
            mask = dev["loss_mask"]
        flat = losses.float().reshape(-1)
        n_tokens = mask.reshape(-1).sum()
        loss = (flat * mask.reshape(-1)).sum() / n_tokens
        loss.backward()
        ref = {"losses": flat.detach(), "loss": loss.item(),
               "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
               "params": sum(1 for _ in model.parameters())}
        if fmt == "thd":
            ref["documents"] = layout.num_documents
        del model
        self.refs[fmt] = ref
        return ref

    # ------------------------------------------------------------------ one scenario
    def run(self, sc):
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_harpe import compat
        from megatron_harpe.training.packing import (pack_micro_batch, packed_seq_params, rank_rows,
                                                     stream_multiple)
        from megatron_harpe.training.trainer import _loss_func as trainer_loss_func
        from tests.sharding import load_full_state_dict, local_parameters, shard_full_tensors

        fmt = "thd" if sc["packed"] else "bshd"
        ref = self.reference(fmt)
        tp, cp, sp = sc["tp"], sc["cp"], sc["sp"]
        self.set_layout(tp=tp, cp=cp, hierarchical=sc.get("hierarchical"))
        model, tcfg = self.build(tp=tp, cp=cp, sp=sp, comm=sc.get("comm"), hierarchical=sc.get("hierarchical"),
                                 fp8=sc["fp8"], control=sc["control"])
        tp_rank = ps.get_tensor_model_parallel_rank()
        load_full_state_dict(model, self.state, tp_rank, tp)
        ddp = DistributedDataParallel(tcfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
        tcfg.finalize_model_grads_func = finalize_model_grads
        tcfg.no_sync_func = ddp.no_sync

        batch, eod = self.batch()
        info = {"tp": tp, "cp": cp, "sp": sp, "comm": sc.get("comm"), "hierarchical": sc.get("hierarchical"),
                "format": fmt, "fp8": sc["fp8"], "control": sc["control"], "spec": "te" if self.te else "local",
                "rope_kernel": self.kernel, "dtype": str(self.dtype).replace("torch.", "")}
        if sc["packed"]:
            cp_rank = ps.get_context_parallel_rank()
            packed, layout = pack_micro_batch(batch, eod, cp_size=cp, cp_rank=cp_rank,
                                              total_multiple=stream_multiple(cp, tp, sp, fp8=sc["fp8"]))
            source, _ = rank_rows(layout, cp, cp_rank)
            local = {k: v.to(self.device) for k, v in packed.items()}
            psp = packed_seq_params(layout, self.device)
            ref_index = source.to(self.device)  # -1: a padding row
            info.update(documents=layout.num_documents, local_rows=int(source.numel()),
                        padding_rows=int((source < 0).sum()))
        else:
            dev = {k: v.to(self.device) for k, v in batch.items()}
            local = compat.batch_on_this_cp_rank(dev) if cp > 1 else dev
            psp = None
            ref_index = local["index"]
        seen = {}

        def loss_func(loss_mask, output_tensor):  # the trainer's loss (sum, tokens), per-token losses kept
            seen["losses"] = output_tensor.detach().float().reshape(-1)
            seen["mask"] = loss_mask.reshape(-1).float()
            return trainer_loss_func(loss_mask, output_tensor)

        def forward_step(data_iterator, module):
            b = next(data_iterator)
            if psp is not None:
                out = module(b["tokens"], b["position_ids"], None, labels=b["labels"], packed_seq_params=psp)
            else:
                out = module(b["tokens"], None, None, labels=b["labels"])
            return out, partial(loss_func, b["loss_mask"])

        def step():
            ddp.zero_grad_buffer()
            get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([local]), model=[ddp],
                                        num_microbatches=1, seq_length=self.m["seq"],
                                        micro_batch_size=local["tokens"].shape[0], forward_only=False)

        if sc["fp8"]:
            step()  # delayed scaling: the first step quantizes with scale 1; the second uses measured amax
            info["fp8_warmup_steps"] = 1
        step()  # the schedule has called finalize_model_grads (DP/CP reduce, SP norm grads, 1 / tokens)

        # loss: this rank's masked sum and tokens, summed over the data-parallel x context-parallel group
        losses, mask = seen["losses"], seen["mask"]
        totals = torch.stack([(losses * mask).sum().double(), mask.sum().double()])
        dist.all_reduce(totals, group=ps.get_data_parallel_group(with_context_parallel=True))
        loss = (totals[0] / totals[1]).item()
        real = ref_index.reshape(-1) >= 0
        mine = losses[real]
        theirs = ref["losses"][ref_index.reshape(-1)[real]]
        res = {"layout": info, "loss": loss, "loss_ref": ref["loss"], "loss_abs_diff": abs(loss - ref["loss"]),
               "tokens_compared": int(real.sum()),
               "token_loss_max_diff": (mine - theirs).abs().max().item()}
        expected = shard_full_tensors(model, ref["grads"], tp_rank, tp)
        abs_diff, rel_l2, finite = {}, {}, True
        for _, glob, param in local_parameters(model):
            got = param.main_grad.float()
            exp = expected[glob].float()
            d = got - exp
            abs_diff[glob] = d.abs().max().item()
            rel_l2[glob] = (d.norm() / exp.norm().clamp_min(1e-30)).item()
            finite &= bool(torch.isfinite(got).all())
        res.update(grad_max_abs_diff=max(abs_diff.values()), grad_worst_abs=max(abs_diff, key=abs_diff.get),
                   grad_max_rel_l2=max(rel_l2.values()), grad_worst_rel=max(rel_l2, key=rel_l2.get),
                   grad_scale=max(t.abs().max().item() for t in expected.values()), grads_finite=finite,
                   params_checked=len(abs_diff), params_reference=ref["params"],
                   grad_rel_l2=rel_l2 if sc["fp8"] else None)
        if not math.isfinite(loss):
            res["loss_abs_diff"] = float("inf")
        del ddp, model
        return res


def torch_current_device():
    import torch

    return torch.cuda.current_device()


if __name__ == "__main__":
    sys.exit(main())
