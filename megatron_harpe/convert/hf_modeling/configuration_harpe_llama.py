"""Configuration of a HARPE Llama: a stock `LlamaConfig` plus one RoPE base per K/V head.

HARPE (Lian et al., COLING 2025) gives every attention head its own RoPE base; with
grouped-query attention the bases are per K/V head, and every query head of a group uses its
group's base. Everything else is Llama. `harpe_bases[g]` is the base of K/V head g (and of
query heads g * n_rep .. (g + 1) * n_rep - 1, transformers' `repeat_kv` order).

`rope_theta` / `rope_parameters` are kept (the first base) only so that transformers' own
Llama code, which this model reuses, finds the fields it expects; the rotation that is
applied comes from `harpe_bases`.

This file ships inside exported model directories and imports nothing but transformers.
"""
from transformers import LlamaConfig


class HarpeLlamaConfig(LlamaConfig):
    model_type = "harpe_llama"

    # transformers >= 5 turns config classes into dataclasses (this annotation is a field);
    # older versions store unknown keyword arguments as attributes, so both read it the same way.
    harpe_bases: list | None = None


__all__ = ["HarpeLlamaConfig"]
