"""tools/gpu_check.py, the script the first GPU session runs, kept from rotting on CPU.

One subprocess run in CPU mode (tiny sizes, Triton's interpreter, gloo; ~45 s on 2 cores) must pass every
section a-g, with only the parts CPU mode cannot do (the flash backend, performance targets) recorded as
skipped, an identical loss trace after the signal-and-resume of section f, and a markdown report naming
every section. The report plumbing (a failing check, a section that raises, one that overruns its cap, bad
arguments) is checked in-process with stand-in sections, in well under a second each.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.py"
SECTIONS = "abcdefg"
CPU_LABEL = "CPU mode: correctness only, no performance numbers"


def load_tool():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_cpu")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--out", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    return proc, out, time.monotonic() - started


def test_cpu_mode_passes_every_section(cpu_run):
    proc, out, seconds = cpu_run
    assert proc.returncode == 0, proc.stdout[-8000:] + "\n--- stderr ---\n" + proc.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "cpu" and report["label"] == CPU_LABEL and report["exit_code"] == 0
    assert list(report["sections"]) == list(SECTIONS)
    for key, sec in report["sections"].items():
        assert sec["status"] == "ok", (key, sec["status"], sec.get("error"))
        checks = [c for c in sec["checks"] if c["kind"] == "check"]
        assert checks, f"section {key} checks nothing"
        assert all(c["result"] == "pass" for c in checks), [c for c in checks if c["result"] != "pass"]
        # CPU mode skips only what it cannot do, and says so
        for skipped in sec["skipped"]:
            assert skipped["reason"].startswith("CPU mode"), (key, skipped)
    skipped_parts = {key: [s["part"] for s in sec["skipped"]] for key, sec in report["sections"].items()}
    assert any("flash" in p for p in skipped_parts["a"]) and any("flash" in p for p in skipped_parts["d"])
    # no performance targets are judged on CPU
    assert not [c for sec in report["sections"].values() for c in sec["checks"] if c["kind"] == "target"]
    assert CPU_LABEL in proc.stdout
    # the one-line summary closes the output and is the report's
    assert proc.stdout.strip().splitlines()[-1] == report["summary"]
    assert report["summary"].startswith("gpu_check PASS: 7/7 sections ok")
    print(f"gpu_check --cpu took {seconds:.0f} s (report: {report['duration_s']} s)")


def test_cpu_mode_resume_trace_is_identical(cpu_run):
    _, out, _ = cpu_run
    f = json.loads((out / "gpu_check.json").read_text())["sections"]["f"]
    trace = f["numbers"]["loss_trace"]
    iterations = f["numbers"]["model"]["iterations"]
    assert len(trace["straight"]) == iterations and trace["interrupted_then_resumed"] == trace["straight"]
    assert f["numbers"]["trace_max_abs_diff"] == {"before_signal": 0.0, "after_resume": 0.0}
    check = next(c for c in f["checks"] if c["name"].startswith("resumed loss trace"))
    assert check["result"] == "pass"
    assert any(c["name"].startswith("SIGTERM after iteration") and c["result"] == "pass" for c in f["checks"])


def test_cpu_mode_numbers_the_gpu_run_will_fill(cpu_run):
    """The same code paths as on a GPU: b checks fp32 and bf16, both apply paths and gradients; c every CP
    size; d both masks with GQA; e the three layer variants; g bench_rope's numerics."""
    _, out, _ = cpu_run
    secs = json.loads((out / "gpu_check.json").read_text())["sections"]
    names = lambda key: [c["name"] for c in secs[key]["checks"]]  # noqa: E731
    for dtype in ("fp32", "bf16"):
        for path in ("fused", "unfused"):
            assert f"{dtype} {path} gradients vs float64 (rotation by -angle)" in names("b")
            assert f"{dtype} {path} forward vs float64 (exact-angle)" in names("b")
    assert sum("HARPE table == megatron-core RotaryEmbedding table" in n for n in names("b")) >= 2
    assert [n for n in names("c") if "get_pos_emb_on_this_cp_rank" in n] == [
        f"cp {cp}: every rank's HARPE table == get_pos_emb_on_this_cp_rank(full table) (torch.equal)"
        for cp in (2, 4, 8)]
    assert {"causal", "lower-right"} <= {n.split()[0] for n in names("d")}
    assert {"one-base", "harpe-table", "harpe-fused"} <= set(secs["e"]["numbers"])
    assert secs["g"]["numbers"]["bench_rows"] and all(r["fused_matches_unfused"] for r in secs["g"]["numbers"]["bench_rows"])
    assert secs["f"]["numbers"]["throughput"]["tokens_per_s_median"] > 0


