"""Hugging Face Llama `config.json` <-> this project's ModelConfig (architecture + position encoding).

Reading accepts both ways transformers has written RoPE settings:
- legacy (transformers 4): `rope_theta` and `rope_scaling` ({"type"|"rope_type": ..., "factor": ...});
- transformers 5: `rope_parameters` ({"rope_type": ..., "rope_theta": ..., "factor": ...}).
When both are present transformers 5 uses `rope_scaling` first; so do we, and we refuse a file
whose two records disagree.

Writing produces both records (so old and new loaders build the same model): plain RoPE/ABF,
PI and YaRN become stock `LlamaForCausalLM` configs; HARPE becomes a `harpe_llama` config
whose `auto_map` points at the modeling files shipped beside the weights (hf_modeling/).

Pure Python (no torch, no transformers): the architecture checks run before anything heavy.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Dict, Optional

from megatron_harpe.convert.errors import ConversionError
from megatron_harpe.config.model import ModelConfig, PositionEmbeddingConfig

#: model_type -> the class a HF checkpoint of that type is built with
SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "harpe_llama": "HarpeLlamaForCausalLM"}
HARPE_AUTO_MAP = {
    "AutoConfig": "configuration_harpe_llama.HarpeLlamaConfig",
    "AutoModel": "modeling_harpe_llama.HarpeLlamaModel",
    "AutoModelForCausalLM": "modeling_harpe_llama.HarpeLlamaForCausalLM",
}


def read_hf_config(directory: str | Path) -> Dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{directory} has no config.json; pass --hf-dir the directory of a Hugging Face "
                              f"checkpoint (config.json + *.safetensors)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from None


# ----------------------------------------------------------------------------- RoPE settings
def hf_rope_settings(hf: Dict[str, Any]) -> Dict[str, Any]:
    """{"rope_type", "rope_theta", ...scaling keys} from whichever record(s) config.json has."""
    legacy = hf.get("rope_scaling") or None
    modern = hf.get("rope_parameters") or None
    for name, record in (("rope_scaling", legacy), ("rope_parameters", modern)):
        if record is not None and not isinstance(record, dict):
            raise ConversionError(f"config.json: {name} must be a mapping, got {record!r}")
        if record and any(isinstance(v, dict) for v in record.values()):
            raise ConversionError(f"config.json: {name} is nested per layer type ({sorted(record)}); Llama models "
                                  f"have one RoPE setting for all layers")

    def kind(record):
        return (record or {}).get("rope_type") or (record or {}).get("type") or "default"

    if legacy and modern:
        keys = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")
        if kind(legacy) != kind(modern) or any(
                k in legacy and k in modern and legacy[k] != modern[k] for k in keys):
            raise ConversionError(f"config.json's rope_scaling {legacy} and rope_parameters {modern} disagree; "
                                  f"remove the stale one")
    rope = dict(modern or {})
    rope.update(legacy or {})
    rope.pop("type", None)
    rope["rope_type"] = kind(legacy or modern)
    theta = rope.get("rope_theta", (modern or {}).get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope["rope_theta"] = float(theta)
    return rope


def _yarn_default_attention_factor(factor: float) -> float:
    return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0


def position_from_hf(hf: Dict[str, Any]) -> PositionEmbeddingConfig:
    """The position encoding a HF checkpoint was trained with, as our PositionEmbeddingConfig."""
    rope = hf_rope_settings(hf)
    if hf.get("model_type") == "harpe_llama":
        bases = hf.get("harpe_bases")
        if not bases:
            raise ConversionError("config.json: model_type harpe_llama without harpe_bases")
        return PositionEmbeddingConfig(kind="harpe", bases=[float(b) for b in bases])
    rope_type, base = rope["rope_type"], rope["rope_theta"]
    if rope.get("partial_rotary_factor", 1.0) != 1.0 or hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError("config.json: partial_rotary_factor != 1 is not a Llama layout this converter supports")
    if rope_type == "default":
        return PositionEmbeddingConfig(kind="rope", base=base)
    if rope_type == "linear":
        return PositionEmbeddingConfig(kind="pi", base=base, interpolation_factor=float(rope["factor"]))
    if rope_type == "yarn":
        factor = float(rope["factor"])
        original = rope.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
        if not original:
            raise ConversionError("config.json: yarn RoPE without original_max_position_embeddings")
        attention_factor = rope.get("attention_factor")
        if attention_factor is not None and not math.isclose(attention_factor,
                                                             _yarn_default_attention_factor(factor)):
            raise ConversionError(f"config.json: yarn attention_factor {attention_factor} differs from YaRN's default "
                                  f"0.1*ln(factor)+1; megatron-core's YaRN cannot represent it")
        if rope.get("mscale") or rope.get("mscale_all_dim") or rope.get("truncate", True) is False:
            raise ConversionError("config.json: yarn with mscale/mscale_all_dim/truncate=false (DeepSeek-style) is "
                                  "not supported; choose the position encoding with --position-kind")
        return PositionEmbeddingConfig(kind="yarn", base=base, yarn_factor=factor,
                                       yarn_original_max_position_embeddings=int(original),
                                       yarn_beta_fast=float(rope.get("beta_fast") or 32.0),
                                       yarn_beta_slow=float(rope.get("beta_slow") or 1.0))
    if rope_type == "llama3":
        original = rope.get("original_max_position_embeddings")
        if not original:
            raise ConversionError("config.json: llama3 RoPE scaling without original_max_position_embeddings")
        return PositionEmbeddingConfig(kind="llama3", base=base, llama3_factor=float(rope["factor"]),
                                       llama3_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                                       llama3_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                                       llama3_original_max_position_embeddings=int(original))
    raise ConversionError(
        f"config.json: RoPE type {rope_type!r} has no equivalent among this project's position encodings "
        f"(rope/ABF, pi, yarn, llama3, harpe). Choose the encoding to continue training with, e.g. "
        f"--position-kind rope --rope-base {base:g} (or --position-kind harpe --base-strategy ...); the "
        f"weights convert unchanged.")


# ----------------------------------------------------------------------------- HF -> ModelConfig
def check_hf_architecture(hf: Dict[str, Any]) -> None:
    """Refuse what is not a Llama-family decoder this project's model can hold."""
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"unsupported architecture: model_type {model_type!r} (architectures {architectures}); harpe-convert "
            f"reads Llama-family checkpoints (model_type 'llama': Llama-2, Llama-3, CodeLlama, ...) and HARPE "
            f"exports ('harpe_llama')")
    unknown = [a for a in architectures if a not in SUPPORTED_MODEL_TYPES.values()]
    if unknown:
        raise ConversionError(f"unsupported architecture {unknown}: only causal LMs "
                              f"({', '.join(SUPPORTED_MODEL_TYPES.values())}) are converted")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act {hf.get('hidden_act')!r}: Llama's SwiGLU uses silu")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ConversionError(f"config.json has {flag}=true; the Llama layout converted here has no biases")
    heads, kv = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    if heads % kv:
        raise ConversionError(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})")


