"""``<run_dir>/metrics.jsonl``: one JSON object per line, the machine-readable history of a run.

Each line is flushed as written so a script can ``tail -f`` the file while the job runs. JSON has no
NaN or inf, and a strict reader (``jq``, most non-Python parsers) rejects Python's ``NaN`` token, so
non-finite values are written as ``null`` and the record gets ``"nonfinite": true`` and
``"nonfinite_keys": [...]``: the divergence stays visible instead of looking like a missing value.

**Resume.** The file is opened in append mode, so a resumed run continues it. On open, every record
whose ``iteration`` is greater than ``start_iteration`` (the iteration of the checkpoint being resumed)
is dropped, as is a torn last line: those came from an attempt that crashed after its last checkpoint,
and this run is about to redo those iterations, so keeping them would list those iterations twice.
Events carry an iteration for exactly this reason: an event logged after iteration 150 by a crashed
attempt goes too, one logged at or before the checkpoint stays. The file is rewritten (via a temporary
file and an atomic rename, so a crash during the rewrite cannot lose the kept history) only when
something is dropped. A fresh run (``start_iteration=0``) in an old run directory therefore starts an
empty history.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

from megatron_harpe.files import atomic_write_text
from megatron_harpe.training.metrics.values import is_number

__all__ = ["METRICS_FILENAME", "MetricsJsonl", "trim_for_resume"]

METRICS_FILENAME = "metrics.jsonl"


def trim_for_resume(path: str, start_iteration: int) -> int:
    """Apply the resume rule (module doc) to ``path``; return how many lines were dropped."""
    if not os.path.exists(path):
        return 0
    kept: list[str] = []
    dropped = 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            stripped = line.strip()
            if not stripped:
                continue
            try:
                record = json.loads(stripped)
            except json.JSONDecodeError:
                dropped += 1  # torn write of a crashed attempt
                continue
            it = record.get("iteration") if isinstance(record, dict) else None
            if is_number(it) and it > start_iteration:
                dropped += 1
                continue
            kept.append(stripped + "\n")
    if dropped:
        atomic_write_text(path, "".join(kept))
    return dropped


def _json_safe(record: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Replace non-finite floats by None; return the record and the (dotted/indexed) keys hit."""
    bad: list[str] = []

    def fix(key: str, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(key)
            return None
        if isinstance(value, dict):
            return {k: fix(f"{key}.{k}", v) for k, v in value.items()}
        if isinstance(value, list):
            return [fix(f"{key}[{i}]", v) for i, v in enumerate(value)]
        return value

    out = {k: fix(k, v) for k, v in record.items()}
    return out, bad


class MetricsJsonl:
    """The open ``metrics.jsonl`` of a run, already trimmed for resume (see the module doc)."""

    def __init__(self, path: str, start_iteration: int):
        self.path = path
        self.dropped_on_resume = trim_for_resume(path, start_iteration)
        self._fh = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """One line, flushed; values must already be plain Python (see ``values.to_plain``)."""
        safe, bad = _json_safe(record)
        if bad:
            safe["nonfinite"] = True
            safe["nonfinite_keys"] = bad
        self._fh.write(json.dumps(safe, allow_nan=False) + "\n")
        self._fh.flush()

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()
