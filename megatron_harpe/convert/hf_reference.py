"""A Hugging Face directory as the reference of a run's step-0 check (harpe-train --check-init; the check itself is
training/init_check.py).

The reference is the directory's weights in transformers with the RUN's position encoding: a continual-pretraining
run usually changes it (ABF: another rope_theta; PI/YaRN/Llama 3 scaling; HARPE: one base per K/V group), and its
first loss is the converted model's with that encoding, not the original model's (on SmolLM2-135M, HARPE bases
(1e5, 5e5, 2e6) cost +11% perplexity at 1k tokens before any training: a real difference the check must not call a
fault). So:

- the run's encoding is the directory's own: stock `AutoModelForCausalLM` (transformers' code alone);
- RoPE/ABF, PI, YaRN, Llama 3: transformers' `LlamaForCausalLM` with the config records `harpe-convert
  megatron-to-hf` would write for the run (hf_config.rope_records), the directory's weights;
- HARPE: `HarpeLlamaForCausalLM`, the class HARPE exports ship (hf_modeling/), the directory's weights; with every
  base equal to the model's rope_theta it gives transformers' Llama logits exactly (tests/test_real_model.py).

Architecture differences between the run's model: section and the directory's config.json (layers, sizes, heads,
K/V groups, head size, norm epsilon, tied embeddings, a vocabulary smaller than the directory's) are reported before
anything is built: the check fails on them without a forward.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import List

import torch

from megatron_harpe.config.model import ModelConfig, PositionEmbeddingConfig
from megatron_harpe.convert.errors import ConversionError
from megatron_harpe.convert.hf_config import (check_hf_architecture, model_config_from_hf, position_from_hf,
                                              read_hf_config, rope_records)
from megatron_harpe.convert.hf_runtime import hf_progress, load_hf_causal_lm

__all__ = ["HFReference"]

_COMPARED = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "groups", "head_dim",
             "norm_epsilon", "tie_embeddings")


def _effective(position: PositionEmbeddingConfig) -> tuple:
    """What decides the rotation (not how a base set was found)."""
    records = rope_records(position)
    bases = tuple(float(b) for b in position.bases) if position.kind == "harpe" else ()
    return position.kind, records["rope_theta"], str(records["rope_scaling"]), bases


class HFReference:
    """The weights of a Hugging Face directory, computed by transformers with a run's position encoding."""

    def __init__(self, directory: str | Path, show_progress: bool = True):
        self.directory = Path(directory)
        self.name = str(self.directory)
        if not (self.directory / "config.json").is_file():
            raise ConversionError(f"{self.directory} has no config.json: the reference must be a Hugging Face "
                                  f"checkpoint directory (config.json and *.safetensors)")
        self.config = read_hf_config(self.directory)
        check_hf_architecture(self.config)
        self.show_progress = show_progress

    def own(self) -> ModelConfig:
        return model_config_from_hf(self.config)

    def mismatches(self, model_cfg: ModelConfig) -> List[str]:
        """Where the run's model: section differs from config.json (nothing: an empty list)."""
        own, out = self.own(), []
        for key in _COMPARED:
            run, hf = getattr(model_cfg, key), getattr(own, key)
            same = math.isclose(run, hf, rel_tol=1e-9) if isinstance(run, float) else run == hf
            if not same:
                out.append(f"model.{key} {run} in the run, {hf} in {self.directory}/config.json")
        if model_cfg.vocab_size < own.vocab_size:
            out.append(f"model.vocab_size {model_cfg.vocab_size} in the run is smaller than the {own.vocab_size} of "
                       f"{self.directory}/config.json")
        if model_cfg.rotary_interleaved or model_cfg.rotary_percent != 1.0:
            out.append("the run rotates interleaved pairs or part of each head; Hugging Face Llama rotates whole heads "
                       "in halves (rotate_half)")
        return out

    def notes(self, model_cfg: ModelConfig) -> List[str]:
        padded = model_cfg.vocab_size - self.own().vocab_size
        if padded <= 0:
            return []
        return [f"the run's vocabulary is padded by {padded} rows (zeros from the conversion): their logits (0) take "
                f"part in the run's softmax and not in the reference's, a difference of about {padded} x "
                f"exp(-logsumexp) per token"]

    def _same_position(self, position: PositionEmbeddingConfig) -> bool:
        return _effective(position) == _effective(position_from_hf(self.config))

    def describe(self, model_cfg: ModelConfig) -> str:
        position = model_cfg.position
        own = position_from_hf(self.config)
        if self._same_position(position):
            return f"transformers {self.config.get('architectures', ['?'])[0]} as saved ({own.describe()})"
        cls = "HarpeLlamaForCausalLM (megatron-harpe's HF class)" if position.kind == "harpe" \
            else "transformers LlamaForCausalLM"
        return f"its weights in {cls} with the run's {position.describe()} (saved: {own.describe()})"

    def load(self, model_cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
        """The reference model in eval mode on `device`."""
        try:
            if self._same_position(model_cfg.position):
                model = load_hf_causal_lm(self.directory, dtype=dtype, show_progress=self.show_progress)
            else:
                model = self._with_position(model_cfg, dtype)
        except (OSError, ValueError) as err:  # missing or unreadable weights: transformers' own message, named
            if isinstance(err, ConversionError):
                raise
            raise ConversionError(f"cannot load the Hugging Face model in {self.directory}: {err}") from None
        return model.to(device).eval()

    def _with_position(self, model_cfg: ModelConfig, dtype: torch.dtype):
        try:
            from transformers import LlamaConfig, LlamaForCausalLM
        except ImportError:
            raise ConversionError("the Hugging Face reference needs transformers: pip install 'megatron-harpe[hf]'") \
                from None
        position = model_cfg.position
        values = {k: v for k, v in self.config.items()
                  if k not in ("auto_map", "architectures", "harpe_bases", "model_type", "transformers_version")}
        values.update(rope_records(position))
        values["max_position_embeddings"] = model_cfg.max_position_embeddings
        if position.kind == "harpe":
            from megatron_harpe.convert.hf_modeling.configuration_harpe_llama import HarpeLlamaConfig
            from megatron_harpe.convert.hf_modeling.modeling_harpe_llama import HarpeLlamaForCausalLM

            config, cls = HarpeLlamaConfig(**values, harpe_bases=[float(b) for b in position.bases]), \
                HarpeLlamaForCausalLM
        else:
            config, cls = LlamaConfig(**values), LlamaForCausalLM
        with hf_progress(self.show_progress):
            try:  # transformers >= 4.56 calls it dtype; older versions torch_dtype
                return cls.from_pretrained(str(self.directory), config=config, dtype=dtype, local_files_only=True)
            except TypeError:
                return cls.from_pretrained(str(self.directory), config=config, torch_dtype=dtype,
                                           local_files_only=True)
