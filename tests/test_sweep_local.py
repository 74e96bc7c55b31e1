"""harpe-sweep --local: a grid trained on this machine, point after point, resumable.

One real sweep serves this module and tests/test_sweep_report.py (`tiny_sweep`, built once per session):
two tiny methods (HARPE and single-stage ABF), 4 iterations each with validation loss and passkey probes,
run as a user would:

1. the sweep is interrupted (SIGINT, as Ctrl-C) once the first point has logged an iteration: the sweep
   stops that training gracefully (checkpoint, exit 75) and exits 130 telling to rerun;
2. the same command again: the first point resumes from its checkpoint, the second trains;
3. the same command a third time: both points are done and skipped, nothing is started.

Failures, the seed axis, local layouts and bad input are checked on points that fail or are not run, which
costs no training.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_harpe.sweeps import local, manifest, runs, sweep
from tests.data_fixtures import *  # noqa: F401,F403  (spm_model: the probes' tokenizer)

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = REPO_ROOT / "examples" / "tiny"
ITERATIONS = 4
SETTINGS = [f"training.iterations={ITERATIONS}", "checkpoint.save_interval=2", "training.eval_interval=2",
            "training.eval_iterations=1", "training.probe.lengths=[128]", "training.probe.prompts=2",
            "model.vocab_size=1024", "logging.tensorboard=false"]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run(cmd, cwd) -> dict:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    return {"rc": proc.returncode, "out": proc.stdout, "err": proc.stderr, "seconds": time.perf_counter() - started}


def _training_iterations(metrics: Path) -> list[int]:
    return [r["iteration"] for r in runs.read_jsonl(metrics) if runs.is_training(r)]


@functools.lru_cache(maxsize=None)
def build_tiny_sweep(base: str, tokenizer: str) -> dict:
    """The shared sweep (module doc); returns what each of the three invocations did."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    sets = [a for s in SETTINGS + [f"data.tokenizer_model={tokenizer}"] for a in ("--set", s)]
    cmd = [sys.executable, "-m", "megatron_harpe.sweeps.sweep", "--local", "--name", "tiny",
           "--out-dir", str(base / "sweeps"), "--runs-root", str(base / "runs"),
           "--method", f"harpe={TINY / 'harpe.yaml'}", "--method", f"abf_single={TINY / 'abf_single.yaml'}", *sets]
    sweep_dir, runs_dir = base / "sweeps" / "tiny", base / "runs" / "tiny"
    metrics = runs_dir / "harpe" / "metrics.jsonl"

    # 1. interrupted (Ctrl-C) during the first point's training, once it has logged an iteration
    proc = subprocess.Popen(cmd, cwd=base, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and not _training_iterations(metrics) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    first = {"rc": proc.returncode, "out": out, "err": err,
             "manifest": json.loads((sweep_dir / "sweep.json").read_text()),
             "latest": runs.latest_iteration(runs_dir / "harpe" / "checkpoints"),
             "records": runs.read_jsonl(metrics)}
    # 2. the same command: the interrupted point resumes, the other one trains
    second = _run(cmd, base)
    second["logs"] = {p: (sweep_dir / "logs" / f"{p}.log").read_text() for p in ("harpe", "abf_single")}
    # 3. the same command again: nothing left to do
    third = _run(cmd, base)
    third["logs"] = {p: (sweep_dir / "logs" / f"{p}.log").read_text() for p in ("harpe", "abf_single")}
    return {"base": base, "sweep_dir": sweep_dir, "runs": runs_dir, "cmd": cmd, "first": first, "second": second,
            "third": third}


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, spm_model) -> dict:
    return build_tiny_sweep(str(tmp_path_factory.getbasetemp() / "tiny-sweep"), spm_model)


