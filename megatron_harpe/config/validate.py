"""Whole-config checks, run on every rank before any process group exists.

Each check is deterministic in the config and the world size, so all ranks raise the same
error at the same point and nobody is left waiting in a rendezvous or a collective. What a
section can check alone (a model's heads and base set, a position encoding's settings) is
checked when the section is built (config/model.py); what needs the whole run is here.
"""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Iterable, List

from megatron_harpe.config.loader import ConfigError
from megatron_harpe.config.model import check_layout
from megatron_harpe.config.schema import Config, parse_blend
from megatron_harpe.config.stages import build_schedule

DECAY_STYLES = ("constant", "cosine", "linear")
PRECISIONS = ("auto", "bf16", "fp32")
DATA_KINDS = ("mock", "indexed")


def parse_signals(names: Iterable[str]) -> List[signal.Signals]:
    """checkpoint.exit_signals as signal numbers ("SIGUSR1", "usr1", "TERM" all work)."""
    result = []
    for name in names:
        key = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
        if not hasattr(signal.Signals, key):
            raise ConfigError(f"checkpoint.exit_signals: unknown signal {name!r}; use names like SIGTERM, SIGUSR1")
        result.append(signal.Signals[key])
    return result


def validate_config(cfg: Config, world_size: int) -> None:
    """Raise ConfigError (a ValueError) naming the key and the fix for the first problem found."""
    p = cfg.parallel
    for name in ("tensor", "pipeline", "context"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    model_parallel = p.tensor * p.pipeline * p.context
    if world_size % model_parallel:
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline x "
                          f"parallel.context = {p.tensor} x {p.pipeline} x {p.context} = {model_parallel}; "
                          f"launch a multiple of {model_parallel} processes")
    if p.sequence_parallel and p.tensor == 1:
        raise ConfigError("parallel.sequence_parallel needs parallel.tensor > 1")
    _validate_batches(cfg, data_parallel=world_size // model_parallel)
    _validate_data(cfg)
    _validate_training(cfg)
    parse_signals(cfg.checkpoint.exit_signals)
    try:
        for stage in build_schedule(cfg):
            check_layout(stage.model_cfg, tensor=p.tensor, pipeline=p.pipeline, virtual_pipeline=p.virtual_pipeline,
                         context=p.context, seq_length=stage.seq_length)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _validate_batches(cfg: Config, data_parallel: int) -> None:
    d, p = cfg.data, cfg.parallel
    if d.micro_batch_size < 1 or d.global_batch_size < 1:
        raise ConfigError("data.micro_batch_size and data.global_batch_size must be >= 1")
    if d.global_batch_size % (d.micro_batch_size * data_parallel):
        raise ConfigError(f"data.global_batch_size ({d.global_batch_size}) must be divisible by data.micro_batch_size "
                          f"({d.micro_batch_size}) x data-parallel size ({data_parallel})")
    if p.virtual_pipeline is not None and (d.global_batch_size // (d.micro_batch_size * data_parallel)) % p.pipeline:
        raise ConfigError("with parallel.virtual_pipeline the number of micro-batches per iteration must be a "
                          "multiple of parallel.pipeline (megatron-core's interleaved schedule)")


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    if d.kind not in DATA_KINDS:
        raise ConfigError(f"data.kind must be one of {DATA_KINDS}, got {d.kind!r}")
    if d.kind == "indexed":
        try:
            prefixes, _ = parse_blend(d.blend)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        for prefix in prefixes:
            for suffix in (".bin", ".idx"):
                if not Path(prefix + suffix).is_file():
                    raise ConfigError(f"data.blend: {prefix}{suffix} does not exist; make it with "
                                      f"harpe-preprocess --output-prefix ... (prefixes omit .bin/.idx)")
    if d.tokenizer_model is not None and not Path(d.tokenizer_model).exists():
        raise ConfigError(f"data.tokenizer_model: {d.tokenizer_model} does not exist")


def _validate_training(cfg: Config) -> None:
    t = cfg.training
    if t.precision not in PRECISIONS:
        raise ConfigError(f"training.precision must be one of {PRECISIONS}, got {t.precision!r}")
    if cfg.scheduler.decay_style not in DECAY_STYLES:
        raise ConfigError(f"scheduler.decay_style must be one of {DECAY_STYLES}, got {cfg.scheduler.decay_style!r}")
    if t.recompute_granularity not in (None, "selective", "full"):
        raise ConfigError("training.recompute_granularity must be null, selective or full")
    if t.recompute_granularity == "full" and t.recompute_method not in ("uniform", "block"):
        raise ConfigError("training.recompute_granularity=full needs training.recompute_method uniform or block")
    if t.init_from is not None and not Path(t.init_from).exists():
        raise ConfigError(f"training.init_from: {t.init_from} does not exist")
    if cfg.logging.interval < 1:
        raise ConfigError("logging.interval must be >= 1")
