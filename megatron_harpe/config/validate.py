"""Whole-config checks, run on every rank before any process group exists.

Each check is deterministic in the config and the world size, so all ranks raise the same
error at the same point and nobody is left waiting in a rendezvous or a collective. What a
section can check alone (a model's heads and base set, a position encoding's settings) is
checked when the section is built (config/model.py); what needs the whole run is here.
"""
from __future__ import annotations

import importlib.util
import signal
from pathlib import Path
from typing import Iterable, List

from megatron_harpe.config.combinations import config_refusals
from megatron_harpe.config.loader import ConfigError
from megatron_harpe.config.model import check_layout
from megatron_harpe.config.schema import Config, parse_blend
from megatron_harpe.config.stages import build_schedule

DECAY_STYLES = ("constant", "cosine", "linear")
OPTIMIZER_FORMATS = ("auto", "fully_reshardable", "dp_reshardable")
CP_COMM_TYPES = ("p2p", "all_gather", "a2a", "a2a+p2p")
FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
FP8_ATTENTION_RECIPES = ("delayed", "tensorwise")  # megatron-core 0.16.1 passes fp8_dpa to these only
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")  # megatron-core's choices that a dense model has
PRECISIONS = ("auto", "bf16", "fp32")
DATA_KINDS = ("mock", "indexed")
WANDB_MODES = ("online", "offline", "disabled")


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
    if p.cp_comm_type not in CP_COMM_TYPES:
        raise ConfigError(f"parallel.cp_comm_type must be one of {CP_COMM_TYPES}, got {p.cp_comm_type!r}")
    _validate_hierarchical_context(p)
    _validate_batches(cfg, data_parallel=world_size // model_parallel)
    _validate_data(cfg)
    _validate_training(cfg)
    _validate_fp8(cfg)
    _validate_wandb(cfg)
    parse_signals(cfg.checkpoint.exit_signals)
    if cfg.checkpoint.optimizer_format not in OPTIMIZER_FORMATS:
        raise ConfigError(f"checkpoint.optimizer_format must be one of {OPTIMIZER_FORMATS}, got "
                          f"{cfg.checkpoint.optimizer_format!r}")
    if cfg.checkpoint.optimizer_format != "auto" and not p.distributed_optimizer:
        raise ConfigError(f"checkpoint.optimizer_format={cfg.checkpoint.optimizer_format} chooses how the distributed "
                          f"optimizer's state is saved; set parallel.distributed_optimizer=true, or leave it at auto")
    try:
        for stage in build_schedule(cfg):
            check_layout(stage.model_cfg, tensor=p.tensor, pipeline=p.pipeline, virtual_pipeline=p.virtual_pipeline,
                         context=p.context, seq_length=stage.seq_length)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _validate_profile(cfg, world_size)
    raise_refusals(config_refusals(cfg))


def raise_refusals(refusals) -> None:
    """Combinations Transformer Engine or megatron-core cannot run (config/combinations.py): all of them, at once."""
    if refusals:
        lines = [r.message() for r in refusals]
        raise ConfigError(lines[0] if len(lines) == 1 else
                          f"{len(lines)} combinations cannot run:\n  - " + "\n  - ".join(lines))


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
    if d.eod_token is not None and d.tokenizer_model is None:
        raise ConfigError(f"data.eod_token {d.eod_token!r} names a token of the tokenizer: set data.tokenizer_model "
                          f"too (the tokenizer the data was made with)")
    if d.document_mask and (d.kind != "indexed" or d.tokenizer_model is None):
        raise ConfigError("data.document_mask needs documents and their end-of-document (EOD) token: set "
                          "data.kind=indexed with data.blend and data.tokenizer_model (the mock source has no "
                          "documents), or data.document_mask=false")
    if d.reset_position_ids and not d.document_mask:
        raise ConfigError("data.reset_position_ids alone changes nothing here: RoPE/HARPE models take positions "
                          "from the token's place in the sequence, not from position_ids. To restart positions (and "
                          "attention) at every document set data.document_mask=true, or drop "
                          "data.reset_position_ids")


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
    if t.recompute_modules is not None:
        if t.recompute_granularity != "selective":
            raise ConfigError("training.recompute_modules applies to training.recompute_granularity=selective")
        unknown = sorted(set(t.recompute_modules) - set(RECOMPUTE_MODULES))
        if unknown or not t.recompute_modules:
            raise ConfigError(f"training.recompute_modules: {unknown or 'empty'}; choose from {RECOMPUTE_MODULES}")
    if t.recompute_granularity == "full" and (t.recompute_num_layers or 0) < 1:
        raise ConfigError("training.recompute_granularity=full needs training.recompute_num_layers >= 1 (layers "
                          "per recomputed chunk with uniform, recomputed layers per stage with block)")
    if t.init_from is not None:
        _validate_init_from(t.init_from)
    if cfg.logging.interval < 1:
        raise ConfigError("logging.interval must be >= 1")
    _validate_evaluation(cfg)
    _validate_nonfinite(cfg)


def _validate_init_from(path: str) -> None:
    """The shapes training/checkpointing.py resolve_checkpoint_path accepts, checked without importing torch."""
    root = Path(path)
    if not root.exists():
        raise ConfigError(f"training.init_from: {path} does not exist; give a checkpoint (harpe-convert hf-to-megatron "
                          f"--save DIR), a checkpoints directory with a 'latest' file, or a run directory")
    if (root / "metadata.json").is_file():
        return
    for directory in (root, root / "checkpoints"):
        if (directory / "latest").is_file():
            named = directory / (directory / "latest").read_text().strip()
            if (named / "metadata.json").is_file():
                return
            raise ConfigError(f"training.init_from: {directory / 'latest'} names {named.name}, which is not a "
                              f"complete checkpoint (no metadata.json); point init_from at a complete one")
    raise ConfigError(f"training.init_from: {path} is neither a torch_dist checkpoint (metadata.json), a "
                      f"checkpoints directory with a 'latest' file, nor a run directory with checkpoints/latest")


def _validate_nonfinite(cfg: Config) -> None:
    t = cfg.training
    if t.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"training.on_nonfinite must be stop or skip, got {t.on_nonfinite!r}")
    if t.max_skipped_iterations < 0:
        raise ConfigError(f"training.max_skipped_iterations must be >= 0, got {t.max_skipped_iterations}")


