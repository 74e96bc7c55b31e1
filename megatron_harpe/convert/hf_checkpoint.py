"""Reading and writing Hugging Face weight files.

Reading: `model.safetensors`, sharded `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json`, and the older `pytorch_model*.bin` (+ index). Tensors are read
one at a time (safetensors memory-maps), so converting a 7B model never holds two copies of
it. Writing: safetensors shards of at most `max_shard_size` bytes, with the index transformers
expects when there is more than one shard.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from megatron_harpe.convert.errors import ConversionError
from megatron_harpe.files import default_permissions

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


def _require_safetensors():
    if importlib.util.find_spec("safetensors") is None:
        raise ConversionError("reading/writing Hugging Face checkpoints needs safetensors: "
                              "pip install 'megatron-harpe[hf]'")


class HFCheckpoint:
    """The weights of a HF checkpoint directory, by tensor name, read lazily."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ConversionError(f"--hf-dir {directory} is not a directory")
        self.weight_map: Dict[str, str] = self._find_weights()
        self.files = sorted(set(self.weight_map.values()))
        self._open: Dict[str, object] = {}

    def _find_weights(self) -> Dict[str, str]:
        d = self.directory
        for index_name in (SAFE_INDEX, BIN_INDEX):
            if (d / index_name).is_file():
                index = json.loads((d / index_name).read_text())
                weight_map = index.get("weight_map") or {}
                missing = sorted({f for f in weight_map.values() if not (d / f).is_file()})
                if missing:
                    raise ConversionError(f"{d / index_name} names shard(s) that are not there: {missing}")
                return dict(weight_map)
        if (d / SAFE_SINGLE).is_file():
            _require_safetensors()
            from safetensors import safe_open

            with safe_open(str(d / SAFE_SINGLE), framework="pt") as f:
                return {name: SAFE_SINGLE for name in f.keys()}
        if (d / BIN_SINGLE).is_file():
            return {name: BIN_SINGLE for name in self._load_bin(BIN_SINGLE)}
        raise ConversionError(f"{d} has no weights: expected {SAFE_SINGLE}, {SAFE_INDEX} (sharded), {BIN_SINGLE} or "
                              f"{BIN_INDEX}")

    def _load_bin(self, filename: str):
        if filename not in self._open:
            self._open.clear()  # one .bin file in memory at a time
            self._open[filename] = torch.load(self.directory / filename, map_location="cpu", weights_only=True,
                                              mmap=True)
        return self._open[filename]

    def names(self) -> List[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ConversionError(f"{self.directory} lacks tensor {name!r}; is it a Llama checkpoint?")
        filename = self.weight_map[name]
        if filename.endswith(".safetensors"):
            if filename not in self._open:
                _require_safetensors()
                from safetensors import safe_open

                self._open[filename] = safe_open(str(self.directory / filename), framework="pt")
            return self._open[filename].get_tensor(name)
        return self._load_bin(filename)[name]

    def dtype(self) -> torch.dtype:
        for name in self.weight_map:
            if name.endswith("embed_tokens.weight"):
                return self.get(name).dtype
        return self.get(next(iter(self.weight_map))).dtype

    def close(self) -> None:
        self._open.clear()


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 bytes (transformers' convention: KB/MB/GB are powers of 10)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ConversionError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def write_safetensors(tensors: Iterable[Tuple[str, torch.Tensor]], directory: Path, max_shard_size: int,
                      dtype: Optional[torch.dtype] = None) -> Dict[str, int]:
    """Write (name, tensor) pairs as safetensors shards; returns {"shards", "tensors", "parameters", "bytes"}."""
    _require_safetensors()
    from safetensors.torch import save_file

    directory = Path(directory)
    shards: List[List[str]] = []
    current: Dict[str, torch.Tensor] = {}
    current_bytes = total_bytes = parameters = 0
    weight_map: Dict[str, int] = {}

    def flush():
        nonlocal current, current_bytes
        if current:
            save_file(current, str(directory / f".shard-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            shards.append(list(current))
            current, current_bytes = {}, 0

    for name, tensor in tensors:
        # own storage per tensor: safetensors refuses views of one buffer (e.g. q/k/v of a fused QKV)
        tensor = tensor.detach().to("cpu", dtype=dtype or tensor.dtype).contiguous().clone()
        size = tensor.numel() * tensor.element_size()
        if current and current_bytes + size > max_shard_size:
            flush()
        current[name] = tensor
        current_bytes += size
        total_bytes += size
        parameters += tensor.numel()
        weight_map[name] = len(shards)
    flush()
    names = ([SAFE_SINGLE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for i, final in enumerate(names):
        os.replace(directory / f".shard-{i:05d}.safetensors", directory / final)
        default_permissions(directory / final)  # save_file writes 0600: a shared export is read by the team
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_bytes},
                 "weight_map": {name: names[i] for name, i in weight_map.items()}}
        (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return {"shards": len(shards), "tensors": len(weight_map), "parameters": parameters, "bytes": total_bytes}