def test_markdown_report_names_every_section(cpu_run):
    _, out, _ = cpu_run
    md = (out / "gpu_check.md").read_text()
    tool = load_tool()
    assert CPU_LABEL in md
    for key in SECTIONS:
        assert f"## {key}. {tool.TITLES[key]}" in md
        assert f"| {key}. {tool.TITLES[key]} | ok |" in md
    assert "tolerance / goal" in md and "| PASS |" in md and "FAIL" not in md


# ----------------------------------------------------------------------------- the plumbing, in-process
@pytest.fixture
def tool(monkeypatch):
    """The script as a module, its environment changes undone after the test. Its backend choice is left out:
    in this (shared) pytest process another test may have chosen one already."""
    for name in ("CUDA_VISIBLE_DEVICES", "HARPE_BACKEND", "TRITON_INTERPRET"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
    import megatron_harpe.backends

    monkeypatch.setattr(megatron_harpe.backends, "setup_backend", lambda force_cpu=None: "cpu")
    return load_tool()


def test_failed_check_error_and_overrun_are_recorded_and_the_run_goes_on(tool, monkeypatch, tmp_path):
    def passes(sec, env):
        sec.check("fine", True, value=1.0, tolerance="exact")

    def fails(sec, env):
        sec.check("wrong", False, value=2.0, tolerance="< 1")
        sec.check("after the failure", True)

    def raises(sec, env):
        raise ValueError("boom in a section")

    def overruns_cooperatively(sec, env):
        sec.check("before the cap", True)
        sec.need(1e6, "a part that needs more time than the cap")

    def hangs(sec, env):
        time.sleep(30)  # interrupted by the section's alarm

    monkeypatch.setattr(tool, "SECTION_FUNCS", {"a": passes, "b": fails, "c": raises, "d": overruns_cooperatively,
                                                "e": hangs, "f": passes, "g": passes})
    monkeypatch.setitem(tool.CAPS, "cpu", dict(a=5, b=5, c=5, d=5, e=0.5, f=5, g=5))
    monkeypatch.setattr(tool, "ALARM_GRACE_S", 0.0)
    started = time.monotonic()
    code = tool.main(["--cpu", "--out", str(tmp_path), "--sections", "a,b,c,d,e,f"])
    assert time.monotonic() - started < 20
    assert code == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {k: s["status"] for k, s in report["sections"].items()}
    assert status == {"a": "ok", "b": "fail", "c": "error", "d": "timeout", "e": "timeout", "f": "ok"}
    assert "ValueError: boom in a section" in report["sections"]["c"]["error"]
    assert [c["name"] for c in report["sections"]["b"]["checks"]] == ["wrong", "after the failure"]
    assert "needs more time" in report["sections"]["d"]["skipped"][0]["reason"]
    assert report["sections"]["e"]["skipped"][0]["part"] == "the rest of the section"
    assert report["summary"].startswith("gpu_check FAIL: 2/6 sections ok")
    md = (tmp_path / "gpu_check.md").read_text()
    assert "boom in a section" in md and "| wrong | FAIL | 2 | < 1 |" in md


def test_spent_budget_skips_the_remaining_sections(tool, monkeypatch, tmp_path):
    monkeypatch.setattr(tool, "SECTION_FUNCS", {k: (lambda sec, env: sec.check("ok", True)) for k in SECTIONS})
    code = tool.main(["--cpu", "--out", str(tmp_path), "--sections", "a,b", "--budget", "1"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert code == 1 and all(s["status"].startswith("skipped: the run's") for s in report["sections"].values())


@pytest.mark.parametrize("args", [["--sections", "a,z"], ["--sections", ","], ["--budget", "-1"], ["--bogus"]])
def test_bad_arguments_exit_2(args, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), *args], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()
