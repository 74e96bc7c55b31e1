"""Forward-only passes of the training model during training: validation loss, and the sums they reduce.

Evaluation runs through the same megatron-core schedule as training (``forward_only=True``), so it
works unchanged under every layout the trainer supports: TP, PP (micro-batches pass along the
pipeline; only the last stage sees the losses), VPP, CP (each rank holds its load-balanced slice of
every sequence) and DP. What each micro-batch reports is a vector of sums (loss sum, token count,
...); :func:`reduce_sums` adds them over micro-batches and over the data-parallel x context-parallel
group on the last pipeline stage, then broadcasts the result along the pipeline, so every rank gets
the same numbers (the logging rank is the last one; the trainer's decisions must not differ by rank).

Two things the training step does that evaluation must not:
- dropout: the chunks are put in eval mode for the pass (and back afterwards). Dropout off draws no
  random numbers, so an evaluation does not move the RNG streams and exact resume is unaffected;
- with the distributed optimizer and ``overlap_param_gather``, parameters are all-gathered by forward
  pre-hooks that also start the next gather; the trainer wraps evaluation in its
  ``_parameters_gathered`` context (the hooks off, parameters gathered first), as Megatron-LM does.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Dict, List, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

__all__ = ["eval_mode", "forward_only", "reduce_sums", "validation_loss"]


@contextlib.contextmanager
def eval_mode(chunks: Sequence[torch.nn.Module]):
    """Chunks in eval mode (no dropout) and no autograd graph, restored afterwards."""
    modes = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for chunk, mode in zip(chunks, modes):
            chunk.train(mode)


def forward_only(chunks, forward_step: Callable, batches: List[Dict[str, torch.Tensor]], *, seq_length: int,
                 micro_batch_size: int) -> list:
    """megatron-core's schedule over `batches` without backward: the loss functions' reports, in
    micro-batch order, on the last pipeline stage (empty elsewhere)."""
    from megatron_harpe.training.data import iterators_for_chunks

    if not batches:
        return []
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators_for_chunks(batches, len(chunks)), model=list(chunks),
        num_microbatches=len(batches), seq_length=seq_length, micro_batch_size=micro_batch_size,  # CP: divided there
        forward_only=True)


def reduce_sums(reports: Sequence[torch.Tensor], size: int, device: torch.device) -> torch.Tensor:
    """Sum of the micro-batch `reports` (float64 vectors of `size`), over this rank's micro-batches and
    the DP x CP group on the last pipeline stage, then shared with every pipeline stage."""
    totals = torch.zeros(size, device=device, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for report in reports:
            totals += report.to(totals)
        dist.all_reduce(totals, group=ps.get_data_parallel_group(with_context_parallel=True))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(totals, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return totals


def validation_loss(chunks, forward_step: Callable, batches: List[Dict[str, torch.Tensor]], *, seq_length: int,
                    micro_batch_size: int, device: torch.device) -> Dict[str, float]:
    """{"eval_loss", "eval_perplexity", "eval_tokens", "eval_seconds"} over `batches` (this DP rank's share
    of the validation batches), token-weighted exactly as the training loss is."""
    started = time.perf_counter()
    with eval_mode(chunks):
        outputs = forward_only(chunks, forward_step, batches, seq_length=seq_length, micro_batch_size=micro_batch_size)
    totals = reduce_sums([out["lm loss"] for out in outputs], 2, device)
    loss = (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)), "eval_tokens": int(totals[1].item()),
            "eval_seconds": time.perf_counter() - started}