def model_config_from_hf(hf: Dict[str, Any], position: Optional[PositionEmbeddingConfig] = None,
                         max_position_embeddings: Optional[int] = None) -> ModelConfig:
    """ModelConfig of a HF Llama config; `position` replaces the checkpoint's own RoPE settings."""
    check_hf_architecture(hf)
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or hidden // heads)
    kv_channels = None if (hidden % heads == 0 and head_dim == hidden // heads) else head_dim
    try:
        return _model_config(hf, hidden, heads, kv_channels, position or position_from_hf(hf),
                             max_position_embeddings)
    except ValueError as err:
        if isinstance(err, ConversionError):
            raise
        raise ConversionError(f"config.json does not describe a model this project can hold: {err}") from None


def _model_config(hf, hidden, heads, kv_channels, position, max_position_embeddings) -> ModelConfig:
    return ModelConfig(
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        kv_channels=kv_channels,
        vocab_size=int(hf["vocab_size"]),
        max_position_embeddings=int(max_position_embeddings or hf.get("max_position_embeddings") or 4096),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        position=position,
    )


# ----------------------------------------------------------------------------- ModelConfig -> HF
def check_exportable(model_cfg: ModelConfig) -> None:
    if model_cfg.rotary_percent != 1.0:
        raise ConversionError(f"rotary_percent={model_cfg.rotary_percent}: Hugging Face Llama rotates whole heads")
    if model_cfg.rotary_interleaved:
        raise ConversionError("rotary_interleaved=True: Hugging Face Llama rotates half-split pairs (rotate_half); "
                              "this model's q/k rows are in the interleaved order and cannot be exported as Llama")


def rope_records(position: PositionEmbeddingConfig) -> Dict[str, Any]:
    """rope_theta + rope_scaling (transformers 4) and rope_parameters (transformers 5), consistent."""
    if position.kind == "harpe":
        theta = float(position.bases[0])
        return {"rope_theta": theta, "rope_scaling": None,
                "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    theta = float(position.base)
    if position.kind == "rope":
        scaling = None
    elif position.kind == "pi":
        scaling = {"rope_type": "linear", "factor": float(position.interpolation_factor)}
    elif position.kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(position.yarn_factor),
                   "original_max_position_embeddings": int(position.yarn_original_max_position_embeddings),
                   "beta_fast": float(position.yarn_beta_fast), "beta_slow": float(position.yarn_beta_slow)}
    elif position.kind == "llama3":
        scaling = {"rope_type": "llama3", "factor": float(position.llama3_factor),
                   "low_freq_factor": float(position.llama3_low_freq_factor),
                   "high_freq_factor": float(position.llama3_high_freq_factor),
                   "original_max_position_embeddings": int(position.llama3_original_max_position_embeddings)}
    else:
        raise ConversionError(f"position kind {position.kind!r} cannot be exported")
    legacy = None if scaling is None else {**scaling, "type": scaling["rope_type"]}
    modern = {"rope_type": "default", "rope_theta": theta} if scaling is None else {**scaling, "rope_theta": theta}
    return {"rope_theta": theta, "rope_scaling": legacy, "rope_parameters": modern}


def hf_config_dict(model_cfg: ModelConfig, *, vocab_size: int, dtype_name: str,
                   token_ids: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """config.json for a model: stock Llama, or HARPE Llama with auto_map."""
    check_exportable(model_cfg)
    position = model_cfg.position
    harpe = position.kind == "harpe"
    token_ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, **(token_ids or {})}
    config: Dict[str, Any] = {
        "architectures": ["HarpeLlamaForCausalLM" if harpe else "LlamaForCausalLM"],
        "model_type": "harpe_llama" if harpe else "llama",
        "vocab_size": int(vocab_size),
        "hidden_size": model_cfg.hidden_size,
        "intermediate_size": model_cfg.ffn_hidden_size,
        "num_hidden_layers": model_cfg.num_layers,
        "num_attention_heads": model_cfg.num_attention_heads,
        "num_key_value_heads": model_cfg.groups,
        "head_dim": model_cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model_cfg.max_position_embeddings,
        "rms_norm_eps": model_cfg.norm_epsilon,
        "initializer_range": model_cfg.init_method_std,
        "tie_word_embeddings": model_cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": dtype_name,  # transformers 4
        "dtype": dtype_name,  # transformers 5
        **token_ids,
        **rope_records(position),
    }
    if harpe:
        config["harpe_bases"] = [float(b) for b in position.bases]
        config["auto_map"] = dict(HARPE_AUTO_MAP)
    try:
        import transformers

        config["transformers_version"] = transformers.__version__
    except ImportError:
        pass
    return config
