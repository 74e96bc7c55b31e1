"""Base sets for HARPE (megatron_harpe.rope.bases) and the harpe-bases CLI."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_harpe.rope import bases as B
from megatron_harpe.rope.bases import (
    PAPER_LLAMA2_7B_BASES, attention_waveform, compare_with_paper, find_peaks_and_valleys,
    load_bases_file, make_base_set, overlap_with_paper, peak_valley_search, uniform_bases,
    validate_bases)
from megatron_harpe.rope.bases_cli import main

REPO = Path(__file__).resolve().parents[1]

# Table 2 of the paper (HARPE.md), in millions, typed in independently of the library.
TABLE2_MILLIONS = """1.00 1.15 1.30 1.45 2.17 2.20 2.23 2.47 2.50 2.65 2.68 2.71 2.74 2.80 2.83 2.92
3.01 3.04 3.10 3.13 3.16 3.22 3.43 3.46 3.61 3.88 4.09 4.15 4.39 4.45 4.51 4.54"""
TABLE2 = [int(round(float(x) * 100)) * 10_000 for x in TABLE2_MILLIONS.split()]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def direct_waveform(base: float, d: int, m: float) -> float:
    return 2.0 / math.sqrt(d) * sum(math.cos(m * base ** (-2.0 * j / d)) for j in range(d // 2))


# ------------------------------------------------------------------ Table 2 preset


def test_paper_constant_is_table2():
    assert len(TABLE2) == 32 and TABLE2[1] == 1_150_000 and TABLE2[-1] == 4_540_000
    assert list(PAPER_LLAMA2_7B_BASES) == TABLE2
    assert list(PAPER_LLAMA2_7B_BASES) == sorted(PAPER_LLAMA2_7B_BASES)
    for b in PAPER_LLAMA2_7B_BASES:  # every value on the 30k grid from 1e6
        assert (b - 1_000_000) % 30_000 == 0
    assert make_base_set("paper-llama2-7b", num_bases=32) == TABLE2
    assert make_base_set("paper-llama2-7b", num_bases=None) == TABLE2


def _cli_commands():
    cmds = [[sys.executable, "-m", "megatron_harpe.rope.bases_cli"],
            [sys.executable, str(REPO / "tools" / "harpe_bases.py")]]
    script = Path(sys.executable).with_name("harpe-bases")
    if script.exists():
        cmds.insert(0, [str(script)])
    return cmds


@pytest.mark.parametrize("cmd", _cli_commands(), ids=lambda c: Path(c[-1]).name)
def test_cli_paper_json_prints_table2_exactly(cmd):
    out = subprocess.run(cmd + ["--base-strategy", "paper-llama2-7b", "--json"], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == TABLE2
    assert "1150000," in out.stdout and ".0" not in out.stdout  # integers printed as integers


# ------------------------------------------------------------------ uniform


def test_uniform_exact_values():
    assert uniform_bases(1e6, 5e6, 5) == [1e6, 2e6, 3e6, 4e6, 5e6]
    assert uniform_bases(1e6, 5e6, 5, descending=True) == [5e6, 4e6, 3e6, 2e6, 1e6]
    assert uniform_bases(1e6, 5e6, 1) == [1e6]
    u = uniform_bases(1e6, 5e6, 32)
    assert len(u) == 32 and u[0] == 1e6 and u[-1] == 5e6
    for h, b in enumerate(u):
        assert b == pytest.approx(1e6 + h * 4e6 / 31, rel=1e-15)
    assert make_base_set("uniform", num_bases=5, b_min=1e6, b_max=5e6) == [1e6, 2e6, 3e6, 4e6, 5e6]
    assert make_base_set("uniform-desc", num_bases=5, b_min=1e6, b_max=5e6) == [5e6, 4e6, 3e6, 2e6, 1e6]


def test_cli_uniform_json_and_table(capsys):
    assert main(["--base-strategy", "uniform-desc", "--num-bases", "5", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == [5_000_000, 4_000_000, 3_000_000, 2_000_000, 1_000_000]
    assert main(["--base-strategy", "uniform", "--num-bases", "3", "--base-min", "1e6", "--base-max", "3e6"]) == 0
    out = capsys.readouterr().out
    assert "2000000" in out and "2.00" in out and "3 bases" in out
    assert main(["--base-strategy", "uniform", "--num-bases", "32", "--json"]) == 0
    vals = json.loads(capsys.readouterr().out)
    assert vals == uniform_bases(1e6, 5e6, 32)  # non-integral floats round-trip exactly


# ------------------------------------------------------------------ waveform


def test_waveform_matches_direct_loop():
    bases = [10_000.0, 1e6, 2.47e6]
    m = np.arange(1000, 4091)  # evenly spaced: fast path
    w = attention_waveform(bases, 128, m)
    assert w.shape == (3, len(m)) and w.dtype == np.float64
    for bi, base in enumerate(bases):
        for k in (0, 1, 777, 2000, len(m) - 1):
            assert w[bi, k] == pytest.approx(direct_waveform(base, 128, float(m[k])), abs=1e-11)
    odd = [0.0, 3.0, 17.5, 4090.0, 131072.0]  # uneven: direct path
    w2 = attention_waveform(bases, 64, odd)
    for bi, base in enumerate(bases):
        for k, mm in enumerate(odd):
            assert w2[bi, k] == pytest.approx(direct_waveform(base, 64, mm), abs=1e-11)
    assert attention_waveform([1e6], 128, [0])[0, 0] == pytest.approx(128 / math.sqrt(128))


# ------------------------------------------------------------------ detection


def test_detection_rules_on_a_known_signal():
    m = np.arange(0, 1000)
    w = np.cos(2 * np.pi * m / 100) * (1 + m / 1000)  # peaks at 100, 200, ..; valleys at ~50, 150, ..
    p, v = find_peaks_and_valleys(w, m, detection="first", max_extrema=3, min_spacing=0)
    assert list(p) == [100, 200, 300] and list(v) == [50, 150, 250]
    p, _ = find_peaks_and_valleys(w, m, detection="last", max_extrema=2, min_spacing=0)
    assert list(p) == [800, 900]
    p, _ = find_peaks_and_valleys(w, m, detection="highest", max_extrema=2, min_spacing=150)
    assert list(p) == [700, 900]  # 800 is too close to 900
    p, _ = find_peaks_and_valleys(w, m, detection="first", max_extrema=3, min_spacing=150)
    assert list(p) == [100, 300, 500]
    p, _ = find_peaks_and_valleys(w, m, detection="envelope", max_extrema=3, min_spacing=0, lookahead=250)
    assert list(p) == [300, 600, 900]  # the highest of 100..300, then of 400..600, then 700..900
    p, v = find_peaks_and_valleys(np.arange(10.0))  # monotone: none, no crash
    assert p.size == 0 and v.size == 0


# ------------------------------------------------------------------ the search


def test_search_properties_determinism_and_speed():
    peak_valley_search(num_bases=2)  # warm-up (first BLAS call)
    times, results = [], []
    for _ in range(2):
        B._grid_waveforms.cache_clear()  # time the whole search, waveforms included
        t0 = time.perf_counter()
        results.append(peak_valley_search(1e6, 5e6, 30_000, 32, 128))
        times.append(time.perf_counter() - t0)
    res = results[0]
    assert min(times) < 1.0, times
    assert len(res.bases) == 32 and len(set(res.bases)) == 32
    assert res.bases[0] == 1e6
    for b in res.bases:
        i = (b - 1e6) / 30_000
        assert i == int(i) and 0 <= i <= 133
    assert res.sorted_bases == sorted(res.bases)
    assert results[1].bases == res.bases
    assert all(np.array_equal(a, b) for a, b in zip(results[1].peaks, res.peaks))
    assert len(res.peaks) == len(res.valleys) == 32 and res.costs[0] == 0.0
    assert make_base_set("peak-valley", num_bases=32) == res.sorted_bases


def test_documented_overlaps_are_what_the_search_gives(capsys):
    default = overlap_with_paper(peak_valley_search().bases)
    literal = overlap_with_paper(peak_valley_search(**B.LITERAL_READING).bases)
    best = overlap_with_paper(peak_valley_search(**B.BEST_GRID_SETTING).bases)
    assert default == B.DOCUMENTED_DEFAULT_OVERLAP
    assert literal == B.DOCUMENTED_LITERAL_OVERLAP
    assert best == B.DOCUMENTED_BEST_GRID_OVERLAP
    doc = (REPO / "docs" / "base_search.md").read_text()
    for what, k in (("default", default), ("literal reading", literal), ("best grid setting", best)):
        assert re.search(rf"\*\*{k} of 31\*\*", doc), f"docs/base_search.md must report the {what} overlap"
    assert main(["--base-strategy", "peak-valley", "--compare-paper"]) == 0  # what the CLI reports
    assert f"overlap with Table 2: {default}/31" in capsys.readouterr().out


def test_overlap_with_paper():
    assert overlap_with_paper(PAPER_LLAMA2_7B_BASES) == 31
    assert overlap_with_paper(PAPER_LLAMA2_7B_BASES[1:]) == 31
    assert overlap_with_paper([1e6]) == 0  # b_min is not a searched base
    assert overlap_with_paper([1_150_000.5, 1_300_001.0, 1_450_002.0, 1_160_000]) == 2  # tolerance 1
    cmp = compare_with_paper([1e6, 1.15e6, 1.16e6])
    assert cmp["overlap"] == 1 and cmp["extra"] == [1.16e6] and len(cmp["missing"]) == 30


def test_cli_compare_paper(capsys):
    assert main(["--base-strategy", "paper-llama2-7b", "--compare-paper"]) == 0
    assert "overlap with Table 2: 31/31" in capsys.readouterr().out
    assert main(["--base-strategy", "uniform", "--num-bases", "5", "--json", "--compare-paper"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out) == [1_000_000, 2_000_000, 3_000_000, 4_000_000, 5_000_000]
    assert "overlap with Table 2: 0/31" in cap.err


def test_short_window_does_not_crash():
    # 30 distances: the first 12 extrema do not exist for most bases
    res = peak_valley_search(num_bases=8, window=(1, 30), max_extrema=12)
    assert len(set(res.bases)) == 8 and res.bases[0] == 1e6
    assert any(len(p) < 12 for p in res.peaks)
    for pairing in B.PAIRINGS:
        for det in B.DETECTION_RULES:
            r = peak_valley_search(num_bases=4, window=(2000, 2004), detection=det, pairing=pairing)
            assert len(set(r.bases)) == 4
    # no extrema at all (3 samples, monotone near 0): all costs tie -> smallest bases first
    r = peak_valley_search(num_bases=4, window=(0, 2))
    assert r.bases == [1e6, 1.03e6, 1.06e6, 1.09e6]


def test_search_small_grid_and_exhausting_candidates():
    r = peak_valley_search(1e6, 2e6, 250_000, 5)  # exactly 4 candidates for 4 picks
    assert sorted(r.bases) == [1e6, 1.25e6, 1.5e6, 1.75e6, 2e6]
    with pytest.raises(ValueError, match=r"only 4 candidate bases.*num_bases=6"):
        peak_valley_search(1e6, 2e6, 250_000, 6)


# ------------------------------------------------------------------ files


def test_load_bases_file(tmp_path):
    f = tmp_path / "b.json"
    f.write_text("[2000000, 1e6, 1500000.5]")
    assert load_bases_file(f) == [2e6, 1e6, 1500000.5]
    assert make_base_set("file", path=f) == [2e6, 1e6, 1500000.5]  # file order
    f.write_text('{"bases": [3, 4]}')
    assert load_bases_file(f) == [3.0, 4.0]
    with pytest.raises(ValueError, match="holds 2 bases but num_bases=3"):
        make_base_set("file", path=f, num_bases=3)


@pytest.mark.parametrize("text, match", [
    ("[1e6, 2e6,", "not valid JSON"),
    ('["a", 2e6]', "not a number"),
    ("[1e6, 1]", "must be > 1"),
    ("[]", "empty"),
    ('{"x": [1e6]}', "without a \"bases\" key"),
    ("3.5", "must hold a list"),
    ("[1e6, true]", "not a number"),
])
def test_bad_bases_files(tmp_path, text, match):
    f = tmp_path / "bad.json"
    f.write_text(text)
    with pytest.raises(ValueError, match=match) as exc:
        load_bases_file(f)
    assert "bad.json" in str(exc.value)


def test_missing_bases_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist") as exc:
        load_bases_file(tmp_path / "nope.json")
    assert "nope.json" in str(exc.value)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("call, match", [
    (lambda: uniform_bases(5e6, 1e6, 4), "b_min must be smaller than b_max"),
    (lambda: uniform_bases(1e6, 1e6, 4), "b_min must be smaller than b_max"),
    (lambda: uniform_bases(1.0, 5e6, 4), "b_min must be > 1"),
    (lambda: uniform_bases(1e6, 5e6, 0), "num_bases must be >= 1"),
    (lambda: peak_valley_search(1e6, 5e6, 0, 4), "stride must be > 0"),
    (lambda: peak_valley_search(1e6, 5e6, -30_000, 4), "stride must be > 0"),
    (lambda: peak_valley_search(5e6, 1e6, 30_000, 4), "b_min must be smaller than b_max"),
    (lambda: peak_valley_search(0.5, 5e6, 30_000, 4), "b_min must be > 1"),
    (lambda: peak_valley_search(1e6, 5e6, 1e6, 32), "only 4 candidate bases.*lower stride"),
    (lambda: peak_valley_search(head_dim=127), "head_dim must be a positive even"),
    (lambda: peak_valley_search(window=(100, 101)), "window must span"),
    (lambda: peak_valley_search(detection="bogus"), "detection must be one of"),
    (lambda: peak_valley_search(pairing="bogus"), "pairing must be one of"),
    (lambda: peak_valley_search(max_extrema=0), "max_extrema must be >= 1"),
    (lambda: make_base_set("paper-llama2-7b", num_bases=16), "exactly 32 bases.*num_bases=16"),
    (lambda: make_base_set("paper-llama2-7b", num_bases=32, b_min=2e6), "preset is fixed"),
    (lambda: make_base_set("bogus", num_bases=4), "unknown base strategy"),
    (lambda: make_base_set("file", num_bases=4), "needs path"),
    (lambda: make_base_set("uniform", num_bases=4, window=(1, 100)), "only apply to strategy 'peak-valley'"),
    (lambda: validate_bases([1e6, 0.5]), r"base #1 is 0.5.*must be > 1"),
    (lambda: validate_bases([1e6, float("nan")]), "not finite"),
    (lambda: validate_bases([1e6, "x"]), "not a number"),
    (lambda: validate_bases([]), "empty"),
    (lambda: validate_bases([1e6] * 8, num_groups=32), "8 bases but the model has 32 K/V groups"),
    (lambda: attention_waveform([1e6], 7, [1, 2]), "head_dim"),
    (lambda: attention_waveform([1.0], 128, [1, 2]), "> 1"),
])
def test_library_rejects_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_validate_bases_ok():
    assert validate_bases([1e6, 2_000_000, np.float32(3e6)], num_groups=3) == [1e6, 2e6, 3e6]


@pytest.mark.parametrize("argv, flag", [
    (["--base-strategy", "uniform", "--base-min", "5e6", "--base-max", "1e6"], "--base-min"),
    (["--base-strategy", "peak-valley", "--base-stride", "0"], "--base-stride"),
    (["--base-strategy", "peak-valley", "--base-stride", "-5"], "--base-stride"),
    (["--base-strategy", "uniform", "--base-min", "1"], "--base-min"),
    (["--base-strategy", "peak-valley", "--base-stride", "1e6"], "--num-bases"),
    (["--base-strategy", "paper-llama2-7b", "--num-bases", "8"], "--num-bases"),
    (["--base-strategy", "file"], "--bases-file"),
    (["--base-strategy", "uniform", "--bases-file", "b.json"], "--bases-file"),
    (["--base-strategy", "uniform", "--window", "1", "100"], "--window"),
    (["--base-strategy", "peak-valley", "--head-dim", "7"], "--head-dim"),
    (["--base-strategy", "uniform", "--base-min", "abc"], "--base-min"),
    (["--base-strategy", "bogus"], "--base-strategy"),
    ([], "--base-strategy"),
    (["--base-strategy", "uniform", "--plot", "/nonexistent-dir/x.png"], "--plot"),
    # the earlier spellings: the same checks; a message from the library names the flag's current name
    (["--strategy", "uniform", "--b-min", "5e6", "--b-max", "1e6"], "--base-min"),
    (["--strategy", "peak-valley", "--stride", "0"], "--base-stride"),
    (["--strategy", "uniform", "--b-min", "abc"], "--b-min"),   # argparse names what was typed
    (["--strategy", "bogus"], "--strategy"),
    (["--strategy", "file"], "--bases-file"),
])
def test_cli_rejects_bad_arguments(capsys, argv, flag):
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert flag in cap.err and "error" in cap.err
    assert "Traceback" not in cap.err and cap.out == ""
    assert len([line for line in cap.err.splitlines() if "error:" in line]) == 1


@pytest.mark.parametrize("new, old", [
    (["--base-strategy", "uniform", "--base-min", "1e6", "--base-max", "3e6", "--num-bases", "3"],
     ["--strategy", "uniform", "--b-min", "1e6", "--b-max", "3e6", "--num-bases", "3"]),
    (["--base-strategy", "peak-valley", "--base-min", "1e6", "--base-max", "2e6", "--base-stride", "50000",
      "--num-bases", "4"],
     ["--strategy", "peak-valley", "--b-min", "1e6", "--b-max", "2e6", "--stride", "50000", "--num-bases", "4"]),
])
def test_cli_flags_named_as_harpe_convert_and_the_old_spellings(capsys, new, old):
    """--base-strategy/--base-min/--base-max/--base-stride/--bases-file as harpe-convert and the config keys
    name them; --strategy/--b-min/--b-max/--stride/--file still work, hidden from --help."""
    assert main(new + ["--json"]) == 0
    by_new = json.loads(capsys.readouterr().out)
    assert main(old + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out) == by_new
    mixed = [new[0], new[1]] + old[2:]
    assert main(mixed + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out) == by_new


def test_cli_bases_file_old_and_new_flag(tmp_path, capsys):
    f = tmp_path / "b.json"
    f.write_text("[3e6, 1e6]")
    for argv in (["--base-strategy", "file", "--bases-file", str(f)], ["--strategy", "file", "--file", str(f)]):
        assert main(argv + ["--json"]) == 0
        assert json.loads(capsys.readouterr().out) == [3_000_000, 1_000_000]


def test_cli_help_shows_the_new_names_only(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--base-strategy", "--base-min", "--base-max", "--base-stride", "--bases-file", "--debug",
                 "--verbose"):
        assert flag in out
    for old in ("--strategy", "--b-min", "--b-max", "--stride", "--file"):
        assert re.search(rf"(?<![-\w]){re.escape(old)}\b", out) is None, old


def test_cli_debug_adds_the_traceback(capsys, monkeypatch):
    monkeypatch.delenv("HARPE_DEBUG", raising=False)
    argv = ["--base-strategy", "uniform", "--base-min", "5e6", "--base-max", "1e6"]
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(argv + ["--debug"]) == 2
    err = capsys.readouterr().err
    assert "--base-min must be smaller" in err and "Traceback" in err
    monkeypatch.setenv("HARPE_DEBUG", "1")
    assert main(argv) == 2
    assert "Traceback" in capsys.readouterr().err


def test_validate_bases_hint_names_the_callers_own_keys():
    """validate_bases is shared by the config layer and the library: its count message names no flag of
    any tool unless the caller gives a hint."""
    with pytest.raises(ValueError) as exc:
        validate_bases([1e6] * 3, num_groups=4)
    assert "give exactly 4 bases" in str(exc.value) and "--" not in str(exc.value)
    with pytest.raises(ValueError, match="3 bases but the model has 4 K/V groups.*set it right here"):
        validate_bases([1e6] * 3, num_groups=4, hint="set it right here")


def test_config_error_names_config_keys_not_cli_flags():
    from megatron_harpe.config.loader import ConfigError, load_config

    with pytest.raises(ConfigError) as exc:
        load_config(None, ["model.position.kind=harpe", "model.position.bases=[2,3,4]"])
    message = str(exc.value)
    assert "model.position.bases" in message and "model.num_query_groups" in message
    assert "--num-bases" not in message and "--" not in message


def test_cli_rejects_bad_file(tmp_path, capsys):
    f = tmp_path / "bad.json"
    f.write_text("[1e6, ")
    assert main(["--base-strategy", "file", "--bases-file", str(f)]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "not valid JSON" in err and "Traceback" not in err
    assert main(["--base-strategy", "file", "--bases-file", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err
    assert "nope.json" in err and "does not exist" in err and "Traceback" not in err
    f.write_text("[1e6, 0.5]")
    assert main(["--base-strategy", "file", "--bases-file", str(f)]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "must be > 1" in err and "Traceback" not in err


def test_cli_plot_failure_leaves_no_file(tmp_path, capsys):
    target = tmp_path / "ro"
    target.mkdir()
    png = target / "x.png"
    (target / "x.png").mkdir()  # a directory where the PNG should go: the rename fails
    assert main(["--base-strategy", "uniform", "--num-bases", "4", "--plot", str(png)]) == 2
    err = capsys.readouterr().err
    assert "--plot" in err and "x.png" in err and "Traceback" not in err
    assert sorted(os.listdir(target)) == ["x.png"] and os.path.isdir(png)  # no temp file left


def test_cli_file_strategy_keeps_file_order(tmp_path, capsys):
    f = tmp_path / "b.json"
    f.write_text("[3e6, 1e6, 2.5e6]")
    assert main(["--base-strategy", "file", "--bases-file", str(f), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [3_000_000, 1_000_000, 2_500_000]


# ------------------------------------------------------------------ plot


def test_cli_plot_writes_png(tmp_path, capsys):
    png = tmp_path / "bases.png"
    assert main(["--base-strategy", "peak-valley", "--num-bases", "6", "--plot", str(png),
                 "--compare-paper"]) == 0
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    assert sorted(os.listdir(tmp_path)) == ["bases.png"]  # no temp file left behind
    assert "overlap with Table 2" in capsys.readouterr().out
    png2 = tmp_path / "uniform.png"
    assert main(["--base-strategy", "uniform", "--num-bases", "4", "--window", "1000", "1100",
                 "--plot", str(png2), "--json"]) == 0
    assert png2.read_bytes().startswith(PNG_SIGNATURE)
    assert json.loads(capsys.readouterr().out) == uniform_bases(1e6, 5e6, 4)
