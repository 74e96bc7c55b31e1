"""Training checkpoints: model, optimizer, scheduler, RNG, data position, iteration.

Layout of `<checkpoint dir>`:
    iter_0000120/          a megatron-core torch_dist checkpoint (loads into any TP/PP layout)
    iter_0000120/config.yaml   the resolved run config at save time
    latest                 the name of the newest complete checkpoint, replaced atomically

A checkpoint directory is written under a temporary name and renamed when every rank has
finished; `latest` is rewritten (temp file + rename) only after that, so a job killed at any
moment leaves the previous checkpoint as the latest complete one. The last `keep_last` are kept.

Three megatron-core 0.16.1 behaviours with PyTorch's AdamW (what runs without apex/TE, e.g. on
CPU) are corrected here, and covered by the exact-resume tests:
- A fresh optimizer has no per-parameter 'step', and megatron-core's loading path then fails
  with KeyError 'step'; we give every parameter an explicit zero step before building the
  loading state dict.
- When loading, megatron-core puts the SAME step tensor into every parameter's state; AdamW
  increments each parameter's step in place, so a shared tensor advances once per parameter
  per iteration and the bias correction is wrong after resume (a silent loss difference). We
  give each parameter its own copy after loading.
- The distributed optimizer's "fully_reshardable" loader copies a 'step' it never saved
  (KeyError 'step'); `_load_optimizer_state` loads that parameter state with 'step' set aside.
The distributed optimizer is saved with sharding type "fully_reshardable" (the default,
"fully_sharded_model_space", fails with torch's AdamW in 0.16.1), which also lets a run resume
with another data-parallel size.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_harpe.models.metadata import METADATA_KEY, position_metadata, verify_position_metadata

LATEST = "latest"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


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


def _unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def _model_state(chunks) -> Dict[str, Any]:
    if len(chunks) == 1:
        return {"model": _unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _inner_optimizers(optimizer):
    """The torch optimizers inside megatron-core's (chained) optimizer."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [opt.optimizer for opt in chained if getattr(opt, "optimizer", None) is not None]


def _give_fresh_state_a_step(optimizer) -> None:
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state.setdefault("exp_avg", torch.zeros_like(param.data))
                    state.setdefault("exp_avg_sq", torch.zeros_like(param.data))


def _unshare_step_tensors(optimizer) -> None:
    for inner in _inner_optimizers(optimizer):
        for state in inner.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].detach().clone()


def _load_optimizer_state(optimizer, state_dict) -> None:
    """optimizer.load_state_dict, except for the distributed optimizer's reshardable parameter
    state, whose loader in megatron-core 0.16.1 copies every per-parameter state key from the
    checkpoint — 'step' included, which it never saved for torch's AdamW (KeyError 'step').
    We load the rest through megatron-core, then the parameter state with 'step' set aside."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [state_dict] if len(chained) == 1 else list(state_dict)
    for opt, state in zip(chained, states):
        if not (isinstance(state, dict) and state.get("param_state_sharding_type") == "fully_reshardable"):
            opt.load_state_dict(state)
            continue
        state = dict(state)
        param_state = state.pop("param_state")
        state.pop("param_state_sharding_type")
        opt.load_state_dict(state)
        inner = opt.optimizer
        steps = {id(p): st.pop("step") for p, st in inner.state.items() if "step" in st}
        opt.load_parameter_state_from_fully_reshardable(param_state)
        for p, st in inner.state.items():
            if id(p) in steps:
                st["step"] = steps[id(p)]


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


def save_checkpoint(directory: str | Path, iteration: int, *, chunks: List[torch.nn.Module], optimizer, scheduler,
                    model_cfg, common: Dict[str, Any], keep_last: int, config_yaml: str) -> Path:
    """Collective: every rank calls it. Returns the checkpoint path."""
    directory = Path(directory)
    final = directory / checkpoint_name(iteration)
    staging = directory / f".{final.name}.incomplete"
    rank = dist.get_rank()
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    dist.barrier()
    state = _model_state(chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=OPTIMIZER_METADATA)
    state["rng"] = _rng_sharded_object(_rng_state())
    state[METADATA_KEY] = position_metadata(model_cfg)
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    state["layout"] = _layout()
    state.update(common)
    dist_checkpointing.save(state, str(staging), content_metadata=OPTIMIZER_METADATA)
    dist.barrier()
    if rank == 0:
        (staging / "config.yaml").write_text(config_yaml)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        _write_latest(directory, final.name)
        _prune(directory, keep_last)
    dist.barrier()
    return final


def _write_latest(directory: Path, name: str) -> None:
    tmp = directory / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    tmp.replace(directory / LATEST)


def _prune(directory: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    checkpoints = sorted(p for p in directory.glob("iter_*") if p.is_dir())
    for old in checkpoints[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _layout() -> Dict[str, int]:
    return {"world": dist.get_world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(), "cp": ps.get_context_parallel_world_size()}


def load_checkpoint(path: str | Path, *, chunks: List[torch.nn.Module], optimizer, scheduler, model_cfg,
                    load_optimizer: bool = True) -> Dict[str, Any]:
    """Load a training checkpoint into this rank's objects; returns its common state.

    RNG states are restored only when the parallel layout is the one saved (otherwise the
    per-rank streams have no counterpart, and a warning says so in the returned dict).
    """
    path = Path(path)
    common = dist_checkpointing.load_common_state_dict(str(path))
    verify_position_metadata(common[METADATA_KEY], position_metadata(model_cfg), where=f"checkpoint {path}")
    same_layout = common.get("layout") == _layout()
    state = _model_state(chunks)
    if load_optimizer and optimizer is not None:
        _give_fresh_state_a_step(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=OPTIMIZER_METADATA)
    if same_layout:
        state["rng"] = _rng_sharded_object(_rng_state())
    loaded = dist_checkpointing.load(state, str(path))
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        _unwrap(chunk).load_state_dict(loaded[key], strict=True)
    if load_optimizer and optimizer is not None:
        _load_optimizer_state(optimizer, loaded["optimizer"])
        _unshare_step_tensors(optimizer)
        if scheduler is not None and common.get("scheduler") is not None:
            scheduler.load_state_dict(common["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng"])
    common["rng_restored"] = same_layout
    return common


def load_weights_only(path: str | Path, chunks: List[torch.nn.Module]) -> Dict[str, Any]:
    """`init_from`: weights of a (converted) checkpoint, any position encoding, fresh optimizer."""
    path = Path(path)
    if not (path / "metadata.json").is_file():
        pointer = latest_checkpoint(path)
        if pointer is None:
            raise FileNotFoundError(f"training.init_from={path} is neither a torch_dist checkpoint nor a "
                                    f"checkpoint directory with a '{LATEST}' file")
        path = pointer
    common = dist_checkpointing.load_common_state_dict(str(path))
    loaded = dist_checkpointing.load(_model_state(chunks), str(path))
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        _unwrap(chunk).load_state_dict(loaded[key], strict=True)
    return common
