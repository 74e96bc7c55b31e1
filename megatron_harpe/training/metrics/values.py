"""Plain Python values for the writers: JSON and TensorBoard take neither numpy nor torch scalars."""
from __future__ import annotations

from typing import Any

__all__ = ["to_plain", "is_number"]


def to_plain(value: Any) -> Any:
    """Python scalars for JSON: unwrap numpy/torch 0-d values, recurse into containers."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except Exception:
            pass
    return str(value)


def is_number(value: Any) -> bool:
    """True for ints and floats; False for bools, which are ints to Python but flags to a reader."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
