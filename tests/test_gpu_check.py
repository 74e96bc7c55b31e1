"""tools/gpu_check.py (the entry point; the sections, report and run loop are the package tools/gpu_checks/),
the script the first GPU session runs, kept from rotting on CPU.

One subprocess run in CPU mode (tiny sizes, Triton's interpreter, gloo; ~60 s on 2 cores) must pass every
section a-i, with only the parts CPU mode cannot do (the flash backend, performance targets, the CUDA peak,
Transformer Engine's CP communication types and FP8 attention) recorded as skipped, and skip section j
(harpe-preflight: tests/test_preflight.py runs it on CPU) with that reason; an identical loss trace
after the signal-and-resume of section f, section h's measured / planned rows, section i's two-rank layouts
(TP=2 + SP, CP=2, packed CP=2, a negative control) each against one rank, and a markdown report naming every
section. The report plumbing (a failing check, a section that raises, one that overruns its cap, bad
arguments; section h's per-plan isolation and time skips; section i's scenario choice per platform, its
one-GPU skip, and a failing scenario's relaunch) is checked in-process with stand-ins.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.py"
SECTIONS = "abcdefjghi"  # the run order (common.SECTION_ORDER): j right after f
CPU_LABEL = "CPU mode: correctness only, no performance numbers"


def load_tool():
    """The entry point loaded from its path, as `python tools/gpu_check.py` runs it, with the package modules
    the tests reach into: cli (the run loop: SECTION_FUNCS, ALARM_GRACE_S), common (TITLES, SIZES, CAPS),
    h (section h: COLUMNS, TOLERANCE, world_of_one, measure, estimate_seconds) and i (section i: plan_scenarios,
    the tolerances)."""
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from tools.gpu_checks import cli, common, h_planner, i_multi_gpu

    assert mod.main is cli.main  # the script is the package's command line, nothing of its own
    return SimpleNamespace(main=mod.main, cli=cli, common=common, h=h_planner, i=i_multi_gpu)


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
        if key == "j":  # harpe-preflight: not run on CPU, where tests/test_preflight.py runs it
            assert not checks and sec["skipped"] == [{"part": "the whole section", "reason": "CPU mode: covered by "
                                                      "tests/test_preflight.py on CPU (gloo)"}], sec
            continue
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
    assert report["summary"].startswith("gpu_check PASS: 10/10 sections ok")
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
    """The same code paths as on a GPU: a names the megatron-core release and whether it is supported; b checks
    fp32 and bf16, both apply paths and gradients; c every CP size; d both masks with GQA; e the three layer
    variants; g bench_rope's numerics."""
    _, out, _ = cpu_run
    secs = json.loads((out / "gpu_check.json").read_text())["sections"]
    names = lambda key: [c["name"] for c in secs[key]["checks"]]  # noqa: E731
    from megatron_harpe import compat

    mcore = secs["a"]["numbers"]["megatron_core"]
    assert mcore["installed"] == compat.installed_version() == secs["a"]["numbers"]["versions"]["megatron_core"]
    assert mcore["supported"] is True and mcore["tested_releases"] == list(compat.TESTED_RELEASES)
    assert "megatron-core release is in the range this project supports" in names("a")
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


