"""The megatron-core TransformerConfig for a ModelConfig and a parallel layout.

The model itself is described in config/model_cfg.py (pure data, checked when made); this module
is the one place that maps it onto megatron-core's TransformerConfig. The HARPE base set is not
copied in: it goes straight from `model_cfg.position.bases` to the rotary module (provider.py),
so a stage switch cannot leave a stale copy in a config object every layer shares.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

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


def rope_kernel(model_cfg: ModelConfig, *, cuda: bool, te: bool, triton: bool, interpreted: bool = False) -> str:
    """"fused" or "unfused": what `model.position.kernel` means on this machine.

    harpe: fused = this project's Triton kernel (rope/fused_kernel.py), which needs CUDA and Triton
    (or, asked for explicitly, Triton's interpreter: TRITON_INTERPRET=1, for tests on CPU).
    rope/pi/llama3: fused = Transformer Engine's fused RoPE (one frequency table for all heads),
    needs TE on CUDA. yarn: always unfused (no fused kernel applies YaRN's attention scaling). auto never
    picks the interpreter.
    """
    position = model_cfg.position
    if position.kind == "yarn":
        return "unfused"
    if position.kind == "harpe" and position.kernel == "fused" and interpreted and triton:
        return "fused"
    available = cuda and (triton if position.kind == "harpe" else te)
    if position.kernel == "fused":
        if not available:
            need = "CUDA and Triton" if position.kind == "harpe" else "Transformer Engine on CUDA"
            raise ValueError(f"model.position.kernel=fused needs {need} here; use auto or unfused")
        return "fused"
    return "fused" if position.kernel == "auto" and available else "unfused"


def apex_wgrad_fusion_available() -> bool:
    """Whether apex's `fused_weight_gradient_mlp_cuda` extension is installed (found, not imported)."""
    import importlib.util

    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def fusion_settings(model_cfg: ModelConfig, *, cuda: bool, te: bool, kernel: str = "unfused",
                    apex_wgrad: bool = False) -> Dict[str, bool]:
    """megatron-core's fusion switches for this model on this machine: the one place they are decided.

    | switch                       | on when              | why                                                   |
    |------------------------------|----------------------|-------------------------------------------------------|
    | bias_activation_fusion       | CUDA                 | SwiGLU in one fused kernel (bias-free variant)        |
    | bias_dropout_fusion          | CUDA                 | dropout + residual add in one fused kernel            |
    | cross_entropy_loss_fusion    | CUDA                 | megatron-core's native vocab-parallel fused loss      |
    | gradient_accumulation_fusion | CUDA, TE and apex's  | TE's linears add wgrad into main_grad inside the GEMM;|
    |                              | wgrad extension      | but GPTModel's output layer is megatron-core's own    |
    |                              | (`apex_wgrad`)       | ColumnParallelLinear, which raises RuntimeError at    |
    |                              |                      | build without apex's fused_weight_gradient_mlp_cuda   |
    |                              |                      | (tensor_parallel/layers.py:924 in core_v0.16.1, :1070 |
    |                              |                      | in 0.19.2): TE from PyPI without apex would crash.    |
    |                              |                      | Megatron-LM turns it off the same way (arguments.py)  |
    | apply_rope_fusion            | rope/pi, kernel fused| TE's fused RoPE takes ONE frequency table for all     |
    |                              |                      | heads: never for HARPE (per-head angles; TE checks    |
    |                              |                      | freqs.size(2) == 1), which has its own fused kernel   |
    | fused_single_qkv_rope        | never                | a one-base RoPE fused into the QKV split; refuses     |
    |                              |                      | packed sequences; not worth the special case          |
    | masked_softmax_fusion,       | never                | only megatron-core's local attention and apex's       |
    | persist_layer_norm           |                      | LayerNorm use them; this project uses neither         |
    On CPU everything is off: the fused kernels are CUDA (or TorchScript-on-CUDA) kernels.
    """
    rope_fused_by_te = kernel == "fused" and model_cfg.position.kind in ("rope", "pi", "llama3")
    return dict(
        bias_activation_fusion=cuda,
        bias_dropout_fusion=cuda,
        cross_entropy_loss_fusion=cuda,
        gradient_accumulation_fusion=cuda and te and apex_wgrad,
        apply_rope_fusion=cuda and te and rope_fused_by_te,
        fused_single_qkv_rope=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
    )


def fp8_settings(fp8_cfg) -> Dict[str, Any]:
    """The config's `fp8:` section under megatron-core's TransformerConfig names ({} when FP8 is off)."""
    if fp8_cfg.format is None:
        return {}
    return dict(fp8=fp8_cfg.format, fp8_recipe=fp8_cfg.recipe, fp8_margin=fp8_cfg.margin,
                fp8_amax_history_len=fp8_cfg.amax_history_len, fp8_amax_compute_algo=fp8_cfg.amax_compute_algo,
                fp8_wgrad=fp8_cfg.wgrad, fp8_dot_product_attention=fp8_cfg.dot_product_attention,
                fp8_multi_head_attention=fp8_cfg.multi_head_attention,
                first_last_layers_bf16=fp8_cfg.first_last_layers_bf16,
                num_layers_at_start_in_bf16=fp8_cfg.num_layers_at_start_in_bf16,
                num_layers_at_end_in_bf16=fp8_cfg.num_layers_at_end_in_bf16)


def build_transformer_config(model_cfg: ModelConfig, *, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                             virtual_pipeline_parallel: Optional[int] = None, context_parallel: int = 1,
                             sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                             use_cpu_initialization: bool = True, fusions: Optional[Dict[str, bool]] = None,
                             **overrides) -> TransformerConfig:
    """megatron-core TransformerConfig for a Llama-style model and a parallel layout.

    `fusions` comes from fusion_settings (default: all off, what runs anywhere); `overrides` passes
    any other TransformerConfig field (recompute options, FP8, cp_comm_type, ...).
    """
    check_layout(model_cfg, tensor=tensor_parallel, pipeline=pipeline_parallel,
                 virtual_pipeline=virtual_pipeline_parallel, context=context_parallel)
    fusions = fusion_settings(model_cfg, cuda=False, te=False) if fusions is None else fusions
    rope_fusions = [k for k in ("apply_rope_fusion", "fused_single_qkv_rope")
                    if (fusions.get(k) or overrides.get(k)) and model_cfg.position.kind == "harpe"]
    if rope_fusions:
        raise ValueError(f"{', '.join(rope_fusions)}: megatron-core/TE's fused RoPE applies one base to all heads "
                         f"and would reject (or mis-rotate) HARPE's per-head angles; HARPE's own fused kernel is "
                         f"model.position.kernel=fused")
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
        **fusions,
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

