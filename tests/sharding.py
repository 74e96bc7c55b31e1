"""Test helper: map a full (TP=1, PP=1) megatron-core state dict onto one rank's shard, and back.

Why our own mapping instead of only dist_checkpointing: the parallel-equivalence tests need to
place the SAME weights into any TP/PP layout, tensor by tensor, and know exactly which slice a
rank holds, independently of the checkpoint code they also check. Two layout facts of megatron-core matter:
- Tensor-parallel parameters carry `tensor_model_parallel=True` and `partition_dim`; a rank
  holds the r-th contiguous chunk along that dim. The fused QKV weight is laid out group by
  group ([q heads of group g, k_g, v_g] for each g), so a contiguous chunk is whole groups.
- With a gated MLP (SwiGLU) `linear_fc1` is [gate; up]; a rank holds [gate_r; up_r], not the
  r-th chunk of the concatenation.
Pipeline stages hold layers offset by their first layer: a layer's global index is its
`layer_number - 1`.
"""
from __future__ import annotations

import re
from typing import Dict, Iterator, Tuple

import torch
from torch import nn

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")


def _global_layer_names(model: nn.Module) -> Dict[int, int]:
    """Local layer index -> global layer index for this pipeline (virtual) stage."""
    layers = getattr(getattr(model, "decoder", None), "layers", [])
    return {i: layer.layer_number - 1 for i, layer in enumerate(layers)}


def global_name(local_name: str, layer_map: Dict[int, int]) -> str:
    match = _LAYER_RE.match(local_name)
    if not match:
        return local_name
    return f"decoder.layers.{layer_map[int(match.group(1))]}." + local_name[match.end():]


def is_gated_fc1(name: str, gated_linear_unit: bool) -> bool:
    return gated_linear_unit and name.endswith("mlp.linear_fc1.weight")


def shard_tensor(full: torch.Tensor, param: torch.Tensor, name: str, tp_rank: int, tp_size: int,
                 gated_linear_unit: bool) -> torch.Tensor:
    """The slice of `full` that the rank holding `param` owns."""
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if is_gated_fc1(name, gated_linear_unit):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp_size, dim=dim)[tp_rank], up.chunk(tp_size, dim=dim)[tp_rank]], dim=dim)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def local_parameters(model: nn.Module) -> Iterator[Tuple[str, str, torch.nn.Parameter]]:
    """(local name, global name, parameter) for every parameter of a model chunk."""
    layer_map = _global_layer_names(model)
    for name, param in model.named_parameters():
        yield name, global_name(name, layer_map), param


def load_full_state_dict(model: nn.Module, full_state: Dict[str, torch.Tensor], tp_rank: int, tp_size: int,
                         gated_linear_unit: bool = True) -> None:
    """Copy this rank's shard of a full TP=1/PP=1 state dict into `model` (one pipeline chunk)."""
    missing = []
    with torch.no_grad():
        for local, glob, param in local_parameters(model):
            if glob not in full_state:
                missing.append(glob)
                continue
            shard = shard_tensor(full_state[glob], param, glob, tp_rank, tp_size, gated_linear_unit)
            if shard.shape != param.shape:
                raise ValueError(f"shape mismatch for {glob}: the full tensor {tuple(full_state[glob].shape)} "
                                 f"gives a TP shard {tuple(shard.shape)}, the model has {tuple(param.shape)}")
            param.copy_(shard)
    if missing:
        raise KeyError(f"full state dict lacks {len(missing)} parameter(s) of this model, e.g. {missing[:3]}")


def shard_full_tensors(model: nn.Module, full: Dict[str, torch.Tensor], tp_rank: int, tp_size: int,
                       gated_linear_unit: bool = True) -> Dict[str, torch.Tensor]:
    """{global name: this rank's slice} for every parameter of `model` (e.g. reference grads)."""
    return {glob: shard_tensor(full[glob], param, glob, tp_rank, tp_size, gated_linear_unit)
            for _, glob, param in local_parameters(model)}