def test_cpu_mode_section_h_rows_ratios_and_table(cpu_run):
    """Section h on CPU: the tiny model's plans measured and judged; the JSON rows carry exactly the fields
    the markdown table prints, one row per plan, with the ratios the checks judged."""
    _, out, _ = cpu_run
    tool = load_tool()
    h = json.loads((out / "gpu_check.json").read_text())["sections"]["h"]
    keys = [k for k, _ in tool.h.COLUMNS]
    labels = [label for _, label in tool.h.COLUMNS]
    rows = h["numbers"]["plans"]
    assert len(rows) >= 6 and all(list(r) == keys for r in rows)
    assert {r["layout"] for r in rows} == {"plain", "DO", "full(uniform,1)", "sel(core_attn)"}
    assert len({r["seq"] for r in rows}) == 2 and {r["rope"] for r in rows} == {"unfused"}
    for r in rows:
        assert r["result"] == "pass", r
        for comp, tol in tool.h.TOLERANCE.items():
            assert set(r[comp]) == {"measured", "planned", "ratio", "within"}, r[comp]
            if comp == "peak":  # no CUDA allocator on CPU: planned only
                assert r[comp]["measured"] is None and r[comp]["ratio"] is None and r[comp]["planned"] > 0
            else:
                assert r[comp]["measured"] > 0 and abs(r[comp]["ratio"] - 1) <= tol and r[comp]["within"] is True
                assert r[comp]["ratio"] == r[comp]["measured"] / r[comp]["planned"]
        check = next(c for c in h["checks"]
                     if c["name"].startswith(r["plan"] + " ") and "planned vs measured" in c["name"])
        assert check["result"] == "pass" and check["value"] == {c: r[c]["ratio"] for c in tool.h.TOLERANCE
                                                                 if c != "peak"}
    assert set(h["numbers"]["results"]) == {r["plan"] for r in rows}
    [table] = [t for t in h["tables"] if t["title"].startswith("measured / planned per plan")]
    assert table["columns"] == labels and len(table["rows"]) == len(rows)
    assert all(len(cells) == len(labels) and cells[0] == r["plan"] for cells, r in zip(table["rows"], rows))
    md = (out / "gpu_check.md").read_text()
    assert "| " + " | ".join(labels) + " |" in md
    for r in rows:
        assert f"| {r['plan']} | {r['seq']} | local | unfused | {r['layout']} | " in md
    assert "= 1.000" in md and "(CPU mode: not measured)" in md


def test_cpu_mode_section_i_two_ranks_match_one_rank(cpu_run):
    """Section i on 2 gloo ranks: TP=2 + SP, CP=2 and packed documents at CP=2 ran, each loss and gradient
    within the fp32 tolerances of the one-rank model on the same batch and weights; the negative control
    (K/V groups' bases swapped) is seen; TE's comm types and FP8 attention are skipped with their reason."""
    _, out, _ = cpu_run
    tool = load_tool()
    i = json.loads((out / "gpu_check.json").read_text())["sections"]["i"]
    assert i["status"] == "ok" and i["numbers"]["platform"]["backend"] == "gloo"
    scen = i["numbers"]["scenarios"]
    assert {"tp2_sp", "cp2", "packed_cp2", "control_cp2_swapped_bases"} <= set(scen)
    tol = tool.i.TOL_CPU
    for name in ("tp2_sp", "cp2", "packed_cp2"):
        r = scen[name]
        assert r["status"] == "ran", (name, r)
        assert r["loss_abs_diff"] <= tol["loss"] and r["token_loss_max_diff"] <= tol["token_loss"], (name, r)
        assert r["grad_max_abs_diff"] <= tol["grad_abs"] and r["grads_finite"], (name, r)
        assert r["params_checked"] == [r["params_reference"]] * 2 and r["params_reference"] > 10
        checks = [c for c in i["checks"] if c["name"].startswith(name + " (")]
        assert len(checks) == 3 and all(c["result"] == "pass" for c in checks), checks
    assert scen["tp2_sp"]["layout"]["tp"] == 2 and scen["tp2_sp"]["layout"]["sp"] is True
    assert scen["cp2"]["layout"]["cp"] == 2 and scen["cp2"]["layout"]["spec"] == "local"
    packed = scen["packed_cp2"]["layout"]
    assert packed["format"] == "thd" and packed["cp"] == 2 and packed["documents"] >= 5
    assert sum(packed["padding_rows"]) > 0  # documents padded to multiples of 2*cp: padding rows exercised
    ctl = scen["control_cp2_swapped_bases"]
    assert ctl["status"] == "ran" and ctl["grad_max_abs_diff"] > 100 * tol["grad_abs"]
    assert any(c["name"].startswith("control_cp2_swapped_bases") and "sees the swapped bases" in c["name"]
               and c["result"] == "pass" for c in i["checks"])
    skipped = i["numbers"]["skipped_scenarios"]
    for comm in tool.i.COMM_TYPES:
        assert "TE absent (local spec), comm type unused" in skipped[f"cp2_{comm}"]
    assert "FP8 attention needs Transformer Engine" in skipped["fp8_cp2"]
    assert all(s["reason"].startswith("CPU mode") for s in i["skipped"])
    [table] = i["tables"]
    assert [r[0] for r in table["rows"]] == list(scen) + list(skipped)
    assert [r[2] for r in table["rows"][:4]] == ["pass", "pass", "pass", "detected"]
    md = (out / "gpu_check.md").read_text()
    assert "| cp2_a2a | - | skipped: CPU mode: a2a: TE absent (local spec), comm type unused" in md