# ------------------------------------------------------------------------------------------ the real sweep
def test_an_interrupted_point_resumes_from_its_checkpoint(tiny_sweep):
    first, second = tiny_sweep["first"], tiny_sweep["second"]
    assert first["rc"] == 130, first["out"] + first["err"]
    assert "rerun the same command to continue" in first["err"]
    statuses = {p["name"]: p["status"] for p in first["manifest"]["points"]}
    assert statuses == {"harpe": "interrupted", "abf_single": "pending"}
    k = first["latest"]
    assert k is not None and 1 <= k < ITERATIONS, (k, first["out"], first["err"])  # stopped mid-run, checkpointed
    assert "interrupted after" in first["out"] and f"checkpoint at iteration {k}" in first["out"]
    assert [r["iteration"] for r in first["records"] if runs.is_training(r)] == list(range(1, k + 1))

    assert second["rc"] == 0, second["out"] + second["err"]
    assert f"[1/2] harpe: training (1 rank, resuming from iteration {k} of {ITERATIONS}) ... done in" in second["out"]
    assert f"at iteration {k}" in second["logs"]["harpe"] and "resumed from" in second["logs"]["harpe"]
    records = runs.read_jsonl(tiny_sweep["runs"] / "harpe" / "metrics.jsonl")
    # the first attempt's records are kept as they were, the resumed run's are appended after its resume event
    assert records[:len(first["records"])] == first["records"]
    appended = records[len(first["records"]):]
    assert appended[0]["event"].startswith("resumed from")
    assert [r["iteration"] for r in appended if runs.is_training(r)] == list(range(k + 1, ITERATIONS + 1))
    assert [r["iteration"] for r in records if runs.is_training(r)] == list(range(1, ITERATIONS + 1))
    assert runs.latest_iteration(tiny_sweep["runs"] / "harpe" / "checkpoints") == ITERATIONS


def test_the_local_sweep_trains_every_point_and_a_rerun_skips_them(tiny_sweep):
    second, third = tiny_sweep["second"], tiny_sweep["third"]
    assert "[2/2] abf_single: training (1 rank) ... done in" in second["out"]
    assert "harpe-sweep: 2 point(s) in" in second["out"] and "2 run, 0 done before, 0 failed" in second["out"]
    for name in ("harpe", "abf_single"):
        run_dir = tiny_sweep["runs"] / name
        records = runs.read_jsonl(run_dir / "metrics.jsonl")
        first, last = runs.loss_range(records)
        assert f"{first:.4g} -> {last:.4g}" in second["out"]
        done = json.loads((run_dir / ".sweep_done").read_text())
        assert done["exit_code"] == 0 and done["iterations"] == ITERATIONS and done["loss"] == [first, last]
        assert done["train_seconds"] > 0 and done["checkpoint"] == f"iter_{ITERATIONS:07d}"
        evals = [r["iteration"] for r in runs.kind_records(records, "eval")]
        # the interrupted point skipped the evaluation due at its stop (a signal leaves the time to the checkpoint)
        assert evals == [2, 4] if name == "abf_single" else evals[-1] == ITERATIONS
        assert runs.kind_records(records, "probe")[-1]["iteration"] == ITERATIONS

    assert third["rc"] == 0, third["out"] + third["err"]
    assert "[1/2] harpe: done before" in third["out"] and "[2/2] abf_single: done before" in third["out"]
    assert "0 run, 2 done before, 0 failed" in third["out"]
    assert third["logs"] == second["logs"]  # nothing was started: no step appended to any log
    data = json.loads((tiny_sweep["sweep_dir"] / "sweep.json").read_text())
    assert data["mode"] == "local" and [p["status"] for p in data["points"]] == ["done", "done"]
    point = data["points"][0]
    assert (point["run_dir"], point["world_size"], point["parallel"]) == (
        str(tiny_sweep["runs"] / "harpe"), 1, {"tp": 1, "pp": 1, "cp": 1, "dp": 1})
    assert point["log"] == str(tiny_sweep["sweep_dir"] / "logs" / "harpe.log") and point["total_iterations"] == 4
    rows = (tiny_sweep["sweep_dir"] / "jobs.tsv").read_text().splitlines()
    assert rows[0].split("\t") == manifest.JOBS_COLUMNS and [r.split("\t")[0] for r in rows[1:]] == ["harpe",
                                                                                                       "abf_single"]


