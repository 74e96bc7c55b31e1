"""The megatron side of the converters: a one-process world, the model, checkpoints.

Why build the model at TP=1/PP=1 in one process: the parameter names, shapes and the
checkpoint's sharded keys are then those of the project's own megatron-core model, built by the
same provider the trainer uses, so by construction those the trainer expects; megatron-core's
`torch_dist` format reshards on load into whatever TP/PP layout a run uses. No layout-specific
file writing exists here to get wrong. The converters build it on the meta device
(`build_meta_model`: the layout without the weights) and move the weights one tensor or one layer
at a time (streaming_writer.py, streaming_reader.py); `build_full_model` is for --verify and tests.

Which checkpoints `megatron-to-hf` reads (`locate_checkpoint`):
- a torch_dist directory (it has `metadata.json`): `harpe-convert hf-to-megatron` output,
  `models.checkpoint.save_model` output, or one trainer checkpoint `iter_XXXXXXX/`;
- a trainer checkpoint directory with a `latest` pointer (its newest complete checkpoint);
- a trainer run directory with `checkpoints/latest`.
The architecture comes from, in this order: `--config`, the checkpoint's own record (written
by hf-to-megatron), the trainer's `config.yaml` saved in the checkpoint (or in the run
directory). The position encoding comes from the checkpoint's position record, which is the
encoding the weights were last trained with (a staged run changes it along the way).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import yaml

from megatron_harpe.config.loader import ConfigError, from_dict, model_config_from_dict
from megatron_harpe.config.model import ModelConfig
from megatron_harpe.config.position_record import RECORD_KEY, position_from_record
from megatron_harpe.convert.errors import ConversionError

#: common-state keys this package adds beside config.position_record.RECORD_KEY
MODEL_KEY = "megatron_harpe_model"  # the ModelConfig as a dict
CONVERSION_KEY = "megatron_harpe_conversion"  # where the weights came from, tokenizer, vocabulary
HF_SOURCE_DIR = "hf_source"  # inside a converted checkpoint: the HF config, generation config, tokenizer
MODEL_YAML = "model.yaml"  # inside a converted checkpoint: the `model:` section for harpe-train

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """None/"auto" -> None (keep the source's dtype)."""
    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise ConversionError(f"--dtype {name!r}: choose auto, fp32, bf16 or fp16")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------- a world of one
@contextlib.contextmanager
def single_process_world():
    """torch.distributed (gloo, world size 1) and megatron-core's parallel state at TP=PP=1.

    Creates only what is not there and removes only what it created, so it can run inside a
    test process or a user's script; the global CPU RNG is left as it was.
    """
    from megatron_harpe.backends import setup_backend

    setup_backend()
    import torch.distributed as dist

    created_group = False
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        created_group = True
    elif dist.get_world_size() != 1:
        raise ConversionError(f"the converters run in a single process, not under torchrun (world size "
                              f"{dist.get_world_size()}); start them with python / harpe-convert directly")
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    created_state = False
    with torch.random.fork_rng(devices=[]):
        try:
            if not ps.model_parallel_is_initialized():
                ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
                created_state = True
                model_parallel_cuda_manual_seed(1234)
            yield
        finally:
            if created_state:
                ps.destroy_model_parallel()
            if created_group:
                dist.destroy_process_group()


def build_full_model(model_cfg: ModelConfig, dtype: torch.dtype):
    """The whole model (TP=1, PP=1) in eval mode, parameters left uninitialised (they are overwritten)."""
    from megatron_harpe.models.provider import build_model
    from megatron_harpe.models.transformer_config import build_transformer_config

    config = build_transformer_config(model_cfg, params_dtype=dtype, perform_initialization=False)
    model = build_model(model_cfg, config, parallel_output=False)
    return model.eval()


def build_meta_model(model_cfg: ModelConfig, dtype: torch.dtype):
    """The whole model (TP=1, PP=1) with its parameters on the meta device: the same names, shapes
    and sharded checkpoint keys as build_full_model's, without memory for the weights.

    The streaming converters read the checkpoint layout from it (streaming_writer, streaming_reader).
    Tensors that a module creates on an explicit device (the norms' weights: one vector each)
    are real but never read.
    """
    with torch.device("meta"):
        return build_full_model(model_cfg, dtype)


def megatron_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """[batch, seq, vocab] logits of a full (TP=1, PP=1) megatron model for token ids [batch, seq]."""
    with torch.no_grad():
        return model(input_ids, None, None)


# ----------------------------------------------------------------------------- locating checkpoints
def locate_checkpoint(path: str | Path) -> Path:
    """The torch_dist directory that `path` names (see the module docstring)."""
    from megatron_harpe.training.checkpointing import latest_checkpoint

    path = Path(path)
    if not path.exists():
        raise ConversionError(f"--load {path} does not exist")
    if (path / "metadata.json").is_file():
        return path
    for candidate in (path, path / "checkpoints"):
        try:
            latest = latest_checkpoint(candidate)
        except FileNotFoundError as err:
            raise ConversionError(str(err)) from None
        if latest is not None:
            return latest
    raise ConversionError(f"--load {path} is not a megatron checkpoint: expected a torch_dist directory "
                          f"(metadata.json), a trainer checkpoint directory with 'latest', or a run directory "
                          f"with checkpoints/latest")


def _load_yaml(path: Path) -> Dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConversionError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} does not hold a mapping")
    return data


