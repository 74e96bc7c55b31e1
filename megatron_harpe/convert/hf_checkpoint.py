"""Reading and writing Hugging Face weight files, one tensor at a time.

Reading: `model.safetensors`, sharded `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json`, and the older `pytorch_model*.bin` (+ index). A safetensors
tensor is read with plain file reads into memory of its own (`SafetensorsFile`), not through a
memory map: pages of a mapped file that were read stay resident (they count in the process's
RSS, and against a job's memory limit) until the whole file is unmapped, so reading a 7B model
through mmap looks like holding all of it. `.bin` files are read one file at a time (torch.load
with mmap).

Writing (`write_safetensors`): safetensors shards of at most `max_shard_size` bytes, with the
index transformers expects when there is more than one shard. Given the tensors' names and
shapes in advance (`layout`), each shard's header is written first and every tensor is written
into its place the moment it arrives, so nothing but the tensor at hand is held, whatever the
shard size; without a layout a shard is gathered in memory first. Both are done here (the format
is an 8-byte header length, a JSON header, the raw little-endian data), not with the safetensors
package: its safe_open memory-maps, and its save_file makes a second in-memory copy of a shard.
"""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import BinaryIO, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from megatron_harpe.convert.errors import ConversionError
from megatron_harpe.files import default_permissions

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

#: safetensors dtype names <-> torch dtypes (the ones a checkpoint of ours can hold)
SAFE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool}
SAFE_NAMES = {dtype: name for name, dtype in SAFE_DTYPES.items()}
_HEADER_LIMIT = 100_000_000  # safetensors' own limit on the JSON header


