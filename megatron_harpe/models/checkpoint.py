"""megatron-core `torch_dist` checkpoints: the one path every checkpoint is written and read through.

The trainer's checkpoints (model + optimizer + RNG + scheduler), the converters' checkpoints
(model only) and the evaluation's loads all come here, so they share three guarantees:
- A torch_dist checkpoint loads into any TP/PP layout (megatron-core reshards it).
- It carries the position-encoding record (config/position_record.py), which the weights cannot
  tell; loading checks it unless the caller deliberately changes the encoding (init_from).
- It is written under a staging name and renamed into place when every rank has finished, so an
  interrupted save never looks like a complete checkpoint.
- It loads across layer specs: Transformer Engine's modules keep FP8 scaling state in `_extra_state`
  entries that the local spec (CPU, converters) neither writes nor reads. Loading asks megatron-core
  to return what the model wants and the checkpoint lacks (StrictHandling.RETURN_UNEXPECTED) and
  accepts exactly those `_extra_state` entries as missing (TE then starts its FP8 scales afresh);
  any other missing entry is an error naming it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling

from megatron_harpe.config.model import ModelConfig
from megatron_harpe.config.position_record import RECORD_KEY, position_record, verify_position_record
from megatron_harpe.files import publish, staging_path
from megatron_harpe.models.unwrap import unwrap_model


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def model_state_key(index: int, num_chunks: int) -> str:
    """The key of one model chunk in a checkpoint ("model", or "model0", "model1"... with virtual stages)."""
    return "model" if num_chunks == 1 else f"model{index}"


def model_sharded_state(chunks: Sequence[torch.nn.Module]) -> Dict[str, Any]:
    """This rank's sharded state dicts of its model chunks, keyed as in the checkpoint."""
    return {model_state_key(i, len(chunks)): unwrap_model(chunk).sharded_state_dict()
            for i, chunk in enumerate(chunks)}


EXTRA_STATE_SUFFIX = "_extra_state"


def load_model_state(chunks: Sequence[torch.nn.Module], loaded: Mapping[str, Any]) -> None:
    """Load each chunk's weights; only `_extra_state` entries may be absent (see the module doc)."""
    for i, chunk in enumerate(chunks):
        result = unwrap_model(chunk).load_state_dict(loaded[model_state_key(i, len(chunks))], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith(EXTRA_STATE_SUFFIX)]
        if missing or result.unexpected_keys:
            raise ValueError(f"checkpoint weights do not fit the model: missing {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}, unexpected {result.unexpected_keys[:5]}")


def write_checkpoint(directory: str | os.PathLike, sharded_state: Dict[str, Any], model_cfg: ModelConfig, *,
                     common: Optional[Dict[str, Any]] = None, side_files: Optional[Dict[str, str]] = None,
                     content_metadata: Optional[Dict[str, Any]] = None) -> Path:
    """Save a torch_dist checkpoint to `directory` (collective: every rank calls it).

    `sharded_state` is what megatron-core saves (model chunks, optimizer, ...); `common` is
    plain data readable without loading tensors; `side_files` ({name: text}) are written by
    rank 0 into the directory (e.g. the run's config.yaml).
    """
    directory = Path(directory)
    staging = staging_path(directory)
    if _rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    state = dict(sharded_state)
    state[RECORD_KEY] = position_record(model_cfg)
    state.update(common or {})
    dist_checkpointing.save(state, str(staging), content_metadata=content_metadata)
    _barrier()
    if _rank() == 0:
        for name, text in (side_files or {}).items():
            (staging / name).write_text(text)
        publish(staging, directory)
    _barrier()
    return directory


def read_common_state(directory: str | os.PathLike) -> Dict[str, Any]:
    """The non-sharded part of a checkpoint (position record, iteration, ...), readable on any rank."""
    directory = Path(directory)
    if not (directory / "metadata.json").exists():
        raise FileNotFoundError(f"{directory} is not a complete torch_dist checkpoint (no metadata.json); "
                                f"pass the directory that the trainer or harpe-convert wrote")
    return dist_checkpointing.load_common_state_dict(str(directory))


def check_position_record(common: Mapping[str, Any], model_cfg: ModelConfig, directory) -> None:
    saved = common.get(RECORD_KEY)
    if saved is None:
        raise ValueError(f"checkpoint {directory} has no position-encoding record; load it as weights only "
                         f"(training.init_from) if it comes from elsewhere")
    verify_position_record(saved, position_record(model_cfg), where=f"checkpoint {directory}")


def read_checkpoint(directory: str | os.PathLike, sharded_state: Dict[str, Any],
                    model_cfg: Optional[ModelConfig]) -> tuple[Dict[str, Any], Dict[str, Any]]:
    """Load `sharded_state`'s entries from a checkpoint: (loaded state, common state).

    With `model_cfg`, the checkpoint's position record must match it; None loads weights whatever
    their position encoding (a deliberate change: continual pretraining into HARPE, an ABF stage).
    """
    common = read_common_state(directory)
    if model_cfg is not None:
        check_position_record(common, model_cfg, directory)
    loaded, _, absent = dist_checkpointing.load(sharded_state, str(directory),
                                                strict=StrictHandling.RETURN_UNEXPECTED)
    absent = sorted(k for k in absent if not k.endswith(EXTRA_STATE_SUFFIX))
    if absent:
        raise ValueError(f"checkpoint {directory} lacks {len(absent)} entr{'y' if len(absent) == 1 else 'ies'} this "
                         f"model needs, e.g. {absent[:4]}: it was saved by another architecture or layout")
    return loaded, common


def save_model(chunks: Sequence[torch.nn.Module], model_cfg: ModelConfig, directory: str | os.PathLike,
               extra_common: Optional[Dict[str, Any]] = None) -> Path:
    """Save every rank's model chunks (weights only) into `directory` (collective)."""
    return write_checkpoint(directory, model_sharded_state(chunks), model_cfg, common=extra_common)


def load_model(chunks: List[torch.nn.Module], model_cfg: Optional[ModelConfig],
               directory: str | os.PathLike) -> Dict[str, Any]:
    """Load weights into this rank's chunks, whatever layout they were saved in; returns the common state.

    `model_cfg=None` skips the position check (see read_checkpoint).
    """
    loaded, common = read_checkpoint(directory, model_sharded_state(chunks), model_cfg)
    load_model_state(chunks, loaded)
    return common