def test_section_i_plans_scenarios_from_the_combination_rules(tool):
    """Which scenarios run follows config/combinations.py for the TE version and GPU: THD per comm type by TE
    version, a2a+p2p never packed, FP8 attention only on >= sm89 and never with all_gather; without TE one CP=2
    run and each comm type skipped as unused."""
    from megatron_harpe.config.combinations import Platform

    z = dict(tool.common.SIZES["gpu"]["i"], head_dim=128)
    names = lambda plat, cuda=True: [s["name"] for s in tool.i.plan_scenarios(plat, cuda, z)[0]]  # noqa: E731
    base = ["tp2_sp", "cp2_p2p", "packed_cp2_p2p", "cp2_all_gather"]
    fp8 = ["fp8_cp2_p2p", "fp8_cp2_a2a", "fp8_cp2_a2a+p2p"]
    assert names(Platform("2.9", (9, 0), True)) == base + ["cp2_a2a", "cp2_a2a+p2p", "control_cp2_swapped_bases"] + fp8
    assert names(Platform("2.11", (9, 0), True)) == base + ["cp2_a2a", "packed_cp2_a2a", "cp2_a2a+p2p",
                                                            "control_cp2_swapped_bases"] + fp8
    assert names(Platform("2.18", (9, 0), True)) == base + ["packed_cp2_all_gather", "cp2_a2a", "packed_cp2_a2a",
                                                            "cp2_a2a+p2p", "control_cp2_swapped_bases"] + fp8
    assert names(Platform("2.11", (8, 0), True))[-1] == "control_cp2_swapped_bases"  # no FP8 below sm89
    run, skipped = tool.i.plan_scenarios(Platform("2.9", (9, 0), True), True, z)
    reasons = dict(skipped)
    assert "no packed (THD) path" in reasons["packed_cp2_a2a"] and "hierarchical CP" in reasons["packed_cp2_a2a+p2p"]
    assert "no FP8 path for all_gather" in reasons["fp8_cp2_all_gather"]
    [hier] = [s for s in run if s["name"] == "cp2_a2a+p2p"]
    assert hier["hierarchical"] == [1, 2] and hier["cp"] == 2
    assert [s["fp8"] for s in run if s["name"].startswith("fp8_")] == [True] * 3
    assert names(Platform(None, (9, 0), False)) == ["tp2_sp", "cp2", "packed_cp2", "control_cp2_swapped_bases"]
    # a head count a2a cannot split over CP=2 is refused (TE's rule), in both formats
    odd = dict(z, heads=3, groups=1, hidden=384)
    reasons = dict(tool.i.plan_scenarios(Platform("2.18", (9, 0), True), True, odd)[1])
    assert "divisible by CP 2" in reasons["cp2_a2a"] and "divisible by CP 2" in reasons["packed_cp2_a2a"]


def test_section_i_skips_with_fewer_than_two_gpus_and_sizes_the_budget(tool, monkeypatch, tmp_path):
    import torch

    env = SimpleNamespace(cuda=True, cpu=False, mode="gpu", sizes=tool.common.SIZES["gpu"], work=tmp_path)
    for n, budget in ((0, 520.0), (1, 520.0), (2, 520.0 + tool.common.CAPS["gpu"]["i"])):
        monkeypatch.setattr(torch.cuda, "device_count", lambda n=n: n)
        assert tool.cli.default_budget(env, list(SECTIONS)) == budget
        assert tool.cli.default_budget(env, list("abcdefgh")) == 520.0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    sec = tool.common.Section("i", 10)
    tool.i.run(sec, env)
    assert sec.record["checks"] == [] and sec.record["numbers"]["gpus"] == 1
    assert [s["part"] for s in sec.record["skipped"]] == ["the whole section"]
    assert sec.record["skipped"][0]["reason"].startswith("needs 2+ GPUs")