def _model_section(data: Dict[str, Any], where: str) -> ModelConfig:
    section = data.get("model") if isinstance(data.get("model"), dict) else data
    try:
        return from_dict(ModelConfig, section, "model")
    except (ConfigError, TypeError) as err:
        raise ConversionError(f"{where}: not a model config: {err}") from None


@dataclass
class MegatronCheckpoint:
    path: Path  # the torch_dist directory
    common: Dict[str, Any]
    model_cfg: ModelConfig
    config_source: str
    run_config: Optional[Dict[str, Any]]  # the trainer's config.yaml, when there is one

    @property
    def conversion(self) -> Dict[str, Any]:
        return self.common.get(CONVERSION_KEY) or {}


def open_checkpoint(load: str | Path, config: Optional[str | Path] = None) -> MegatronCheckpoint:
    """Find the checkpoint, read its common state and rebuild its ModelConfig."""
    from megatron_harpe.models.checkpoint import read_common_state

    path = locate_checkpoint(load)
    common = read_common_state(path)
    run_config, run_config_path = None, None
    for candidate in (path / "config.yaml", path.parent.parent / "config.yaml"):
        if candidate.is_file():
            run_config, run_config_path = _load_yaml(candidate), candidate
            break
    if config is not None:
        model_cfg, source = _model_section(_load_yaml(Path(config)), str(config)), f"--config {config}"
    elif common.get(MODEL_KEY):
        try:
            model_cfg, source = model_config_from_dict(common[MODEL_KEY]), "the checkpoint's model record"
        except ConfigError as err:
            raise ConversionError(f"{path}: its model record is not a model config this version reads: {err}") from None
    elif run_config is not None:
        model_cfg, source = _model_section(run_config, str(run_config_path)), str(run_config_path)
    else:
        raise ConversionError(f"{path}: cannot tell the model architecture (no model record in the checkpoint and no "
                              f"config.yaml beside it); pass --config with the run's YAML (its model: section)")
    record = common.get(RECORD_KEY)
    if record is None:
        raise ConversionError(f"{path} has no position-encoding record ({RECORD_KEY}); it was not written by "
                              f"megatron-harpe, so the RoPE base(s) of its weights are unknown")
    for key, ours in (("head_dim", model_cfg.head_dim), ("num_query_groups", model_cfg.groups)):
        if key in record and record[key] != ours:
            raise ConversionError(f"{path}: the position record says {key}={record[key]} but the model config "
                                  f"({source}) gives {ours}; pass the right --config")
    try:  # the record is the encoding the weights were last trained with (a staged run changes it)
        model_cfg = dataclasses.replace(model_cfg, position=position_from_record(record),
                                        rotary_percent=record.get("rotary_percent", model_cfg.rotary_percent),
                                        rotary_interleaved=record.get("rotary_interleaved",
                                                                      model_cfg.rotary_interleaved))
    except ValueError as err:
        raise ConversionError(f"{path}: its position record does not fit the model config ({source}): {err}") from None
    return MegatronCheckpoint(path=path, common=common, model_cfg=model_cfg, config_source=source,
                              run_config=run_config)


def stored_dtype(path: Path) -> torch.dtype:
    """The dtype the checkpoint's weights were saved in."""
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(str(path))
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key in metadata:
            return metadata[key].dtype
    return next(iter(metadata.values())).dtype
