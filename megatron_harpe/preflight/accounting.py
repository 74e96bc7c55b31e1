"""Check 6: the layout does the work the throughput numbers assume, and the numbers are possible.

A context-parallel setting that silently turned CP off (Megatron-Bridge #2667) looked like a fast run: each GPU
processed the whole sequence, attention ran on its own chunks alone, and the logged TFLOP/s - computed as if the
sequence were sharded - exceeded the hardware's peak. The two causes are checked directly, on every rank of the
twin:

- the sequence share: the first layer of every chunk was handed s / CP positions (/ TP with sequence
  parallelism), and the CP ranks together hold the whole sequence (document masking: the packed, padded stream,
  recomputed here from the documents);
- the attention's CP group: every core-attention module holds a CP group of the configured size (TE's
  DotProductAttention and our SDPA core attention keep it as `cp_group`); without one it attends within its own
  chunks only.

And the numbers: the twin's step time gives tokens/s, TFLOP/s per device (harpe-train's model-FLOPs formula) and
MFU against the device's peak; the planner's prediction for the full run gives the same three. An MFU above 100%
is impossible and is an error, wherever it comes from.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_harpe.models.unwrap import unwrap_model
from megatron_harpe.preflight.layout_run import LayoutRun, gather_objects
from megatron_harpe.preflight.result import FAIL, PASS, CheckResult
from megatron_harpe.preflight.twin import Twin
from megatron_harpe.training.init_check import FirstBatch
from megatron_harpe.training.metrics import model_flops_per_token

NAME = "accounting sanity"


def attention_cp_groups(twin: Twin, trainer) -> Dict[str, Any]:
    """A probe (run while the twin exists): the CP group size every core-attention module of this rank holds."""
    sizes = []
    for chunk in trainer.chunks:
        for name, module in unwrap_model(chunk).named_modules():
            kind = type(module).__name__
            if "DotProductAttention" in kind or "CoreAttention" in kind:
                group = getattr(module, "cp_group", None)
                sizes.append((name, kind, None if group is None else dist.get_world_size(group)))
    return {"rank": dist.get_rank() if dist.is_initialized() else 0, "cp_rank": ps.get_context_parallel_rank(),
            "tp_rank": ps.get_tensor_model_parallel_rank(), "modules": sizes}


def expected_share(twin: Twin, windows: torch.Tensor) -> List[int]:
    """The sequence positions one rank should compute per micro-batch (s_local), over every micro-batch of the
    global batch (packed streams differ in length with their documents), recomputed from the documents."""
    p, d = twin.cfg.parallel, twin.cfg.data
    split = p.context * (p.tensor if p.sequence_parallel else 1)
    if not d.document_mask:
        return [twin.seq_length // split]
    from megatron_harpe.training.packing import stream_multiple

    multiple = stream_multiple(p.context, p.tensor, p.sequence_parallel, fp8=twin.cfg.fp8.format is not None)
    doc_multiple = 2 * p.context if p.context > 1 else 1
    batch = FirstBatch(windows.long(), twin.eod_id, True, False)
    shares = []
    rows = d.micro_batch_size
    for first in range(0, windows.shape[0], rows):
        lengths = [end - start for row, start, end in batch.segments() if first <= row < first + rows]
        padded = sum(-(-n // doc_multiple) * doc_multiple for n in lengths)
        padded += -padded % multiple
        shares.append(padded // split)
    return sorted(set(shares))


def accounting_check(twin: Twin, run: LayoutRun, windows: torch.Tensor, peak_tflops: Optional[float],
                     predicted: Optional[Dict[str, Any]] = None) -> CheckResult:
    """Collective; the same verdict on every rank. `predicted`: the memory check's planner numbers for the full
    run (tokens_per_second, tflops_per_device, mfu), None when it gave none."""
    started = time.perf_counter()
    p = twin.cfg.parallel
    faults: List[str] = []
    details: Dict[str, Any] = {}

    # the sequence share of every rank
    shares = gather_objects(sorted({shape[0] for shape in run.probes.get("sequence_shares", [])}))
    allowed = set(expected_share(twin, windows))
    details["sequence_share"] = {"expected": sorted(allowed), "per_rank": shares}
    for rank, seen in enumerate(shares):
        wrong = [s for s in seen if s not in allowed]
        if wrong:
            faults.append(f"rank {rank} computed {wrong[0]} positions of each sequence, its share is "
                          f"{min(allowed)} (s / CP{' / TP' if p.sequence_parallel else ''}): "
                          f"{'context parallelism does not shard the sequence' if p.context > 1 else 'the sequence is not split as configured'}")
            break

    # the attention's CP group
    groups = run.probes.get("attention_cp_groups", [])
    details["attention_cp_groups"] = groups
    if p.context > 1:
        for entry in groups:
            bad = [(name, kind, size) for name, kind, size in entry["modules"] if size != p.context]
            if bad:
                name, kind, size = bad[0]
                faults.append(f"rank {entry['rank']}: {kind} {name} attends with "
                              f"{'no CP group' if size in (None, 1) else f'a CP group of {size}'} (CP is "
                              f"{p.context}): each rank would attend within its own chunks only "
                              f"(Megatron-Bridge #2667)")
                break

    # the numbers: the twin's measured step, the planner's full run
    step = min(ps_.seconds for ps_ in run.passes)
    tokens = twin.cfg.data.global_batch_size * twin.seq_length
    m = twin.model_cfg
    flops = model_flops_per_token(m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.groups,
                                  m.vocab_size, twin.seq_length)
    tflops = tokens * flops / step / twin.world_size / 1e12
    measured = {"step_seconds": step, "tokens_per_second": tokens / step, "tflops_per_device": tflops,
                "peak_tflops_per_device": peak_tflops, "mfu": tflops / peak_tflops if peak_tflops else None}
    details["twin"] = measured
    details["full_run_predicted"] = predicted
    for what, numbers in (("the twin's measured step", measured), ("the planner's full run", predicted or {})):
        mfu = numbers.get("mfu")
        if mfu is not None and mfu > 1.0:
            faults.append(f"{what}: MFU {100 * mfu:.0f}% is above the device's peak: the work counted is not the "
                          f"work done (a parallel dimension that does not shard, or a wrong peak in "
                          f"logging.peak_tflops_per_device)")
    peak = "no peak on a CPU" if peak_tflops is None else f"MFU {100 * measured['mfu']:.1f}%"
    line = (f"twin: {measured['tokens_per_second']:,.0f} tokens/s, {tflops:.3g} TFLOP/s per device ({peak}); "
            f"each rank computed {min(allowed)} positions per sequence")
    if predicted and predicted.get("mfu") is not None:
        line += f"; full run predicted MFU {100 * predicted['mfu']:.0f}%"
    tolerance = "sequence share exactly s / CP (/ TP with SP); attention's CP group = CP; MFU <= 100%"
    return CheckResult(NAME, FAIL if faults else PASS, "; ".join(faults) if faults else line, tolerance, details,
                       time.perf_counter() - started)
