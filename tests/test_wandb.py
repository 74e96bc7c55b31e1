"""Weights & Biases logging (megatron_harpe/training/metrics/wandb.py) with the real wandb package, offline.

Offline runs write W&B's transaction log (``<run_dir>/wandb/offline-run-*/run-<id>.wandb``, protobuf records)
and nothing else leaves the machine. It is read back with W&B's own reader, ``wandb leet inspect --json``
(one JSON object per record: the run record with the config, history rows with their step, summary
updates, the exit record), so the tests check what an upload (``wandb sync``) would send.

One trainer launch pair (2 iterations, then resumed to 3) in this process proves the wiring and the resume
rule; the sink's finer points are tested on a MetricsLogger alone. Each read-back costs a wandb CLI start
(~1 s), so the files of a test are read in parallel.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import REPO_ROOT

# `make setup` installs wandb beside the venv, not in it (requirements/wandb-tests.txt says why): put it on
# the path of this process and of the wandb CLI processes the tests start.
WANDB_SITE = Path(sys.prefix) / "wandb-site"
if WANDB_SITE.is_dir() and str(WANDB_SITE) not in sys.path:
    # last on the path: what the venv has (yaml, packaging, protobuf...) keeps coming from the venv; this
    # process only, the suite's other subprocesses stay without wandb
    sys.path.append(str(WANDB_SITE))
if os.environ.get("CI") and importlib.util.find_spec("wandb") is None:
    pytest.fail("wandb not found: `make setup` installs it into .venv/wandb-site", pytrace=False)
wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install 'megatron-harpe[wandb]')")

TINY = str(REPO_ROOT / "examples" / "tiny" / "harpe.yaml")
OFFLINE = ["logging.wandb.project=harpe-test", "logging.wandb.mode=offline", "logging.wandb.tags=[ci]"]


def env_with_wandb() -> dict:
    """The environment for a subprocess that must find wandb where `make setup` put it."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), str(WANDB_SITE),
                                                                      os.environ.get("PYTHONPATH")])))


