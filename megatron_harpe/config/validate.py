"""Whole-config checks, run on every rank before any process group exists.

Each check is deterministic in the config and the world size, so all ranks raise the same
error at the same point and nobody is left waiting in a rendezvous or a collective.
"""
from __future__ import annotations

from pathlib import Path

from megatron_harpe.config.loader import ConfigError
from megatron_harpe.config.schema import Config

DECAY_STYLES = ("constant", "cosine", "linear")
PRECISIONS = ("auto", "bf16", "fp32")
DATA_KINDS = ("mock", "indexed")


def validate_config(cfg: Config, world_size: int) -> None:
    """Raise ConfigError (a ValueError) naming the key and the fix for the first problem found."""
    from megatron_harpe.training.signals import parse_signals
    from megatron_harpe.training.stages import build_schedule

    p = cfg.parallel
    for name in ("tensor", "pipeline", "context"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    model_parallel = p.tensor * p.pipeline * p.context
    if world_size % model_parallel:
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline x "
                          f"parallel.context = {p.tensor} x {p.pipeline} x {p.context} = {model_parallel}; "
                          f"launch a multiple of {model_parallel} processes")
    dp = world_size // model_parallel
    m = cfg.model
    if m.num_layers % p.pipeline:
        raise ConfigError(f"model.num_layers ({m.num_layers}) must be divisible by parallel.pipeline ({p.pipeline})")
    if p.virtual_pipeline is not None:
        if p.pipeline < 2:
            raise ConfigError("parallel.virtual_pipeline needs parallel.pipeline >= 2")
        if m.num_layers % (p.pipeline * p.virtual_pipeline):
            raise ConfigError(f"model.num_layers ({m.num_layers}) must be divisible by parallel.pipeline x "
                              f"parallel.virtual_pipeline ({p.pipeline} x {p.virtual_pipeline})")
    if p.sequence_parallel and p.tensor == 1:
        raise ConfigError("parallel.sequence_parallel needs parallel.tensor > 1")
    d = cfg.data
    if d.micro_batch_size < 1 or d.global_batch_size < 1:
        raise ConfigError("data.micro_batch_size and data.global_batch_size must be >= 1")
    if d.global_batch_size % (d.micro_batch_size * dp):
        raise ConfigError(f"data.global_batch_size ({d.global_batch_size}) must be divisible by data.micro_batch_size "
                          f"({d.micro_batch_size}) x data-parallel size ({dp} = {world_size} processes / "
                          f"{model_parallel})")
    if p.virtual_pipeline is not None and (d.global_batch_size // (d.micro_batch_size * dp)) % p.pipeline:
        raise ConfigError("with parallel.virtual_pipeline the number of micro-batches per iteration must be a "
                          "multiple of parallel.pipeline (megatron-core's interleaved schedule)")
    if d.kind not in DATA_KINDS:
        raise ConfigError(f"data.kind must be one of {DATA_KINDS}, got {d.kind!r}")
    if d.kind == "indexed":
        from megatron_harpe.training.data import check_blend_files

        try:
            check_blend_files(d.blend)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(str(err)) from None
    if d.tokenizer_model is not None and not Path(d.tokenizer_model).exists():
        raise ConfigError(f"data.tokenizer_model: {d.tokenizer_model} does not exist")
    if cfg.training.precision not in PRECISIONS:
        raise ConfigError(f"training.precision must be one of {PRECISIONS}, got {cfg.training.precision!r}")
    if cfg.scheduler.decay_style not in DECAY_STYLES:
        raise ConfigError(f"scheduler.decay_style must be one of {DECAY_STYLES}, got {cfg.scheduler.decay_style!r}")
    if cfg.training.recompute_granularity not in (None, "selective", "full"):
        raise ConfigError("training.recompute_granularity must be null, selective or full")
    if cfg.training.recompute_granularity == "full" and cfg.training.recompute_method not in ("uniform", "block"):
        raise ConfigError("training.recompute_granularity=full needs training.recompute_method uniform or block")
    if cfg.training.init_from is not None and not Path(cfg.training.init_from).exists():
        raise ConfigError(f"training.init_from: {cfg.training.init_from} does not exist")
    if cfg.logging.interval < 1:
        raise ConfigError("logging.interval must be >= 1")
    try:
        parse_signals(cfg.checkpoint.exit_signals)
        stages = build_schedule(cfg)
        for stage in stages:
            stage.model.validate(p.tensor, p.context, stage.seq_length)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if m.vocab_size % p.tensor:
        raise ConfigError(f"model.vocab_size ({m.vocab_size}) must be divisible by parallel.tensor ({p.tensor})")
