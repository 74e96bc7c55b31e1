"""The evaluations as functions (the CLI and the demo call these): each writes into ``out_dir``

    results.jsonl   one line per evaluated unit (resumable; see results.py)
    summary.json    the numbers, the settings and the model's description
    table.md        the markdown tables
    heatmap.png     needle / passkey: the depth x length grid

and returns ``(summary, markdown, stats)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from megatron_harpe.evaluation.errors import EvalError
from megatron_harpe.evaluation.model import LoadedModel
from megatron_harpe.evaluation.report import (grid_markdown, grid_summary, niah_markdown, niah_summary, plot_heatmap,
                                              ppl_markdown, write_json)
from megatron_harpe.evaluation.results import ResultStore
from megatron_harpe.evaluation.runner import run_generation
from megatron_harpe.evaluation.tasks import (NIAH_TASKS, PASSKEY_MAX_NEW_TOKENS, needle_sample, niah_sample,
                                             passkey_sample)

__all__ = ["run_niah", "run_grid", "run_ppl", "FORMAT"]

FORMAT = 1   # bump when prompts/templates change: old result files are then refused, not mixed


def _identity(lm: LoadedModel) -> dict:
    return lm.describe()


def _haystack_id(haystack: Optional[str], text_key: str) -> str:
    import os

    if not haystack:
        return "per task"
    if haystack in ("essay", "repeat"):
        return haystack
    return f"{os.path.abspath(haystack)} ({text_key})"


def _check_lengths(lengths: Sequence[int]) -> List[int]:
    lengths = [int(L) for L in lengths]
    if not lengths:
        raise EvalError("--lengths is empty")
    bad = [L for L in lengths if L < 16]
    if bad:
        raise EvalError(f"--lengths {bad}: lengths are token counts and must be at least 16")
    return sorted(dict.fromkeys(lengths))


def _finish(out_dir: Path, summary: dict, markdown: str) -> None:
    write_json(out_dir / "summary.json", summary)
    (out_dir / "table.md").write_text(markdown)


def run_niah(lm: LoadedModel, out_dir: str | Path, *, tasks: Sequence[str], lengths: Sequence[int], samples: int = 25,
             seed: int = 0, haystack: Optional[str] = None, max_new_tokens: Optional[int] = None,
             text_key: str = "text", batch_size: Optional[int] = None, batch_tokens: Optional[int] = None,
             overwrite: bool = False, progress: bool = True, max_units: Optional[int] = None,
             name: str = "") -> Tuple[dict, str, object]:
    """The 8 RULER-style NiaH tasks at each length; per-task and per-length tables."""
    out_dir = Path(out_dir)
    lengths = _check_lengths(lengths)
    if samples < 1:
        raise EvalError("--samples must be >= 1")
    for t in tasks:
        if t not in NIAH_TASKS:
            raise EvalError(f"unknown task {t!r}; known tasks: {', '.join(NIAH_TASKS)}")
    lm.check_lengths(lengths, "niah")
    header = {"kind": "niah", "format": FORMAT, "seed": seed, "haystack": _haystack_id(haystack, text_key),
              "max_new_tokens": max_new_tokens, **_identity(lm)}
    store = ResultStore(out_dir / "results.jsonl", header, ("task", "length", "index"), overwrite=overwrite)
    # length-major order: a sweep stopped half-way has complete short lengths; batches share a length
    units = [{"task": t, "length": L, "index": i} for L in lengths for t in tasks for i in range(samples)]

    def make(unit):
        return niah_sample(unit["task"], unit["length"], unit["index"], lm.tokenizer, seed=seed, haystack=haystack,
                           max_new_tokens=max_new_tokens, text_key=text_key)

    for t in tasks:  # fail before any evaluation when the shortest length cannot hold a task's prompt
        make({"task": t, "length": lengths[0], "index": 0})
    stats = run_generation(lm, units, make, store, batch_size=batch_size, batch_tokens=batch_tokens,
                           progress=progress, max_units=max_units, desc="niah")
    summary = niah_summary(store.select(units), tasks, lengths)
    summary.update({"model": lm.source, "name": name or Path(lm.source).name, "seed": seed,
                    "samples_per_cell": samples, "haystack": haystack or "per task",
                    "tasks_spec": {t: NIAH_TASKS[t].describe() for t in tasks}, "model_info": _identity(lm),
                    "complete": not stats.stopped})
    title = f"### NiaH (RULER-style, string_match_all %) — {summary['name']}, {samples} samples per cell"
    markdown = niah_markdown(summary, title)
    _finish(out_dir, summary, markdown)
    return summary, markdown, stats


def run_grid(kind: str, lm: LoadedModel, out_dir: str | Path, *, lengths: Sequence[int], depths: Sequence[float],
             samples: int = 1, seed: int = 0, haystack: str = "essay", max_new_tokens: Optional[int] = None,
             text_key: str = "text", batch_size: Optional[int] = None, batch_tokens: Optional[int] = None,
             overwrite: bool = False, progress: bool = True, max_units: Optional[int] = None, name: str = "",
             heatmap: bool = True) -> Tuple[dict, str, object]:
    """``kind`` = needle (classic single needle) or passkey, over lengths x depths; tables and a heatmap."""
    if kind not in ("needle", "passkey"):
        raise ValueError(kind)
    out_dir = Path(out_dir)
    lengths = _check_lengths(lengths)
    depths = sorted(dict.fromkeys(round(float(d), 6) for d in depths))
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise EvalError(f"--depths must be percentages between 0 and 100, got {[100 * d for d in depths]}")
    if samples < 1:
        raise EvalError("--samples must be >= 1")
    gen = int(max_new_tokens or (PASSKEY_MAX_NEW_TOKENS if kind == "passkey" else 32))
    lm.check_lengths(lengths, kind)
    header = {"kind": kind, "format": FORMAT, "seed": seed, "max_new_tokens": gen, **_identity(lm)}
    if kind == "needle":
        header["haystack"] = _haystack_id(haystack, text_key)
    store = ResultStore(out_dir / "results.jsonl", header, ("length", "depth", "index"), overwrite=overwrite)
    units = [{"length": L, "depth": d, "index": i} for L in lengths for d in depths for i in range(samples)]

    def make(unit):
        if kind == "needle":
            return needle_sample(unit["length"], unit["depth"], unit["index"], lm.tokenizer, seed=seed,
                                 haystack=haystack, max_new_tokens=gen, text_key=text_key)
        return passkey_sample(unit["length"], unit["depth"], unit["index"], lm.tokenizer, seed=seed,
                              max_new_tokens=gen)

    make({"length": lengths[0], "depth": depths[0], "index": 0})  # fail early when the shortest length is too short
    stats = run_generation(lm, units, make, store, batch_size=batch_size, batch_tokens=batch_tokens,
                           progress=progress, max_units=max_units, desc=kind)
    summary = grid_summary(store.select(units), lengths, depths, kind)
    summary.update({"model": lm.source, "name": name or Path(lm.source).name, "seed": seed,
                    "samples_per_cell": samples, "max_new_tokens": gen, "model_info": _identity(lm),
                    "complete": not stats.stopped})
    if kind == "needle":
        summary["haystack"] = haystack
    label = "Needle in a haystack" if kind == "needle" else "Passkey retrieval"
    title = f"### {label} (% retrieved) — {summary['name']}, {samples} sample(s) per cell"
    markdown = grid_markdown(summary, title)
    if heatmap:
        path = plot_heatmap(summary, out_dir / "heatmap.png",
                            f"{label}: {summary['name']} (average {summary['average']:.1f})")
        summary["heatmap"] = str(path)
    _finish(out_dir, summary, markdown)
    return summary, markdown, stats


def run_ppl(lm: LoadedModel, out_dir: str | Path, *, data: Sequence[str], lengths: Sequence[int], window: int = 256,
            mode: str = "truncate", span: Optional[int] = None, num_docs: int = 10, text_key: str = "text",
            add_bos: bool = True, batch_size: Optional[int] = None, batch_tokens: Optional[int] = None,
            overwrite: bool = False, progress: bool = True, max_units: Optional[int] = None,
            name: str = "") -> Tuple[dict, str, dict]:
    """Sliding-window perplexity per length (see perplexity.py for the convention)."""
    import os

    from megatron_harpe.evaluation.perplexity import MODES, evaluate_perplexity, load_documents, ppl_summary

    out_dir = Path(out_dir)
    lengths = _check_lengths(lengths)
    if mode not in MODES:
        raise EvalError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    if window < 1:
        raise EvalError("--window must be >= 1")
    if num_docs < 1:
        raise EvalError("--num-docs must be >= 1")
    if mode == "sliding":
        span = int(span or max(lengths))
        if span < max(lengths):
            raise EvalError(f"--span {span} is shorter than the longest length {max(lengths)}")
        if window > min(lengths):
            raise EvalError(f"--window {window} is larger than the shortest length {min(lengths)}")
        needed = span
    else:
        span = None
        needed = max(lengths)
    lm.check_lengths(lengths, "ppl")
    vocab = lm.config.get("vocab_size")
    docs = load_documents(list(data), lm.tokenizer, needed, num_docs, text_key=text_key, add_bos=add_bos,
                          vocab_size=int(vocab) if vocab else None)
    settings = {"mode": mode, "window": window, "span": span, "num_docs": num_docs, "add_bos": add_bos,
                "data": [os.path.abspath(p) for p in data], "text_key": text_key}
    header = {"kind": "ppl", "format": FORMAT, **settings, **_identity(lm)}
    header.pop("num_docs")  # more documents later add to the file
    store = ResultStore(out_dir / "results.jsonl", header, ("length", "doc_id"), overwrite=overwrite)
    stats = evaluate_perplexity(lm, docs, lengths, store, window=window, mode=mode, span=span, batch_size=batch_size,
                                batch_tokens=batch_tokens, progress=progress, max_units=max_units)
    units = [{"length": L, "doc_id": d.doc_id} for L in lengths for d in docs]
    summary = ppl_summary(store.select(units), lengths, settings)
    if len(docs) < num_docs:
        summary["note"] = f"only {len(docs)} of the {num_docs} requested documents have {needed} tokens"
    summary.update({"model": lm.source, "name": name or Path(lm.source).name, "model_info": _identity(lm),
                    "complete": not stats["stopped"]})
    conv = (f"first L tokens of each document, one window of L (stride {window} unused)" if mode == "truncate" else
            f"context L, stride {window}, over the first {span} tokens")
    title = f"### Perplexity — {summary['name']}, {len(docs)} document(s), {mode}: {conv}"
    markdown = ppl_markdown(summary, title)
    if "note" in summary:
        markdown += f"\nNote: {summary['note']}.\n"
    _finish(out_dir, summary, markdown)
    return summary, markdown, stats