def test_section_i_failing_scenario_is_recorded_and_the_rest_run_in_a_new_launch(tool, monkeypatch, tmp_path):
    """A scenario that raises ends its launch (the other rank may be inside a collective); it is a failed
    check with the worker's traceback, and the scenarios after it run in a new launch."""
    real = tool.i.plan_scenarios

    def plan(platform, cuda, model, cpu_prefix=""):
        run, skipped = real(platform, cuda, model, cpu_prefix)
        bad = dict(run[0], name="tp3", label="TP=3 in a world of 2", tp=3, sp=False)
        return [bad, run[0]], skipped

    monkeypatch.setattr(tool.i, "plan_scenarios", plan)
    code = tool.main(["--cpu", "--out", str(tmp_path), "--sections", "i"])
    i = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["i"]
    assert code == 1 and i["status"] == "fail"
    assert i["numbers"]["scenarios"]["tp3"]["status"] == "error"
    failed = [c for c in i["checks"] if c["result"] == "fail"]
    assert [c["name"] for c in failed] == ["tp3 (TP=3 in a world of 2): runs"]
    assert "Traceback" in i["error"] and "scenario tp3" in i["error"]
    assert i["numbers"]["scenarios"]["tp2_sp"]["status"] == "ran"
    assert all(c["result"] == "pass" for c in i["checks"] if c["name"].startswith("tp2_sp"))
    assert any("launch 1 exited 1" in n for n in i["notes"])
    assert (tmp_path / "work" / "i_multi_gpu" / "launch2.log").exists()


def test_markdown_report_names_every_section(cpu_run):
    _, out, _ = cpu_run
    md = (out / "gpu_check.md").read_text()
    tool = load_tool()
    assert CPU_LABEL in md
    for key in SECTIONS:
        assert f"## {key}. {tool.common.TITLES[key]}" in md
        assert f"| {key}. {tool.common.TITLES[key]} | ok |" in md
    assert "tolerance / goal" in md and "| PASS |" in md and "FAIL" not in md


