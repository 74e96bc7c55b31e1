"""harpe-bases: build, inspect and plot HARPE base sets (one RoPE base per head).

Examples:
    harpe-bases --base-strategy paper-llama2-7b --json          # Table 2 of the paper
    harpe-bases --base-strategy peak-valley --compare-paper     # Algorithm 1, paper setting
    harpe-bases --base-strategy uniform --num-bases 8 --base-min 1e6 --base-max 5e6
    harpe-bases --base-strategy peak-valley --plot bases.png

The base-set flags are named as harpe-convert's and as the config keys (model.position.base_strategy,
base_min, base_max, base_stride, bases_file): --base-strategy, --base-min, --base-max, --base-stride,
--bases-file. The earlier names --strategy, --b-min, --b-max, --stride and --file still work (not
shown in --help). The details of the peak-valley search and its defaults are documented in
docs/base_search.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import traceback

from megatron_harpe.cli import EXIT_BAD_INPUT, debug_requested, setup_output
from megatron_harpe.rope import bases as B

PROG = "harpe-bases"

# options that steer the peak/valley search (and what --plot marks)
SEARCH_OPTIONS = ("window", "detection", "max_extrema", "min_spacing", "lookahead", "pairing",
                  "missing_penalty")

_FLAG_NAMES = {
    "b_min": "--base-min", "b_max": "--base-max", "stride": "--base-stride", "num_bases": "--num-bases",
    "head_dim": "--head-dim", "window": "--window", "detection": "--detection",
    "max_extrema": "--max-extrema", "min_spacing": "--min-spacing", "lookahead": "--lookahead",
    "pairing": "--pairing", "missing_penalty": "--missing-penalty",
}


class _UsageError(Exception):
    """A bad command line: reported on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # no SystemExit, no traceback: main() returns 2
        raise _UsageError(message)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 1e6 or 1000000, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _integer(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not math.isfinite(value) or not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Build a HARPE base set (one RoPE base per attention head "
                "or K/V group) and print, compare or plot it.",
                epilog="The peak-valley search and its defaults: docs/base_search.md.")
    # the names of harpe-convert and of the config keys (base_strategy, base_min, ...); each earlier name
    # is a hidden alias with the same dest (`required` is checked in main: either spelling satisfies it)
    p.add_argument("--base-strategy", dest="strategy", default=None, choices=B.STRATEGIES, metavar="STRATEGY",
                   help="required: uniform (ascending by head), uniform-desc (descending), peak-valley "
                        "(Algorithm 1), paper-llama2-7b (Table 2 verbatim), file (--bases-file)")
    g = p.add_argument_group("base range (uniform, peak-valley)")
    g.add_argument("--base-min", dest="b_min", type=_number, default=None, metavar="BASE",
                   help=f"smallest base (default {B.PAPER_B_MIN:.0f})")
    g.add_argument("--base-max", dest="b_max", type=_number, default=None, metavar="BASE",
                   help=f"largest base (default {B.PAPER_B_MAX:.0f})")
    g.add_argument("--base-stride", dest="stride", type=_number, default=None, metavar="STEP",
                   help=f"candidate grid step of the search (default {B.PAPER_STRIDE:.0f})")
    g.add_argument("--num-bases", type=_integer, default=None,
                   help=f"number of bases = heads or K/V groups (default {B.PAPER_NUM_BASES})")
    g.add_argument("--head-dim", type=_integer, default=B.PAPER_HEAD_DIM,
                   help=f"attention head dimension (default {B.PAPER_HEAD_DIM})")
    g.add_argument("--bases-file", dest="file", default=None, metavar="PATH",
                   help="JSON list of bases (or {\"bases\": [...]}) for --base-strategy file")
    for old, dest, kind in (("--strategy", "strategy", None), ("--b-min", "b_min", _number),
                            ("--b-max", "b_max", _number), ("--stride", "stride", _number),
                            ("--file", "file", None)):
        extra = {"choices": B.STRATEGIES} if dest == "strategy" else {"type": kind} if kind else {}
        p.add_argument(old, dest=dest, default=None, help=argparse.SUPPRESS, **extra)
    s = p.add_argument_group("peak-valley search (also what --plot marks)")
    s.add_argument("--window", nargs=2, type=_integer, default=None, metavar=("LO", "HI"),
                   help=f"relative distances LO..HI of the waveform (default "
                        f"{B.DEFAULT_WINDOW[0]} {B.DEFAULT_WINDOW[1]})")
    s.add_argument("--detection", choices=B.DETECTION_RULES, default=None,
                   help=f"which peaks/valleys to keep (default {B.DEFAULT_DETECTION})")
    s.add_argument("--max-extrema", type=_integer, default=None, metavar="K",
                   help=f"peaks and valleys kept per base (default {B.DEFAULT_MAX_EXTREMA})")
    s.add_argument("--min-spacing", type=_integer, default=None,
                   help=f"kept extrema are more than this apart (default {B.DEFAULT_MIN_SPACING})")
    s.add_argument("--lookahead", type=_integer, default=None,
                   help=f"stretch of the 'envelope' rule (default {B.DEFAULT_LOOKAHEAD})")
    s.add_argument("--pairing", choices=B.PAIRINGS, default=None,
                   help=f"peak-to-valley pairing in d_j (default {B.DEFAULT_PAIRING})")
    s.add_argument("--missing-penalty", type=_number, default=None,
                   help="cost per missing peak/valley (default: the window width)")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true",
                   help="print only a JSON list of the bases on stdout")
    o.add_argument("--plot", default=None, metavar="FILE.png",
                   help="write a PNG of the waveforms with their peaks/valleys and of the set")
    o.add_argument("--compare-paper", action="store_true",
                   help="report the overlap with Table 2 (its 31 searched bases)")
    d = p.add_argument_group("diagnostics")
    d.add_argument("--verbose", action="store_true", help="show upstream warnings too (HARPE_VERBOSE=1)")
    d.add_argument("--debug", action="store_true", help="a traceback with bad-input errors too (HARPE_DEBUG=1)")
    return p


