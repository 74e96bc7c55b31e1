"""Tiny Hugging Face Llamas made here with transformers, and HF weight directories read back.

Shared by the conversion tests (test_convert.py, test_convert_streaming.py, test_real_model.py): importing this
module needs transformers and safetensors, which those files skip without.
"""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 1000


def tiny_llama(directory: Path, *, dtype=torch.float32, tie=False, seed=0, shard="60KB", **overrides) -> Path:
    """A random LlamaForCausalLM saved as sharded safetensors (GQA: 4 heads, 2 K/V groups, 4 layers by default);
    `overrides` are LlamaConfig fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=tie)
    kwargs.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).to(dtype).eval()
    with torch.no_grad():  # RMSNorm weights are ones at init; make them informative
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory, max_shard_size=shard)
    return directory


def hf_state(directory: Path) -> dict:
    """Every tensor of a HF directory's safetensors files, by name."""
    from safetensors.torch import load_file

    state = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state
