"""A torch_dist checkpoint whose tensors are made one at a time, just before each is written.

Why: megatron-core's own torch_dist writer (FileSystemWriterAsync) copies every tensor of the
state dict into memory before it writes any (its preload step), so saving a converted model
through it means holding the whole model. Here megatron-core still decides everything that
makes the checkpoint what it is - the sharded keys, shapes and chunks come from the model's own
`sharded_state_dict()` (of a model on the meta device: shapes, no storage), the translation to
torch's sharded state dict is `mcore_to_pyt_state_dict`, the save planner is its
`MCoreSavePlanner`, and `dist_checkpointing.save` writes the common state and metadata.json as
always - and only the tensor data goes through torch's own `FileSystemWriter`, which asks its
planner for each write item's tensor (`resolve_data`) right before writing it. The planner
here answers with `source(path, sharded_tensor)`: for the converter, the tensor built from the
Hugging Face files then. Peak memory: the tensor being written (plus what `source` caches).

It plugs in at megatron-core's public extension point, `dist_checkpointing.save(...,
sharded_strategy=StreamingSaveStrategy(source))` (from 0.19 `save` accepts subclasses of
TorchDistSaveShardedStrategy only, so this is one); nothing of megatron-core is patched. The
result is an ordinary torch_dist checkpoint (one data file, `__0_0.distcp`).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import torch
from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedObject, ShardedTensor, is_main_replica
from megatron.core.dist_checkpointing.strategies.torch import (MCoreSavePlanner, TorchDistSaveShardedStrategy,
                                                                mcore_to_pyt_state_dict)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

#: (path of the entry in the nested sharded state dict, its ShardedTensor) -> the tensor of
#: sharded_tensor.local_shape (any dtype: it is cast to the checkpoint's)
TensorSource = Callable[[Tuple[Any, ...], ShardedTensor], torch.Tensor]


def sharded_entries(state: Any, path: Tuple[Any, ...] = ()) -> List[Tuple[Tuple[Any, ...], ShardedBase]]:
    """(path, ShardedBase) for every sharded entry of a nested state dict (dicts and lists), in order."""
    if isinstance(state, ShardedBase):
        return [(path, state)]
    if isinstance(state, dict):
        return [entry for key, value in state.items() for entry in sharded_entries(value, path + (key,))]
    if isinstance(state, (list, tuple)):
        return [entry for i, value in enumerate(state) for entry in sharded_entries(value, path + (i,))]
    return []


class _StreamingPlanner(MCoreSavePlanner):
    """MCoreSavePlanner whose tensor data comes from `source` at write time."""

    def __init__(self, chunks: Dict[Tuple[str, Tuple[int, ...]], Tuple[Tuple[Any, ...], ShardedTensor]],
                 source: TensorSource, **kwargs):
        super().__init__(**kwargs)
        self._chunks = chunks
        self._source = source

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:  # ShardedObjects (and 0.19's common state): already bytes
            return super().resolve_data(write_item)
        chunk = write_item.tensor_data.chunk
        found = self._chunks.get((write_item.index.fqn, tuple(chunk.offsets)))
        if found is None:
            raise RuntimeError(f"streaming save: no sharded tensor {write_item.index.fqn} at offset "
                               f"{tuple(chunk.offsets)} (a write item this strategy does not know)")
        path, sh_ten = found
        tensor = self._source(path, sh_ten)
        if tuple(tensor.shape) != tuple(sh_ten.local_shape):
            raise RuntimeError(f"streaming save: the source gave {tuple(tensor.shape)} for {sh_ten.key} at "
                               f"{sh_ten.global_offset}, which is {tuple(sh_ten.local_shape)}")
        return tensor.to(write_item.tensor_data.properties.dtype).reshape(tuple(chunk.sizes))


class StreamingSaveStrategy(TorchDistSaveShardedStrategy):
    """torch_dist save strategy (format torch_dist, version 1) with tensors from `source` (module doc)."""

    def __init__(self, source: TensorSource):
        super().__init__("torch_dist", 1)
        self.source = source

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        grouped: Dict[str, List[ShardedBase]] = {}
        chunks: Dict[Tuple[str, Tuple[int, ...]], Tuple[Tuple[Any, ...], ShardedTensor]] = {}
        for path, entry in sharded_entries(sharded_state_dict):
            if not is_main_replica(entry.replica_id):
                continue  # as megatron-core's strategy (keep_only_main_replica)
            key = entry.unique_key if isinstance(entry, ShardedObject) else entry.key
            grouped.setdefault(key, []).append(entry)
            if isinstance(entry, ShardedTensor):
                if entry.flattened_range is not None:
                    raise NotImplementedError(f"streaming save: {entry.key} is a flattened (optimizer) shard")
                chunks[(entry.key, tuple(entry.global_offset))] = (path, entry)
        pyt_state_dict = mcore_to_pyt_state_dict(grouped, False)
        planner = _StreamingPlanner(chunks, self.source, dedup_replicated_tensors=False, flatten_state_dict=False)
        # One file, one thread, no copy-ahead: torch then resolves (here: makes) the items one at a time,
        # in plan order (a checkpoint key's layers in turn). With copy-ahead and CUDA present it would pick
        # its overlapping loader, which sorts the items by size.
        writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, thread_count=1, sync_files=True,
                                  per_thread_copy_ahead=0)
        dcp_save(pyt_state_dict, storage_writer=writer, planner=planner)

    def async_save(self, *args, **kwargs):
        raise NotImplementedError("StreamingSaveStrategy saves synchronously (dist_checkpointing.save without "
                                  "async_sharded_save)")
