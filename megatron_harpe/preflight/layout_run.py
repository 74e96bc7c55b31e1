"""The twin in the user's layout: one training forward and backward per pass, as harpe-train runs them.

Collective (every rank of the launch). The twin is built by the trainer itself (Trainer: parallel state, the
provider, megatron-core DDP, the forward step with CP slicing or document packing, the loss function, the
per-token normalisation of megatron-core's finalize_model_grads), so what is checked is the code that will train.
Two passes over the same batch: positions from 0, and shifted so that the last token sits at the run's last
position (positions.py). Each pass leaves on disk, through the project's own checkpoint writer (any layout
reshards on load):

    weights/        the twin's initial weights (saved once)
    grads_<shift>/  the reduced gradients of that pass, saved as if they were the weights

and returns the loss. While the model exists, the probes that need it run too: the rotary angles (rotary_check)
and what each rank's layers were handed (the sequence share, the attention's CP group: accounting.py).
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_harpe.models.checkpoint import load_model, save_model
from megatron_harpe.models.unwrap import unwrap_model
from megatron_harpe.preflight.positions import fused_harpe, shift_positions
from megatron_harpe.preflight.twin import TWIN_EOD, Twin
from megatron_harpe.training.data import MicroBatches, iterators_for_chunks


# ----------------------------------------------------------------------------- the batch
def twin_windows(twin: Twin, seed: int = 20261206) -> torch.Tensor:
    """[global batch, seq + 1] token windows (inputs and the token after them), the same on every rank.

    Random ordinary tokens (1..vocab-1); with document masking or eod_mask_loss, EODs cut each sample into three
    documents of uneven lengths that move from sample to sample, so CP's per-document padding and the packed
    positions are all exercised."""
    gen = torch.Generator().manual_seed(seed)
    n, s = twin.cfg.data.global_batch_size, twin.seq_length
    windows = torch.randint(1, twin.model_cfg.vocab_size, (n, s + 1), generator=gen)
    if twin.eod_id is not None:
        for row in range(n):
            for share in (0.29, 0.67):
                end = int(s * share) + 3 * row % max(s // 16, 1)
                windows[row, min(end, s - 2)] = TWIN_EOD
    return windows


def samples_from_windows(windows: torch.Tensor, eod_mask_loss: bool) -> List[Dict[str, torch.Tensor]]:
    """The dataset items harpe-train's MicroBatches reads (GPTDataset's keys)."""
    out = []
    for w in windows:
        tokens, labels = w[:-1].clone(), w[1:].clone()
        mask = torch.ones(tokens.shape[0])
        if eod_mask_loss:
            mask[tokens == TWIN_EOD] = 0.0
        out.append({"tokens": tokens, "labels": labels, "loss_mask": mask,
                    "position_ids": torch.arange(tokens.shape[0])})
    return out


# ----------------------------------------------------------------------------- what the run records
@dataclass
class Pass:
    shift: int
    loss: float
    tokens: int
    seconds: float
    grads: str


@dataclass
class LayoutRun:
    weights: str
    passes: List[Pass]
    probes: Dict[str, Any] = field(default_factory=dict)  # name -> what a probe returned (same on every rank)
    far_note: Optional[str] = None
    rank_layout: Dict[str, int] = field(default_factory=dict)


class SequenceShares:
    """What the first layer of every chunk is handed per micro-batch: [s_local, b, h] (s_local is the CP (and SP)
    share of the sequence this rank computes)."""

    def __init__(self, chunks):
        self.shapes: List[tuple] = []
        self.handles = []
        for chunk in chunks:
            layers = getattr(unwrap_model(chunk).decoder, "layers", [])
            if len(layers):
                self.handles.append(layers[0].register_forward_pre_hook(self._record, with_kwargs=True))

    def _record(self, module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor):
            self.shapes.append(tuple(hidden.shape))

    def close(self):
        for h in self.handles:
            h.remove()


def _copy_grads_into_params(chunks) -> None:
    """Put each parameter's reduced gradient (DDP's main_grad) where its weight is (the weights are read back from
    their checkpoint afterwards: a copy in memory would be a third model per rank, too much for 32 CPU ranks)."""
    with torch.no_grad():
        for chunk in chunks:
            for param in chunk.parameters():
                grad = getattr(param, "main_grad", None)
                param.copy_(grad.view_as(param) if grad is not None else torch.zeros_like(param))


def run_layout(twin: Twin, workdir: Path, probes: Dict[str, Callable] = None,
               log: Callable[[str], None] = lambda text: None) -> LayoutRun:
    """Collective: build the twin in its layout, save its weights, run the passes; `probes` are called as
    probe(twin, trainer) on every rank while the model exists and must return the same value on every rank."""
    from megatron_harpe.training.trainer import Trainer

    trainer = Trainer(twin.cfg)
    try:
        trainer._build(twin.model_cfg)
        trainer.eod_id = twin.eod_id
        chunks = trainer.chunks
        run = LayoutRun(weights=str(workdir / "weights"), passes=[],
                        rank_layout={"tp": ps.get_tensor_model_parallel_rank(),
                                     "cp": ps.get_context_parallel_rank(),
                                     "pp": ps.get_pipeline_model_parallel_rank(),
                                     "dp": ps.get_data_parallel_rank()})
        log(f"twin built ({twin.describe()}); saving its weights")
        save_model(chunks, twin.model_cfg, run.weights)
        windows = twin_windows(twin)
        dataset = samples_from_windows(windows, twin.cfg.data.eod_mask_loss)
        batches = MicroBatches(dataset, global_batch=twin.cfg.data.global_batch_size,
                               micro_batch=twin.cfg.data.micro_batch_size, dp_rank=trainer.dp_rank,
                               dp_size=trainer.dp_size).iteration(0)
        shifts = [0]
        if twin.far_offset:
            if any(fused_harpe(c) for c in chunks):
                run.far_note = ("far positions: HARPE's fused kernel counts positions from 0 inside the kernel, so "
                                "the shifted pass runs only with model.position.kernel=unfused; the rotary check "
                                "covers its angles")
            else:
                shifts.append(twin.far_offset)
        shares = SequenceShares(chunks)
        for shift in shifts:
            shift_positions(chunks, shift)
            for chunk in chunks:
                chunk.zero_grad_buffer()
            if shift == 0:
                shares.shapes.clear()
            _barrier()
            started = time.perf_counter()
            outputs = get_forward_backward_func()(
                forward_step_func=trainer._forward_step, data_iterator=iterators_for_chunks(batches, len(chunks)),
                model=chunks, num_microbatches=len(batches), seq_length=twin.seq_length,
                micro_batch_size=twin.cfg.data.micro_batch_size, forward_only=False)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds = _max_over_ranks(time.perf_counter() - started)
            if shift == 0:
                run.probes["sequence_shares"] = list(shares.shapes)
                shares.close()
            from megatron_harpe.training.evaluation import reduce_sums

            totals = reduce_sums([out["lm loss"] for out in outputs], 2, trainer.device)
            loss, tokens = (totals[0] / totals[1]).item(), int(totals[1].item())
            grads = str(workdir / f"grads_{shift}")
            _copy_grads_into_params(chunks)
            save_model(chunks, twin.model_cfg, grads)
            load_model(chunks, None, run.weights)
            run.passes.append(Pass(shift=shift, loss=loss, tokens=tokens, seconds=seconds, grads=grads))
            log(f"pass with positions from {shift:,}: loss {loss:.6f} over {tokens:,} tokens in {seconds:.2f} s")
        shift_positions(chunks, 0)
        for name, probe in (probes or {}).items():
            run.probes[name] = probe(twin, trainer)
        return run
    finally:
        trainer.chunks = trainer.optimizer = trainer.scheduler = None
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        ps.destroy_model_parallel()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _max_over_ranks(value: float) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64,
                     device=torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def gather_objects(value: Any) -> List[Any]:
    """`value` of every rank, on every rank, in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def as_numpy(x) -> np.ndarray:
    return x.detach().double().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
