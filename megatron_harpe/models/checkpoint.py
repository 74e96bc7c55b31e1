"""megatron-core `torch_dist` checkpoints: the one path every checkpoint is written and read through.

The trainer's checkpoints (model + optimizer + RNG + scheduler), the converters' checkpoints
(model only) and the evaluation's loads all come here, so they share three guarantees:
- A torch_dist checkpoint loads into any TP/PP layout (megatron-core reshards it).
- It carries the position-encoding record (config/position_record.py), which the weights cannot
  tell; loading checks it unless the caller deliberately changes the encoding (init_from).
- It carries the software stack that wrote it (environment.py: torch, megatron-core, TE, NCCL, GPU,
  driver; rank 0's, under "environment"), so whoever reads it back can say what changed since.
- It is written under a staging name and renamed into place when every rank has finished, so an
  interrupted save never looks like a complete checkpoint. A save that fails on any rank fails on
  every rank with one message and leaves no staging directory; lack of space (checked before
  writing where the filesystem can tell, and recognised in the failure) is NoSpaceError, exit 4.
- A checkpoint that cannot be loaded is a CheckpointError (bad input, exit 2) that names the
  directory and says why: incomplete (a shard file missing or cut short: a copy or a save that did
  not finish), another model (a tensor of another shape), or missing entries.
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
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling

from megatron_harpe.cli import InputError, NoSpaceError
from megatron_harpe.config.model import ModelConfig
from megatron_harpe.config.position_record import RECORD_KEY, position_record, verify_position_record
from megatron_harpe.environment import ENVIRONMENT_KEY, environment_record
from megatron_harpe.files import directory_bytes, free_bytes, human_bytes, out_of_space, publish, staging_path
from megatron_harpe.models.unwrap import unwrap_model


class CheckpointError(InputError):
    """A checkpoint that cannot be loaded into this model; the message names it and the likely cause."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint save that failed for another reason than space (exit 1: the machine or a bug)."""


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
            raise CheckpointError(f"checkpoint weights do not fit the model: missing {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}, unexpected {result.unexpected_keys[:5]}")


def write_checkpoint(directory: str | os.PathLike, sharded_state: Dict[str, Any], model_cfg: ModelConfig, *,
                     common: Optional[Dict[str, Any]] = None, side_files: Optional[Dict[str, str]] = None,
                     content_metadata: Optional[Dict[str, Any]] = None, size_hint: int = 0,
                     sharded_strategy: Any = None) -> Path:
    """Save a torch_dist checkpoint to `directory` (collective: every rank calls it).

    `sharded_state` is what megatron-core saves (model chunks, optimizer, ...); `common` is
    plain data readable without loading tensors; `side_files` ({name: text}) are written by
    rank 0 into the directory (e.g. the run's config.yaml). `size_hint`: the bytes a checkpoint
    like this took before (the free-space check takes the larger of it and the estimate).
    `sharded_strategy`: megatron-core's save strategy for the tensors (default: its own torch_dist
    writer); the converter passes one that makes each tensor just before it is written.
    The common state also gets rank 0's environment_record() under "environment" (unless `common`
    has that key): one record for every rank, as megatron-core checks the common state is the same
    on all of them, and host names are not.

    Failures are collective: a rank whose write failed (megatron-core reports other ranks' write
    failures on rank 0 only, and the others would wait for it forever) is known to every rank, the
    staging directory is removed, and every rank raises the same error - NoSpaceError (exit 4) when
    it was the filesystem or quota, with the bytes needed and free.
    """
    directory = Path(directory)
    staging = staging_path(directory)
    needed = max(_bytes_to_write(sharded_state), size_hint)
    _refuse_without_space(directory, needed)
    failure = _attempt(lambda: _fresh_directory(staging), rank0_only=True)
    _raise_if_any_failed(failure, staging, directory, needed)
    state = dict(sharded_state)
    state[RECORD_KEY] = position_record(model_cfg)
    if ENVIRONMENT_KEY not in (common or {}):
        state[ENVIRONMENT_KEY] = share_from_rank0(environment_record() if _rank() == 0 else None)
    state.update(common or {})
    failure = _attempt(lambda: dist_checkpointing.save(state, str(staging), sharded_strategy=sharded_strategy,
                                                                 content_metadata=content_metadata))
    _raise_if_any_failed(failure, staging, directory, needed)

    def finish():
        for name, text in (side_files or {}).items():
            (staging / name).write_text(text)
        publish(staging, directory)

    failure = _attempt(finish, rank0_only=True)
    _raise_if_any_failed(failure, staging, directory, needed)
    return directory


