"""Before / during / after for the SmolLM2 example: one markdown report and two plots.

    python examples/smollm2/summarize.py [--data runs/smollm2_data] [--sweep sweeps/smollm2] [--out DIR]

Why a script beside `harpe-sweep report`: the sweep's report covers what its points did (training, the in-run
evaluations, harpe-eval after training); the example's question also needs the models before any training (the
conversion cost, prepare.sh's evaluations of the original, HARPE and ABF models) on the same rows. Reads:
- before: <data>/eval/<original|harpe|abf>/{ppl,passkey}/summary.json (prepare.sh)
- during: each point's metrics.jsonl - validation loss at the training length and passkey probes at 1k, taken by
  harpe-train at training.eval_interval
- after: each point's <run_dir>/eval/{ppl,passkey}/summary.json (the grid's --eval after export)
Writes <out>/report.md (default <sweep>/summary), ppl_by_length.png and during.png; prints the report. Points not
finished yet are listed as missing, so it can run at any time.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional

LABELS = {"original": "original (RoPE 1e5)", "harpe": "HARPE (1e5, 5e5, 2e6)", "abf": "ABF (2e6)"}
METHODS = ("harpe", "abf")


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def mean_spread(values: List[float]) -> tuple[Optional[float], Optional[float]]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (max(values) - min(values)) / 2 if len(values) > 1 else None


def cell(values: List[float], digits: int = 2, base: Optional[float] = None, unit: str = "") -> str:
    """mean ± half the range over seeds, and the change against `base` in % when given."""
    mean, spread = mean_spread(values)
    if mean is None:
        return "-"
    text = f"{mean:.{digits}f}{unit}"
    if spread is not None:
        text += f" ± {spread:.{digits}f}"
    if base:
        text += f" ({100 * (mean / base - 1):+.0f}%)"
    return text


def points(sweep: Path) -> Dict[str, List[dict]]:
    """method -> its points (name, seed, run_dir) from the sweep's manifest."""
    manifest = read_json(sweep / "sweep.json") or {}
    out: Dict[str, List[dict]] = {m: [] for m in METHODS}
    for entry in manifest.get("points", []):
        if entry.get("method") in out:
            out[entry["method"]].append(entry)
    return out


