"""The megatron-core TransformerConfig for a ModelConfig and a parallel layout.

The model itself is described in config/model_cfg.py (pure data, checked when made); this module
is the one place that maps it onto megatron-core's TransformerConfig. The HARPE base set is not
copied in: it goes straight from `model_cfg.position.bases` to the rotary module (provider.py),
so a stage switch cannot leave a stale copy in a config object every layer shares.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_harpe.config.model import ModelConfig, check_layout


@dataclass
class YarnTransformerConfig(TransformerConfig):
    """TransformerConfig plus the fields megatron-core's GPTModel reads for position 'yarn'.

    A separate class on purpose: megatron-core's attention applies YaRN's attention scaling to
    any config that HAS `yarn_rotary_scaling_factor`, so these fields must exist only on YaRN
    models.
    """

    yarn_rotary_scaling_factor: float = 1.0
    yarn_original_max_position_embeddings: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 0.0
    yarn_correction_range_round_to_int: bool = True


def build_transformer_config(model_cfg: ModelConfig, *, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                             virtual_pipeline_parallel: Optional[int] = None, context_parallel: int = 1,
                             sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                             use_cpu_initialization: bool = True, **overrides) -> TransformerConfig:
    """megatron-core TransformerConfig for a Llama-style model and a parallel layout.

    Fusions that need CUDA extensions (apex, TE) are off; `overrides` passes any other
    TransformerConfig field (recompute options, dropout, ...).
    """
    check_layout(model_cfg, tensor=tensor_parallel, pipeline=pipeline_parallel,
                 virtual_pipeline=virtual_pipeline_parallel, context=context_parallel)
    kwargs = dict(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.groups,
        kv_channels=model_cfg.head_dim,
        layernorm_epsilon=model_cfg.norm_epsilon,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=model_cfg.hidden_dropout,
        attention_dropout=model_cfg.attention_dropout,
        init_method_std=model_cfg.init_method_std,
        rotary_interleaved=model_cfg.rotary_interleaved,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel,
        context_parallel_size=context_parallel,
        sequence_parallel=sequence_parallel and tensor_parallel > 1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=use_cpu_initialization,
    )
    kwargs.update(overrides)
    position = model_cfg.position
    if position.kind == "yarn":
        return YarnTransformerConfig(
            yarn_rotary_scaling_factor=position.yarn_factor,
            yarn_original_max_position_embeddings=position.yarn_original_max_position_embeddings,
            yarn_beta_fast=position.yarn_beta_fast,
            yarn_beta_slow=position.yarn_beta_slow,
            **kwargs,
        )
    return TransformerConfig(**kwargs)