def _flagify(message: str) -> str:
    """Name command-line flags instead of the library's parameter names."""
    return re.sub(r"(?<![-\w])(" + "|".join(_FLAG_NAMES) + r")\b", lambda m: _FLAG_NAMES[m.group(1)], message)


def _json_number(x: float):
    x = float(x)
    return int(x) if x.is_integer() and abs(x) < 2 ** 53 else x


def _millions(x: float) -> str:
    """1150000 -> '1.15', 1000000 -> '1.00', 1129032.26 -> '1.129'."""
    text = f"{x / 1e6:.4f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def _search_kw(args) -> dict:
    kw = {}
    if args.window is not None:
        kw["window"] = tuple(args.window)
    for name in SEARCH_OPTIONS[1:]:
        value = getattr(args, name)
        if value is not None:
            kw[name] = value
    return kw


def _build(args):
    """Return (bases in output order, SearchResult or None, seconds)."""
    kw = _search_kw(args)
    t0 = time.perf_counter()
    if args.strategy == "peak-valley":
        res = B.peak_valley_search(
            B.PAPER_B_MIN if args.b_min is None else args.b_min,
            B.PAPER_B_MAX if args.b_max is None else args.b_max,
            B.PAPER_STRIDE if args.stride is None else args.stride,
            B.PAPER_NUM_BASES if args.num_bases is None else args.num_bases,
            args.head_dim, **kw)
        return res.sorted_bases, res, time.perf_counter() - t0
    if kw and not args.plot:
        given = ", ".join(kw)
        raise ValueError(f"{given} only affect --base-strategy peak-valley (or the --plot of another "
                         "strategy); drop them or use --base-strategy peak-valley")
    if args.file is not None and args.strategy != "file":
        raise ValueError(f"--bases-file only applies to --base-strategy file, not {args.strategy}")
    if args.strategy == "file" and args.file is None:
        raise ValueError("--base-strategy file needs --bases-file PATH (a JSON list of bases)")
    bases = B.make_base_set(args.strategy, num_bases=args.num_bases, b_min=args.b_min,
                            b_max=args.b_max, stride=args.stride, head_dim=args.head_dim,
                            path=args.file)
    if args.head_dim <= 0 or args.head_dim % 2:
        raise ValueError(f"head_dim must be a positive even integer, got {args.head_dim}")
    return bases, None, time.perf_counter() - t0


def _describe_search(res) -> str:
    rule = f"{res.detection} {res.max_extrema} peaks/valleys >{res.min_spacing} apart"
    if res.detection == "envelope":
        rule += f" (lookahead {res.lookahead})"
    return (f"b_min {_json_number(res.b_min)}, b_max {_json_number(res.b_max)}, "
            f"stride {_json_number(res.stride)}, head dim {res.head_dim}; "
            f"window {res.window[0]}..{res.window[1]}, {rule}, {res.pairing} pairing")


