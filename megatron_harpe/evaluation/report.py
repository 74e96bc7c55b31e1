"""Tables (markdown + JSON) and heatmaps from result records.

- NiaH: a task x length table with per-task averages and an "Average" row (the paper's Table 8
  for one model; its per-length Average row is Table 4's row for that model).
- Needle / passkey: a depth x length grid of scores, per-length and per-depth averages, and a
  heatmap PNG like the paper's Figure 2 (x: context length, y: needle depth, colour: score,
  red 0 -> green 100).
- Perplexity: per-length perplexities and their mean over the lengths.
- :func:`compare_table`: several runs' summary.json files side by side (methods as rows).
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from megatron_harpe.files import atomic_write_text
from megatron_harpe.evaluation.errors import EvalError

__all__ = ["fmt_length", "niah_summary", "niah_markdown", "grid_summary", "grid_markdown", "plot_heatmap",
           "ppl_markdown", "compare_table", "write_json", "load_summary"]


def fmt_length(n: int) -> str:
    """4096 -> '4k', 131072 -> '128k', 1536 -> '1.5k', 1000 -> '1000'."""
    n = int(n)
    if n >= 1024 and n % 512 == 0:
        k = n / 1024
        return f"{k:g}k"
    return str(n)


def _mean(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else float("nan")


def _fmt(v: Optional[float], digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


# ----------------------------------------------------------------------------- NiaH


def niah_summary(records: Sequence[dict], tasks: Sequence[str], lengths: Sequence[int]) -> dict:
    """Mean scores (0..100) per task and length from ``string_match_all`` per-sample scores in [0, 1]."""
    cells: Dict[str, Dict[int, List[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        cells[r["task"]][int(r["length"])].append(float(r["score"]))
    scores = {t: {str(L): (100.0 * _mean(cells[t][L]) if cells[t][L] else None) for L in lengths} for t in tasks}
    counts = {t: {str(L): len(cells[t][L]) for L in lengths} for t in tasks}
    per_task = {t: _mean(v for v in scores[t].values() if v is not None) for t in tasks}
    per_length = {str(L): _mean(scores[t][str(L)] for t in tasks if scores[t][str(L)] is not None) for L in lengths}
    average = _mean(v for v in per_length.values() if not math.isnan(v))
    return {"kind": "niah", "metric": "string_match_all (percent)", "tasks": list(tasks),
            "lengths": [int(L) for L in lengths], "scores": scores, "samples": counts, "per_task": per_task,
            "per_length": per_length, "average": average}


def niah_markdown(summary: dict, title: str = "") -> str:
    lengths = summary["lengths"]
    head = "| task | " + " | ".join(fmt_length(L) for L in lengths) + " | Avg |"
    sep = "|---|" + "---:|" * (len(lengths) + 1)
    rows = [head, sep]
    for t in summary["tasks"]:
        cells = [_fmt(summary["scores"][t][str(L)]) for L in lengths]
        rows.append(f"| {t} | " + " | ".join(cells) + f" | {_fmt(summary['per_task'][t])} |")
    rows.append("| **Average** | " + " | ".join(f"**{_fmt(summary['per_length'][str(L)])}**" for L in lengths)
                + f" | **{_fmt(summary['average'])}** |")
    out = "\n".join(rows)
    return (f"{title}\n\n{out}" if title else out) + "\n"


# ----------------------------------------------------------------------------- needle / passkey grids


def grid_summary(records: Sequence[dict], lengths: Sequence[int], depths: Sequence[float], kind: str) -> dict:
    cells: Dict[tuple, List[float]] = defaultdict(list)
    for r in records:
        cells[(int(r["length"]), round(float(r["depth"]), 6))].append(float(r["score"]))
    dkeys = [round(float(d), 6) for d in depths]
    grid = {_depth_key(d): {str(L): (100.0 * _mean(cells[(L, d)]) if cells[(L, d)] else None) for L in lengths}
            for d in dkeys}
    per_length = {str(L): _mean(grid[_depth_key(d)][str(L)] for d in dkeys if grid[_depth_key(d)][str(L)] is not None)
                  for L in lengths}
    per_depth = {_depth_key(d): _mean(v for v in grid[_depth_key(d)].values() if v is not None) for d in dkeys}
    return {"kind": kind, "metric": "string_match_all (percent)", "lengths": [int(L) for L in lengths],
            "depths": dkeys, "grid": grid, "per_length": per_length, "per_depth": per_depth,
            "average": _mean(v for v in per_length.values() if not math.isnan(v)),
            "samples": {_depth_key(d): {str(L): len(cells[(L, d)]) for L in lengths} for d in dkeys}}


def _depth_key(d: float) -> str:
    return f"{100 * d:g}%"


def grid_markdown(summary: dict, title: str = "") -> str:
    lengths = summary["lengths"]
    rows = ["| length | " + " | ".join(fmt_length(L) for L in lengths) + " | Avg |",
            "|---|" + "---:|" * (len(lengths) + 1),
            "| score | " + " | ".join(_fmt(summary["per_length"][str(L)]) for L in lengths)
            + f" | {_fmt(summary['average'])} |"]
    grid_rows = ["| depth \\ length | " + " | ".join(fmt_length(L) for L in lengths) + " |",
                 "|---|" + "---:|" * len(lengths)]
    for d in summary["depths"]:
        k = _depth_key(d)
        grid_rows.append(f"| {k} | " + " | ".join(_fmt(summary["grid"][k][str(L)], 0) for L in lengths) + " |")
    out = "\n".join(rows) + "\n\n" + "\n".join(grid_rows)
    return (f"{title}\n\n{out}" if title else out) + "\n"


def plot_heatmap(summary: dict, path: Path, title: str = "") -> Path:
    """The depth x length grid as a heatmap PNG (the paper's Figure 2 layout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap

    lengths, depths = summary["lengths"], summary["depths"]
    grid = summary["grid"]
    data = np.array([[np.nan if grid[_depth_key(d)][str(L)] is None else grid[_depth_key(d)][str(L)] for L in lengths]
                     for d in depths], dtype=float)
    cmap = LinearSegmentedColormap.from_list("needle", ["#F0496E", "#EBB839", "#0CD79F"]).with_extremes(bad="#dddddd")
    fig_w = max(5.0, 0.75 * len(lengths) + 2.5)
    fig_h = max(3.5, 0.42 * len(depths) + 1.8)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(lengths)), [fmt_length(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:g}" for d in depths])
    ax.set_xlabel("Context length (tokens)")
    ax.set_ylabel("Depth percent")
    if len(lengths) * len(depths) <= 400:
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not np.isnan(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:.0f}", ha="center", va="center", fontsize=7, color="black")
    ax.set_title(title or f"{summary['kind']}: average {summary['average']:.1f}")
    fig.colorbar(im, ax=ax, label="score")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- perplexity


def ppl_markdown(summary: dict, title: str = "") -> str:
    lengths = summary["lengths"]
    rows = ["| length | " + " | ".join(fmt_length(L) for L in lengths) + " | Avg |",
            "|---|" + "---:|" * (len(lengths) + 1),
            "| perplexity | " + " | ".join(_fmt(summary["ppl"].get(str(L))) for L in lengths)
            + f" | {_fmt(summary['average'])} |"]
    out = "\n".join(rows)
    return (f"{title}\n\n{out}" if title else out) + "\n"


# ----------------------------------------------------------------------------- comparison


def load_summary(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "summary.json"
    if not p.is_file():
        raise EvalError(f"{path}: no summary.json (give a harpe-eval --output directory or its summary.json)")
    try:
        return json.loads(p.read_text())
    except ValueError as err:
        raise EvalError(f"{p} is not valid JSON: {err}") from None


def compare_table(summaries: Sequence[dict], names: Sequence[str]) -> str:
    """Runs side by side: rows = runs, columns = lengths (+ the average), like the paper's Tables 1 and 4."""
    if not summaries:
        raise EvalError("nothing to compare")
    kinds = {s.get("kind") for s in summaries}
    if len(kinds) != 1:
        raise EvalError(f"cannot put different kinds of results in one table: {sorted(map(str, kinds))}")
    kind = kinds.pop()
    lengths = sorted({int(L) for s in summaries for L in s["lengths"]})
    key = "ppl" if kind == "ppl" else "per_length"
    rows = [f"| {'model' if kind != 'ppl' else 'model (perplexity)'} | " + " | ".join(fmt_length(L) for L in lengths)
            + " | Avg |", "|---|" + "---:|" * (len(lengths) + 1)]
    for s, name in zip(summaries, names):
        vals = s.get(key, {})
        rows.append(f"| {name} | " + " | ".join(_fmt(vals.get(str(L))) for L in lengths)
                    + f" | {_fmt(s.get('average'))} |")
    return "\n".join(rows) + "\n"
