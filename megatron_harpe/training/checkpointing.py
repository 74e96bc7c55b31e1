"""Training checkpoints: model, optimizer, scheduler, RNG, data position, iteration.

Layout of `<checkpoint dir>`:
    iter_0000120/          a megatron-core torch_dist checkpoint (loads into any TP/PP layout)
    iter_0000120/config.yaml   the resolved run config at save time
    latest                 the name of the newest complete checkpoint, replaced atomically

Each checkpoint is written through models/checkpoint.py (staging name, position record, rename
when every rank has finished); `latest` is rewritten only after that, so a job killed at any
moment leaves the previous checkpoint as the latest complete one. The last `keep_last` are kept.
The optimizer goes through megatron-core's sharded state dict with the fixes compat.py lists for
torch's AdamW (what runs without apex/TE, e.g. on CPU); the exact-resume tests cover them.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_harpe import compat
from megatron_harpe.cli import InputError, NoSpaceError
from megatron_harpe.config.model import ModelConfig
from megatron_harpe.files import (INCOMPLETE_SUFFIX, atomic_write_text, directory_bytes, free_bytes, human_bytes,
                                  out_of_space)
from megatron_harpe.models.checkpoint import (CheckpointError, load_model, load_model_state, model_sharded_state,
                                              read_checkpoint,
                                              read_common_state, share_from_rank0, write_checkpoint)

LATEST = "latest"


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def latest_checkpoint(directory: str | Path) -> Optional[Path]:
    """The newest complete checkpoint, or None."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    path = Path(directory) / pointer.read_text().strip()
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is not a complete checkpoint; "
                                f"fix or remove {pointer} to resume from an older one")
    return path


SKIPPED = "skipped"  # complete checkpoints newer than `latest`, moved aside at resume (tidy_checkpoint_dir)


def tidy_checkpoint_dir(directory: str | Path) -> List[str]:
    """Rank 0, before resuming: clear what an interrupted save left; returns one line per thing done.

    - `.iter_N.incomplete` (a save killed before every rank finished: some shards, or none) is removed: it can
      never be completed, and on a full disk it holds the space the next save needs.
    - `.iter_N.old` (files.publish killed between its two renames) is renamed back when `iter_N` is missing.
    - a complete `iter_N` newer than the one `latest` names (a save killed after its rename but before
      `latest` was rewritten, or a deliberate rollback by editing `latest`) is moved to `skipped/iter_N`:
      the run resumes from `latest` as recorded and would otherwise overwrite or prune it.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    notes = []
    for old in sorted(directory.glob(".iter_*.old")):
        final = directory / old.name[1:-len(".old")]
        if not final.exists():
            old.rename(final)
            notes.append(f"restored {final.name} from {old.name} (a replacement of it was interrupted)")
    for partial in sorted(directory.glob(f".iter_*{INCOMPLETE_SUFFIX}")):
        size = directory_bytes(partial)
        shutil.rmtree(partial, ignore_errors=True)
        notes.append(f"removed the partial checkpoint {partial.name} ({size / 2**20:.1f} MiB; a save that did not "
                     f"finish)")
    latest = latest_checkpoint(directory)
    for path in sorted(p for p in directory.glob("iter_*") if p.is_dir()):
        if latest is None or path.name > latest.name:
            target = directory / SKIPPED / path.name
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(exist_ok=True)
            path.rename(target)
            notes.append(f"moved {path.name} to {SKIPPED}/{path.name}: it is newer than the checkpoint 'latest' "
                         f"names ({latest.name if latest else 'none'}; a save stopped before 'latest' was written, or "
                         f"'latest' was edited); the run resumes from 'latest'")
    return notes


def _rng_state() -> Dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state) -> ShardedObject:
    """Per-rank RNG states, one slot per global rank (restored only into the same layout)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _layout() -> Dict[str, int]:
    return {"world": dist.get_world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(), "cp": ps.get_context_parallel_world_size()}


def save_checkpoint(directory: str | Path, iteration: int, *, chunks: List[torch.nn.Module], optimizer, scheduler,
                    model_cfg: ModelConfig, common: Dict[str, Any], keep_last: int, config_yaml: str,
                    optimizer_format: str = "auto") -> Path:
    """Collective: every rank calls it. Returns the checkpoint path. `optimizer_format`: checkpoint.optimizer_format
    (compat.optimizer_checkpoint_metadata); recorded in the checkpoint, which is loaded in the format it was saved."""
    directory = Path(directory)
    final = directory / checkpoint_name(iteration)
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    state = model_sharded_state(chunks)
    metadata = optimizer_format_metadata(optimizer, optimizer_format)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=metadata)
    state["rng"] = _rng_sharded_object(_rng_state())
    common = {"scheduler": scheduler.state_dict() if scheduler is not None else None, "layout": _layout(),
              "optimizer_format": metadata["distrib_optim_sharding_type"], **common}
    write_checkpoint(final, state, model_cfg, common=common, side_files={"config.yaml": config_yaml},
                     content_metadata=metadata, size_hint=_previous_size(directory))
    error = None
    if dist.get_rank() == 0:
        try:
            atomic_write_text(directory / LATEST, final.name + "\n")
            _prune(directory, keep_last)
        except OSError as err:
            error = (out_of_space(err), f"{type(err).__name__}: {err}")
    error = share_from_rank0(error)
    if error is not None:  # every rank says it, none waits for rank 0 in a barrier
        space, text = error
        message = (f"checkpoint {final} was written but '{LATEST}' could not be updated ({text}); it still names "
                   f"the previous checkpoint")
        raise NoSpaceError(message + ": free space and resume") if space else RuntimeError(message)
    return final