def _print_table(args, bases, res, seconds, out) -> None:
    pick = {}
    if res is not None:
        for order, b in enumerate(res.bases):
            pick[b] = order
        print(f"{'head':>4}  {'base':>14}  {'millions':>9}  {'picked':>6}", file=out)
    else:
        print(f"{'head':>4}  {'base':>14}  {'millions':>9}", file=out)
    for h, b in enumerate(bases):
        num = _json_number(b)
        line = f"{h:>4}  {num!s:>14}  {_millions(b):>9}"
        if res is not None:
            line += f"  {pick[b]:>6}"
        print(line, file=out)
    order = {"uniform": "ascending by head", "uniform-desc": "descending by head",
             "peak-valley": "sorted ascending", "paper-llama2-7b": "sorted ascending",
             "file": "as in the file"}[args.strategy]
    summary = (f"{args.strategy}: {len(bases)} bases, {_millions(min(bases))}M..{_millions(max(bases))}M, "
               f"{order}")
    if res is not None:
        summary += f"; {_describe_search(res)}; searched in {seconds:.2f} s (picked = pick order)"
    print(summary, file=out)


def _print_compare(bases, out) -> None:
    cmp = B.compare_with_paper(bases)
    print(f"overlap with Table 2: {cmp['overlap']}/{cmp['total']}", file=out)
    if cmp["missing"]:
        print("  in Table 2, not in this set (M): " + " ".join(_millions(b) for b in cmp["missing"]), file=out)
    if cmp["extra"]:
        print("  in this set, not in Table 2 (M): " + " ".join(_millions(b) for b in cmp["extra"]), file=out)


def plot_base_set(path: str, bases, *, strategy: str, head_dim: int, result=None,
                  search_kw: dict | None = None, compare_paper: bool = False) -> None:
    """PNG: each base's waveform with its peaks/valleys, a zoom on them, and the set by head."""
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    window, sorted_b, m, wave, peaks, valleys = _waveforms_and_extrema(bases, head_dim, result, search_kw)
    norm = _stacked_traces(wave)
    n = len(sorted_b)
    zoom = _zoom_range(peaks, valleys, window)
    fig = Figure(figsize=(14 if zoom else 10, max(6.0, 0.28 * n) + 3.0), dpi=100)
    FigureCanvasAgg(fig)
    if zoom:
        gs = fig.add_gridspec(2, 2, height_ratios=[max(6.0, 0.28 * n), 3.0])
        wave_axes = [fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1])]
        set_ax = fig.add_subplot(gs[1, :])
    else:
        gs = fig.add_gridspec(2, 1, height_ratios=[max(6.0, 0.28 * n), 3.0])
        wave_axes = [fig.add_subplot(gs[0, 0])]
        set_ax = fig.add_subplot(gs[1, 0])
    labels = [f"{_millions(b)}M" for b in sorted_b]
    for ax, x_range in zip(wave_axes, (window, zoom)):
        _draw_waveforms(ax, m, norm, peaks, valleys, window, x_range, labels)
    wave_axes[0].set_title(f"attention waveform per base (scaled), window {window[0]}..{window[1]}; "
                           "^ peaks, v valleys", fontsize=10)
    if zoom:
        wave_axes[1].set_title(f"zoom on the detected peaks/valleys ({zoom[0]:.0f}..{zoom[1]:.0f})",
                               fontsize=10)
    _draw_base_set(set_ax, bases, strategy, compare_paper)
    fig.tight_layout()
    _save_png(fig, path)


def _waveforms_and_extrema(bases, head_dim: int, result, search_kw: dict | None):
    """(window, bases sorted, distances, waveforms, peaks, valleys). With a search result the marks
    are exactly the extrema the search used, not a fresh detection with other settings."""
    import numpy as np

    kw = dict(search_kw or {})
    if result is not None:
        kw.update(window=result.window, detection=result.detection, max_extrema=result.max_extrema,
                  min_spacing=result.min_spacing, lookahead=result.lookahead)
    window = B._check_window(kw.pop("window", B.DEFAULT_WINDOW))
    det = {k: kw[k] for k in ("detection", "max_extrema", "min_spacing", "lookahead") if k in kw}
    sorted_b = sorted(bases)
    m = np.arange(window[0], window[1] + 1, dtype=np.float64)
    wave = B.attention_waveform(sorted_b, head_dim, m)
    peaks, valleys = B.find_peaks_and_valleys(wave, m, **det)
    if result is not None:
        by_base = {b: (p, v) for b, p, v in zip(result.bases, result.peaks, result.valleys)}
        peaks = [by_base[b][0] for b in sorted_b]
        valleys = [by_base[b][1] for b in sorted_b]
    return window, sorted_b, m, wave, peaks, valleys


def _stacked_traces(wave):
    """Each trace centred and scaled so that 99% of it fits its row (the rest clipped): waveforms of
    very different amplitude stay readable stacked one per row."""
    import numpy as np

    centred = wave - wave.mean(axis=1, keepdims=True)
    scale = np.percentile(np.abs(centred), 99, axis=1, keepdims=True)
    scale[scale == 0] = 1.0
    return np.clip(0.45 * centred / scale, -0.48, 0.48)