def read_runs(*files: Path) -> list[dict]:
    """Each .wandb file through ``wandb leet inspect --json``, in parallel: {"run", "config", "history"
    ({step: row}), "summary" (updates merged in order), "exit_code"}."""
    env = env_with_wandb()
    procs = [subprocess.Popen([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(f)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for f in files]
    runs = []
    for f, proc in zip(files, procs):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (f, err[-2000:])
        run = {"run": None, "config": {}, "history": {}, "summary": {}, "exit_code": None}
        for line in out.splitlines():
            record = json.loads(line)
            kind = record["type"]
            if kind == "run":
                run["run"] = record["run"]
                run["config"] = record["run"].get("config", {}).get("update", {})
            elif kind == "history":
                run["history"][int(record["history"]["step"]["num"])] = record["history"]["item"]
            elif kind == "summary":
                run["summary"].update(record["summary"].get("update", {}))
            elif kind == "exit":
                run["exit_code"] = record["exit"].get("exit_code", 0)
        runs.append(run)
    return runs


def run_train(capsys, *args):
    """harpe-train's main() in this process (launcher "single"): no torchrun, no second import of torch."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    capsys.readouterr()
    code = importlib.import_module("megatron_harpe.train").main(["--config", TINY, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def jsonl_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in records if "loss" in r}


def test_trainer_logs_every_line_and_a_resume_continues_the_same_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run_train(capsys, f"run_dir={run_dir}", "training.iterations=2", *OFFLINE)
    assert code == 0, err[-3000:]
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert f"W&B run {run_id} (harpe-test): offline in {run_dir / 'wandb'}" in out
    assert "wandb:" not in out + err  # W&B's own terminal output is off

    code, out, err = run_train(capsys, f"run_dir={run_dir}", "training.iterations=3",
                               "scheduler.replan_on_resume=true", *OFFLINE)
    assert code == 0, err[-3000:]
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id  # the same W&B run, resumed
    assert f"W&B run {run_id} (harpe-test)" in out

    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))  # one per launch, in start order
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2
    first, second = read_runs(*files)
    losses = jsonl_losses(run_dir)

    for launch in (first, second):
        assert launch["run"]["run_id"] == run_id and launch["run"]["project"] == "harpe-test"
        assert launch["run"]["display_name"] == "run"  # the run directory's name
        assert launch["exit_code"] == 0
        config = launch["config"]  # the whole resolved config, as config.yaml has it
        assert config["model"]["position"]["bases"] == [10000, 200000]
        assert config["logging"]["wandb"]["tags"] == ["ci"]
    assert first["config"]["training"]["iterations"] == 2 and second["config"]["training"]["iterations"] == 3

    assert sorted(first["history"]) == [1, 2] and sorted(second["history"]) == [3]
    history = {**first["history"], **second["history"]}
    for step, row in history.items():
        assert row["train/loss"] == pytest.approx(losses[step], rel=1e-12)
        for tag in ("train/lr", "train/grad_norm", "throughput/tokens_per_s", "throughput/tflops_per_device",
                    "memory/peak_memory_bytes", "time/seconds_per_iteration", "extra/stage"):
            assert tag in row, (tag, row)
    assert second["summary"]["last_event"].startswith("finished 3 iterations")
    assert second["summary"]["launch/first_iteration"] == 3 and second["summary"]["launch/iterations"] == 1
    assert second["summary"]["launch/summary_line"].startswith(f"loss {losses[3]:.4f} -> {losses[3]:.4f}")


def test_sink_numbers_only_nonfinite_kept_and_a_fresh_start_is_a_new_run(tmp_path):
    from megatron_harpe.config.schema import WandbConfig
    from megatron_harpe.training.metrics import MetricsLogger

    settings = WandbConfig(project="unit", mode="offline", name="named", group="g")
    kw = dict(is_logging_rank=True, total_iterations=None, tensorboard=False, progress_bar=False,
              wandb=settings, run_config={"a": {"b": 1}})
    with MetricsLogger(str(tmp_path), **kw) as logger:
        logger.log_event("hello")
        logger.log_iteration(1, loss=2.0, lr=1e-3, grad_norm=None, tokens=10, elapsed_s=0.5, flops=1e9,
                             world_size=1, extra={"stage": 1, "note": "text"})
        logger.log_iteration(2, loss=float("nan"), lr=1e-3, grad_norm=0.5, tokens=10, elapsed_s=0.5, flops=1e9,
                             world_size=1)
    first_id = (tmp_path / "wandb_run_id").read_text().strip()
    with MetricsLogger(str(tmp_path), **kw) as logger:  # start_iteration 0 again: a new history, a new run
        logger.log_iteration(1, loss=1.0, lr=1e-3, grad_norm=None, tokens=10, elapsed_s=0.5, flops=1e9,
                             world_size=1)
    assert (tmp_path / "wandb_run_id").read_text().strip() != first_id

    (run,) = read_runs(*tmp_path.glob(f"wandb/offline-run-*-{first_id}/run-{first_id}.wandb"))
    assert run["run"]["display_name"] == "named" and run["config"]["a"] == {"b": 1}
    assert run["history"][1]["train/loss"] == 2.0
    assert run["history"][1]["extra/stage"] == 1 and "extra/note" not in run["history"][1]  # numbers only
    assert "train/grad_norm" not in run["history"][1]  # no value, no point
    assert math.isnan(float(run["history"][2]["train/loss"]))  # a divergence stays visible
    assert run["summary"]["last_event"] == "hello"
    assert run["summary"]["launch/iterations"] == 2 and run["summary"]["launch/nonfinite_iterations"] == 1


def test_an_online_start_without_credentials_logs_offline_instead(tmp_path, monkeypatch):
    """Compute nodes often have no network or no W&B login: the run must not die of it."""
    from megatron_harpe.config.schema import WandbConfig
    from megatron_harpe.training.metrics.wandb import WandbWriter

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))  # where W&B looks for a stored key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: never the real server
    wandb.teardown()  # W&B reads its environment once per process: start from this one
    try:
        writer = WandbWriter.open(WandbConfig(project="unit"), run_dir=str(tmp_path), start_iteration=0,
                                  run_config={})
        assert writer is not None
        assert "the online start failed" in writer.note and "logs offline" in writer.note
        writer.write({"iteration": 1, "loss": 3.0}, {})
        writer.close()
    finally:
        wandb.teardown()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert list(tmp_path.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))


def test_wandb_on_without_the_package_is_refused_before_anything_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python marks a module as not importable
    code, out, err = run_train(capsys, f"run_dir={tmp_path / 'run'}", "logging.wandb.project=p")
    assert code == 2, err[-3000:]
    assert "logging.wandb.project='p' turns on Weights & Biases" in err
    assert "pip install 'megatron-harpe[wandb]'" in err and "logging.wandb.mode=disabled" in err
    assert not (tmp_path / "run").exists()
    code, out, err = run_train(capsys, f"run_dir={tmp_path / 'run'}", "logging.wandb.project=p",
                               "logging.wandb.mode=disabled", "--print-config")
    assert code == 0, err[-3000:]
    code, out, err = run_train(capsys, f"run_dir={tmp_path / 'run'}", "logging.wandb.mode=cloud")
    assert code == 2 and "logging.wandb.mode must be one of ('online', 'offline', 'disabled')" in err


def test_wandb_is_not_imported_when_off(tmp_path):
    code = ("import sys\n"
            "from megatron_harpe.config.schema import LoggingConfig\n"
            "from megatron_harpe.training.metrics import MetricsLogger\n"
            f"with MetricsLogger({str(tmp_path)!r}, is_logging_rank=True, total_iterations=1, tensorboard=False,\n"
            "                   progress_bar=False, wandb=LoggingConfig().wandb, run_config={}) as logger:\n"
            "    logger.log_iteration(1, loss=1.0, lr=1e-3, grad_norm=None, tokens=1, elapsed_s=1.0, flops=1.0,\n"
            "                         world_size=1)\n"
            "print('wandb' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code + "import wandb\n"], cwd=REPO_ROOT, env=env_with_wandb(),
                         capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "False"  # ... although it can be imported (the last line does)
    assert not (tmp_path / "wandb_run_id").exists() and not (tmp_path / "wandb").exists()