def _validate_evaluation(cfg: Config) -> None:
    t, probe, p = cfg.training, cfg.training.probe, cfg.parallel
    if t.eval_interval < 0:
        raise ConfigError(f"training.eval_interval must be >= 0 (0 = no evaluation), got {t.eval_interval}")
    if t.eval_interval and t.eval_iterations < 1:
        raise ConfigError(f"training.eval_iterations must be >= 1 with training.eval_interval, got {t.eval_iterations}")
    if t.eval_interval and cfg.data.kind == "indexed":
        try:
            valid_share = [float(x) for x in str(cfg.data.split).replace("/", ",").split(",")][1:2]
        except ValueError:
            raise ConfigError(f"data.split must be three numbers, e.g. 98,2,0; got {cfg.data.split!r}") from None
        if not valid_share or valid_share[0] <= 0:
            raise ConfigError(f"training.eval_interval needs a validation split: data.split {cfg.data.split!r} gives "
                              f"it nothing; e.g. data.split=98,2,0")
    if not probe.lengths:
        return
    if (probe.interval or t.eval_interval) < 1:
        raise ConfigError("training.probe.lengths is set but neither training.probe.interval nor "
                          "training.eval_interval is: set when to probe, e.g. training.probe.interval=500")
    if cfg.data.tokenizer_model is None:
        raise ConfigError("training.probe needs data.tokenizer_model: the passkey prompts are text")
    if probe.prompts < 1:
        raise ConfigError(f"training.probe.prompts must be >= 1, got {probe.prompts}")
    multiple = (2 * p.context if p.context > 1 else 1) * (p.tensor if p.sequence_parallel else 1)
    for length in probe.lengths:
        if length < 64 or length % multiple:
            raise ConfigError(f"training.probe.lengths: {length} must be >= 64 and a multiple of {multiple} "
                              f"(2 x parallel.context, x parallel.tensor with sequence parallelism)")


def _validate_hierarchical_context(p) -> None:
    """a2a+p2p needs the two levels of the CP group spelled out (schema.py says why)."""
    sizes = p.hierarchical_context_sizes
    if p.cp_comm_type == "a2a+p2p" and p.context > 1:
        if not sizes:
            raise ConfigError(f"parallel.cp_comm_type=a2a+p2p needs parallel.hierarchical_context_sizes=[A2A,P2P] with "
                              f"A2A x P2P = parallel.context ({p.context}), e.g. [{_inner_guess(p.context)},"
                              f"{p.context // _inner_guess(p.context)}]: without them megatron-core hands Transformer "
                              f"Engine no hierarchical CP group and each rank attends only within its own chunks "
                              f"(a plausible loss, a wrong model); or use cp_comm_type p2p or a2a")
        if len(sizes) != 2 or min(sizes) < 1 or sizes[0] * sizes[1] != p.context:
            raise ConfigError(f"parallel.hierarchical_context_sizes must be two sizes [A2A,P2P] whose product is "
                              f"parallel.context ({p.context}), got {list(sizes)}")
    elif sizes:
        raise ConfigError(f"parallel.hierarchical_context_sizes={list(sizes)} is used only with parallel.cp_comm_type="
                          f"a2a+p2p and parallel.context > 1 (here cp_comm_type={p.cp_comm_type}, context="
                          f"{p.context}); remove it")


def _inner_guess(context: int) -> int:
    """A suggestion for the a2a level: the largest power of two <= 8 (a node's GPUs) dividing context, < context."""
    size = 1
    while size * 2 <= 8 and context % (size * 2) == 0 and size * 2 < context:
        size *= 2
    return size