def _fresh_directory(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _attempt(write: Callable[[], Any], rank0_only: bool = False) -> Optional[BaseException]:
    """Run `write` (on rank 0 only, if asked); the error it raised, if any. torch.distributed.checkpoint's
    CheckpointException derives from BaseException, hence the explicit catch."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        if not rank0_only or _rank() == 0:
            write()
    except (Exception, CheckpointException) as err:
        return err
    return None


def _bytes_to_write(sharded_state: Dict[str, Any]) -> int:
    """What the checkpoint's tensors take, summed over ranks (each tensor counted once, by its main
    replica): the free-space check's estimate, a little under the files' size."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica

    local = sum(t.data.numel() * t.data.element_size() for t in nested_values(sharded_state)
                if isinstance(t, (ShardedTensor, ShardedTensorFactory)) and isinstance(t.data, torch.Tensor)
                and is_main_replica(t.replica_id))
    total = torch.tensor([float(local)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        total = total.to(_collective_device())
        dist.all_reduce(total)
    return int(total.item())


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def share_from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _no_space_message(directory: Path, needed: int, free: Optional[int], when: str,
                      available: Optional[int] = None) -> str:
    """`available`: what the failed write had (what it wrote plus what was still free), when known."""
    free_text = "an unknown amount" if free is None else f"{human_bytes(free)} ({free:,} bytes)"
    need_text = f"about {human_bytes(needed)} ({needed:,} bytes)"
    if available is not None and available >= needed:  # the estimate was low: say what is known for sure
        need_text = f"more than the {human_bytes(available)} it had (estimated {human_bytes(needed)})"
    return (f"no space for checkpoint {directory} ({when}): it needs {need_text} and {free_text} is free on its "
            f"filesystem or quota. The previous checkpoint and 'latest' are "
            f"untouched and nothing partial is left; free space (or lower checkpoint.keep_last, or move "
            f"checkpoint.dir) and resume: retrying as is fails again")


def _refuse_without_space(directory: Path, needed: int) -> None:
    """Before writing anything: a save the filesystem says cannot fit is refused (exit 4) instead of filling
    the disk and failing halfway."""
    free = share_from_rank0(free_bytes(directory.parent) if _rank() == 0 else None)
    if free is not None and free < needed:
        raise NoSpaceError(_no_space_message(directory, needed, free, "checked before writing"))


def _raise_if_any_failed(failure: Optional[BaseException], staging: Path, directory: Path, needed: int) -> None:
    """Collective: when any rank's `failure` is set, remove the staging directory and raise on every rank."""
    flag = torch.tensor([0.0 if failure is None else 1.0], device=_collective_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() == 0:
        return
    free_before = free_bytes(staging) if staging.exists() else free_bytes(directory.parent)
    written = directory_bytes(staging)
    last_line = (str(failure).strip().splitlines() or [""])[-1][:300] if failure is not None else ""
    described = f"{type(failure).__name__}: {last_line}".rstrip(": ") if failure is not None else None
    space = out_of_space(failure) or (free_before is not None and free_before < needed)
    reports = [(described, space, written, free_before)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        reports = [None] * dist.get_world_size()
        dist.all_gather_object(reports, (described, space, written, free_before))
    if _rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
    _barrier()
    errors = sorted({r[0] for r in reports if r[0]})
    if any(r[1] for r in reports):
        free = share_from_rank0(free_bytes(directory.parent) if _rank() == 0 else None)
        # ranks see one filesystem (a shared one, or each its own): the largest view of what the write had
        available = max((r[2] + r[3] for r in reports if r[3] is not None), default=None)
        raise NoSpaceError(_no_space_message(directory, needed, free, "the write failed: " + "; ".join(errors),
                                             available))
    raise CheckpointWriteError(f"checkpoint {directory} could not be written ({'; '.join(errors)}); the partial "
                               f"save was removed, the previous checkpoint and 'latest' are untouched") from failure


def read_common_state(directory: str | os.PathLike) -> Dict[str, Any]:
    """The non-sharded part of a checkpoint (position record, environment record, iteration, ...), readable on
    any rank."""
    directory = Path(directory)
    if not (directory / "metadata.json").exists():
        raise CheckpointError(f"{directory} is not a complete torch_dist checkpoint (no metadata.json); "
                              f"pass the directory that the trainer or harpe-convert wrote")
    from torch.distributed.checkpoint.api import CheckpointException

    _check_shard_files(directory)
    try:
        return dist_checkpointing.load_common_state_dict(str(directory))
    except (OSError, EOFError, RuntimeError, CheckpointException) as err:
        raise CheckpointError(f"checkpoint {directory} is incomplete or corrupt: its common state cannot be read "
                              f"({type(err).__name__}: {err}); remove it, or point 'latest' at an older one") from None


def _check_shard_files(directory: Path):
    """Every shard file the checkpoint's index names exists and is long enough; returns the index.

    Checked before anything is read: from megatron-core 0.19 even the common state (iteration,
    position record) is read through torch.distributed.checkpoint from the shard files, and a
    shard cut short then fails deep inside it (EOFError wrapped in a CheckpointException, which
    is not even an Exception)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except (OSError, EOFError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {directory} is incomplete or corrupt: its index (.metadata) cannot be "
                              f"read ({type(err).__name__}); remove it, or point 'latest' at an older one") from None
    needed: Dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = directory / name
        if not path.is_file() or path.stat().st_size < size:
            state = "missing" if not path.is_file() else f"cut short ({path.stat().st_size} of {size} bytes)"
            raise CheckpointError(f"checkpoint {directory} is incomplete: shard file {name} is {state} (a copy or a "
                                  f"save that did not finish); remove it, or point 'latest' at an older checkpoint")
    return metadata


def check_checkpoint_files(directory: str | os.PathLike, sharded_state: Dict[str, Any]) -> None:
    """Before loading (which would fail deep inside torch.distributed.checkpoint, rank by rank): every
    shard file the checkpoint's index names exists and is long enough, and every tensor this model
    asks for has the shape the checkpoint holds."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    directory = Path(directory)
    metadata = _check_shard_files(directory)
    shapes = {key: tuple(meta.size) for key, meta in metadata.state_dict_metadata.items() if hasattr(meta, "size")}
    for tensor in nested_values(sharded_state):
        if not isinstance(tensor, ShardedTensor) or tensor.key not in shapes or tensor.allow_shape_mismatch:
            continue  # (megatron-core lets some tensors, e.g. a padded vocabulary, differ on purpose)
        if shapes[tensor.key] != tuple(tensor.global_shape):
            raise CheckpointError(f"checkpoint {directory} holds another model: {tensor.key} is {shapes[tensor.key]} "
                                  f"there but {tuple(tensor.global_shape)} in this one; the model settings (layers, "
                                  f"hidden size, heads, K/V groups, vocabulary) must match the checkpoint's "
                                  f"(see its config.yaml or model.yaml), or start from it with a matching config")


def check_position_record(common: Mapping[str, Any], model_cfg: ModelConfig, directory) -> None:
    saved = common.get(RECORD_KEY)
    if saved is None:
        raise CheckpointError(f"checkpoint {directory} has no position-encoding record; load it as weights only "
                              f"(training.init_from) if it comes from elsewhere")
    try:
        verify_position_record(saved, position_record(model_cfg), where=f"checkpoint {directory}")
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def read_checkpoint(directory: str | os.PathLike, sharded_state: Dict[str, Any],
                    model_cfg: Optional[ModelConfig]) -> tuple[Dict[str, Any], Dict[str, Any]]:
    """Load `sharded_state`'s entries from a checkpoint: (loaded state, common state).

    With `model_cfg`, the checkpoint's position record must match it; None loads weights whatever
    their position encoding (a deliberate change: continual pretraining into HARPE, an ABF stage).
    """
    common = read_common_state(directory)
    if model_cfg is not None:
        check_position_record(common, model_cfg, directory)
    check_checkpoint_files(directory, sharded_state)
    loaded, _, absent = dist_checkpointing.load(sharded_state, str(directory),
                                                strict=StrictHandling.RETURN_UNEXPECTED)
    absent = sorted(k for k in absent if not k.endswith(EXTRA_STATE_SUFFIX))
    if absent:
        raise CheckpointError(f"checkpoint {directory} lacks {len(absent)} entr{'y' if len(absent) == 1 else 'ies'} "
                              f"this model needs, e.g. {absent[:4]}: it was saved by another architecture or layout")
    return loaded, common


def save_model(chunks: Sequence[torch.nn.Module], model_cfg: ModelConfig, directory: str | os.PathLike,
               extra_common: Optional[Dict[str, Any]] = None, sharded_strategy: Any = None) -> Path:
    """Save every rank's model chunks (weights only) into `directory` (collective); see write_checkpoint."""
    return write_checkpoint(directory, model_sharded_state(chunks), model_cfg, common=extra_common,
                            sharded_strategy=sharded_strategy)


def load_model(chunks: List[torch.nn.Module], model_cfg: Optional[ModelConfig],
               directory: str | os.PathLike) -> Dict[str, Any]:
    """Load weights into this rank's chunks, whatever layout they were saved in; returns the common state.

    `model_cfg=None` skips the position check (see read_checkpoint).
    """
    loaded, common = read_checkpoint(directory, model_sharded_state(chunks), model_cfg)
    load_model_state(chunks, loaded)
    return common
