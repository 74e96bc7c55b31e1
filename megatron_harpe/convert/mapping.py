"""Tensor by tensor: Hugging Face Llama names/layouts <-> megatron-core's full (TP=1, PP=1) state dict.

    HF Llama                                        megatron-core (TP=1/PP=1 parameter names)
    model.embed_tokens.weight                       embedding.word_embeddings.weight
    model.layers.i.input_layernorm.weight           decoder.layers.i.input_layernorm.weight
    model.layers.i.self_attn.{q,k,v}_proj.weight    decoder.layers.i.self_attention.linear_qkv.weight
    model.layers.i.self_attn.o_proj.weight          decoder.layers.i.self_attention.linear_proj.weight
    model.layers.i.post_attention_layernorm.weight  decoder.layers.i.pre_mlp_layernorm.weight
    model.layers.i.mlp.{gate,up}_proj.weight        decoder.layers.i.mlp.linear_fc1.weight  ([gate; up])
    model.layers.i.mlp.down_proj.weight             decoder.layers.i.mlp.linear_fc2.weight
    model.norm.weight                               decoder.final_layernorm.weight
    lm_head.weight (absent when tied)               output_layer.weight (absent when tied)

The fused QKV weight is group-major: for each K/V group g, the rows of its query heads, then
k_g, then v_g (megatron-core splits it per group; a TP rank holds whole groups). HF's q_proj /
k_proj rows are already in the half-split ("rotate_half") order within each head, which is
also what megatron-core's non-interleaved RoPE rotates, so no per-head permutation is needed
(the logits tests check this numerically). Rows beyond the HF vocabulary (megatron vocabulary
padding) are zeros on import and dropped on export.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from megatron_harpe.convert.errors import ConversionError
from megatron_harpe.config.model import ModelConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
#: HF tensors that carry no weights of their own (old checkpoints saved RoPE tables)
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    groups, d = cfg.groups, cfg.head_dim
    per_group = cfg.num_attention_heads // groups
    hidden = q.shape[1]
    parts = (q.reshape(groups, per_group * d, hidden), k.reshape(groups, d, hidden), v.reshape(groups, d, hidden))
    return torch.cat(parts, dim=1).reshape(groups * (per_group + 2) * d, hidden)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, d = cfg.groups, cfg.head_dim
    per_group = cfg.num_attention_heads // groups
    hidden = qkv.shape[1]
    q, k, v = qkv.reshape(groups, (per_group + 2) * d, hidden).split([per_group * d, d, d], dim=1)
    return (q.reshape(groups * per_group * d, hidden), k.reshape(groups * d, hidden), v.reshape(groups * d, hidden))


def pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    if weight.shape[0] == rows:
        return weight
    padding = weight.new_zeros((rows - weight.shape[0],) + tuple(weight.shape[1:]))
    return torch.cat([weight, padding])


def hf_sources(megatron_name: str, tie_embeddings_in_hf: bool) -> Tuple[str, ...]:
    """The HF tensor names one megatron parameter is made of."""
    if megatron_name == "embedding.word_embeddings.weight":
        return ("model.embed_tokens.weight",)
    if megatron_name == "output_layer.weight":
        return ("model.embed_tokens.weight",) if tie_embeddings_in_hf else ("lm_head.weight",)
    if megatron_name == "decoder.final_layernorm.weight":
        return ("model.norm.weight",)
    match = _LAYER.match(megatron_name)
    if match:
        hf = f"model.layers.{match.group(1)}."
        rest = match.group(2)
        table = {
            "input_layernorm.weight": ("input_layernorm.weight",),
            "self_attention.linear_qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                 "self_attn.v_proj.weight"),
            "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
            "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight",),
            "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
            "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
        }
        if rest in table:
            return tuple(hf + name for name in table[rest])
    raise ConversionError(f"megatron parameter {megatron_name} has no Hugging Face Llama counterpart (a layer this "
                          f"converter does not know; is the model built with the Llama spec?)")


def megatron_tensor(megatron_name: str, get: Callable[[str], torch.Tensor], cfg: ModelConfig,
                    tie_embeddings_in_hf: bool) -> torch.Tensor:
    """The full megatron tensor `megatron_name`, built from HF tensors read by `get(hf_name)`."""
    sources = [get(name) for name in hf_sources(megatron_name, tie_embeddings_in_hf)]
    if megatron_name.endswith("linear_qkv.weight"):
        return fuse_qkv(*sources, cfg)
    if megatron_name.endswith("linear_fc1.weight"):
        return torch.cat(sources, dim=0)
    if megatron_name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return pad_rows(sources[0], cfg.vocab_size)
    return sources[0]


def hf_tensors(full: Dict[str, torch.Tensor], cfg: ModelConfig,
               vocab_size: Optional[int] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every HF Llama tensor, from a full megatron state dict, in HF's order."""
    vocab = vocab_size or cfg.vocab_size

    def take(name):
        if name not in full:
            raise ConversionError(f"the megatron checkpoint lacks {name}")
        return full[name]

    yield "model.embed_tokens.weight", take("embedding.word_embeddings.weight")[:vocab]
    for i in range(cfg.num_layers):
        meg, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = split_qkv(take(meg + "self_attention.linear_qkv.weight"), cfg)
        gate, up = take(meg + "mlp.linear_fc1.weight").chunk(2, dim=0)
        yield hf + "input_layernorm.weight", take(meg + "input_layernorm.weight")
        yield hf + "self_attn.q_proj.weight", q
        yield hf + "self_attn.k_proj.weight", k
        yield hf + "self_attn.v_proj.weight", v
        yield hf + "self_attn.o_proj.weight", take(meg + "self_attention.linear_proj.weight")
        yield hf + "post_attention_layernorm.weight", take(meg + "pre_mlp_layernorm.weight")
        yield hf + "mlp.gate_proj.weight", gate
        yield hf + "mlp.up_proj.weight", up
        yield hf + "mlp.down_proj.weight", take(meg + "mlp.linear_fc2.weight")
    yield "model.norm.weight", take("decoder.final_layernorm.weight")
    if not cfg.tie_embeddings:
        yield "lm_head.weight", take("output_layer.weight")[:vocab]
