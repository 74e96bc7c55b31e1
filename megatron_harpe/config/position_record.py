"""The position-encoding record stored with every checkpoint: written, read back and checked here only.

megatron-core drops RotaryEmbedding's `inv_freq` from checkpoints, so nothing in the weights says
which base(s) a model was trained with. A HARPE model resumed or converted with another base set
would load without error and silently compute different attention. So every torch_dist
checkpoint this project writes carries this record in its common state; resuming checks it, and
the exporter rebuilds the position encoding from it (not from whatever config is at hand).

The record holds exactly the settings that change the angles (per kind: the base or base set,
the PI factor, every YaRN setting) plus the head geometry; how a HARPE base set was made
(`base_set_origin`) travels along for people reading it, and is never compared.
"""
from __future__ import annotations

import math
from typing import Any, Dict

from megatron_harpe.config.model import ModelConfig, PositionEmbeddingConfig

RECORD_KEY = "megatron_harpe_position_embedding"
RECORD_VERSION = 2

#: The settings that decide the rotation angles, per kind (everything else is provenance).
EFFECTIVE_KEYS = {
    "rope": ("base",),
    "pi": ("base", "interpolation_factor"),
    "yarn": ("base", "yarn_factor", "yarn_original_max_position_embeddings", "yarn_beta_fast", "yarn_beta_slow"),
    "llama3": ("base", "llama3_factor", "llama3_low_freq_factor", "llama3_high_freq_factor",
               "llama3_original_max_position_embeddings"),
    "harpe": ("bases",),
}
_GEOMETRY_KEYS = ("head_dim", "num_query_groups", "rotary_percent", "rotary_interleaved")
_NOT_COMPARED = ("version", "base_set_origin")
_ORIGIN_KEYS = ("base_strategy", "base_min", "base_max", "base_stride", "bases_file")


def position_record(model_cfg: ModelConfig) -> Dict[str, Any]:
    """The JSON-able record of how `model_cfg` encodes positions."""
    position = model_cfg.position
    record: Dict[str, Any] = {"version": RECORD_VERSION, "kind": position.kind, "head_dim": model_cfg.head_dim,
                              "num_query_groups": model_cfg.groups, "rotary_percent": model_cfg.rotary_percent,
                              "rotary_interleaved": model_cfg.rotary_interleaved}
    for key in EFFECTIVE_KEYS[position.kind]:
        value = getattr(position, key)
        record[key] = [float(b) for b in value] if key == "bases" else value
    if position.kind == "harpe" and position.base_strategy is not None:
        record["base_set_origin"] = {k: getattr(position, k) for k in _ORIGIN_KEYS if getattr(position, k) is not None}
    return record


def position_from_record(record: Dict[str, Any]) -> PositionEmbeddingConfig:
    """The PositionEmbeddingConfig a record describes (records of version 1 lack the YaRN betas:
    they were always the defaults then)."""
    kind = record["kind"]
    if kind not in EFFECTIVE_KEYS:
        raise ValueError(f"position record has unknown kind {kind!r}")
    settings = {key: record[key] for key in EFFECTIVE_KEYS[kind] if key in record}
    return PositionEmbeddingConfig(kind=kind, **settings)


def verify_position_record(saved: Dict[str, Any], current: Dict[str, Any], where: str = "checkpoint") -> None:
    """Raise if a checkpoint's position encoding differs from the configured one.

    A deliberate change (continual pretraining that switches a rope model to HARPE, or the next
    stage of multi-stage ABF) loads weights only (`init_from`), which does not call this check.
    """
    saved, current = _comparable(saved), _comparable(current)
    differences = [f"{key}: {where} has {saved.get(key)!r}, config has {current.get(key)!r}"
                   for key in sorted(set(saved) | set(current)) if not _same(saved.get(key), current.get(key))]
    if differences:
        raise ValueError(f"position encoding of the {where} does not match the config:\n  " + "\n  ".join(differences)
                         + "\nResume with the same position settings, or start a new run from these weights "
                           "with training.init_from (weights only).")


def _comparable(record: Dict[str, Any]) -> Dict[str, Any]:
    out = {k: v for k, v in record.items() if k not in _NOT_COMPARED}
    if record.get("version", 1) == 1 and out.get("kind") == "yarn":
        defaults = PositionEmbeddingConfig.__dataclass_fields__
        out.setdefault("yarn_beta_fast", defaults["yarn_beta_fast"].default)
        out.setdefault("yarn_beta_slow", defaults["yarn_beta_slow"].default)
    return out


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b


__all__ = ["RECORD_KEY", "position_record", "position_from_record", "verify_position_record", "EFFECTIVE_KEYS"]