def _previous_size(directory: Path) -> int:
    """Bytes of the newest complete checkpoint (rank 0 reads, all get it): what the next one will need."""
    size = 0
    if dist.get_rank() == 0:
        try:
            latest = latest_checkpoint(directory)
            size = directory_bytes(latest) if latest is not None else 0
        except (OSError, FileNotFoundError):
            size = 0
    return share_from_rank0(size)


def space_warning(directory: str | Path, saved: Path) -> Optional[str]:
    """After a save: a warning when the filesystem cannot hold one more checkpoint of this size (older ones are
    pruned only after the next one is complete), so the operator hears of it before the save that fails."""
    free = free_bytes(directory)
    if free is None:
        return None
    size = directory_bytes(saved)
    if free >= size:
        return None
    return (f"low disk space: {human_bytes(free)} free on the filesystem of {directory}, the next checkpoint "
            f"needs about {human_bytes(size)}; it will fail (exit 4) unless space is freed, checkpoint.keep_last "
            f"lowered or checkpoint.dir moved")


def _prune(directory: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    checkpoints = sorted(p for p in directory.glob("iter_*") if p.is_dir())
    latest = latest_checkpoint(directory)
    for old in checkpoints[:-keep_last]:
        if old == latest:  # never the one a resume would load
            continue
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path, *, chunks: List[torch.nn.Module], optimizer, scheduler, model_cfg: ModelConfig,
                    load_optimizer: bool = True) -> Dict[str, Any]:
    """Load a training checkpoint into this rank's objects; returns its common state.

    RNG states are restored only when the parallel layout is the one saved (otherwise the
    per-rank streams have no counterpart); `common["rng_restored"]` says which happened.
    """
    path = Path(path)
    saved = read_common_state(path)
    same_layout = saved.get("layout") == _layout()
    state = model_sharded_state(chunks)
    if load_optimizer and optimizer is not None:
        metadata = _saved_optimizer_metadata(path, saved)
        _check_optimizer_layout(path, metadata, saved.get("layout"))
        compat.prepare_optimizer_for_loading(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=metadata)
    if same_layout:
        state["rng"] = _rng_sharded_object(_rng_state())
    loaded, common = read_checkpoint(path, state, model_cfg)
    load_model_state(chunks, loaded)
    if load_optimizer and optimizer is not None:
        compat.load_optimizer_state(optimizer, loaded["optimizer"])
        if scheduler is not None and common.get("scheduler") is not None:
            scheduler.load_state_dict(common["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng"])
    common["rng_restored"] = same_layout
    return common


def optimizer_format_metadata(optimizer, requested: str) -> Dict[str, str]:
    """checkpoint.optimizer_format for this optimizer (compat.optimizer_checkpoint_metadata), refusing the one
    combination that does not resume exactly: dp_reshardable with torch's AdamW."""
    if requested == "dp_reshardable" and compat.uses_torch_adam(optimizer):
        raise InputError("checkpoint.optimizer_format=dp_reshardable does not resume torch's AdamW exactly on "
                         f"megatron-core {compat.installed_version()} (measured on CPU: the loss trace leaves the "
                         "uninterrupted one from the second step after resume); it is the format for TE's or apex's "
                         "FusedAdam, which this machine does not have. Use checkpoint.optimizer_format=auto")
    return compat.optimizer_checkpoint_metadata(optimizer, requested)


def _saved_optimizer_metadata(path: Path, common: Dict[str, Any]) -> Dict[str, str]:
    """The optimizer format the checkpoint was saved in (checkpoints before checkpoint.optimizer_format were all
    fully_reshardable)."""
    return {"distrib_optim_sharding_type": common.get("optimizer_format",
                                                      compat.OPTIMIZER_CHECKPOINT_METADATA["distrib_optim_sharding_type"])}


def _check_optimizer_layout(path: Path, metadata: Dict[str, str], saved_layout: Optional[Dict[str, int]]) -> None:
    """dp_reshardable optimizer state holds each rank's flat buffer of its TP/PP/CP shard: it resumes at another DP
    size only. Said before megatron-core fails on it deep in the load."""
    if metadata["distrib_optim_sharding_type"] != "dp_reshardable" or not saved_layout:
        return
    now = _layout()
    changed = [k for k in ("tp", "pp", "cp") if saved_layout.get(k) != now.get(k)]
    if changed:
        raise CheckpointError(f"checkpoint {path} holds dp_reshardable optimizer state (saved at "
                              f"{', '.join(f'{k.upper()}={saved_layout.get(k)}' for k in ('tp', 'pp', 'cp'))}), which "
                              f"resumes at another DP size only, not at another {'/'.join(k.upper() for k in changed)}: "
                              f"resume at the saved layout once with checkpoint.optimizer_format=fully_reshardable "
                              f"and save, or start from its weights only (training.init_from)")


def resolve_checkpoint_path(path: str | Path, what: str = "training.init_from") -> Path:
    """A torch_dist directory, the newest checkpoint of a directory with a `latest` pointer, or of a run directory
    (its checkpoints/): the three things a user calls "the checkpoint" (config/validate.py checks the same shape
    before anything starts)."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    pointer = latest_checkpoint(path)
    if pointer is None:
        pointer = latest_checkpoint(path / "checkpoints")
    if pointer is None:
        raise FileNotFoundError(f"{what}={path} is neither a torch_dist checkpoint, a checkpoint directory "
                                f"with a '{LATEST}' file, nor a run directory with checkpoints/{LATEST}")
    return pointer


def load_weights_only(path: str | Path, chunks: List[torch.nn.Module]) -> Dict[str, Any]:
    """`init_from`: weights of a (converted) checkpoint, any position encoding, fresh optimizer."""
    return load_model(chunks, None, resolve_checkpoint_path(path))