class SafetensorsFile:
    """One safetensors file: its header parsed once, each tensor read on request into its own memory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(8)
                size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                if not 0 < size <= _HEADER_LIMIT:
                    raise ValueError("no safetensors header")
                header = json.loads(f.read(size))
        except (OSError, ValueError, struct.error) as err:
            raise ConversionError(f"{self.path} is not a readable safetensors file ({err}); re-download it") from None
        self.data_start = 8 + size
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: Dict[str, dict] = header
        self._file: Optional[BinaryIO] = None

    def keys(self) -> List[str]:
        return list(self.entries)

    def _entry(self, name: str) -> dict:
        entry = self.entries[name]
        if entry["dtype"] not in SAFE_DTYPES:
            raise ConversionError(f"{self.path}: tensor {name} has dtype {entry['dtype']}, which this converter does "
                                  f"not read (expected one of {sorted(SAFE_DTYPES)})")
        return entry

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return SAFE_DTYPES[self._entry(name)["dtype"]]

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self._entry(name)
        begin, end = entry["data_offsets"]
        dtype, shape = SAFE_DTYPES[entry["dtype"]], tuple(entry["shape"])
        raw = torch.empty(end - begin, dtype=torch.uint8)
        if self._file is None:
            self._file = open(self.path, "rb")
        self._file.seek(self.data_start + begin)
        view, done = memoryview(raw.numpy()), 0
        while done < len(view):
            n = self._file.readinto(view[done:])
            if not n:
                raise ConversionError(f"{self.path} is cut short (tensor {name}); re-download it")
            done += n
        tensor = raw.view(dtype) if raw.numel() else torch.empty(0, dtype=dtype)
        if tensor.numel() != _numel(shape):
            raise ConversionError(f"{self.path}: tensor {name} has {end - begin} bytes, not what shape {list(shape)} "
                                  f"{entry['dtype']} needs")
        return tensor.reshape(shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class HFCheckpoint:
    """The weights of a HF checkpoint directory, by tensor name, read lazily (one tensor at a time)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ConversionError(f"--hf-dir {directory} is not a directory")
        self._safe: Dict[str, SafetensorsFile] = {}
        self._bin: Dict[str, object] = {}
        self.weight_map: Dict[str, str] = self._find_weights()
        self.files = sorted(set(self.weight_map.values()))

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
            return {name: SAFE_SINGLE for name in self._safetensors(SAFE_SINGLE).keys()}
        if (d / BIN_SINGLE).is_file():
            return {name: BIN_SINGLE for name in self._load_bin(BIN_SINGLE)}
        raise ConversionError(f"{d} has no weights: expected {SAFE_SINGLE}, {SAFE_INDEX} (sharded), {BIN_SINGLE} or "
                              f"{BIN_INDEX}")

    def _safetensors(self, filename: str) -> SafetensorsFile:
        if filename not in self._safe:
            self._safe[filename] = SafetensorsFile(self.directory / filename)
        return self._safe[filename]

    def _load_bin(self, filename: str):
        if filename not in self._bin:
            self._bin.clear()  # one .bin file in memory at a time
            self._bin[filename] = torch.load(self.directory / filename, map_location="cpu", weights_only=True,
                                             mmap=True)
        return self._bin[filename]

    def names(self) -> List[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _file_of(self, name: str) -> str:
        if name not in self.weight_map:
            raise ConversionError(f"{self.directory} lacks tensor {name!r}; is it a Llama checkpoint?")
        return self.weight_map[name]

    def _safe_entry(self, name: str) -> SafetensorsFile:
        safe = self._safetensors(self._file_of(name))
        if name not in safe.entries:
            raise ConversionError(f"{self.directory}: the index puts {name} in {safe.path.name}, which lacks it")
        return safe

    def get(self, name: str) -> torch.Tensor:
        filename = self._file_of(name)
        if filename.endswith(".safetensors"):
            return self._safe_entry(name).get_tensor(name)
        return self._load_bin(filename)[name]

    def shape(self, name: str) -> Tuple[int, ...]:
        """A tensor's shape, without reading it (from the safetensors header)."""
        filename = self._file_of(name)
        if filename.endswith(".safetensors"):
            return self._safe_entry(name).shape(name)
        return tuple(self._load_bin(filename)[name].shape)

    def tensor_dtype(self, name: str) -> torch.dtype:
        filename = self._file_of(name)
        if filename.endswith(".safetensors"):
            return self._safe_entry(name).dtype(name)
        return self._load_bin(filename)[name].dtype

    def dtype(self) -> torch.dtype:
        for name in self.weight_map:
            if name.endswith("embed_tokens.weight"):
                return self.tensor_dtype(name)
        return self.tensor_dtype(next(iter(self.weight_map)))

    def close(self) -> None:
        for safe in self._safe.values():
            safe.close()
        self._bin.clear()


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


#: (name, shape, dtype) of one tensor as it will be written
TensorSpec = Tuple[str, Sequence[int], torch.dtype]


class _ShardWriter:
    """One safetensors file whose header is written first; tensors then go in, in header order."""

    def __init__(self, path: Path, specs: Sequence[TensorSpec]):
        header: Dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in specs:
            if dtype not in SAFE_NAMES:
                raise ConversionError(f"cannot write {name} as {dtype} in safetensors")
            size = _numel(shape) * _itemsize(dtype)
            header[name] = {"dtype": SAFE_NAMES[dtype], "shape": [int(d) for d in shape],
                            "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes (aligned tensor data)
        self.path, self.specs, self.next = path, list(specs), 0
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(blob)))
        self.file.write(blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, shape, dtype = self.specs[self.next]
        if (name, tuple(tensor.shape), tensor.dtype) != (expected, tuple(shape), dtype):
            raise ConversionError(f"internal: {self.path.name} expected {expected} {tuple(shape)} {dtype} next, got "
                                  f"{name} {tuple(tensor.shape)} {tensor.dtype}")
        if tensor.numel():
            self.file.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        self.next += 1

    def close(self) -> None:
        complete = self.next == len(self.specs)
        self.file.close()
        if not complete:
            raise ConversionError(f"internal: {self.path.name} got {self.next} of its {len(self.specs)} tensors")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def plan_shards(specs: Iterable[TensorSpec], max_shard_size: int) -> List[List[TensorSpec]]:
    """Tensors in order, a new shard whenever the next one would take the current past `max_shard_size`."""
    shards: List[List[TensorSpec]] = []
    current: List[TensorSpec] = []
    current_bytes = 0
    for spec in specs:
        size = _numel(spec[1]) * _itemsize(spec[2])
        if current and current_bytes + size > max_shard_size:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(spec)
        current_bytes += size
    if current:
        shards.append(current)
    return shards


def write_safetensors(tensors: Iterable[Tuple[str, torch.Tensor]], directory: Path, max_shard_size: int,
                      dtype: Optional[torch.dtype] = None,
                      layout: Optional[Sequence[TensorSpec]] = None) -> Dict[str, int]:
    """Write (name, tensor) pairs as safetensors shards; returns {"shards", "tensors", "parameters", "bytes"}.

    `dtype`: convert every tensor to it. `layout`: the (name, shape, dtype-as-written) of every
    tensor that `tensors` yields, in order; with it each tensor is written the moment it arrives
    (memory: one tensor), without it a shard is gathered in memory before it is written.
    """
    directory = Path(directory)

    def temp(i: int) -> Path:
        return directory / f".shard-{i:05d}.safetensors"

    names_written: List[Tuple[str, int]] = []
    total_bytes = parameters = 0

    def prepared(tensor, want=None):
        return tensor.detach().to("cpu", dtype=want or dtype or tensor.dtype).contiguous()

    if layout is not None:
        shards = plan_shards(layout, max_shard_size)
        pending = iter([(i, spec) for i, shard in enumerate(shards) for spec in shard])
        writer: Optional[_ShardWriter] = None
        try:
            for name, tensor in tensors:
                step = next(pending, None)
                if step is None:
                    raise ConversionError(f"internal: {name} is not in the planned layout")
                shard, spec = step
                if writer is None or writer.path != temp(shard):
                    if writer is not None:
                        writer.close()
                    writer = _ShardWriter(temp(shard), shards[shard])
                tensor = prepared(tensor, spec[2])
                writer.write(name, tensor)
                names_written.append((name, shard))
                total_bytes += tensor.numel() * tensor.element_size()
                parameters += tensor.numel()
                del tensor
            if next(pending, None) is not None:
                raise ConversionError(f"internal: {len(names_written)} tensors arrived, the layout plans {len(layout)}")
            if writer is not None:
                writer.close()
        finally:
            if writer is not None and not writer.file.closed:
                writer.file.close()
        count = len(shards)
    else:
        count = 0
        current: List[Tuple[str, torch.Tensor]] = []
        current_bytes = 0

        def flush():
            nonlocal current, current_bytes, count
            if current:
                writer = _ShardWriter(temp(count), [(n, tuple(t.shape), t.dtype) for n, t in current])
                for n, t in current:
                    writer.write(n, t)
                writer.close()
                count += 1
                current, current_bytes = [], 0

        for name, tensor in tensors:
            tensor = prepared(tensor)
            size = tensor.numel() * tensor.element_size()
            if current and current_bytes + size > max_shard_size:
                flush()
            current.append((name, tensor))
            current_bytes += size
            total_bytes += size
            parameters += tensor.numel()
            names_written.append((name, count))
        flush()
    names = ([SAFE_SINGLE] if count == 1 else
             [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
    for i, final in enumerate(names):
        os.replace(temp(i), directory / final)
        default_permissions(directory / final)  # a shared export is read by the team
    if count > 1:
        index = {"metadata": {"total_size": total_bytes},
                 "weight_map": {name: names[i] for name, i in names_written}}
        (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return {"shards": count, "tensors": len(names_written), "parameters": parameters, "bytes": total_bytes}
