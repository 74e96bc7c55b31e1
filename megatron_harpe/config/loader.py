"""YAML + dotted command-line overrides -> the typed Config, and back to YAML.

`harpe-train --config examples/x.yaml training.iterations=20 model.position.kind=harpe`
Values of overrides are parsed as YAML (numbers, booleans, lists: `model.position.bases=[1e4,1e6]`).
Unknown keys are errors that name the key and list the known ones; numbers written like 1e6
(which YAML reads as a string) are accepted for numeric fields. Each section is checked when it is
built (the dataclasses' __post_init__: a HARPE base set is resolved to its list then), so the
error names the section.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

import yaml

from megatron_harpe.cli import InputError
from megatron_harpe.config.model import ModelConfig
from megatron_harpe.config.schema import Config


class ConfigError(InputError):
    """A configuration problem, with the dotted key it concerns."""


#: Keys that existed once and were removed: a config that still sets one learns why.
REMOVED_KEYS = {
    "data.num_workers": "batches are read in the training process (megatron-core's mmap'd GPTDataset is not the "
                        "bottleneck); remove the key",
    "checkpoint.save_on_signal": "a run always checkpoints before stopping on one of checkpoint.exit_signals; "
                                 "set checkpoint.exit_signals=[] to not stop on signals",
    "training.stop_on_nonfinite_loss": "a non-finite loss or gradient never updates the weights now; choose what "
                                       "happens with training.on_nonfinite: stop (the default) or skip (at most "
                                       "training.max_skipped_iterations updates over the run)",
}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where) if len(inner) == 1 else value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}: {value!r}")
        return from_dict(annotation, value, where)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if annotation is float:
        try:
            return float(value) if not isinstance(value, bool) else _bad(where, "a number", value)
        except (TypeError, ValueError):
            _bad(where, "a number", value)
    if annotation is int:
        if isinstance(value, bool):
            _bad(where, "an integer", value)
        try:
            number = float(value)
        except (TypeError, ValueError):
            _bad(where, "an integer", value)
        if not number.is_integer():
            _bad(where, "an integer", value)
        return int(number)
    if annotation is str:
        if not isinstance(value, str):
            _bad(where, "a string", value)
        return value
    return value


def _bad(where: str, what: str, value: Any):
    raise ConfigError(f"{where} must be {what}, got {value!r}")


def from_dict(cls, data: Dict[str, Any], where: str = "config"):
    """Build dataclass `cls` from a mapping, rejecting unknown keys by their dotted name."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = "" if where == "config" else f"{where}."
    unknown = sorted(set(data) - set(names))
    for key in unknown:
        removed = REMOVED_KEYS.get(_without_index(prefix + key))
        if removed:
            raise ConfigError(f"{prefix}{key} was removed: {removed}")
    if unknown:
        raise ConfigError(f"unknown key(s): {', '.join(prefix + u for u in unknown)}; "
                          f"known keys under {where}: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], prefix + name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # a section's own check (__post_init__)
        raise ConfigError(_in_section(str(err), where, names)) from None


def _in_section(message: str, where: str, names: List[str]) -> str:
    """Make a section's message name its key in full: "position.base must..." raised while
    building `model.position` reads "model.position.base must..."."""
    if where == "config":
        return message
    parent, _, last = where.rpartition(".")
    if message.startswith(last + "."):
        return f"{parent + '.' if parent else ''}{message}"
    if any(message.startswith(name + ".") or message.startswith(name + " ") for name in names):
        return f"{where}.{message}"
    return f"{where}: {message}"


def _without_index(dotted: str) -> str:
    return re.sub(r"\[\d+\]", "", dotted)


def to_dict(cfg) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def model_config_from_dict(data: Dict[str, Any]) -> ModelConfig:
    """ModelConfig from a plain dict (a `model:` YAML section, a checkpoint's record), with the same
    unknown-key and type errors as harpe-train's config."""
    return from_dict(ModelConfig, dict(data), "model")


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply `a.b.c=value` strings to a nested dict (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return data


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply overrides, build the typed Config."""
    data: Dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; see examples/ for configs")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    data = apply_overrides(data, overrides)
    return from_dict(Config, data)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)

