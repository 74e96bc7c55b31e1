"""Non-finite loss or gradients: stop, or skip a bounded number of updates; never save NaN weights.

A NaN or inf reaches the weights through one optimizer step and from then on every loss is NaN, so the
decision is taken between the backward pass and the step, on every rank alike (a collective check of
the loss, already reduced over the world, and of the gradients):
- `stop` (training.on_nonfinite, the default): the update is not applied; the run exits 3 with the last
  good checkpoint as `latest`.
- `skip`: the update is not applied, the learning-rate schedule does not advance (as Megatron-LM does for
  an overflowed step), the iteration's batch is logged as skipped and the run goes on with the next one.
  More than training.max_skipped_iterations skipped over the run (the count is kept in checkpoints)
  stops it as `stop` would: a run that keeps producing NaNs needs a look, not more skipping.
A checkpoint is written only after a check that every weight is finite (one pass over the parameters
per save), so no path - an Adam state gone to inf, a skipped check - saves a model that cannot resume.

The gradient check sums each of megatron-core's contiguous gradient buffers: one read of gradient
memory per step and no temporary of the buffers' size (an isfinite() mask of a 7B model's fp32
gradients would be gigabytes). A sum overflowing to inf from finite values would need gradients
near 1e38; it would be reported as non-finite, which is then what it is in all but name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, List, Optional

import torch
import torch.distributed as dist

ACTIONS = ("stop", "skip")


class NonfiniteWeights(RuntimeError):
    """Raised instead of saving a checkpoint whose weights are not finite (harpe-train exits 3)."""


def _world_all_finite(sums: List[torch.Tensor], device: torch.device) -> bool:
    local = torch.stack([s.float() for s in sums]).sum() if sums else torch.zeros((), device=device)
    flag = torch.tensor([0.0 if torch.isfinite(local) else 1.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0


def _gradient_tensors(chunk) -> Iterable[torch.Tensor]:
    buffers = [*getattr(chunk, "buffers", []), *getattr(chunk, "expert_parallel_buffers", [])]
    if buffers:  # megatron-core DDP: every gradient lives in these flat buffers
        return [b.grad_data for b in buffers]
    grads = [getattr(p, "main_grad", None) for p in chunk.parameters()]
    return [g if g is not None else p.grad for g, p in zip(grads, chunk.parameters())
            if g is not None or p.grad is not None]


def gradients_finite(chunks, device: torch.device) -> bool:
    """Collective: True when every rank's gradients are finite."""
    return _world_all_finite([g.sum(dtype=torch.float32) for c in chunks for g in _gradient_tensors(c)], device)


def weights_finite(chunks, device: torch.device) -> bool:
    """Collective: True when every rank's weights are finite."""
    return _world_all_finite([p.detach().sum(dtype=torch.float32) for c in chunks for p in c.parameters()], device)


@dataclass
class NonfinitePolicy:
    action: str
    max_skipped: int
    skipped: List[int] = field(default_factory=list)  # iterations whose update was skipped, over the whole run

    def verdict(self, iteration: int, loss: float, gradients_ok: bool) -> Optional[str]:
        """None for a good step; otherwise what went wrong at `iteration` (1-based, the one just run)."""
        if math.isfinite(loss) and gradients_ok:
            return None
        what = [f"loss is {loss}"] if not math.isfinite(loss) else []
        what += [] if gradients_ok else ["gradients are not finite"]
        return f"{' and '.join(what)} at iteration {iteration}"

    def may_skip(self) -> bool:
        return self.action == "skip" and len(self.skipped) < self.max_skipped


__all__ = ["ACTIONS", "NonfiniteWeights", "NonfinitePolicy", "gradients_finite", "weights_finite"]
