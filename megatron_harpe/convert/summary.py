"""What a conversion did, as one line, and where both directions stage their output."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from megatron_harpe.convert.errors import ConversionError
from megatron_harpe.files import staging_path


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
    warnings: List[str] = field(default_factory=list)  # harpe-convert prints each on stderr; nothing failed

    def line(self) -> str:
        text = (f"harpe-convert {self.direction}: {self.parameters / 1e6:.2f}M parameters in {self.tensors} tensors, "
                f"{self.shards} shard(s), {self.dtype}, {self.position} | {self.source} -> {self.destination} | "
                f"{self.seconds:.1f} s")
        for key, value in self.extra.items():
            text += f" | {key}: {value}"
        return text


def staging_dir(final: Path, overwrite: bool) -> Path:
    """A fresh staging directory for `final` (files.publish renames it into place when complete)."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise ConversionError(f"{final} already exists; pass --overwrite to replace it, or choose another directory")
    if final.exists() and not final.is_dir():
        raise ConversionError(f"{final} exists and is not a directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(final)
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def progress(iterable, total: Optional[int], desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="tensor", leave=False, dynamic_ncols=True)
