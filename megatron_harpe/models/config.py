"""Typed model configuration: a Llama-family architecture and its position encoding.

These dataclasses are what a user writes in YAML (the trainer's config embeds them); they are
turned into a megatron-core TransformerConfig by `build_transformer_config`. All checks that
can be made before any process group exists are made here, so a bad config fails with a
clear message on every rank instead of hanging a collective.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.transformer_config import TransformerConfig

POSITION_KINDS = ("rope", "pi", "yarn", "harpe")


@dataclass
class PositionEmbeddingConfig:
    """How positions are encoded.

    kind:
      rope  — one base for all heads (`base`); ABF ("adjusted base frequency") is rope with a
              larger base, e.g. 5e6 for the paper's single-stage baseline.
      pi    — rope with linear position interpolation by `interpolation_factor` (paper: 32).
      yarn  — megatron-core's YaRN with `yarn_factor` over `yarn_original_max_position_embeddings`.
      harpe — one base per K/V group: `bases` given explicitly, or made by `base_strategy`
              (uniform | uniform-desc | peak-valley | paper-llama2-7b | file) from
              base_min/base_max/base_stride or `bases_file`.
    """

    kind: str = "rope"
    base: float = 10000.0
    interpolation_factor: Optional[float] = None
    yarn_factor: Optional[float] = None
    yarn_original_max_position_embeddings: Optional[int] = None
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    bases: Optional[List[float]] = None
    base_strategy: Optional[str] = None
    base_min: float = 1.0e6
    base_max: float = 5.0e6
    base_stride: float = 3.0e4
    bases_file: Optional[str] = None

    def resolve_bases(self, num_query_groups: int, head_dim: int) -> List[float]:
        """The HARPE base set, one per K/V group, from `bases` or `base_strategy`."""
        from megatron_harpe.rope.bases import make_base_set, validate_bases

        if self.bases is not None:
            bases = [float(b) for b in self.bases]
        elif self.base_strategy is not None:
            # pass each strategy only the settings it takes (make_base_set rejects the others)
            strategy = self.base_strategy
            kwargs = {}
            if strategy in ("uniform", "uniform-desc", "peak-valley"):
                kwargs.update(b_min=self.base_min, b_max=self.base_max)
            if strategy == "peak-valley":
                kwargs.update(stride=self.base_stride)
            if strategy == "file":
                kwargs.update(path=self.bases_file)
            bases = make_base_set(strategy, num_bases=num_query_groups, head_dim=head_dim, **kwargs)
        else:
            raise ValueError("position.kind=harpe needs position.bases (a list, one per K/V group) or "
                             "position.base_strategy (uniform, uniform-desc, peak-valley, "
                             "paper-llama2-7b, file)")
        validate_bases(bases, num_groups=num_query_groups)
        return bases

    def validate(self) -> None:
        if self.kind not in POSITION_KINDS:
            raise ValueError(f"position.kind must be one of {POSITION_KINDS}; got {self.kind!r}")
        if self.kind in ("rope", "pi", "yarn") and not self.base > 1:
            raise ValueError(f"position.base must be > 1; got {self.base}")
        if self.kind == "pi" and not (self.interpolation_factor and self.interpolation_factor > 1):
            raise ValueError("position.kind=pi needs position.interpolation_factor > 1 "
                             "(target length / original length, e.g. 32 for 4k -> 128k)")
        if self.kind == "yarn":
            if not (self.yarn_factor and self.yarn_factor > 1):
                raise ValueError("position.kind=yarn needs position.yarn_factor > 1 (e.g. 32)")
            if not self.yarn_original_max_position_embeddings:
                raise ValueError("position.kind=yarn needs position.yarn_original_max_position_embeddings "
                                 "(the pretrained context length, e.g. 4096)")


@dataclass
class ModelConfig:
    """A Llama-family decoder: RMSNorm, SwiGLU, no biases, untied embeddings, GQA."""

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 176
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None = MHA (one K/V group per head)
    kv_channels: Optional[int] = None  # None = hidden_size / num_attention_heads
    vocab_size: int = 256
    max_position_embeddings: int = 4096
    norm_epsilon: float = 1e-5
    rotary_percent: float = 1.0
    rotary_interleaved: bool = False
    tie_embeddings: bool = False
    init_method_std: float = 0.02
    position: PositionEmbeddingConfig = field(default_factory=PositionEmbeddingConfig)

    @property
    def groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def validate(self, tensor_parallel: int = 1, context_parallel: int = 1,
                 seq_length: Optional[int] = None) -> None:
        """Check everything that would otherwise fail later, inside a collective."""
        if self.num_attention_heads % self.groups:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_query_groups ({self.groups})")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads}), or set kv_channels")
        if self.num_attention_heads % tensor_parallel:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                             f"tensor_model_parallel_size ({tensor_parallel})")
        if self.groups % tensor_parallel:
            raise ValueError(f"num_query_groups ({self.groups}) must be divisible by "
                             f"tensor_model_parallel_size ({tensor_parallel}): each TP rank holds whole "
                             f"K/V groups")
        if self.ffn_hidden_size % tensor_parallel:
            raise ValueError(f"ffn_hidden_size ({self.ffn_hidden_size}) must be divisible by "
                             f"tensor_model_parallel_size ({tensor_parallel})")
        if self.vocab_size % tensor_parallel:
            raise ValueError(f"vocab_size ({self.vocab_size}) must be divisible by "
                             f"tensor_model_parallel_size ({tensor_parallel}); pad the vocabulary")
        if self.head_dim % 2:
            raise ValueError(f"head dimension ({self.head_dim}) must be even for RoPE")
        if seq_length is not None and context_parallel > 1 and seq_length % (2 * context_parallel):
            raise ValueError(f"sequence length ({seq_length}) must be divisible by 2 * "
                             f"context_parallel_size ({2 * context_parallel})")
        self.position.validate()
        if self.position.kind == "harpe":
            self.position.resolve_bases(self.groups, self.head_dim)


@dataclass
class HarpeTransformerConfig(TransformerConfig):
    """megatron-core's TransformerConfig plus the HARPE base set (one base per K/V group).

    The bases live in the model config so that every place that builds or saves the model
    (provider, checkpoint metadata, Hugging Face export) reads the same list.
    """

    harpe_bases: Optional[List[float]] = None


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


def build_transformer_config(model: ModelConfig, *, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                             virtual_pipeline_parallel: Optional[int] = None, context_parallel: int = 1,
                             sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                             use_cpu_initialization: bool = True, **overrides) -> TransformerConfig:
    """megatron-core TransformerConfig for a Llama-style model and a parallel layout.

    Fusions that need CUDA extensions (apex, TE) are off; `overrides` passes any other
    TransformerConfig field (recompute options, dropout, ...).
    """
    model.validate(tensor_parallel, context_parallel)
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.groups,
        kv_channels=model.head_dim,
        layernorm_epsilon=model.norm_epsilon,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        rotary_interleaved=model.rotary_interleaved,
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
    position = model.position
    if position.kind == "harpe":
        return HarpeTransformerConfig(harpe_bases=position.resolve_bases(model.groups, model.head_dim), **kwargs)
    if position.kind == "yarn":
        return YarnTransformerConfig(
            yarn_rotary_scaling_factor=position.yarn_factor,
            yarn_original_max_position_embeddings=position.yarn_original_max_position_embeddings,
            yarn_beta_fast=position.yarn_beta_fast,
            yarn_beta_slow=position.yarn_beta_slow,
            **kwargs,
        )
    return TransformerConfig(**kwargs)


def model_config_from_dict(data: dict) -> ModelConfig:
    """ModelConfig from a plain dict (YAML, a checkpoint record): the run config's own loader, so
    unknown keys and wrong types get the same errors as in harpe-train's config."""
    from megatron_harpe.config.loader import from_dict

    return from_dict(ModelConfig, dict(data), "model")
