"""GPU combinations that Transformer Engine or megatron-core cannot run, refused or made to work before launch
(docs/gpu.md, "Combinations"). Each test fails on the code as it was before the rule: the combination was
accepted and would have crashed, or run wrong, at the first step on a GPU."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_harpe.backends import setup_backend

setup_backend()

from megatron_harpe.config.model import ModelConfig, PositionEmbeddingConfig  # noqa: E402
from megatron_harpe.convert.megatron_io import single_process_world  # noqa: E402
from megatron_harpe.models.provider import build_model  # noqa: E402
from megatron_harpe.models.transformer_config import (apex_wgrad_fusion_available,  # noqa: E402
                                                      build_transformer_config, fusion_settings)


def _model() -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                       vocab_size=128, max_position_embeddings=64,
                       position=PositionEmbeddingConfig(kind="harpe", bases=[1e4, 1e6]))


# ----------------------------------------------------------------------------- finding 4
def test_gradient_accumulation_fusion_only_with_apex_wgrad_extension():
    """GPTModel's output layer is megatron-core's own ColumnParallelLinear, which refuses to be built with
    gradient_accumulation_fusion when apex's fused_weight_gradient_mlp_cuda is missing (core_v0.16.1
    tensor_parallel/layers.py:924, 0.19.2 :1070) - the case of every install that gets TE from PyPI without apex.
    The fusion was switched on by CUDA + TE alone; now it also needs the extension. Built here on the CPU with
    the flags a GPU node without apex gets (the extension is not installed here either)."""
    assert not apex_wgrad_fusion_available()
    model_cfg = _model()
    gpu_without_apex = fusion_settings(model_cfg, cuda=True, te=True, kernel="unfused", apex_wgrad=False)
    assert gpu_without_apex["gradient_accumulation_fusion"] is False
    cpu_safe = {k: v for k, v in gpu_without_apex.items() if k not in ("bias_activation_fusion",
                                                                       "bias_dropout_fusion",
                                                                       "cross_entropy_loss_fusion")}
    with single_process_world():
        model = build_model(model_cfg, build_transformer_config(model_cfg, fusions={
            **fusion_settings(model_cfg, cuda=False, te=False), **cpu_safe}))
        assert model.output_layer.gradient_accumulation_fusion is False
        # the rule as it was (CUDA and TE): megatron-core refuses to build the model
        old_rule = {**fusion_settings(model_cfg, cuda=False, te=False), "gradient_accumulation_fusion": True}
        with pytest.raises(RuntimeError, match="fused_weight_gradient_mlp_cuda"):
            build_model(model_cfg, build_transformer_config(model_cfg, fusions=old_rule))
    with_apex = fusion_settings(model_cfg, cuda=True, te=True, kernel="unfused", apex_wgrad=True)
    assert with_apex["gradient_accumulation_fusion"] is True
