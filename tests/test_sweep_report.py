"""harpe-sweep report: one markdown report with plots over a sweep.

- On the real tiny sweep of tests/test_sweep_local.py (shared, built once per session): every table and
  plot is there, the PNGs are real images, the numbers are those of the runs' metrics.jsonl; a failed and a
  never-run point added to its manifest are listed, not dropped.
- Seeds, sequence lengths and CP sizes are averaged and plotted on a sweep whose run directories hold
  records written by the trainer's own metrics.jsonl writer, with numbers chosen so the expected means and
  standard deviations are known (16 real trainings would cost minutes), plus harpe-eval summary files.
- A Slurm sweep without sweep.json (older harpe-sweep) is read from its jobs.tsv; bad sweep directories
  exit 2 naming the input; an interrupted report leaves the previous one as it was.
"""
from __future__ import annotations

import json
import re
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_harpe.sweeps import report, runs, sweep
from megatron_harpe.training.metrics.jsonl import MetricsJsonl
from tests.data_fixtures import *  # noqa: F401,F403  (spm_model)
from tests.test_sweep_local import TINY, build_tiny_sweep

IMAGE = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, spm_model) -> dict:
    return build_tiny_sweep(str(tmp_path_factory.getbasetemp() / "tiny-sweep"), spm_model)


def _section(md: str, title: str) -> str:
    """The text of the section `title` (## or ###) up to the next heading of the same or a higher level."""
    lines = md.splitlines()
    for i, line in enumerate(lines):
        m = re.fullmatch(rf"(#+) {re.escape(title)}", line)
        if m:
            level, body = len(m.group(1)), []
            for rest in lines[i + 1:]:
                h = re.match(r"(#+) ", rest)
                if h and len(h.group(1)) <= level:
                    break
                body.append(rest)
            return "\n".join(body)
    raise AssertionError(f"no section {title!r} in the report")


def _rows(section: str) -> dict[str, list[str]]:
    """First cell -> cells of every markdown table row in `section` (header and separator rows left out)."""
    out = {}
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            out.setdefault(cells[0].strip("`"), cells)
    return out


def _check_images(md: str, folder: Path) -> list[str]:
    names = IMAGE.findall(md)
    assert names and len(set(names)) == len(names)
    for name in names:
        path = folder / name
        assert path.is_file(), name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 8000, name
        with Image.open(path) as img:
            img.load()
            assert img.format == "PNG" and img.width >= 400 and img.height >= 250, (name, img.size)
            pixels = np.asarray(img.convert("L"), dtype=float)
        assert pixels.std() > 5, f"{name} is (nearly) blank"  # axes, lines and text, not an empty canvas
    return names


# ------------------------------------------------------------------------------------------ the real sweep
def test_the_report_of_a_local_sweep_has_every_table_and_plot(tiny_sweep, capsys):
    sweep_dir = tiny_sweep["sweep_dir"]
    assert sweep.main(["report", str(sweep_dir)]) == 0
    out = capsys.readouterr().out
    assert "harpe-sweep report: 2 point(s) (2 complete)" in out
    folder = sweep_dir / "report"
    md = (folder / "report.md").read_text()
    names = _check_images(md, folder)
    assert set(names) == {"loss_curves.png", "eval_loss_curves.png", "probe_passkey.png"}
    assert sorted(p.name for p in folder.iterdir()) == sorted(names + ["points.json", "report.md"])
    assert not list(sweep_dir.glob(".report*"))  # no staging directory left behind

    points = _rows(_section(md, "Points"))
    assert points["harpe"][6] == "complete" and points["abf_single"][6] == "complete"
    assert "Nothing missing" in _section(md, "Missing")
    final = _rows(_section(md, "Final loss"))
    tput = _rows(_section(md, "Throughput and memory"))
    probes = _rows(_section(md, "Passkey probes during training"))
    for name in ("harpe", "abf_single"):
        records = runs.read_jsonl(tiny_sweep["runs"] / name / "metrics.jsonl")
        train, evals = runs.training_records(records), runs.kind_records(records, "eval")
        probe = runs.kind_records(records, "probe")[-1]
        assert final[name][4] == "1 of 1"
        assert final[name][5] == f"{train[-1]['loss']:.4f} (n=1)"
        assert final[name][6] == f"{evals[-1]['eval_loss']:.4f} (n=1)"
        assert final[name][7] == f"{evals[-1]['eval_perplexity']:.2f} (n=1)"
        assert final[name][8] == "4"
        median = statistics.median(r["tokens_per_s"] for r in train[1:])
        assert tput[name][6] == f"{median:.1f} (n=1)"
        peak = max(r["peak_memory_bytes"] for r in train) / 1024 ** 3
        assert tput[name][8] == f"{peak:.2f}"
        assert probes[name][1] == "4"
        assert probes[name][2] == (f"{100 * probe['probe_passkey_128_exact']:.1f} (n=1) / "
                                   f"{100 * probe['probe_passkey_128_token_accuracy']:.1f} (n=1) / "
                                   f"{probe['probe_passkey_128_nll']:.3f} (n=1)")
    assert "Missing: no point has harpe-eval results" in _section(md, "harpe-eval results")


