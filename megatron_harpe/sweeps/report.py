"""`harpe-sweep report SWEEP_DIR`: one markdown report with plots over every point of a sweep.

    harpe-sweep report sweeps/tiny                 # -> sweeps/tiny/report/report.md + *.png
    harpe-sweep report sweeps/ext128k --out /tmp/ext128k-report

Reads the sweep's manifest (sweep.json; jobs.tsv for sweeps made before it existed), so it works the same for
--local sweeps and Slurm sweeps (the same layout: runs under <runs-root>/<name>/<point>). Per point it reads
`<run_dir>/metrics.jsonl` (training loss, validation records `kind: eval`, passkey probes `kind: probe`,
tokens/s, peak memory), the sweep's markers, and harpe-eval's `<run_dir>/eval/<command>/summary.json`.

What the report holds (docs/sweeps.md):
- points: every point, its axes, its status (complete / failed / interrupted / incomplete / not started);
- missing: every point or piece left out of a table or plot, and why (nothing is dropped silently);
- training loss curves per method (one panel per sequence length x layout; mean over seeds, min-max band)
  and the final training / validation loss per group (mean +- sample std over seeds, n);
- validation loss curves (when the trainer evaluated: training.eval_interval);
- passkey probes during training (training.probe) by method x length;
- harpe-eval results: perplexity by evaluation length, passkey / NiaH / needle accuracy by length;
- tokens/s and peak memory per group, and plotted against sequence length and CP size when the grid varies
  them.

Groups are the points that differ only by seed (the point name without -seedS). Tables count only points
whose training finished; curves show every point with records. The report directory is built under a
temporary name and renamed into place (megatron_harpe/files.py), so a half-written report never looks
complete. harpe-eval's files are read here rather than through megatron_harpe.evaluation: the sweeps and
evaluation packages share a layer and do not import each other (docs/architecture.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from megatron_harpe.cli import run_command
from megatron_harpe.files import publish, staging_path
from megatron_harpe.sweeps import manifest, runs
from megatron_harpe.sweeps.errors import SweepError

PROG = "harpe-sweep report"
REPORT_DIR = "report"
REPORT_FILE = "report.md"
GIB = 1024 ** 3
STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"), ((0, (1, 3)), "P")]


# ------------------------------------------------------------------------------------------ numbers
def fmt_length(n: int | None) -> str:
    """4096 -> '4k', 131072 -> '128k', 1536 -> '1.5k', 1000 -> '1000' (harpe-eval's convention)."""
    if n is None:
        return "-"
    n = int(n)
    if n >= 1024 and n % 512 == 0:
        return f"{n / 1024:g}k"
    return str(n)


def _finite(values: Iterable) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def mean_std(values: Iterable) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation or None for n < 2, n) of the finite values."""
    vals = _finite(values)
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def fmt_stat(values: Iterable, digits: int = 4, scale: float = 1.0) -> str:
    mean, std, n = mean_std(values)
    if mean is None:
        return "missing"
    text = f"{mean * scale:.{digits}f}"
    if std is not None:
        text += f" ± {std * scale:.{digits}f}"
    return f"{text} (n={n})"


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list[Any]], right: Iterable[int] = ()) -> str:
    right = set(right)
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ collecting
@dataclass
class PointData:
    entry: dict
    state: str = "not started"  # complete | failed | interrupted | incomplete | not started
    detail: str = ""
    trained: bool = False  # training finished (the final-loss and throughput tables use only these)
    train: list[tuple[int, float]] = field(default_factory=list)
    evals: list[tuple[int, float, float | None]] = field(default_factory=list)
    probe_iteration: int | None = None
    probes: dict[int, dict[str, float]] = field(default_factory=dict)  # length -> exact/token_accuracy/nll
    tokens_per_s: float | None = None
    peak_memory_bytes: float | None = None
    harpe_eval: dict[str, dict] = field(default_factory=dict)  # command -> summary.json
    harpe_eval_problems: dict[str, str] = field(default_factory=dict)
    last_iteration: int = 0

    @property
    def name(self) -> str:
        return self.entry["name"]

    @property
    def group(self) -> str:
        return self.entry.get("group") or self.name


def _throughput(train_records: list[dict]) -> float | None:
    """Median tokens/s over the logged intervals, the first one left out when there are others (it carries
    start-up: allocation, the first step's graph and kernel set-up)."""
    values = _finite(r.get("tokens_per_s") for r in train_records)
    if len(values) > 1:
        values = values[1:]
    return statistics.median(values) if values else None


def read_eval_summary(path: Path) -> dict | None:
    """harpe-eval's summary.json (megatron_harpe/evaluation/report.py writes it): `kind`, `lengths`, and `ppl`
    {length: perplexity} for ppl or `per_length` {length: score 0..100} for passkey/needle/niah, `average`,
    `complete` (false when --max-units stopped it)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "lengths" in data else None


def collect_point(entry: dict, eval_wanted: list[str]) -> PointData:
    pd = PointData(entry)
    run_dir = Path(entry["run_dir"]) if entry.get("run_dir") else None
    records = runs.read_jsonl(run_dir / runs.METRICS) if run_dir else []
    train = runs.training_records(records)
    pd.train = [(int(r["iteration"]), float(r["loss"])) for r in train
                if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    pd.last_iteration = int(train[-1]["iteration"]) if train else 0
    pd.evals = [(int(r["iteration"]), float(r["eval_loss"]), r.get("eval_perplexity"))
                for r in runs.kind_records(records, "eval") if isinstance(r.get("eval_loss"), (int, float))]
    probes = runs.kind_records(records, "probe")
    if probes:
        last = probes[-1]
        pd.probe_iteration = int(last["iteration"])
        for key, value in last.items():
            m = runs.PROBE_KEY.match(key)
            if m and isinstance(value, (int, float)):
                pd.probes.setdefault(int(m.group(1)), {})[m.group(2)] = float(value)
    pd.tokens_per_s = _throughput(train)
    mem = _finite(r.get("peak_memory_bytes") for r in train)
    pd.peak_memory_bytes = max(mem) if mem else None

    total = entry.get("total_iterations")
    done = runs.read_marker(run_dir / runs.DONE_MARKER) if run_dir else None
    trained_marker = runs.read_marker(run_dir / runs.TRAINED_MARKER) if run_dir else None
    sha = entry.get("config_sha")
    fresh = (lambda m: bool(m) and (not sha or m.get("config_sha") == sha))
    finished = runs.finished_event(records) and (not total or pd.last_iteration >= total)
    pd.trained = bool(fresh(trained_marker) or (fresh(done) and done.get("exit_code") == 0) or finished)
    status = entry.get("status")
    of_total = f"iteration {pd.last_iteration} of {total}" if total else f"iteration {pd.last_iteration}"
    log = entry.get("log")
    if status == "failed":
        pd.state = "failed"
        pd.detail = (f"{entry.get('step', 'a step')} exited {entry.get('exit_code')}"
                     + (f"; log {log}" if log else ""))
    elif fresh(done) and done.get("exit_code") == 0 or (pd.trained and status not in ("interrupted", "running")):
        pd.state, pd.detail = "complete", f"{pd.last_iteration} iterations"
    elif status == "interrupted":
        latest = runs.latest_iteration(entry.get("ckpt_dir"))
        pd.state = "interrupted"
        pd.detail = (f"{entry.get('message') or 'interrupted'}; at {of_total}"
                     + (f", checkpoint {latest}" if latest is not None else "") + "; rerunning the sweep continues it")
    elif train:
        pd.state = "incomplete"
        pd.detail = f"{of_total} so far (running, stopped, or failed outside the sweep)"
        if log:
            pd.detail += f"; log {log}"
    else:
        pd.state = "not started"
        if run_dir is None:
            pd.detail = "no run directory recorded"
        elif not run_dir.exists():
            pd.detail = f"{run_dir} does not exist"
        else:
            pd.detail = f"no training records in {run_dir / runs.METRICS}"
        if entry.get("job_id"):
            pd.detail += f" (Slurm job {entry['job_id']}: pending, or failed before training; log {log})"

    if run_dir is not None:
        found = sorted(p.name for p in (run_dir / "eval").glob("*") if p.is_dir()) if (run_dir / "eval").is_dir() \
            else []
        wanted = eval_wanted if pd.trained else []  # an unfinished run is listed as such; its eval is not due yet
        for command in dict.fromkeys([*wanted, *found]):
            summary_path = run_dir / "eval" / command / "summary.json"
            summary = read_eval_summary(summary_path)
            if summary is None:
                pd.harpe_eval_problems[command] = (f"no {summary_path}" if not summary_path.exists()
                                                   else f"{summary_path} is not a harpe-eval summary")
                continue
            pd.harpe_eval[command] = summary
            if summary.get("complete") is False:
                pd.harpe_eval_problems[command] = (f"harpe-eval {command} is partial (stopped by --max-units); "
                                                   f"rerun it to complete")
    return pd


# ------------------------------------------------------------------------------------------ plots
def _figure(n_panels: int = 1, ncols: int | None = None, width: float = 5.2, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = ncols or min(n_panels, 3)
    nrows = -(-n_panels // ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n_panels)]
    return fig, axes


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _colors(names: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def _aggregate_curves(curves: list[list[tuple[int, float]]]):
    """x, mean, min, max over the curves at every x any of them has (n varies where a seed is shorter)."""
    by_x: dict[int, list[float]] = {}
    for curve in curves:
        for x, y in curve:
            by_x.setdefault(x, []).append(y)
    xs = sorted(by_x)
    return (xs, [statistics.fmean(by_x[x]) for x in xs], [min(by_x[x]) for x in xs], [max(by_x[x]) for x in xs])


# ------------------------------------------------------------------------------------------ the report
class Report:
    def __init__(self, data: dict, sweep_dir: Path):
        self.data, self.sweep_dir = data, sweep_dir
        self.eval_wanted = [e["command"] for e in data.get("eval", []) if isinstance(e, dict) and "command" in e]
        self.points = [collect_point(e, self.eval_wanted) for e in data["points"]]
        self.groups: dict[str, list[PointData]] = {}
        for pd in self.points:
            self.groups.setdefault(pd.group, []).append(pd)
        self.methods = list(dict.fromkeys(pd.entry.get("method", pd.name) for pd in self.points))
        self.colors = _colors(self.methods)
        self.missing: list[tuple[str, str]] = []
        self.plots: list[str] = []

    # ---- helpers
    def _info(self, group: str) -> dict:
        return self.groups[group][0].entry

    def _seq(self, entry: dict) -> int | None:
        return entry.get("trained_seq_length") or entry.get("seq_length")

    def _style(self, group: str) -> tuple[str, str]:
        """(line style, marker) that tells apart the groups of one method (they share its colour)."""
        method = self._info(group).get("method", group)
        same = [g for g in self.groups if self._info(g).get("method", g) == method]
        return STYLES[same.index(group) % len(STYLES)]

    def _panel_key(self, entry: dict) -> tuple:
        return (self._seq(entry), entry.get("layout", "default"))

    def _panel_title(self, key: tuple) -> str:
        seq, layout = key
        parts = [f"seq {fmt_length(seq)}"] if seq else []
        if layout and layout != "default":
            parts.append(f"layout {layout}")
        return ", ".join(parts) or "all points"

    def _plot(self, fig_fn: Callable[[Path], Any], name: str, out: Path) -> str:
        fig_fn(out / name)
        self.plots.append(name)
        return name

    def _curves_plot(self, path: Path, series: Callable[[PointData], list[tuple[int, float]]], ylabel: str) -> None:
        """Panels per (sequence length, layout); in each, one line per method: mean over the group's seeds with
        a min-max band."""
        from matplotlib.ticker import MaxNLocator

        panels = list(dict.fromkeys(self._panel_key(self._info(g)) for g in self.groups
                                    if any(series(pd) for pd in self.groups[g])))
        fig, axes = _figure(len(panels))
        for ax, key in zip(axes, panels):
            for group, members in self.groups.items():
                entry = members[0].entry
                if self._panel_key(entry) != key:
                    continue
                curves = [series(pd) for pd in members if series(pd)]
                if not curves:
                    continue
                xs, mean, lo, hi = _aggregate_curves(curves)
                color = self.colors[entry.get("method", group)]
                label = f"{group} (n={len(curves)})"
                ax.plot(xs, mean, color=color, lw=1.6, marker="o" if len(xs) <= 20 else None, ms=3, label=label)
                if len(curves) > 1:
                    ax.fill_between(xs, lo, hi, color=color, alpha=0.2, lw=0)
            ax.set_title(self._panel_title(key), fontsize=10)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("iteration")
            ax.set_ylabel(ylabel)
            ax.grid(lw=0.3, alpha=0.5)
            ax.legend(fontsize=8)
        _save(fig, path)

    def _by_length_plot(self, path: Path, table: dict[str, dict[int, list[float]]], ylabel: str, title: str,
                        log_y: bool = False, percent: bool = False) -> None:
        """One line per group over evaluation/prompt length: mean over seeds, min-max error bars."""
        fig, (ax,) = _figure(1, width=6.4, height=4.0)
        lengths = sorted({L for per in table.values() for L in per})
        for group, per in table.items():
            xs = [L for L in lengths if _finite(per.get(L, []))]
            if not xs:
                continue
            vals = [_finite(per[L]) for L in xs]
            mean = [statistics.fmean(v) for v in vals]
            err = [[m - min(v) for m, v in zip(mean, vals)], [max(v) - m for m, v in zip(mean, vals)]]
            color = self.colors[self._info(group).get("method", group)]
            ls, marker = self._style(group)
            ax.errorbar(xs, mean, yerr=err, color=color, ls=ls, marker=marker, ms=4, capsize=3, lw=1.5, label=group)
        if len(lengths) > 1 and max(lengths) / max(min(lengths), 1) >= 4:
            ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [fmt_length(L) for L in lengths])
        values = [v for per in table.values() for vs in per.values() for v in _finite(vs)]
        if log_y and values and min(values) > 0 and max(values) / min(values) > 10:
            ax.set_yscale("log")  # perplexities across lengths/methods can span decades
        if percent:
            ax.set_ylim(-3, 103)
        ax.set_xlabel("length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(lw=0.3, alpha=0.5)
        ax.legend(fontsize=8)
        _save(fig, path)

    # ---- sections
    def section_points(self) -> str:
        rows = []
        for pd in self.points:
            e = pd.entry
            par = e.get("parallel") or {}
            ranks = (f"{e.get('world_size')} = {par.get('tp', '?')}x{par.get('pp', '?')}x{par.get('cp', '?')}x"
                     f"{par.get('dp', '?')}" if par else str(e.get("world_size") or "?"))
            total = e.get("total_iterations")
            rows.append([f"`{pd.name}`", e.get("method", ""), fmt_length(self._seq(e)), e.get("layout", ""),
                         "-" if e.get("seed") is None else e["seed"], ranks, f"**{pd.state}**" if pd.state != "complete"
                         else pd.state, f"{pd.last_iteration}/{total}" if total else pd.last_iteration,
                         pd.detail if pd.state != "complete" else (e.get("log") or "")])
        return ("## Points\n\n" + md_table(["point", "method", "seq", "layout", "seed", "ranks (TPxPPxCPxDP)",
                                            "status", "iterations", "detail / log"], rows, right=[7]))

    def section_loss(self, out: Path) -> str:
        text = "## Training loss\n\n"
        if any(pd.train for pd in self.points):
            name = self._plot(lambda p: self._curves_plot(p, lambda pd: pd.train, "training loss"),
                              "loss_curves.png", out)
            text += (f"![Training loss by method]({name})\n\n`{name}`: training loss per iteration, one panel per "
                     "sequence length x layout, one line per method: the mean over its seeds, the band from the "
                     "lowest to the highest seed.\n\n")
        else:
            text += "Missing: no point has training records yet.\n\n"
        rows = []
        for group, members in self.groups.items():
            e = members[0].entry
            done = [pd for pd in members if pd.trained and pd.train]
            for pd in members:
                if not pd.trained:
                    self.missing.append((pd.name, f"training not finished ({pd.state}: {pd.detail}): left out of "
                                                  f"the final-loss and throughput tables"))
            finals = [pd.train[-1][1] for pd in done]
            vals = [pd.evals[-1][1] for pd in done if pd.evals]
            ppls = [pd.evals[-1][2] for pd in done if pd.evals]
            iters = sorted({pd.last_iteration for pd in done})
            rows.append([group, e.get("method", ""), fmt_length(self._seq(e)), e.get("layout", ""),
                         f"{len(done)} of {len(members)}", fmt_stat(finals), fmt_stat(vals) if vals else "missing",
                         fmt_stat(ppls, 2) if ppls else "missing", ", ".join(map(str, iters)) or "-"])
        text += ("### Final loss\n\nThe loss at the last iteration (training) and the last validation evaluation "
                 "(training.eval_interval), mean ± sample standard deviation over the seeds whose training "
                 "finished (n).\n\n")
        text += md_table(["group", "method", "seq", "layout", "seeds finished", "final training loss",
                          "final validation loss", "validation perplexity", "iterations"], rows, right=[5, 6, 7])
        return text + "\n"

    def section_validation(self, out: Path) -> str:
        text = "## Validation loss\n\n"
        if not any(pd.evals for pd in self.points):
            return text + ("Missing: no point has validation records (set training.eval_interval, e.g. "
                           "`--set training.eval_interval=100`).\n\n")
        for pd in self.points:
            if pd.train and not pd.evals:
                self.missing.append((pd.name, "no validation records (training.eval_interval off, or training "
                                              "stopped before the first evaluation)"))
        name = self._plot(lambda p: self._curves_plot(p, lambda pd: [(i, v) for i, v, _ in pd.evals],
                                                      "validation loss"), "eval_loss_curves.png", out)
        return text + (f"![Validation loss by method]({name})\n\n`{name}`: the held-out loss at every evaluation "
                       "(the same batches each time), mean over seeds with a min-max band.\n\n")

    def section_probes(self, out: Path) -> str:
        text = "## Passkey probes during training\n\n"
        if not any(pd.probes for pd in self.points):
            return text + ("Missing: no point ran passkey probes (training.probe.lengths with "
                           "data.tokenizer_model; docs/training.md).\n\n")
        lengths = sorted({L for pd in self.points for L in pd.probes})
        exact: dict[str, dict[int, list[float]]] = {}
        acc: dict[str, dict[int, list[float]]] = {}
        rows = []
        for group, members in self.groups.items():
            for pd in members:
                if pd.train and not pd.probes:
                    self.missing.append((pd.name, "no passkey probe records (training.probe.lengths empty, or "
                                                  "training stopped before the first probe)"))
            scored = [pd for pd in members if pd.probes]
            if not scored:
                continue
            exact[group] = {L: [100 * pd.probes[L]["exact"] for pd in scored if "exact" in pd.probes.get(L, {})]
                            for L in lengths}
            acc[group] = {L: [100 * pd.probes[L]["token_accuracy"] for pd in scored
                              if "token_accuracy" in pd.probes.get(L, {})] for L in lengths}
            nll = {L: [pd.probes[L]["nll"] for pd in scored if "nll" in pd.probes.get(L, {})] for L in lengths}
            iters = sorted({pd.probe_iteration for pd in scored})
            rows.append([group, ", ".join(map(str, iters))]
                        + [f"{fmt_stat(exact[group][L], 1)} / {fmt_stat(acc[group][L], 1)} / "
                           f"{fmt_stat(nll[L], 3)}" for L in lengths])
        text += ("The last probe of each run (iteration shown): percent of prompts whose key is the greedy "
                 "continuation (exact) / percent of key tokens predicted (token accuracy) / mean NLL of the key "
                 "tokens; mean ± std over seeds (n).\n\n")
        text += md_table(["group", "iteration"] + [f"{fmt_length(L)}: exact % / token acc % / NLL" for L in lengths],
                         rows)
        name = self._plot(lambda p: self._by_length_plot(p, acc, "key token accuracy (%)",
                                                         "passkey probe: token accuracy by prompt length",
                                                         percent=True),
                          "probe_passkey.png", out)
        text += (f"\n![Passkey probe token accuracy by length]({name})\n\n`{name}`: key-token accuracy of the last "
                 "probe by prompt length, mean over seeds with min-max bars (exact match is in the table).\n\n")
        return text

    def section_harpe_eval(self, out: Path) -> str:
        text = "## harpe-eval results\n\n"
        commands = list(dict.fromkeys([*self.eval_wanted, *(c for pd in self.points for c in pd.harpe_eval)]))
        if not commands:
            return text + ("Missing: no point has harpe-eval results (<run_dir>/eval/<command>/summary.json; "
                           "`harpe-sweep --local --eval 'ppl ...'` writes them).\n\n")
        for pd in self.points:
            for command, problem in pd.harpe_eval_problems.items():
                self.missing.append((pd.name, f"harpe-eval {command}: {problem}"))
        for command in commands:
            have = [pd for pd in self.points if command in pd.harpe_eval]
            text += f"### harpe-eval {command}\n\n"
            if not have:
                text += f"Missing: no point has harpe-eval {command} results.\n\n"
                continue
            ppl = command == "ppl"
            key = "ppl" if ppl else "per_length"
            lengths = sorted({int(L) for pd in have for L in pd.harpe_eval[command].get("lengths", [])})
            table: dict[str, dict[int, list[float]]] = {}
            rows = []
            for group, members in self.groups.items():
                scored = [pd for pd in members if command in pd.harpe_eval]
                if not scored:
                    continue
                table[group] = {L: [pd.harpe_eval[command].get(key, {}).get(str(L)) for pd in scored]
                                for L in lengths}
                table[group] = {L: _finite(v) for L, v in table[group].items()}
                avg = [pd.harpe_eval[command].get("average") for pd in scored]
                rows.append([group] + [fmt_stat(table[group][L], 2) if table[group][L] else "missing"
                                       for L in lengths] + [fmt_stat(avg, 2)])
            what = ("perplexity (lower is better)" if ppl else
                    "percent retrieved (string_match_all)" if command != "niah" else
                    "NiaH average over tasks, percent (string_match_all)")
            text += f"{what} by length, mean ± std over seeds (n).\n\n"
            text += md_table(["group"] + [fmt_length(L) for L in lengths] + ["Avg"], rows,
                             right=range(1, len(lengths) + 2))
            name = self._plot(lambda p: self._by_length_plot(
                p, table, "perplexity" if ppl else "score (%)",
                f"harpe-eval {command}: {'perplexity' if ppl else 'accuracy'} by length", log_y=ppl, percent=not ppl),
                f"eval_{command}_by_length.png", out)
            label = "Perplexity" if ppl else f"{command} accuracy"
            text += f"\n![{label} by length]({name})\n\n`{name}`: {what} by length per group (min-max bars).\n\n"
        return text

    def section_throughput(self, out: Path) -> str:
        text = "## Throughput and memory\n\n"
        rows, points = [], []
        for group, members in self.groups.items():
            e = members[0].entry
            done = [pd for pd in members if pd.trained]
            tps = [pd.tokens_per_s for pd in done]
            mem = [pd.peak_memory_bytes / GIB for pd in done if pd.peak_memory_bytes is not None]
            world = e.get("world_size") or 1
            par = e.get("parallel") or {}
            rows.append([group, e.get("method", ""), fmt_length(self._seq(e)), e.get("layout", ""),
                         par.get("cp", "?"), world, fmt_stat(tps, 1),
                         fmt_stat([t / world for t in _finite(tps)], 1) if _finite(tps) else "missing",
                         f"{max(mem):.2f}" if mem else "missing"])
            if _finite(tps):
                points.append((group, e, _finite(tps), mem))
        text += ("tokens/s: the median over the logged intervals of a run (its first left out: start-up), mean ± "
                 "std over seeds; peak memory: the largest `peak_memory_bytes` of any rank-logged interval (GPU: "
                 "the allocator's peak; CPU: the process's peak resident size), the maximum over seeds.\n\n")
        text += md_table(["group", "method", "seq", "layout", "CP", "ranks", "tokens/s", "tokens/s per rank",
                          "peak memory (GiB)"], rows, right=[4, 5, 6, 7, 8])
        seqs = {self._seq(e) for _, e, _, _ in points}
        cps = {(e.get("parallel") or {}).get("cp") for _, e, _, _ in points}
        if len(seqs) > 1:
            name = self._plot(lambda p: self._axis_plot(p, points, lambda e: self._seq(e), "sequence length (tokens)",
                                                        lambda e: (e.get("method"), e.get("layout")), seq_ticks=True),
                              "throughput_vs_seq.png", out)
            text += (f"\n![tokens/s and peak memory vs sequence length]({name})\n\n`{name}`: tokens/s and peak "
                     "memory against the sequence length, one line per method x layout.\n")
        if len(cps) > 1:
            name = self._plot(lambda p: self._axis_plot(p, points, lambda e: (e.get("parallel") or {}).get("cp"),
                                                        "context-parallel size (CP)",
                                                        lambda e: (e.get("method"), self._seq(e))),
                              "throughput_vs_cp.png", out)
            text += (f"\n![tokens/s and peak memory vs CP size]({name})\n\n`{name}`: tokens/s and peak memory "
                     "against the context-parallel size, one line per method x sequence length.\n")
        if len(seqs) <= 1 and len(cps) <= 1:
            text += ("\n(One sequence length and one CP size in this grid: no throughput-vs-length or -vs-CP "
                     "plot.)\n")
        return text + "\n"

    def _axis_plot(self, path: Path, points, x_of, xlabel: str, line_of, seq_ticks: bool = False) -> None:
        fig, (ax_t, ax_m) = _figure(2, ncols=2)
        lines: dict[tuple, list] = {}
        for group, e, tps, mem in points:
            lines.setdefault(line_of(e), []).append((x_of(e), statistics.fmean(tps), max(mem) if mem else None))
        xs_all = sorted({x for pts in lines.values() for x, _, _ in pts if x is not None})
        seconds = list(dict.fromkeys(key[1] for key in lines))  # colour = method, line style = the other key
        for key, pts in lines.items():
            pts = sorted((p for p in pts if p[0] is not None), key=lambda p: p[0])
            label = " ".join(fmt_length(k) if isinstance(k, int) else str(k) for k in key if k not in (None, "default"))
            color = self.colors.get(key[0], None)
            ls, marker = STYLES[seconds.index(key[1]) % len(STYLES)]
            ax_t.plot([p[0] for p in pts], [p[1] for p in pts], ls=ls, marker=marker, color=color, label=label)
            mem_pts = [p for p in pts if p[2] is not None]
            ax_m.plot([p[0] for p in mem_pts], [p[2] for p in mem_pts], ls=ls, marker=marker, color=color, label=label)
        for ax, ylabel in ((ax_t, "tokens/s"), (ax_m, "peak memory (GiB)")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if xs_all:
                if seq_ticks and max(xs_all) / max(min(xs_all), 1) >= 4:
                    ax.set_xscale("log", base=2)
                ax.set_xticks(xs_all, [fmt_length(x) if seq_ticks else str(x) for x in xs_all])
            ax.grid(lw=0.3, alpha=0.5)
            ax.legend(fontsize=8)
        _save(fig, path)

    def section_missing(self) -> str:
        text = "## Missing\n\n"
        if not self.missing:
            return text + "Nothing missing: every point finished training and has every record the others have.\n\n"
        seen = []
        for item in self.missing:
            if item not in seen:
                seen.append(item)
        return text + "".join(f"- `{name}`: {what}\n" for name, what in seen) + "\n"

    def render(self, out: Path) -> str:
        counts: dict[str, int] = {}
        for pd in self.points:
            counts[pd.state] = counts.get(pd.state, 0) + 1
        d = self.data
        body = [self.section_loss(out), self.section_validation(out), self.section_probes(out),
                self.section_harpe_eval(out), self.section_throughput(out)]
        head = (f"# Sweep report: {d.get('name', self.sweep_dir.name)}\n\n"
                f"{d.get('mode', '?')} sweep in `{self.sweep_dir}`, {len(self.points)} point(s): "
                + ", ".join(f"{n} {s}" for s, n in counts.items())
                + f". Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by `harpe-sweep report`.\n\n"
                "Groups are the points that differ only by seed. Numbers are mean ± sample standard deviation over "
                "seeds (n = seeds with data); plots show the mean and the min-max range.\n\n")
        if d.get("source"):
            head += f"(No sweep.json: points read from {d['source']}; relative paths taken from {os.getcwd()}.)\n\n"
        return head + self.section_points() + "\n" + self.section_missing() + "".join(body)


def write_report(sweep_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> tuple[Path, Report]:
    """Build the report into a staging directory and rename it into place; returns (report.md, Report)."""
    sweep_dir = Path(sweep_dir)
    data = manifest.load(sweep_dir)
    final = Path(out) if out else sweep_dir / REPORT_DIR
    if final.exists() and not final.is_dir():
        raise SweepError(f"--out {final} exists and is not a directory")
    staging = staging_path(final)
    shutil.rmtree(staging, ignore_errors=True)  # a report interrupted before
    staging.mkdir(parents=True)
    try:
        report = Report(data, sweep_dir)
        (staging / REPORT_FILE).write_text(report.render(staging), encoding="utf-8")
        (staging / "points.json").write_text(json.dumps(
            [{"name": pd.name, "group": pd.group, "state": pd.state, "detail": pd.detail, "trained": pd.trained,
              "final_loss": pd.train[-1][1] if pd.train else None,
              "final_eval_loss": pd.evals[-1][1] if pd.evals else None, "tokens_per_s": pd.tokens_per_s,
              "peak_memory_bytes": pd.peak_memory_bytes, "probes": pd.probes,
              "harpe_eval": {c: s.get("average") for c, s in pd.harpe_eval.items()}} for pd in report.points],
            indent=1) + "\n")
        publish(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final / REPORT_FILE, report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("sweep_dir", help="the sweep's directory, <out-dir>/<name> (holds sweep.json or jobs.tsv)")
    p.add_argument("--out", help=f"report directory (default SWEEP_DIR/{REPORT_DIR})")
    p.add_argument("--debug", action="store_true", help="tracebacks for bad-input errors too (HARPE_DEBUG=1)")
    return p


def _main(args) -> int:
    path, report = write_report(args.sweep_dir, args.out)
    states: dict[str, int] = {}
    for pd in report.points:
        states[pd.state] = states.get(pd.state, 0) + 1
    missing = len(dict.fromkeys(report.missing))
    print(f"{PROG}: {len(report.points)} point(s) ({', '.join(f'{n} {s}' for s, n in states.items())}), "
          f"{len(report.plots)} plot(s), {missing} missing item(s) listed -> {path}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: _main(args), argv=argv,
                       interrupted="no report written (a previous report, if any, is unchanged)")


__all__ = ["main", "write_report", "Report", "collect_point", "mean_std", "fmt_stat", "fmt_length"]
