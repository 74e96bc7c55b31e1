"""A torch_dist checkpoint's model weights at TP=1/PP=1, read one transformer layer at a time.

Why: megatron-to-hf used to build the whole model and load the whole checkpoint into it before
writing the first Hugging Face tensor. `CheckpointTensors` is a read-only mapping from the full
(TP=1, PP=1) parameter names to tensors that loads a group of them - one transformer layer, or
one of the embedding, final norm and output layer - when one of its names is asked for, and
forgets the previous group; mapping.hf_tensors asks in layer order, so at most one layer is in
memory. What to load comes from a model on the meta device (megatron_io.build_meta_model): its
sharded state dict names the checkpoint keys and each layer's chunk (megatron-core saves the
layers of a stage under one key with a leading layer axis; a layer is one chunk along it), and
megatron-core's `dist_checkpointing.load` reads just those chunks, resharding from whatever
TP/PP layout the checkpoint was saved in (torch_dist). The checks that models.checkpoint's
load_model makes (complete shard files, tensor shapes, the position record, no missing
entries) are made once, before the first read.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from megatron_harpe.config.model import ModelConfig
from megatron_harpe.models.checkpoint import (CheckpointError, check_checkpoint_files, check_position_record,
                                              model_sharded_state, model_state_key, read_common_state)

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
Entry = Union[ShardedTensor, ShardedTensorFactory]


def _group(name: str) -> Union[int, str]:
    """The load group of a parameter: its layer number, else its own name."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else name


def _whole_parameter(entry: Entry, dtype: torch.dtype) -> ShardedTensor:
    """A request for the whole TP=1 parameter `entry` stands for, with fresh memory of `dtype` to load into.

    At TP=1 a parameter is its checkpoint key's whole global tensor (at one index of the leading
    layer axis, for a transformer layer). The request names that chunk directly, without the
    layer axis as a "prepended" one: megatron-core builds a prepended axis's whole grid (every
    layer of the key) on load, while a plain chunk loads on its own. A factory (the SwiGLU
    [gate; up] fc1, saved as two chunks) is requested as the one chunk both pieces make up.
    """
    piece = entry if isinstance(entry, ShardedTensor) else next(
        t for t in nested_values(entry.build()) if isinstance(t, ShardedTensor))
    first = piece.prepend_axis_num
    shape = tuple(entry.local_shape if isinstance(entry, ShardedTensor) else entry.data.shape)
    if tuple(piece.global_shape[first:]) != shape or any(piece.global_offset[first:]):
        raise CheckpointError(f"{piece.key}: a TP=1 parameter {shape} is not the whole of the key's "
                              f"{tuple(piece.global_shape)} here; this reader does not know that layout")
    local = (1,) * first + shape
    return ShardedTensor(key=piece.key, data=torch.empty(local, dtype=dtype), dtype=dtype, local_shape=local,
                         global_shape=tuple(piece.global_shape),
                         global_offset=tuple(piece.global_offset[:first]) + (0,) * len(shape),
                         axis_fragmentations=None, allow_shape_mismatch=piece.allow_shape_mismatch)


class CheckpointTensors(Mapping[str, torch.Tensor]):
    """{full TP=1/PP=1 parameter name: tensor} of a checkpoint, loaded a layer at a time (module doc)."""

    def __init__(self, directory: Union[str, Path], meta_model: torch.nn.Module, dtype: torch.dtype,
                 model_cfg: Optional[ModelConfig]):
        """`meta_model`: megatron_io.build_meta_model's; `dtype`: of the tensors returned; `model_cfg`: the
        checkpoint's position record must match it (None: not checked)."""
        self.directory = Path(directory)
        self.dtype = dtype
        state = model_sharded_state([meta_model])
        self._entries: Dict[str, Entry] = {
            name: entry for name, entry in state[model_state_key(0, 1)].items()
            if isinstance(entry, (ShardedTensor, ShardedTensorFactory))}  # not the (absent) _extra_state objects
        self._groups: Dict[Union[int, str], List[str]] = {}
        for name in self._entries:
            self._groups.setdefault(_group(name), []).append(name)
        self._current: Tuple[Optional[Union[int, str]], Dict[str, torch.Tensor]] = (None, {})
        self.loads = 0  # dist_checkpointing.load calls so far (the tests count them)
        self._check(model_cfg)

    def _check(self, model_cfg: Optional[ModelConfig]) -> None:
        common = read_common_state(self.directory)
        if model_cfg is not None:
            check_position_record(common, model_cfg, self.directory)
        state = {"model": dict(self._entries)}
        check_checkpoint_files(self.directory, state)
        from torch.distributed.checkpoint import FileSystemReader

        saved = set(FileSystemReader(str(self.directory)).read_metadata().state_dict_metadata)
        absent = sorted({entry.key for entry in self._entries.values()} - saved)
        if absent:
            raise CheckpointError(f"checkpoint {self.directory} lacks {len(absent)} entr"
                                  f"{'y' if len(absent) == 1 else 'ies'} this model needs, e.g. {absent[:4]}: it was "
                                  f"saved by another architecture or layout")

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._entries:
            raise KeyError(name)
        group = _group(name)
        if self._current[0] != group:
            self._current = (None, {})  # free the previous layer before reading the next
            self._current = (group, self._load(self._groups[group]))
        return self._current[1][name]

    def _load(self, names: List[str]) -> Dict[str, torch.Tensor]:
        request = {name: _whole_parameter(self._entries[name], self.dtype) for name in names}
        shapes = {name: tuple(self._entries[name].local_shape if isinstance(self._entries[name], ShardedTensor)
                              else self._entries[name].data.shape) for name in names}
        loaded = dist_checkpointing.load({"model": request}, str(self.directory), validate_access_integrity=False)
        self.loads += 1
        return {name: loaded["model"][name].reshape(shapes[name]) for name in names}

    def release(self) -> None:
        self._current = (None, {})