def test_failed_and_never_run_points_are_listed_not_dropped(tiny_sweep, tmp_path, capsys):
    data = json.loads((tiny_sweep["sweep_dir"] / "sweep.json").read_text())
    failed = dict(data["points"][0], name="yarn", group="yarn", method="yarn", status="failed", exit_code=3,
                  step="training", run_dir=str(tmp_path / "runs" / "yarn"), log=str(tmp_path / "logs" / "yarn.log"))
    never = dict(data["points"][0], name="pi", group="pi", method="pi", status="pending",
                 run_dir=str(tmp_path / "runs" / "pi"))
    data["points"] += [failed, never]
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "sweep.json").write_text(json.dumps(data))
    assert sweep.main(["report", str(tmp_path / "sw")]) == 0
    assert "4 point(s) (2 complete, 1 failed, 1 not started)" in capsys.readouterr().out
    md = (tmp_path / "sw" / "report" / "report.md").read_text()
    points = _rows(_section(md, "Points"))
    assert points["yarn"][6] == "**failed**" and f"training exited 3; log {tmp_path / 'logs' / 'yarn.log'}" in \
        points["yarn"][8]
    assert points["pi"][6] == "**not started**" and f"{tmp_path / 'runs' / 'pi'} does not exist" in points["pi"][8]
    missing = _section(md, "Missing")
    assert "- `yarn`: training not finished (failed: training exited 3" in missing
    assert "- `pi`: training not finished (not started:" in missing
    final = _rows(_section(md, "Final loss"))
    assert final["yarn"][4:6] == ["0 of 1", "missing"] and final["pi"][4:6] == ["0 of 1", "missing"]
    assert final["harpe"][5].endswith("(n=1)") and final["abf_single"][5].endswith("(n=1)")
    _check_images(md, tmp_path / "sw" / "report")


# ------------------------------------------------------------------------------------------ seeds and axes
METHOD_LOSS = {"harpe": 3.0, "abf": 3.5}


def _loss(method: str, seq: int, seed: int, it: int) -> float:
    return METHOD_LOSS[method] + 0.25 * seed + seq / 8192 - 0.1 * it


def _tps(seq: int, cp: int, seed: int) -> float:
    return 1000.0 * cp - seq / 8 + 10 * seed


