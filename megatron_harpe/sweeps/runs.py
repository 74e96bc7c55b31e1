"""What a run directory says, read without torch: metrics.jsonl records, the latest checkpoint, the sweep's
markers. Shared by the local runner (progress lines, skip/resume decisions) and the report.

The trainer's metrics.jsonl (megatron_harpe/training/metrics/jsonl.py) holds one JSON object per line:
training records (`iteration`, `loss`, `tokens_per_s`, `peak_memory_bytes`, ...; no `kind`), evaluation
records (`kind: "eval"`: `eval_loss`, `eval_perplexity`), probe records (`kind: "probe"`:
`probe_passkey_<L>_exact|_token_accuracy|_nll`) and events (`event`: a message). A resumed run has already
dropped the lines of the iterations it redoes; a line cut short by a kill is skipped here.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from megatron_harpe.files import atomic_write_text

METRICS = "metrics.jsonl"
LATEST = "latest"  # megatron_harpe.training.checkpointing.LATEST (read here without importing torch)
DONE_MARKER = ".sweep_done"  # the point is finished: trained (and evaluated, with --eval)
TRAINED_MARKER = ".sweep_trained"  # training finished (harpe-train exited 0)
EXPORTED_MARKER = ".sweep_exported"  # <run_dir>/hf was exported from this checkpoint
PROBE_KEY = re.compile(r"probe_passkey_(\d+)_(exact|token_accuracy|nll)$")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON objects of a file, one per line; lines that do not parse (a torn last line) are skipped."""
    out = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
    except FileNotFoundError:
        return []
    return out


def is_training(rec: dict) -> bool:
    return "kind" not in rec and "event" not in rec and "iteration" in rec and "loss" in rec


def training_records(records: list[dict]) -> list[dict]:
    """Training records, one per iteration (the last one wins should a file hold an iteration twice)."""
    by_iter = {int(r["iteration"]): r for r in records if is_training(r)}
    return [by_iter[i] for i in sorted(by_iter)]


def kind_records(records: list[dict], kind: str) -> list[dict]:
    by_iter = {int(r["iteration"]): r for r in records if r.get("kind") == kind and "iteration" in r}
    return [by_iter[i] for i in sorted(by_iter)]


def loss_range(records: list[dict]) -> tuple[float, float] | None:
    """(first, last) training loss of the run so far, or None."""
    losses = [r["loss"] for r in training_records(records) if isinstance(r.get("loss"), (int, float))]
    return (losses[0], losses[-1]) if losses else None


def latest_iteration(ckpt_dir: str | os.PathLike | None) -> int | None:
    """The iteration of <ckpt_dir>/latest (e.g. iter_0000400 -> 400), or None without a checkpoint."""
    if not ckpt_dir:
        return None
    try:
        name = (Path(ckpt_dir) / LATEST).read_text().strip()
    except OSError:
        return None
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else None


def latest_name(ckpt_dir: str | os.PathLike | None) -> str | None:
    try:
        return (Path(ckpt_dir) / LATEST).read_text().strip() if ckpt_dir else None
    except OSError:
        return None


def read_marker(path: str | os.PathLike) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def finished_event(records: list[dict]) -> bool:
    """The trainer logged its normal end ("finished N iterations | ...") as its last event."""
    events = [r.get("event", "") for r in records if "event" in r]
    return bool(events) and str(events[-1]).startswith("finished ")


__all__ = ["METRICS", "DONE_MARKER", "TRAINED_MARKER", "EXPORTED_MARKER", "PROBE_KEY", "read_jsonl", "is_training",
           "training_records", "kind_records", "loss_range", "latest_iteration", "latest_name", "read_marker",
           "write_marker", "finished_event"]
