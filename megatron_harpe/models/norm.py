"""RMSNorm for the local (non-Transformer-Engine) layer spec.

megatron-core's local spec offers `WrappedTorchNorm`, which refuses sequence parallelism, and
`FusedLayerNorm`, which needs apex. Llama uses RMSNorm; this one works with and without
sequence parallelism: under SP each TP rank normalises a different slice of the sequence, so
the weight's gradient is partial per rank. Marking the weight `sequence_parallel = True` makes
megatron-core's `finalize_model_grads` all-reduce it over the TP group.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 like Llama's reference."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)
