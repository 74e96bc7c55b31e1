"""Resumable result files: one JSON line per evaluated unit, appended as the sweep goes.

    store = ResultStore(out_dir / "results.jsonl", header={"kind": "niah", ...}, key_fields=("task", "length", "index"))
    todo = [u for u in units if not store.has(u)]
    store.append([{"task": ..., "length": ..., "index": ..., "score": ...}])   # flushed and fsynced

The first line is ``{"header": {...}}``: what decides a unit's result (model, tokenizer, dtype,
seed, haystack, generation budget, ...). A rerun with the same header continues where the last
one stopped (units already in the file are not evaluated again); a different header is refused
with the fields that differ, so results of different settings never mix (use another
``--output`` or ``--overwrite``). A last line cut short by a kill is dropped on reading.
Settings that only choose *which* units to run (lengths, tasks, number of samples) are not in
the header: a rerun with more lengths or samples adds to the file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from megatron_harpe.evaluation.errors import EvalError

__all__ = ["ResultStore"]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


class ResultStore:
    def __init__(self, path: str | Path, header: Dict[str, Any], key_fields: Sequence[str], *,
                 overwrite: bool = False):
        self.path = Path(path)
        self.header = _jsonable(header)
        self.key_fields = tuple(key_fields)
        self.records: Dict[Tuple, Dict[str, Any]] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite and self.path.exists():
            self.path.unlink()
        if self.path.exists() and self.path.stat().st_size > 0:
            self._load()
        else:
            with open(self.path, "w", encoding="utf-8") as f:
                f.write(json.dumps({"header": self.header}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.resumed = len(self.records)

    def key(self, unit: Dict[str, Any]) -> Tuple:
        return tuple(_key_part(unit[k]) for k in self.key_fields)

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        cut = data.rfind(b"\n") + 1          # bytes after the last newline: a line cut short by a kill
        lines = data[:cut].split(b"\n")[:-1]
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except ValueError:
                raise EvalError(f"{self.path}:{i + 1} is not valid JSON; the result file is damaged (remove that "
                                f"line, or start over with --overwrite)") from None
            if i == 0:
                if not isinstance(rec, dict) or "header" not in rec:
                    raise EvalError(f"{self.path} is not a harpe-eval result file (no header line); choose another "
                                    f"--output or pass --overwrite")
                self._check_header(rec["header"])
                continue
            try:
                self.records[self.key(rec)] = rec
            except (KeyError, TypeError):
                raise EvalError(f"{self.path}:{i + 1} lacks the fields {self.key_fields}; the result file is "
                                f"damaged or of another kind (--overwrite starts over)") from None
        if not lines:  # not even a complete header: start the file again
            with open(self.path, "w", encoding="utf-8") as f:
                f.write(json.dumps({"header": self.header}) + "\n")
        elif cut < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(cut)

    def _check_header(self, old: Dict[str, Any]) -> None:
        if old == self.header:
            return
        keys = sorted(set(old) | set(self.header))
        diffs = [f"{k}: {old.get(k)!r} -> {self.header.get(k)!r}" for k in keys if old.get(k) != self.header.get(k)]
        raise EvalError(f"{self.path} holds results of other settings ({'; '.join(diffs)}); use another --output "
                        f"or --overwrite to start over")

    def has(self, unit: Dict[str, Any]) -> bool:
        return self.key(unit) in self.records

    def get(self, unit: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        return self.records.get(self.key(unit))

    def append(self, records: Iterable[Dict[str, Any]]) -> None:
        records = [_jsonable(r) for r in records]
        if not records:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for rec in records:
            self.records[self.key(rec)] = rec

    def select(self, units: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """The stored records of ``units`` (those evaluated so far), in the units' order."""
        out = []
        for u in units:
            rec = self.get(u)
            if rec is not None:
                out.append(rec)
        return out


def _key_part(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, list):
        return tuple(value)
    return value
