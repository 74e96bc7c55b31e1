"""HARPE Llama for transformers: Llama whose attention heads rotate with their own RoPE bases.

Only two pieces differ from transformers' Llama, and everything else is its classes:

- `HarpeLlamaRotaryEmbedding` returns cos/sin per K/V head, shaped [batch, kv_heads, seq, dim]
  (stock Llama returns one table [batch, seq, dim] broadcast over all heads).
- `HarpeLlamaAttention` is `LlamaAttention` (same projections, cache, attention backends) whose
  forward applies those per-head tables: a query head uses the table of its K/V head.

The arithmetic is the stock one (inverse frequencies `1 / base ** (arange(0, dim, 2) / dim)` in
fp32, angles `position * inv_freq`, `x * cos + rotate_half(x) * sin`), so a model whose bases
are all equal to `rope_theta` gives exactly the logits of `LlamaForCausalLM`, and a model
exported from megatron-harpe gives the logits of its megatron-core twin.

This file ships inside exported model directories and imports nothing but torch and
transformers. Written against the attention API of transformers >= 4.48 (position embeddings
computed once per model and passed to every layer); tested with transformers 5.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaModel,
    eager_attention_forward,
    rotate_half,
)

try:  # transformers >= 4.48
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError:  # pragma: no cover - older transformers lack the attention interface
    ALL_ATTENTION_FUNCTIONS = None

from .configuration_harpe_llama import HarpeLlamaConfig


def harpe_inverse_frequencies(bases, dim: int) -> torch.Tensor:
    """[len(bases), dim/2] fp32: row g is stock Llama's inv_freq for base bases[g]."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    return torch.stack([1.0 / (float(base) ** exponents) for base in bases])


def apply_harpe_rotary_pos_emb(q, k, cos, sin):
    """Rotate q [b, heads, s, d] and k [b, kv_heads, s, d] with per-K/V-head cos/sin [b, kv_heads, s, d].

    Query heads are viewed as [b, kv_heads, heads_per_group, s, d] (the order of transformers'
    `repeat_kv`), so each group's table broadcasts over its query heads without a copy.
    """
    b, heads, s, d = q.shape
    kv_heads = k.shape[1]
    q_grouped = q.reshape(b, kv_heads, heads // kv_heads, s, d)
    q_cos, q_sin = cos.unsqueeze(2), sin.unsqueeze(2)
    q_embed = (q_grouped * q_cos) + (rotate_half(q_grouped) * q_sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed.reshape(b, heads, s, d), k_embed


class HarpeLlamaRotaryEmbedding(nn.Module):
    """cos/sin for every K/V head with its own base: forward(x, position_ids) -> [b, kv_heads, s, d] each."""

    def __init__(self, config: HarpeLlamaConfig):
        super().__init__()
        bases = getattr(config, "harpe_bases", None)
        if not bases:
            raise ValueError("HarpeLlamaConfig.harpe_bases is empty: a HARPE model needs one RoPE base per K/V head")
        if len(bases) != config.num_key_value_heads:
            raise ValueError(f"harpe_bases has {len(bases)} bases but the model has {config.num_key_value_heads} "
                             f"K/V heads (num_key_value_heads); HARPE needs exactly one base per K/V head")
        if not all(float(b) > 1.0 for b in bases):
            raise ValueError(f"RoPE bases must be > 1; got {bases}")
        self.bases = [float(b) for b in bases]
        self.dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # Plain attribute, not a buffer: nothing to load or initialise, and model.to(dtype)
        # cannot round the frequencies (they stay fp32, like Llama's).
        self._inv_freq = {}

    def inv_freq(self, device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = harpe_inverse_frequencies(self.bases, self.dim).to(device)
        return self._inv_freq[device]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        inv_freq = self.inv_freq(x.device)  # [kv_heads, d/2]
        positions = position_ids.to(device=x.device, dtype=torch.float32)  # [b, s]
        freqs = positions[:, None, :, None] * inv_freq[None, :, None, :]  # [b, kv_heads, s, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bases={self.bases}"


def _attention_function(implementation):
    if implementation in (None, "eager") or ALL_ATTENTION_FUNCTIONS is None:
        return eager_attention_forward
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):  # transformers >= 5
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _pop_cache(kwargs):
    """The layer's KV cache under the name this transformers version uses."""
    cache = None
    for name in ("cache", "past_key_values", "past_key_value"):
        value = kwargs.pop(name, None)
        cache = value if value is not None else cache
    return cache


class HarpeLlamaAttention(LlamaAttention):
    """LlamaAttention whose RoPE has one base per K/V head (position_embeddings from HarpeLlamaRotaryEmbedding)."""

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        cache = _pop_cache(kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query, key = apply_harpe_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            # transformers < 5 reads cache_position from this dict (static caches); >= 5 ignores it
            key, value = cache.update(key, value, self.layer_idx, {"cache_position": kwargs.get("cache_position")})

        attention = _attention_function(self.config._attn_implementation)
        attn_output, attn_weights = attention(
            self, query, key, value, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


def use_harpe_rotary(model: LlamaModel, config: HarpeLlamaConfig) -> None:
    """Turn a freshly built LlamaModel into HARPE: per-K/V-head rotary and attention.

    The new attention modules adopt the existing projections, so the parameters (and their
    initialisation) are exactly those transformers created.
    """
    model.rotary_emb = HarpeLlamaRotaryEmbedding(config)
    for layer in model.layers:
        stock = layer.self_attn
        harpe = HarpeLlamaAttention(config, stock.layer_idx)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(harpe, name, getattr(stock, name))
        layer.self_attn = harpe


class HarpeLlamaModel(LlamaModel):
    config_class = HarpeLlamaConfig

    def __init__(self, config: HarpeLlamaConfig):
        super().__init__(config)
        use_harpe_rotary(self, config)


class HarpeLlamaForCausalLM(LlamaForCausalLM):
    config_class = HarpeLlamaConfig

    def __init__(self, config: HarpeLlamaConfig):
        super().__init__(config)
        use_harpe_rotary(self.model, config)


__all__ = ["HarpeLlamaConfig", "HarpeLlamaModel", "HarpeLlamaForCausalLM", "HarpeLlamaRotaryEmbedding",
           "HarpeLlamaAttention", "apply_harpe_rotary_pos_emb", "harpe_inverse_frequencies"]
