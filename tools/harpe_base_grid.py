#!/usr/bin/env python
"""Re-run the experiments of docs/base_search.md: overlap with Table 2 of search settings.

    python tools/harpe_base_grid.py [--jobs 2] [--out grid.json] [--no-scans]

Each setting runs Algorithm 1 in the paper's setting (b_min 1e6, b_max 5e6, stride 30k, 32
bases, head dim 128) and counts how many of Table 2's 31 searched bases it picks. First the
grid (840 settings), with the chance level (31 of the 133 candidates drawn at random); then
the neighbourhoods of the default and of the best setting. Well under a minute.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_harpe.rope.bases import (  # noqa: E402
    DETECTION_RULES, PAIRINGS, overlap_with_paper, peak_valley_search)

WINDOWS = [(1000, 4090), (1, 4096), (1, 2048), (1000, 8192), (2048, 8192), (1, 16384), (4096, 32768)]
MAX_EXTREMA = [3, 4, 6, 8, 12]
MIN_SPACING = [0, 50, 100]


def run_window(window):
    rows = []
    for det, k, sp, pair in itertools.product(DETECTION_RULES, MAX_EXTREMA, MIN_SPACING, PAIRINGS):
        res = peak_valley_search(window=window, detection=det, max_extrema=k, min_spacing=sp,
                                 pairing=pair)
        rows.append(dict(window=list(window), detection=det, max_extrema=k, min_spacing=sp,
                         pairing=pair, overlap=overlap_with_paper(res.bases)))
    return rows


def chance(num_cand=133, picks=31, hits=31):
    """Mean and sd of the hypergeometric overlap of a random pick with Table 2."""
    p = [math.comb(hits, x) * math.comb(num_cand - hits, picks - x) / math.comb(num_cand, picks)
         for x in range(min(hits, picks) + 1)]
    mean = sum(x * q for x, q in enumerate(p))
    sd = math.sqrt(sum((x - mean) ** 2 * q for x, q in enumerate(p)))
    return mean, sd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=None, help="write every row as JSON here")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--no-scans", action="store_true", help="skip the sensitivity scans")
    args = ap.parse_args(argv)
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = [r for part in pool.map(run_window, WINDOWS) for r in part]
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=0)
    vals = [r["overlap"] for r in rows]
    mean, sd = chance()
    print(f"{len(rows)} settings in {time.time() - t0:.0f} s; overlap mean {sum(vals) / len(vals):.2f}, "
          f"max {max(vals)}; chance (random 31 of 133): {mean:.2f} +- {sd:.2f}")
    hist = {v: vals.count(v) for v in sorted(set(vals))}
    print("histogram (overlap: settings):", hist)
    for key in ("window", "detection", "max_extrema", "min_spacing", "pairing"):
        groups = {}
        for r in rows:
            groups.setdefault(str(r[key]), []).append(r["overlap"])
        print(f"by {key}: " + ", ".join(f"{g}: mean {sum(v) / len(v):.2f} max {max(v)}"
                                       for g, v in groups.items()))
    rows.sort(key=lambda r: -r["overlap"])
    for r in rows[:args.top]:
        print(r)
    if not args.no_scans:
        sensitivity()
    return 0


def _ov(**kw) -> int:
    return overlap_with_paper(peak_valley_search(**kw).bases)


def sensitivity() -> None:
    """The neighbourhoods of the default, of the best grid setting, and the window's lower end."""
    print("\n[default family] window 1000..4090, envelope, index pairing; "
          "rows: max_extrema/min_spacing, columns: lookahead 300 400 500 600 800 1000")
    vals = []
    for k in (4, 6, 8):
        for sp in (30, 50, 70, 100):
            row = [_ov(window=(1000, 4090), detection="envelope", max_extrema=k, min_spacing=sp,
                       lookahead=la, pairing="index") for la in (300, 400, 500, 600, 800, 1000)]
            vals += row
            print(f"  K={k:<2} spacing={sp:<3} {row}")
    print(f"  mean {sum(vals) / len(vals):.2f}, min {min(vals)}, max {max(vals)}")
    print("[default, other pairing] the same with nearest pairing:")
    vals = [_ov(window=(1000, 4090), detection="envelope", max_extrema=k, min_spacing=sp,
                lookahead=la, pairing="nearest")
            for k in (4, 6, 8) for sp in (30, 50, 70, 100) for la in (300, 400, 500, 600, 800, 1000)]
    print(f"  mean {sum(vals) / len(vals):.2f}, min {min(vals)}, max {max(vals)}")
    print("[default, window lower end] lo: overlap (hi = 4090)")
    print("  " + ", ".join(f"{lo}: {_ov(window=(lo, 4090))}"
                           for lo in (1, 256, 512, 750, 900, 1000, 1100, 1250, 1500, 2000)))
    print("[best grid setting] window 1..4096, first, nearest pairing; rows: max_extrema, "
          "columns: min_spacing 30 40 45 50 55 60 70")
    for k in (8, 10, 11, 12, 13, 14, 16):
        row = [_ov(window=(1, 4096), detection="first", max_extrema=k, min_spacing=sp,
                   pairing="nearest") for sp in (30, 40, 45, 50, 55, 60, 70)]
        print(f"  K={k:<2} {row}")


if __name__ == "__main__":
    sys.exit(main())
