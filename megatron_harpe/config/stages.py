"""The stage schedule: which sequence length and which RoPE base(s) hold at each iteration.

A HARPE run is one stage at the target length. Multi-stage ABF (e.g. base 1M at 32k, 2M at
64k, 5M at 128k) is a list of stages run as one job: the model, optimizer and learning-rate
schedule continue across a boundary (one job, one schedule, warmup once); at the boundary the
trainer checkpoints, switches the position base(s) and the sequence length, and rebuilds the
data iterator.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional

from megatron_harpe.config.model import ModelConfig
from megatron_harpe.config.schema import Config


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    start_iteration: int  # first iteration of the stage (0-based count of completed iterations)
    end_iteration: int  # exclusive
    seq_length: int
    model_cfg: ModelConfig  # the run's model with this stage's position settings

    @property
    def iterations(self) -> int:
        return self.end_iteration - self.start_iteration


def _iterations_for(tokens: Optional[int], iterations: Optional[int], global_batch: int, seq_length: int,
                    where: str) -> int:
    if iterations is not None and tokens is not None:
        raise ValueError(f"{where}: give iterations or tokens, not both")
    if iterations is not None:
        if iterations <= 0:
            raise ValueError(f"{where}.iterations must be > 0, got {iterations}")
        return iterations
    if tokens is not None:
        per_iteration = global_batch * seq_length
        count = -(-tokens // per_iteration)  # ceil: the budget is at least reached
        if count <= 0:
            raise ValueError(f"{where}.tokens must be > 0, got {tokens}")
        return count
    raise ValueError(f"{where} needs iterations or tokens")


def stage_model(model_cfg: ModelConfig, base: Optional[float], bases: Optional[List[float]],
                where: str) -> ModelConfig:
    """The model config of a stage: the run's model with the stage's base or base set.

    Built with dataclasses.replace, so the stage's model is checked (and its base set resolved)
    like any other ModelConfig; the run's own config is left as it was.
    """
    position = model_cfg.position
    if bases is not None:
        if position.kind != "harpe":
            raise ValueError(f"{where}.bases is a HARPE base set but model.position.kind is "
                             f"{position.kind!r}; use {where}.base for rope/pi/yarn")
        position = dataclasses.replace(position, bases=[float(b) for b in bases], base_strategy=None,
                                       base_min=None, base_max=None, base_stride=None, bases_file=None)
    if base is not None:
        if position.kind == "harpe":
            raise ValueError(f"{where}.base sets one base, but the model is HARPE; give {where}.bases")
        position = dataclasses.replace(position, base=float(base))
    try:
        return dataclasses.replace(model_cfg, position=position)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def build_schedule(cfg: Config) -> List[Stage]:
    """The run's stages with absolute iteration ranges (one stage when cfg.stages is empty)."""
    global_batch = cfg.data.global_batch_size
    if not cfg.stages:
        seq = cfg.data.seq_length
        total = _iterations_for(cfg.training.tokens, cfg.training.iterations if cfg.training.tokens is None else None,
                                global_batch, seq, "training")
        return [Stage(0, "main", 0, total, seq, cfg.model)]
    stages, start = [], 0
    for i, spec in enumerate(cfg.stages):
        where = f"stages[{i}]"
        seq = spec.seq_length or cfg.data.seq_length
        count = _iterations_for(spec.tokens, spec.iterations, global_batch, seq, where)
        model_cfg = stage_model(cfg.model, spec.base, spec.bases, where)
        stages.append(Stage(i, spec.name or f"stage{i}", start, start + count, seq, model_cfg))
        start += count
    return stages


def stage_at(stages: List[Stage], iteration: int) -> Stage:
    """The stage that runs iteration `iteration` (the last stage once the run is complete)."""
    for stage in stages:
        if iteration < stage.end_iteration:
            return stage
    return stages[-1]
