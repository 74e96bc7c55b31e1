"""Position-encoding metadata stored with every checkpoint, and its check on load.

megatron-core drops RotaryEmbedding's `inv_freq` from checkpoints, so nothing in the weights
says which bases a model was trained with. A HARPE model resumed or converted with a
different base set would load without error and silently compute different attention. The
trainer and converters therefore store this record (in the checkpoint's common state) and
verify it on load.
"""
from __future__ import annotations

import math
from typing import Any, Dict

from megatron_harpe.models.config import ModelConfig

METADATA_KEY = "megatron_harpe_position_embedding"


def position_metadata(model: ModelConfig) -> Dict[str, Any]:
    """A JSON-able record of how this model encodes positions."""
    position = model.position
    record: Dict[str, Any] = {"kind": position.kind, "head_dim": model.head_dim,
                              "num_query_groups": model.groups, "rotary_percent": model.rotary_percent,
                              "rotary_interleaved": model.rotary_interleaved}
    if position.kind == "harpe":
        record["bases"] = position.resolve_bases(model.groups, model.head_dim)
    else:
        record["base"] = float(position.base)
    if position.kind == "pi":
        record["interpolation_factor"] = position.interpolation_factor
    if position.kind == "yarn":
        record["yarn_factor"] = position.yarn_factor
        record["yarn_original_max_position_embeddings"] = position.yarn_original_max_position_embeddings
    return record


def verify_position_metadata(saved: Dict[str, Any], current: Dict[str, Any], where: str = "checkpoint") -> None:
    """Raise if a checkpoint's position encoding differs from the configured one.

    A deliberate change (e.g. continual pretraining that switches a rope model to HARPE, or
    the next stage of multi-stage ABF) is expressed by loading weights only (`init_from`),
    which does not call this check.
    """
    differences = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if not _same(a, b):
            differences.append(f"{key}: {where} has {a!r}, config has {b!r}")
    if differences:
        raise ValueError(f"position encoding of the {where} does not match the config:\n  " + "\n  ".join(differences)
                         + "\nResume with the same position settings, or start a new run from these weights "
                           "with init_from (weights only).")


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b
