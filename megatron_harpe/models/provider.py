"""Model provider: megatron-core GPTModel, Llama-style, with the configured position encoding.

HARPE enters through one seam: `HarpeGPTModel` is megatron-core's GPTModel built with
position_embedding_type='rope', whose rotary module is then HARPE's. GPTModel's forward,
its pipeline/CP handling and the attention's apply path are all megatron-core's own.
"""
from __future__ import annotations

from typing import Optional

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_harpe.models.config import HarpeTransformerConfig, ModelConfig
from megatron_harpe.models.spec import llama_block_spec
from megatron_harpe.rope.harpe_rotary import HarpeRotaryEmbedding


class HarpeGPTModel(GPTModel):
    """GPTModel with one RoPE base per K/V group (config.harpe_bases)."""

    def __init__(self, config: HarpeTransformerConfig, *, rotary_percent: float = 1.0,
                 seq_len_interpolation_factor: Optional[float] = None, **kwargs):
        if not getattr(config, "harpe_bases", None):
            raise ValueError("HarpeGPTModel needs a HarpeTransformerConfig with harpe_bases set")
        if config.flash_decode:
            raise ValueError("flash_decode takes one cos/sin table for all heads; it cannot apply HARPE's "
                             "per-head bases. Set flash_decode=False.")
        super().__init__(config=config, position_embedding_type="rope", rotary_percent=rotary_percent,
                         seq_len_interpolation_factor=seq_len_interpolation_factor, **kwargs)
        self.rotary_pos_emb = HarpeRotaryEmbedding(
            kv_channels=config.kv_channels,
            rotary_percent=rotary_percent,
            bases=config.harpe_bases,
            num_attention_heads=config.num_attention_heads,
            num_query_groups=config.num_query_groups,
            rotary_interleaved=config.rotary_interleaved,
            seq_len_interpolation_factor=seq_len_interpolation_factor,
            tp_group=self.pg_collection.tp,
            cp_group=self.pg_collection.cp,
        )


def build_model(model: ModelConfig, config: TransformerConfig, *, pre_process: bool = True,
                post_process: bool = True, vp_stage: Optional[int] = None,
                use_te: Optional[bool] = None, parallel_output: bool = True) -> GPTModel:
    """One pipeline stage (or virtual stage) of the model on this rank."""
    position = model.position
    common = dict(
        config=config,
        transformer_layer_spec=llama_block_spec(config, use_te=use_te, vp_stage=vp_stage),
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=model.tie_embeddings,
        rotary_percent=model.rotary_percent,
        vp_stage=vp_stage,
    )
    if position.kind == "harpe":
        return HarpeGPTModel(**common)
    if position.kind == "yarn":
        return GPTModel(position_embedding_type="yarn", rotary_base=position.base, **common)
    factor = position.interpolation_factor if position.kind == "pi" else None
    return GPTModel(position_embedding_type="rope", rotary_base=position.base,
                    seq_len_interpolation_factor=factor, **common)


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
        bases = position.resolve_bases(model_cfg.groups, model_cfg.head_dim)
        config.harpe_bases = bases
        model.rotary_pos_emb = HarpeRotaryEmbedding(
            kv_channels=config.kv_channels, rotary_percent=model.rotary_percent, bases=bases,
            num_attention_heads=config.num_attention_heads, num_query_groups=config.num_query_groups,
            rotary_interleaved=config.rotary_interleaved,
            seq_len_interpolation_factor=model.rotary_pos_emb.seq_len_interpolation_factor,
            tp_group=model.pg_collection.tp, cp_group=model.pg_collection.cp)
        return
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    factor = position.interpolation_factor if position.kind == "pi" else None
    model.rotary_pos_emb = RotaryEmbedding(
        kv_channels=config.kv_channels, rotary_percent=model.rotary_percent,
        rotary_interleaved=config.rotary_interleaved, seq_len_interpolation_factor=factor,
        rotary_base=position.base, use_cpu_initialization=config.use_cpu_initialization,
        cp_group=model.pg_collection.cp)
    model.rotary_base = position.base