def metrics(run_dir: Path) -> List[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def during(records: List[dict]) -> Dict[int, dict]:
    """iteration -> {val_ppl, probe_exact, train_loss} from harpe-train's metrics."""
    out: Dict[int, dict] = {}
    for r in records:
        it = int(r.get("iteration", -1))
        if r.get("kind") == "eval" and r.get("eval_loss") is not None:
            out.setdefault(it, {})["val_ppl"] = math.exp(float(r["eval_loss"]))
        if r.get("kind") == "probe":
            exact = [v for k, v in r.items() if k.startswith("probe_passkey_") and k.endswith("_exact")]
            if exact:
                out.setdefault(it, {})["probe_exact"] = 100 * statistics.fmean(exact)
    return out


def train_losses(records: List[dict]) -> List[tuple[int, float]]:
    return [(int(r["iteration"]), float(r["loss"])) for r in records
            if r.get("loss") is not None and r.get("kind") in (None, "train")]


def build(data: Path, sweep: Path, out: Path, seconds: Optional[int]) -> str:
    before = {m: {kind: read_json(data / "eval" / m / kind / "summary.json") for kind in ("ppl", "passkey")}
              for m in ("original", "harpe", "abf")}
    by_method = points(sweep)
    after = {m: [{kind: read_json(Path(p["run_dir"]) / "eval" / kind / "summary.json") for kind in ("ppl", "passkey")}
                 for p in pts] for m, pts in by_method.items()}
    runs = {m: [metrics(Path(p["run_dir"])) for p in pts] for m, pts in by_method.items()}
    lengths = next((s["ppl"]["lengths"] for s in before.values() if s["ppl"]), [1024, 4096, 8192])
    original = before["original"]["ppl"]
    base_ppl = {L: original["ppl"][str(L)] for L in lengths} if original else {}

    def ppl_row(label, summaries, note, compare=True):
        cells = [cell([s["ppl"][str(L)] for s in summaries if s and s.get("ppl")],
                      base=base_ppl.get(L) if compare else None) for L in lengths]
        return f"| {label} | {note} | " + " | ".join(cells) + " |"

    def passkey_cell(summaries):
        return cell([s["average"] for s in summaries if s], digits=0, unit="%")

    header = "| model | when | " + " | ".join(f"ppl {L // 1024}k" for L in lengths) + " | passkey 1k |"
    rule = "|---|---|" + "---:|" * (len(lengths) + 1)
    rows = []
    for m in ("original", "harpe", "abf"):
        when = "as released" if m == "original" else "converted, no training"
        rows.append(ppl_row(LABELS[m], [before[m]["ppl"]], when, compare=m != "original")
                    + f" {passkey_cell([before[m]['passkey']])} |")
    iters = {m: max((max((r["iteration"] for r in recs if "iteration" in r), default=0) for recs in runs[m]),
                    default=0) for m in METHODS}
    for m in METHODS:
        done = [a for a in after[m] if a["ppl"]]
        seeds = len(done)
        rows.append(ppl_row(LABELS[m], [a["ppl"] for a in done], f"after {iters[m]} it., {seeds} seed(s)")
                    + f" {passkey_cell([a['passkey'] for a in done])} |")

    during_rows = []
    steps = sorted({it for m in METHODS for recs in runs[m] for it in during(recs)})
    for m in METHODS:
        per_run = [during(recs) for recs in runs[m]]
        for it in steps:
            vals = [d[it] for d in per_run if it in d]
            during_rows.append(f"| {LABELS[m]} | {it} | {cell([v.get('val_ppl') for v in vals])} | "
                               f"{cell([v.get('probe_exact') for v in vals], digits=0, unit='%')} | {len(vals)} |")

    missing = [p["name"] for m in METHODS for p, a in zip(by_method[m], after[m]) if not a["ppl"]]
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(out, lengths, before, after, runs)
    lines = ["# SmolLM2-135M: HARPE vs ABF, converted and continued (examples/smollm2)", "",
             "Perplexity on 2 held-out documents of Python's documentation (the first L tokens of each; the change "
             "against the original model in brackets) and passkey retrieval at 1k tokens (10 prompts: 5 depths x 2). "
             "After training: mean ± half the range over seeds.", "", header, rule, *rows, ""]
    if during_rows:
        lines += ["During training (harpe-train's own evaluations): perplexity of the validation split at the "
                  "training length (2,048 tokens) and passkey probes at 1k tokens (4 prompts), mean over seeds.", "",
                  "| model | iteration | validation ppl (2k) | passkey probe 1k | seeds |", "|---|---:|---:|---:|---:|",
                  *during_rows, ""]
    cost = _cost_ratio(before, lengths)
    if cost:
        lines += [cost, ""]
    alt = {"ppl_by_length.png": "perplexity by length, before and after", "during.png": "training loss"}
    lines += [f"![{alt[p]}]({p})" for p in plots]
    if missing:
        lines += ["", f"Not finished yet: {', '.join(missing)} (rerun the grid, then this script)."]
    if seconds:
        lines += ["", f"Whole example (prepare, grid, reports): {seconds / 60:.0f} min."]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def _cost_ratio(before, lengths) -> str:
    """One line: the HARPE conversion's perplexity increase as a fraction of ABF's, per length."""
    if not all(before[m]["ppl"] for m in ("original", "harpe", "abf")):
        return ""
    parts = []
    for L in lengths:
        o, h, a = (before[m]["ppl"]["ppl"][str(L)] for m in ("original", "harpe", "abf"))
        if a > o:
            parts.append(f"{(h - o) / (a - o):.2f} at {L // 1024}k")
    return ("The conversion's cost (perplexity increase before training), HARPE's as a fraction of ABF's: "
            + ", ".join(parts) + ".") if parts else ""


def _plots(out: Path, lengths, before, after, runs) -> List[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    colors = {"original": "black", "harpe": "tab:blue", "abf": "tab:orange"}
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for m in ("original", "harpe", "abf"):
        s = before[m]["ppl"]
        if s:
            ax.plot(lengths, [s["ppl"][str(L)] for L in lengths], "o--" if m != "original" else "o-",
                    color=colors[m], label=f"{LABELS[m]}{'' if m == 'original' else ', converted'}")
    for m in METHODS:
        done = [a["ppl"] for a in after[m] if a["ppl"]]
        if done:
            ax.plot(lengths, [statistics.fmean(d["ppl"][str(L)] for d in done) for L in lengths], "s-",
                    color=colors[m], label=f"{LABELS[m]}, after training")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{L // 1024}k" for L in lengths])
    _finish(plt, fig, ax, "tokens", "perplexity (held-out)", out / "ppl_by_length.png")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for m in METHODS:
        for i, recs in enumerate(runs[m]):
            curve = train_losses(recs)
            if curve:
                ax.plot(*zip(*curve), color=colors[m], alpha=0.8, label=LABELS[m] if i == 0 else None)
    _finish(plt, fig, ax, "iteration", "training loss (per logging interval)", out / "during.png")
    return ["ppl_by_length.png", "during.png"]


def _finish(plt, fig, ax, xlabel: str, ylabel: str, path: Path) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="runs/smollm2_data", help="prepare.sh's directory")
    parser.add_argument("--sweep", default="sweeps/smollm2", help="the grid's sweep directory")
    parser.add_argument("--out", help="where to write report.md and the plots (default <sweep>/summary)")
    parser.add_argument("--seconds", type=int, help="the whole example's wall time, for the report")
    args = parser.parse_args(argv)
    out = Path(args.out or Path(args.sweep) / "summary")
    print(build(Path(args.data), Path(args.sweep), out, args.seconds))
    print(f"summarize: report {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