# ------------------------------------------------------------------------------------------ no training
def _bad_data(tmp_path) -> list[str]:
    """Points that harpe-train refuses at once (before torch loads): exit 2, as a real failure would be."""
    return ["--no-validate", "--set", "data.kind=indexed", "--set", f"data.blend=[{tmp_path / 'missing'}]"]


def _main(capsys, argv) -> dict:
    code = sweep.main(argv)
    captured = capsys.readouterr()
    return {"rc": code, "out": captured.out, "err": captured.err}


def test_failed_points_are_listed_with_their_logs_and_the_others_still_run(tmp_path, capsys):
    base = ["--local", "--name", "bad", "--out-dir", str(tmp_path / "sweeps"), "--runs-root", str(tmp_path / "runs"),
            "--method", f"a={TINY / 'harpe.yaml'}", "--method", f"b={TINY / 'abf_single.yaml'}", *_bad_data(tmp_path)]
    res = _main(capsys, base)
    logs = tmp_path / "sweeps" / "bad" / "logs"
    assert res["rc"] == 1, res["out"] + res["err"]
    assert "[1/2] a: training (1 rank) ... FAILED (exit 2)" in res["out"]
    assert "[2/2] b: training (1 rank) ... FAILED (exit 2)" in res["out"]  # went on after the first failure
    assert "missing.bin does not exist" in res["out"]  # the log's tail is shown
    assert f"a: training exited 2; log {logs / 'a.log'}" in res["err"]
    assert f"b: training exited 2; log {logs / 'b.log'}" in res["err"]
    assert "missing.bin does not exist" in (logs / "b.log").read_text()
    data = json.loads((tmp_path / "sweeps" / "bad" / "sweep.json").read_text())
    assert [(p["status"], p["exit_code"], p["step"]) for p in data["points"]] == [("failed", 2, "training")] * 2

    res = _main(capsys, base + ["--stop-on-failure"])
    assert res["rc"] == 1 and "[1/2] a:" in res["out"] and "[2/2]" not in res["out"]
    assert "1 failed, 1 not run" in res["out"] and "--stop-on-failure" in res["err"]
    data = json.loads((tmp_path / "sweeps" / "bad" / "sweep.json").read_text())
    assert [p["status"] for p in data["points"]] == ["failed", "failed"]  # b's earlier failure is kept