def _validate_fp8(cfg: Config) -> None:
    """FP8 settings that can be judged from the config alone (TE and the GPU are checked at start-up,
    training/runtime.py)."""
    f, p, position = cfg.fp8, cfg.parallel, cfg.model.position
    if f.format is None:
        if f.dot_product_attention or f.multi_head_attention or f.first_last_layers_bf16:
            raise ConfigError("fp8.dot_product_attention / multi_head_attention / first_last_layers_bf16 need "
                              "fp8.format (hybrid or e4m3)")
        return
    if f.format not in FP8_FORMATS:
        raise ConfigError(f"fp8.format must be one of {FP8_FORMATS} (or null for bf16), got {f.format!r}")
    if f.recipe not in FP8_RECIPES:
        raise ConfigError(f"fp8.recipe must be one of {FP8_RECIPES}, got {f.recipe!r}")
    if f.amax_compute_algo not in ("max", "most_recent"):
        raise ConfigError(f"fp8.amax_compute_algo must be max or most_recent, got {f.amax_compute_algo!r}")
    if f.amax_history_len < 1 or f.margin < 0:
        raise ConfigError("fp8.amax_history_len must be >= 1 and fp8.margin >= 0")
    if cfg.training.precision == "fp32":
        raise ConfigError("fp8.format needs training.precision bf16 (or auto): FP8 GEMMs take bf16 inputs")
    if (f.dot_product_attention or f.multi_head_attention) and f.recipe not in FP8_ATTENTION_RECIPES:
        raise ConfigError(f"fp8.dot_product_attention needs fp8.recipe {' or '.join(FP8_ATTENTION_RECIPES)}: "
                          f"megatron-core 0.16.1 does not hand the {f.recipe} recipe an FP8 attention setting")
    if f.multi_head_attention and not f.dot_product_attention:
        raise ConfigError("fp8.multi_head_attention needs fp8.dot_product_attention=true")
    if f.multi_head_attention and position.kind == "harpe":
        raise ConfigError("fp8.multi_head_attention hands attention FP8 q and k straight from the QKV projection, "
                          "but HARPE rotates q and k (per head) in between; use fp8.dot_product_attention alone")
    if f.first_last_layers_bf16:
        kept = f.num_layers_at_start_in_bf16 + f.num_layers_at_end_in_bf16
        if min(f.num_layers_at_start_in_bf16, f.num_layers_at_end_in_bf16) < 0 or kept >= cfg.model.num_layers:
            raise ConfigError(f"fp8.num_layers_at_start_in_bf16 + num_layers_at_end_in_bf16 ({kept}) must leave "
                              f"some of the model's {cfg.model.num_layers} layers in FP8")


def _validate_wandb(cfg: Config) -> None:
    """W&B's settings, and that the optional package is there when they turn it on: a missing package would
    otherwise surface on the logging rank only, after the model is built, with the other ranks already
    waiting in a collective. ``find_spec`` locates the package without importing it (importing wandb takes
    about a second and is not wanted in this layer)."""
    w = cfg.logging.wandb
    if w.mode not in WANDB_MODES:
        raise ConfigError(f"logging.wandb.mode must be one of {WANDB_MODES}, got {w.mode!r}")
    if w.project is not None and not w.project.strip():
        raise ConfigError("logging.wandb.project is empty; set a project name, or null to turn W&B off")
    if w.enabled and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"logging.wandb.project={w.project!r} turns on Weights & Biases, but the wandb package "
                          "is not installed: pip install 'megatron-harpe[wandb]' (or pip install wandb), or turn "
                          "it off with logging.wandb.mode=disabled")


def _validate_profile(cfg: Config, world_size: int) -> None:
    """logging.profile's window and ranks (after the schedule is known to be valid: the window must lie
    inside the run). Whether the machine can take a memory snapshot (CUDA) is checked with the machine
    (training/runtime.py check_runtime), the one place that knows."""
    prof = cfg.logging.profile
    if not prof.enabled:
        return
    if prof.start < 0:
        raise ConfigError(f"logging.profile.start must be >= 0 (iterations done before the first profiled one; "
                          f"null = profiling off), got {prof.start}")
    if prof.last <= prof.start:
        raise ConfigError(f"logging.profile.end ({prof.end}) must be greater than logging.profile.start "
                          f"({prof.start}): iterations start+1..end are profiled")
    total = build_schedule(cfg)[-1].end_iteration
    if prof.last > total:
        raise ConfigError(f"logging.profile.end ({prof.last}) is past the run's last iteration ({total}); "
                          f"profile iterations inside the run")
    if not prof.ranks:
        raise ConfigError("logging.profile.ranks is empty: list the global ranks to profile, e.g. [0], or set "
                          "logging.profile.start=null to turn profiling off")
    outside = sorted({r for r in prof.ranks if not 0 <= r < world_size})
    if outside:
        raise ConfigError(f"logging.profile.ranks: {outside} not in this run of {world_size} process(es) "
                          f"(global ranks 0..{world_size - 1})")
