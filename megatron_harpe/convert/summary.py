"""What a conversion did, as one line, and the staging helpers both directions share."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from megatron_harpe.convert.errors import ConversionError


@dataclass
class ConversionSummary:
    direction: str  # "hf-to-megatron" | "megatron-to-hf"
    source: str
    destination: str
    parameters: int = 0
    tensors: int = 0
    shards: int = 0
    seconds: float = 0.0
    dtype: str = ""
    position: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        text = (f"harpe-convert {self.direction}: {self.parameters / 1e6:.2f}M parameters in {self.tensors} tensors, "
                f"{self.shards} shard(s), {self.dtype}, {self.position} | {self.source} -> {self.destination} | "
                f"{self.seconds:.1f} s")
        for key, value in self.extra.items():
            text += f" | {key}: {value}"
        return text


def position_summary(position) -> str:
    if position.kind == "harpe":
        bases = position.bases or []
        shown = ", ".join(f"{b:g}" for b in bases[:4]) + (", ..." if len(bases) > 4 else "")
        return f"HARPE {len(bases)} bases [{shown}]"
    if position.kind == "pi":
        return f"RoPE base {position.base:g} + PI x{position.interpolation_factor:g}"
    if position.kind == "yarn":
        return f"YaRN base {position.base:g} x{position.yarn_factor:g}"
    return f"RoPE base {position.base:g}"


def staging_dir(final: Path, overwrite: bool) -> Path:
    """A fresh sibling directory to write into, renamed to `final` by `publish`."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise ConversionError(f"{final} already exists; pass --overwrite to replace it, or choose another directory")
    if final.exists() and not final.is_dir():
        raise ConversionError(f"{final} exists and is not a directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.incomplete"
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def publish(staging: Path, final: Path) -> None:
    """Replace `final` by the finished `staging` directory (an interrupted run leaves `final` untouched)."""
    if final.exists():
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(final)


def progress(iterable, total: Optional[int], desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="tensor", leave=False, dynamic_ncols=True)
