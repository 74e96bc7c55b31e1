"""The model inside megatron-core's wrappers.

The trainer holds each model chunk wrapped (DistributedDataParallel, Float16Module...), each of
which keeps the wrapped module in `.module`; checkpointing and stage switches act on the GPTModel
itself. One function, so every caller unwraps the same way.
"""
from __future__ import annotations

import torch


def unwrap_model(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module"):
        module = module.module
    return module
