"""Model provider: megatron-core GPTModel, Llama-style, with the configured position encoding.

HARPE enters through one seam: `HarpeGPTModel` is megatron-core's GPTModel built with
position_embedding_type='rope', whose rotary module is then HARPE's. GPTModel's forward,
its pipeline/CP handling and the attention's apply path are all megatron-core's own. The base
set comes from `model_cfg.position.bases` (resolved when the config was made) straight to the
rotary module, which is the only model-side holder of it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_harpe.config.model import ModelConfig
from megatron_harpe.models.spec import llama_block_spec
from megatron_harpe.rope.harpe_rotary import HarpeRotaryEmbedding


class HarpeGPTModel(GPTModel):
    """GPTModel with one RoPE base per K/V group (`bases`, one per group of the whole model)."""

    def __init__(self, config: TransformerConfig, *, bases: Sequence[float], rotary_percent: float = 1.0,
                 rope_kernel: str = "unfused", **kwargs):
        if config.flash_decode:
            raise ValueError("flash_decode takes one cos/sin table for all heads; it cannot apply HARPE's "
                             "per-head bases. Set flash_decode=False.")
        if rope_kernel not in ("fused", "unfused"):
            raise ValueError(f"rope_kernel must be fused or unfused (transformer_config.rope_kernel resolves auto), "
                             f"got {rope_kernel!r}")
        super().__init__(config=config, position_embedding_type="rope", rotary_percent=rotary_percent, **kwargs)
        self.rope_kernel = rope_kernel
        self.set_bases(bases)

    def set_bases(self, bases: Sequence[float]) -> None:
        """Install a fresh rotary module for `bases` (at build, and at a stage boundary).

        A new module rather than edited frequencies: megatron-core-style angle caches of the
        previous base set cannot survive.
        """
        config = self.config
        self.rotary_pos_emb = HarpeRotaryEmbedding(
            kv_channels=config.kv_channels, rotary_percent=self.rotary_percent, bases=bases,
            num_attention_heads=config.num_attention_heads, num_query_groups=config.num_query_groups,
            rotary_interleaved=config.rotary_interleaved, fused=self.rope_kernel == "fused",
            tp_group=self.pg_collection.tp, cp_group=self.pg_collection.cp)


def build_model(model_cfg: ModelConfig, config: TransformerConfig, *, pre_process: bool = True,
                post_process: bool = True, vp_stage: Optional[int] = None,
                use_te: Optional[bool] = None, parallel_output: bool = True,
                rope_kernel: str = "unfused") -> GPTModel:
    """One pipeline stage (or virtual stage) of the model on this rank.

    `rope_kernel` ("fused" | "unfused", see models/transformer_config.rope_kernel) picks HARPE's
    apply path; for one-base kinds the TransformerConfig's apply_rope_fusion decides instead.
    """
    position = model_cfg.position
    common = dict(
        config=config,
        transformer_layer_spec=llama_block_spec(config, use_te=use_te, vp_stage=vp_stage,
                                                harpe=position.kind == "harpe"),
        vocab_size=model_cfg.vocab_size,
        max_sequence_length=model_cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=model_cfg.tie_embeddings,
        rotary_percent=model_cfg.rotary_percent,
        vp_stage=vp_stage,
    )
    if position.kind == "harpe":
        return HarpeGPTModel(bases=position.bases, rope_kernel=rope_kernel, **common)
    if position.kind == "yarn":
        return GPTModel(position_embedding_type="yarn", rotary_base=position.base, **common)
    factor = position.interpolation_factor if position.kind == "pi" else None
    model = GPTModel(position_embedding_type="rope", rotary_base=position.base,
                     seq_len_interpolation_factor=factor, rope_scaling=position.kind == "llama3",
                     rope_scaling_factor=position.llama3_factor or 8.0, **common)
    if position.kind == "llama3":
        _apply_llama3_settings(model.rotary_pos_emb, position)
    return model


def _apply_llama3_settings(rotary, position) -> None:
    """megatron-core's RotaryEmbedding(rope_scaling=True) takes only the factor and keeps Llama 3.1's other
    settings (low/high frequency factors 1 and 4, original context 8192); recompute its inverse
    frequencies with the configured ones through its own _apply_scaling when they differ."""
    llama31 = (1.0, 4.0, 8192)
    settings = (position.llama3_low_freq_factor, position.llama3_high_freq_factor,
                position.llama3_original_max_position_embeddings)
    if settings == llama31:
        return
    dim = rotary.inv_freq.numel() * 2
    plain = 1.0 / (position.base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=rotary.inv_freq.device)
                                     / dim))
    rotary.inv_freq = rotary._apply_scaling(plain, factor=position.llama3_factor, low_freq_factor=settings[0],
                                            high_freq_factor=settings[1], original_max_position_embeddings=settings[2])


def replace_position_encoding(model: GPTModel, model_cfg: ModelConfig) -> None:
    """Give a built model the position settings of `model_cfg` (a stage boundary of a staged run).

    Only the rotary module changes (it holds no parameters); weights and optimizer state stay.
    A fresh module is built rather than editing the old one's frequencies, so no cached angle
    table of the previous base can survive (megatron-core caches RotaryEmbedding.forward).
    """
    position = model_cfg.position
    config = model.config
    if position.kind == "yarn":
        raise ValueError("switching YaRN settings between stages is not supported; use rope (ABF) or harpe stages")
    if position.kind == "harpe":
        if not isinstance(model, HarpeGPTModel):
            raise ValueError("a HARPE stage needs a model built with position.kind=harpe")
        model.set_bases(position.bases)
        return
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    factor = position.interpolation_factor if position.kind == "pi" else None
    model.rotary_pos_emb = RotaryEmbedding(
        kv_channels=config.kv_channels, rotary_percent=model.rotary_percent,
        rotary_interleaved=config.rotary_interleaved, seq_len_interpolation_factor=factor,
        rotary_base=position.base, rope_scaling=position.kind == "llama3",
        rope_scaling_factor=position.llama3_factor or 8.0, use_cpu_initialization=config.use_cpu_initialization,
        cp_group=model.pg_collection.cp)
    if position.kind == "llama3":
        _apply_llama3_settings(model.rotary_pos_emb, position)
    model.rotary_base = position.base