def test_seed_axis_and_local_layouts(tmp_path, capsys):
    code = sweep.main(["--local", "--dry-run", "--name", "s", "--out-dir", str(tmp_path / "sweeps"), "--runs-root",
                       str(tmp_path / "runs"), "--method", f"harpe={TINY / 'harpe.yaml'}", "--seed", "1", "--seed", "2",
                       "--layout", "one:tp=1", "--layout", "cp2:cp=2", "--layout", "dp2:dp=2",
                       "--set", "training.iterations=3"])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "sweeps" / "s" / "sweep.json").read_text())
    names = [p["name"] for p in data["points"]]
    assert names == [f"harpe-{lay}-seed{s}" for lay in ("one", "cp2", "dp2") for s in (1, 2)]
    by_name = {p["name"]: p for p in data["points"]}
    assert by_name["harpe-cp2-seed2"]["group"] == "harpe-cp2" and by_name["harpe-cp2-seed2"]["seed"] == 2
    assert [by_name[f"harpe-{lay}-seed1"]["world_size"] for lay in ("one", "cp2", "dp2")] == [1, 2, 2]
    assert by_name["harpe-dp2-seed1"]["parallel"] == {"tp": 1, "pp": 1, "cp": 1, "dp": 2}
    from megatron_harpe.config.loader import load_config

    cfg = load_config(tmp_path / "sweeps" / "s" / "configs" / "harpe-cp2-seed2.yaml")
    assert (cfg.training.seed, cfg.parallel.context, cfg.run_dir) == (2, 2, str(tmp_path / "runs" / "s" /
                                                                               "harpe-cp2-seed2"))
    assert local.train_command("c.yaml", 1)[1:] == ["-m", "megatron_harpe.train", "--config", "c.yaml"]
    assert "--nproc-per-node=2" in local.train_command("c.yaml", 2)
    cp2 = [line for line in out.splitlines() if line.endswith("harpe-cp2-seed1.yaml")]
    assert len(cp2) == 1 and "torch.distributed.run" in cp2[0] and "--nproc-per-node=2" in cp2[0]
    assert "harpe-sweep: 6 point(s), none run (dry run)" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, message", [
    (["--local", "--layout", "big:nodes=2,tp=2"], "runs on this machine"),
    (["--local", "--eval", "bogus --x 1"], "starts with one of ppl, passkey, niah, needle"),
    (["--local", "--eval", "ppl --model x --data d.jsonl"], "--model is set by the sweep"),
    (["--local", "--eval", "ppl --data d", "--eval", "ppl --data e"], "names a command twice"),
    (["--local", "--eval-args", "--device cpu"], "--eval-args without --eval"),
    (["--local", "--eval", "passkey --lengths 128"], "have no data.tokenizer_model"),
    (["--eval", "passkey"], "need --local"),
    (["--local", "--seed", "1", "--seed", "1"], "--seed values repeat"),
    (["--local", "--chain", "afterok"], "--chain and --sbatch-arg are for Slurm"),
    (["--layout", "x:dp=3", "--tasks-per-node", "2", "--dry-run"], "says dp=3"),
])
def test_bad_grids_exit_2_naming_the_input(tmp_path, capsys, args, message):
    code = sweep.main(["--name", "g", "--out-dir", str(tmp_path / "sweeps"), "--runs-root", str(tmp_path / "runs"),
                       "--method", f"harpe={TINY / 'harpe.yaml'}", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


def test_one_local_sweep_at_a_time(tmp_path, capsys):
    sweep_dir = tmp_path / "sweeps" / "g"
    with local.sweep_lock(sweep_dir):
        code = sweep.main(["--local", "--dry-run", "--name", "g", "--out-dir", str(tmp_path / "sweeps"),
                           "--method", f"harpe={TINY / 'harpe.yaml'}"])
    assert code == 2 and "is being run by another harpe-sweep --local" in capsys.readouterr().err
    assert sweep.main(["--local", "--dry-run", "--name", "g", "--out-dir", str(tmp_path / "sweeps"),
                       "--runs-root", str(tmp_path / "runs"), "--method", f"harpe={TINY / 'harpe.yaml'}"]) == 0


def test_eval_steps_are_the_export_then_harpe_eval_per_command(tmp_path, capsys):
    """The commands --eval runs after training (a real export + harpe-eval run costs ~30 s of CPU, more than
    this suite's budget; docs/sweeps.md shows one)."""
    code = sweep.main(["--local", "--dry-run", "--name", "e", "--out-dir", str(tmp_path / "sweeps"), "--runs-root",
                       str(tmp_path / "runs"), "--method", f"harpe={TINY / 'harpe.yaml'}",
                       "--eval", "passkey --lengths 128,256 --samples 1", "--eval", "ppl --data d.jsonl --lengths 64",
                       "--eval-args", "--device cpu", "--export-args", "--tokenizer tok.model"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(sys.executable)]
    assert code == 0 and len(lines) == 4
    run_dir = tmp_path / "runs" / "e" / "harpe"
    assert lines[1].endswith(f"megatron_harpe.convert.cli megatron-to-hf --load {run_dir} --out {run_dir / 'hf'} "
                             f"--no-progress --tokenizer tok.model")
    assert lines[2].endswith(f"megatron_harpe.evaluation.cli passkey --lengths 128,256 --samples 1 --device cpu "
                             f"--model {run_dir / 'hf'} --output {run_dir / 'eval' / 'passkey'} --name harpe "
                             f"--no-progress")
    assert f"cli ppl --data d.jsonl --lengths 64 --device cpu --model {run_dir / 'hf'}" in lines[3]
    data = json.loads((tmp_path / "sweeps" / "e" / "sweep.json").read_text())
    assert [e["command"] for e in data["eval"]] == ["passkey", "ppl"] and data["export_args"] == ["--tokenizer",
                                                                                                  "tok.model"]