# ----------------------------------------------------------------------------- the plumbing, in-process
@pytest.fixture
def tool(monkeypatch):
    """The script and its package, its environment changes undone after the test. Its backend choice is left
    out: in this (shared) pytest process another test may have chosen one already."""
    for name in ("CUDA_VISIBLE_DEVICES", "HARPE_BACKEND", "TRITON_INTERPRET", "HARPE_QUIET_WARNINGS"):
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

    monkeypatch.setattr(tool.cli, "SECTION_FUNCS", {"a": passes, "b": fails, "c": raises,
                                                    "d": overruns_cooperatively, "e": hangs, "f": passes,
                                                    "g": passes})
    monkeypatch.setitem(tool.common.CAPS, "cpu", dict(a=5, b=5, c=5, d=5, e=0.5, f=5, g=5))
    monkeypatch.setattr(tool.cli, "ALARM_GRACE_S", 0.0)
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
    monkeypatch.setattr(tool.cli, "SECTION_FUNCS", {k: (lambda sec, env: sec.check("ok", True)) for k in SECTIONS})
    code = tool.main(["--cpu", "--out", str(tmp_path), "--sections", "a,b", "--budget", "1"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert code == 1 and all(s["status"].startswith("skipped: the run's") for s in report["sections"].values())


def _h_stand_ins(tool, monkeypatch, measure):
    """Section h without megatron-core: a stand-in world and a stand-in measurement built from the planner."""
    import contextlib

    from megatron_harpe.planning.measure import planned_bytes
    from megatron_harpe.planning.memory import microbatch_activations, stage_memory

    world = {"entered": 0, "left": 0}

    @contextlib.contextmanager
    def stand_in_world(sec, env):
        world["entered"] += 1
        try:
            yield "stand-in"
        finally:
            world["left"] += 1

    def planned(plan):
        out = planned_bytes(plan, 0, 0)
        out["activations"] = microbatch_activations(plan, 0, 0, 0)
        out["peak_allocated"] = stage_memory(plan, 0).allocated
        return out

    def stand_in_measure(plan):
        p = planned(plan)
        return {"measured": measure(plan, dict(p, peak_allocated=None)), "planned": p, "loss": 1.0}

    monkeypatch.setattr(tool.h, "world_of_one", stand_in_world)
    monkeypatch.setattr(tool.h, "measure", stand_in_measure)
    return world


def test_section_h_isolates_each_plan_and_skips_what_does_not_fit(tool, monkeypatch, tmp_path):
    seen = []

    def measure(plan, measured):
        seen.append(plan)
        if len(seen) == 2:
            raise RuntimeError("stand-in out of memory")
        if len(seen) == 3:
            measured["activations"] *= 1.2
        return measured

    world = _h_stand_ins(tool, monkeypatch, measure)
    long_seq = max(tool.common.SIZES["cpu"]["h"]["seqs"])
    monkeypatch.setattr(tool.h, "estimate_seconds",
                        lambda plan, done, env: 1e6 if plan.workload.seq_length == long_seq else 0)
    code = tool.main(["--cpu", "--out", str(tmp_path), "--sections", "h"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    h = report["sections"]["h"]
    assert code == 1 and h["status"] == "fail" and world == {"entered": 1, "left": 1}
    rows = h["numbers"]["plans"]
    ran = [r for r in rows if r["seq"] != long_seq]
    skipped = [r for r in rows if r["seq"] == long_seq]
    assert [r["result"] for r in ran] == ["pass", "error: RuntimeError: stand-in out of memory",
                                          "fail: activations 1.200"] + ["pass"] * (len(ran) - 3)
    assert len(ran) >= 4 and len(seen) == len(ran)
    assert skipped and all(r["result"] == "skipped (time)" and r["weights"] is None for r in skipped)
    assert ran[2]["activations"]["within"] is False and ran[2]["weights"]["within"] is True
    time_skips = [s for s in h["skipped"] if s["part"].startswith("plan ")]
    assert len(time_skips) == len(skipped) and all(s["reason"].startswith("time: needs ~") for s in time_skips)
    failed = [c["name"] for c in h["checks"] if c["result"] == "fail"]
    assert failed == [f"{ran[1]['plan']} seq {ran[1]['seq']} local unfused RoPE {ran[1]['layout']}: builds, steps "
                      "and is measured", f"{ran[2]['plan']} seq {ran[2]['seq']} local unfused RoPE "
                      f"{ran[2]['layout']}: planned vs measured"]
    assert "stand-in out of memory" in h["error"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "stand-in out of memory" in md and "= 1.200 (outside)" in md and "skipped (time)" in md


def test_section_h_stopped_by_its_cap_keeps_its_rows(tool, monkeypatch, tmp_path):
    def measure(plan, measured):
        if plan.layout.recompute == "full":
            time.sleep(30)  # interrupted by the section's alarm
        return measured

    world = _h_stand_ins(tool, monkeypatch, measure)
    monkeypatch.setattr(tool.h, "estimate_seconds", lambda plan, done, env: 0)
    monkeypatch.setitem(tool.common.CAPS, "cpu", dict(tool.common.CAPS["cpu"], h=2))
    monkeypatch.setattr(tool.cli, "ALARM_GRACE_S", 0.0)
    started = time.monotonic()
    code = tool.main(["--cpu", "--out", str(tmp_path), "--sections", "h"])
    assert time.monotonic() - started < 20
    h = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["h"]
    assert code == 1 and h["status"] == "timeout" and world == {"entered": 1, "left": 1}
    results = [r["result"] for r in h["numbers"]["plans"]]
    assert results[0] == "pass" and results[1] == "timeout (the section's cap)"
    assert len(results) > 2 and all(r == "skipped (the section's cap)" for r in results[2:])
    assert "during plan h2" in h["skipped"][-1]["reason"]


@pytest.mark.parametrize("args", [["--sections", "a,z"], ["--sections", ","], ["--budget", "-1"], ["--bogus"]])
def test_bad_arguments_exit_2(args, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), *args], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()
