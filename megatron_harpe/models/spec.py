"""Layer specs: a Llama layer built from megatron-core modules, injected by ModuleSpec.

Two backends, chosen by what is installed (never required):
- Transformer Engine present (GPU clusters): megatron-core's own TE spec — fused
  layernorm+linear, TE attention with its ring context parallelism and FP8 options.
- Otherwise (CPU, or GPU without TE): megatron-core's tensor-parallel linears, our RMSNorm
  (sequence-parallel aware) and our SDPA core attention (PyTorch scaled_dot_product_attention,
  with context parallelism and packed sequences), instead of megatron-core's local
  DotProductAttention, which materialises the full score matrix and refuses CP and packing.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_harpe.models.norm import RMSNorm


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install raising at import
        return False
    return True


def mlp_submodule(submodules: MLPSubmodules):
    """The layer's MLP slot in the form the installed megatron-core builds directly.

    From 0.19 a TransformerLayer builds its MLP through the public classmethod
    ``MLP.as_mlp_submodule`` (it passes process groups by keyword); handed a plain
    ModuleSpec(MLP) it rewraps it into that call and logs a warning on every build. Older
    releases (0.16.1) have no such method and take the ModuleSpec."""
    if hasattr(MLP, "as_mlp_submodule"):
        return functools.partial(MLP.as_mlp_submodule, submodules=submodules)
    return ModuleSpec(module=MLP, submodules=submodules)


def local_llama_layer_spec(attention: type = SelfAttention) -> ModuleSpec:
    """One Llama layer from megatron-core's tensor-parallel linears and our attention/norm."""
    from megatron_harpe.parallel.core_attention import SDPACoreAttention

    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=attention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SDPACoreAttention,
                    linear_proj=RowParallelLinear,
                ),
            ),
            pre_mlp_layernorm=RMSNorm,
            mlp=mlp_submodule(MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
            self_attn_bda=get_bias_dropout_add,
            mlp_bda=get_bias_dropout_add,
            # checkpoint keys as in the Transformer Engine spec (norms fused into the next linear),
            # so CPU-trained or converted checkpoints load on TE clusters and the reverse
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def llama_block_spec(config: TransformerConfig, use_te: Optional[bool] = None, vp_stage: Optional[int] = None,
                     harpe: bool = False) -> TransformerBlockSubmodules | ModuleSpec:
    """The decoder block spec for this rank's pipeline stage.

    `harpe` puts HarpeSelfAttention (models/attention.py) in the attention slot of either spec. The
    local path returns TransformerBlockSubmodules so that the final norm is our RMSNorm
    (megatron-core would otherwise pick its torch norm wrapper, which refuses SP).
    """
    from megatron_harpe.models.attention import HarpeSelfAttention

    attention = HarpeSelfAttention if harpe else SelfAttention
    use_te = transformer_engine_available() if use_te is None else use_te
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return with_attention(get_gpt_layer_with_transformer_engine_spec(), attention)
    num_local_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[local_llama_layer_spec(attention)] * num_local_layers,
                                      layer_norm=RMSNorm)


def with_attention(layer_spec: ModuleSpec, attention: type) -> ModuleSpec:
    """A copy of a layer spec whose self-attention module is `attention` (submodules unchanged)."""
    submodules = copy.copy(layer_spec.submodules)
    submodules.self_attention = dataclasses.replace(submodules.self_attention, module=attention)
    return dataclasses.replace(layer_spec, submodules=submodules)
