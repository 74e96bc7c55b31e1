"""Model weights as megatron-core `torch_dist` checkpoints, with the position-encoding record.

A torch_dist checkpoint can be loaded into any TP/PP layout (megatron-core reshards it), so a
model saved at TP=2 resumes at TP=1. What the weights cannot say — which RoPE base(s) the
model was trained with — is stored beside them in the checkpoint's common state and checked
on load (see metadata.py). Writes go to a temporary directory renamed into place only when
every rank has finished, so an interrupted save never looks like a complete checkpoint.

The trainer's checkpoints (optimizer, scheduler, RNG, data position) build on these two
functions.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_harpe.models.config import ModelConfig
from megatron_harpe.models.metadata import METADATA_KEY, position_metadata, verify_position_metadata


def _chunk_key(index: int, num_chunks: int) -> str:
    return "model" if num_chunks == 1 else f"model{index}"


def _unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_model(model_chunks: Sequence[torch.nn.Module], model_cfg: ModelConfig, directory: str | os.PathLike,
               extra_common: Optional[Dict[str, Any]] = None) -> Path:
    """Save every rank's model chunks into `directory` (collective: all ranks call it)."""
    directory = Path(directory)
    staging = directory.with_name(f".{directory.name}.incomplete")
    if _rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    state: Dict[str, Any] = {_chunk_key(i, len(model_chunks)): _unwrap(chunk).sharded_state_dict()
                             for i, chunk in enumerate(model_chunks)}
    state[METADATA_KEY] = position_metadata(model_cfg)
    state.update(extra_common or {})
    dist_checkpointing.save(state, str(staging))
    _barrier()
    if _rank() == 0:
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    _barrier()
    return directory


def read_common_state(directory: str | os.PathLike) -> Dict[str, Any]:
    """The non-sharded part of a checkpoint (metadata, iteration, ...), readable on any rank."""
    directory = Path(directory)
    if not (directory / "metadata.json").exists():
        raise FileNotFoundError(f"{directory} is not a complete torch_dist checkpoint (no metadata.json); "
                                f"pass the directory that save_model wrote")
    return dist_checkpointing.load_common_state_dict(str(directory))


def load_model(model_chunks: List[torch.nn.Module], model_cfg: ModelConfig, directory: str | os.PathLike,
               check_position: bool = True) -> Dict[str, Any]:
    """Load weights into this rank's chunks, whatever layout they were saved in.

    check_position=False is for deliberate changes of position encoding (continual
    pretraining from a one-base model into HARPE, or the next ABF stage).
    """
    common = read_common_state(directory)
    if check_position:
        saved = common.get(METADATA_KEY)
        if saved is None:
            raise ValueError(f"checkpoint {directory} has no position-encoding record; load it with "
                             f"check_position=False (init_from) if it comes from elsewhere")
        verify_position_metadata(saved, position_metadata(model_cfg), where=f"checkpoint {directory}")
    sharded = {_chunk_key(i, len(model_chunks)): _unwrap(chunk).sharded_state_dict()
               for i, chunk in enumerate(model_chunks)}
    loaded = dist_checkpointing.load(sharded, str(directory))
    for i, chunk in enumerate(model_chunks):
        _unwrap(chunk).load_state_dict(loaded[_chunk_key(i, len(model_chunks))], strict=True)
    return common