def _zoom_range(peaks, valleys, window):
    """(lo, hi) around all marks, or None when they already fill most of the window (no zoom panel)."""
    import numpy as np

    marks = np.concatenate([np.concatenate([p, v]) for p, v in zip(peaks, valleys)] or [np.zeros(0)])
    if not marks.size:
        return None
    z_lo, z_hi = marks.min(), marks.max()
    pad = max(5.0, 0.03 * (z_hi - z_lo))
    if (z_hi - z_lo + 2 * pad) < 0.6 * (window[1] - window[0]):
        return (max(window[0], z_lo - pad), min(window[1], z_hi + pad))
    return None


def _draw_waveforms(ax, m, norm, peaks, valleys, window, x_range, labels) -> None:
    """One row per base over ``x_range``: its trace, ^ at its peaks and v at its valleys."""
    n = len(labels)
    lo_x, hi_x = x_range
    sel = (m >= lo_x) & (m <= hi_x)
    for row in range(n):
        ax.plot(m[sel], norm[row, sel] + row, lw=0.6, color=f"C{row % 10}")
        pk, vl = peaks[row], valleys[row]
        if pk.size:
            ax.plot(pk, norm[row, (pk - window[0]).astype(int)] + row, "^", ms=3.5,
                    color="black", mfc="none", mew=0.7)
        if vl.size:
            ax.plot(vl, norm[row, (vl - window[0]).astype(int)] + row, "v", ms=3.5,
                    color="red", mfc="none", mew=0.7)
    ax.set_xlim(lo_x, hi_x)
    ax.set_ylim(-0.8, n - 0.2)
    ax.set_yticks(range(n))
    ax.set_yticklabels(labels, fontsize=7 if n > 16 else 9)
    ax.set_xlabel("relative distance m")
    ax.grid(axis="x", lw=0.3, alpha=0.5)


def _draw_base_set(ax, bases, strategy: str, compare_paper: bool) -> None:
    """The bases by head (in millions), with Table 2 beside them when comparing."""
    import numpy as np

    heads = np.arange(len(bases))
    ax.plot(heads, np.asarray(bases) / 1e6, "o", color="C0", label=f"{strategy} ({len(bases)} bases)")
    if compare_paper:
        paper = np.asarray(B.PAPER_LLAMA2_7B_BASES) / 1e6
        ax.plot(np.arange(len(paper)), paper, "x", color="C3", label="Table 2 (paper)")
        cmp = B.compare_with_paper(bases)
        ax.set_title(f"base set by head; overlap with Table 2: {cmp['overlap']}/{cmp['total']}", fontsize=10)
    else:
        ax.set_title("base set by head", fontsize=10)
    ax.set_xlabel("head (K/V group) index")
    ax.set_ylabel("base (millions)")
    ax.grid(lw=0.3, alpha=0.5)
    ax.legend(loc="upper left", fontsize=8)


def _save_png(fig, path) -> None:
    """Written under a temporary name and renamed: an interrupted run never leaves a truncated PNG."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bad_input(exc: BaseException, debug: bool) -> int:
    """One message naming the flag (megatron_harpe/cli.py's contract); the traceback only with --debug."""
    print(f"{PROG}: error: {_flagify(str(exc))}", file=sys.stderr)
    if debug or debug_requested():
        traceback.print_exception(exc, file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.strategy is None:
            parser.error("the following arguments are required: --base-strategy")
    except _UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    setup_output(["--verbose"] if args.verbose else [])
    try:
        if args.plot is not None:
            directory = os.path.dirname(os.path.abspath(args.plot))
            if not os.path.isdir(directory):
                raise ValueError(f"--plot: directory {directory!r} does not exist; create it or "
                                 "give another path")
        bases, res, seconds = _build(args)
    except ValueError as exc:
        return _bad_input(exc, args.debug)

    if args.json:
        print(json.dumps([_json_number(b) for b in bases]))
    else:
        _print_table(args, bases, res, seconds, sys.stdout)
    if args.compare_paper:
        _print_compare(bases, sys.stderr if args.json else sys.stdout)
    if args.plot is not None:
        try:
            plot_base_set(args.plot, bases, strategy=args.strategy, head_dim=args.head_dim,
                          result=res, search_kw=_search_kw(args), compare_paper=args.compare_paper)
        except (ValueError, OSError) as exc:
            return _bad_input(ValueError(f"--plot {args.plot!r}: {exc}").with_traceback(exc.__traceback__),
                              args.debug)
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