def make_grid(root: Path, methods=tuple(METHOD_LOSS), seqs=(1024, 2048), cps=(1, 2), seeds=(1, 2)) -> Path:
    """A finished (Slurm-mode) sweep: methods x lengths x CP sizes x seeds, 3 iterations each; harpe-eval ppl for
    every point and passkey for harpe only (the manifest asks for both)."""
    sweep_dir, points = root / "sweeps" / "grid", []
    for method in methods:
        for seq in seqs:
            for cp in cps:
                for seed in seeds:
                    group = f"{method}-s{seq // 1024}k-cp{cp}"
                    name = f"{group}-seed{seed}"
                    run_dir = root / "runs" / "grid" / name
                    run_dir.mkdir(parents=True)
                    writer = MetricsJsonl(str(run_dir / "metrics.jsonl"), 0)
                    writer.write({"event": "fresh start; 1 stage(s), 3 iterations", "iteration": 0, "time": 0.0})
                    for it in (1, 2, 3):
                        writer.write({"iteration": it, "loss": _loss(method, seq, seed, it), "lr": 1e-3,
                                      "tokens_per_s": _tps(seq, cp, seed) * (0.5 if it == 1 else 1.0),
                                      "peak_memory_bytes": seq * 1024 ** 2 // cp + seed, "stage": 0})
                    writer.write({"iteration": 3, "kind": "eval", "eval_loss": _loss(method, seq, seed, 3) + 0.05,
                                  "eval_perplexity": 2.0})
                    writer.write({"iteration": 3, "kind": "probe", "probe_passkey_1024_exact": 0.5 * seed,
                                  "probe_passkey_1024_token_accuracy": 0.5, "probe_passkey_1024_nll": 1.0})
                    writer.write({"event": "finished 3 iterations | ...", "iteration": 3, "time": 1.0})
                    writer.close()
                    summaries = {"ppl": {"kind": "ppl", "lengths": [1024, 4096], "average": 7.0 + seed,
                                         "ppl": {"1024": 6.0 + seed, "4096": 8.0 + seed}, "complete": True}}
                    if method == "harpe":
                        summaries["passkey"] = {"kind": "passkey", "lengths": [1024, 4096], "average": 50.0,
                                                "per_length": {"1024": 100.0, "4096": 0.0}, "complete": True}
                    for command, summary in summaries.items():
                        (run_dir / "eval" / command).mkdir(parents=True)
                        (run_dir / "eval" / command / "summary.json").write_text(json.dumps(summary))
                    points.append({"name": name, "group": group, "method": method, "seq_length": seq,
                                   "trained_seq_length": seq, "layout": f"cp{cp}", "nodes": 1, "world_size": 2,
                                   "parallel": {"tp": 1, "pp": 1, "cp": cp, "dp": 2 // cp}, "seed": seed,
                                   "total_iterations": 3, "run_dir": str(run_dir), "job_id": "17",
                                   "log": str(sweep_dir / "logs" / f"grid-{name}-17.out"), "status": "submitted"})
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "sweep.json").write_text(json.dumps({"format": 1, "name": "grid", "mode": "slurm",
                                                      "eval": [{"command": "ppl", "args": []},
                                                               {"command": "passkey", "args": []}],
                                                      "points": points}))
    return sweep_dir


def _stat(values, digits=4) -> str:
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f} (n={len(values)})"


def test_seeds_are_averaged_and_lengths_and_cp_sizes_plotted(tmp_path, capsys):
    sweep_dir = make_grid(tmp_path)
    assert report.main([str(sweep_dir)]) == 0
    assert "16 point(s) (16 complete)" in capsys.readouterr().out
    md = (sweep_dir / "report" / "report.md").read_text()
    names = _check_images(md, sweep_dir / "report")
    assert set(names) == {"loss_curves.png", "eval_loss_curves.png", "probe_passkey.png", "eval_ppl_by_length.png",
                          "eval_passkey_by_length.png", "throughput_vs_seq.png", "throughput_vs_cp.png"}
    final = _rows(_section(md, "Final loss"))
    tput = _rows(_section(md, "Throughput and memory"))
    assert len(final) == 1 + 8 and len(tput) == 1 + 8  # header + one row per group (the seeds averaged)
    for method in METHOD_LOSS:
        for seq in (1024, 2048):
            for cp in (1, 2):
                group = f"{method}-s{seq // 1024}k-cp{cp}"
                assert final[group][4] == "2 of 2"
                assert final[group][5] == _stat([_loss(method, seq, s, 3) for s in (1, 2)])
                assert final[group][6] == _stat([_loss(method, seq, s, 3) + 0.05 for s in (1, 2)])
                assert tput[group][6] == _stat([_tps(seq, cp, s) for s in (1, 2)], 1)
                assert tput[group][7] == _stat([_tps(seq, cp, s) / 2 for s in (1, 2)], 1)
                assert tput[group][8] == f"{(seq * 1024 ** 2 // cp + 2) / 1024 ** 3:.2f}"
    ppl = _rows(_section(md, "harpe-eval ppl"))
    assert ppl["harpe-s1k-cp1"][1:] == [_stat([7.0, 8.0], 2), _stat([9.0, 10.0], 2), _stat([8.0, 9.0], 2)]
    passkey = _rows(_section(md, "harpe-eval passkey"))
    assert passkey["harpe-s2k-cp2"][1] == "100.00 ± 0.00 (n=2)" and "abf-s1k-cp1" not in passkey
    probes = _rows(_section(md, "Passkey probes during training"))
    assert probes["abf-s2k-cp1"][2] == f"{_stat([50.0, 100.0], 1)} / 50.0 ± 0.0 (n=2) / 1.000 ± 0.000 (n=2)"
    missing = _section(md, "Missing")
    for seed in (1, 2):  # asked for by the manifest, absent in abf's run directories
        name = f"abf-s1k-cp2-seed{seed}"
        assert (f"- `{name}`: harpe-eval passkey: no {tmp_path / 'runs' / 'grid' / name / 'eval' / 'passkey'}"
                f"/summary.json") in missing
    assert missing.count("harpe-eval passkey: no") == 8 and "training not finished" not in missing


def test_a_slurm_sweep_without_a_manifest_is_read_from_jobs_tsv(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sweep.main(["--name", "old", "--dry-run", "--method", f"harpe={TINY / 'harpe.yaml'}",
                       "--method", f"pi={TINY / 'pi.yaml'}", "--seed", "3", "--tasks-per-node", "1"]) == 0
    data = json.loads((tmp_path / "sweeps" / "old" / "sweep.json").read_text())
    assert data["mode"] == "slurm" and [p["status"] for p in data["points"]] == ["dry-run", "dry-run"]
    (tmp_path / "sweeps" / "old" / "sweep.json").unlink()  # as a sweep submitted before sweep.json existed
    capsys.readouterr()
    assert sweep.main(["report", "sweeps/old"]) == 0
    assert "2 point(s) (2 not started)" in capsys.readouterr().out
    md = (tmp_path / "sweeps" / "old" / "report" / "report.md").read_text()
    assert "No sweep.json: points read from sweeps/old/jobs.tsv" in md
    points = _rows(_section(md, "Points"))
    assert points["harpe-seed3"][1:5] == ["harpe", "128", "default", "3"]
    assert f"{tmp_path / 'runs' / 'old' / 'pi-seed3'} does not exist" in points["pi-seed3"][8]
    assert "Missing: no point has training records yet." in md


def test_bad_sweep_directories_exit_2_naming_the_input(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "nopoints").mkdir()
    (tmp_path / "nopoints" / "sweep.json").write_text(json.dumps({"name": "x", "points": []}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "sweep.json").write_text("{not json")
    for directory, message in (("missing", "not a directory"), ("empty", "no sweep.json or jobs.tsv"),
                               ("nopoints", "the sweep lists no points"), ("broken", "is not valid JSON")):
        assert sweep.main(["report", str(tmp_path / directory)]) == 2
        err = capsys.readouterr().err
        assert message in err and str(tmp_path / directory) in err and "Traceback" not in err, err
        assert not (tmp_path / directory / "report").exists()


def test_an_interrupted_report_leaves_the_previous_one(tmp_path, monkeypatch, capsys):
    sweep_dir = make_grid(tmp_path, methods=("harpe",), seqs=(1024,), cps=(1,))
    assert report.main([str(sweep_dir)]) == 0
    before = (sweep_dir / "report" / "report.md").read_text()
    shutil.rmtree(tmp_path / "runs" / "grid" / "harpe-s1k-cp1-seed1")  # the next report would differ

    def interrupted(self, out):
        raise KeyboardInterrupt

    monkeypatch.setattr(report.Report, "section_validation", interrupted)  # after the loss plot was drawn
    assert report.main([str(sweep_dir)]) == 130
    assert "no report written" in capsys.readouterr().err
    assert (sweep_dir / "report" / "report.md").read_text() == before
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["report", "sweep.json"]  # no staging directory left
